//! BERT (all-MiniLM-L6-v2, bge, e5, gte, …): absolute position embeddings, token types, post-norm layers,
//! the GELU config.json names (erf or tanh form), any size, pooled as the model says; and BERT cross-encoders
//! (`BertForSequenceClassification`), whose [CLS] state goes through the pooler and the classifier.
//!
//! The batch runs unpadded: every dense layer works on the packed `[total tokens, hidden]` matrix of all
//! sequences, attention runs per sequence, and the sequences are split between the cores by cost so that
//! each core runs its share through all layers without waiting for the other.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::catalog::Pooling;
use super::config::{self, ModelConfig};
use super::kernels::{self, Activation, Attention, LayerNorm, Linear, Threads};
use super::{check_batch, pooling, Encoder, ModelError, Sequence};

/// The hyper-parameters read from the model's config.json.
struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    max_positions: usize,
    vocab: usize,
    /// Rows of the token-type table (segments: a pair's second text is type 1).
    token_types: usize,
    eps: f64,
    activation: Activation,
}

impl Config {
    fn parse(model: &ModelConfig) -> Result<Config, ModelError> {
        let int = |key: &str| model.usize(key);
        let json = model.json();
        let activation = match &json["hidden_act"] {
            Value::Null => Activation::Gelu,
            Value::String(act) => match act.as_str() {
                // transformers' "gelu": the exact erf form.
                "gelu" => Activation::Gelu,
                // "gelu_new" (written out with tanh) and "gelu_pytorch_tanh" (PyTorch's
                // approximate="tanh") compute the same tanh approximation.
                "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
                other => {
                    return Err(ModelError::new(format!(
                        "config.json: BERT hidden_act {other:?} is not supported (gelu, gelu_new and \
                         gelu_pytorch_tanh are)"
                    )))
                }
            },
            other => {
                return Err(ModelError::new(format!(
                    "config.json: hidden_act {other} is not supported (gelu, gelu_new and gelu_pytorch_tanh are)"
                )))
            }
        };
        match json["position_embedding_type"].as_str() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(ModelError::new(format!(
                    "config.json: position_embedding_type {other:?} is not supported (only \"absolute\")"
                )))
            }
        }
        let config = Config {
            hidden: int("hidden_size")?,
            heads: int("num_attention_heads")?,
            layers: int("num_hidden_layers")?,
            intermediate: int("intermediate_size")?,
            max_positions: int("max_position_embeddings")?,
            vocab: int("vocab_size")?,
            token_types: match json["type_vocab_size"] {
                Value::Null => 2,
                _ => int("type_vocab_size")?,
            },
            eps: config::f64_or(json, "layer_norm_eps", 1e-12)?,
            activation,
        };
        if config.token_types == 0 {
            return Err(ModelError::new(
                "config.json: type_vocab_size must be at least 1",
            ));
        }
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(ModelError::new(
                "config.json: hidden_size must be a multiple of num_attention_heads",
            ));
        }
        Ok(config)
    }
}

fn to_vec(tensor: Tensor) -> candle_core::Result<Vec<f32>> {
    tensor.flatten_all()?.to_vec1::<f32>()
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        weight: to_vec(vb.get(size, "weight")?)?,
        bias: to_vec(vb.get(size, "bias")?)?,
        eps: eps as f32,
    })
}

/// `(weight [outputs, inputs], bias)` of one PyTorch `Linear`.
fn dense(
    vb: VarBuilder,
    inputs: usize,
    outputs: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        to_vec(vb.get((outputs, inputs), "weight")?)?,
        to_vec(vb.get(outputs, "bias")?)?,
    ))
}

fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    let (weight, bias) = dense(vb, inputs, outputs)?;
    Ok(Linear::new(&weight, bias, inputs, outputs))
}

/// `BertForSequenceClassification`'s head: the pooler (dense and tanh over the [CLS] state) and the
/// classifier (dense, to one logit per label). Dropout does nothing at inference.
struct Classifier {
    pooler: Linear,
    classifier: Linear,
}

impl Classifier {
    /// The logits of each [CLS] state of `cls`.
    fn forward(&self, cls: &[Vec<f32>], threads: Threads) -> Vec<Vec<f32>> {
        let rows = cls.len();
        let states: Vec<f32> = cls.concat();
        let mut pooled = vec![0f32; rows * self.pooler.outputs()];
        self.pooler.forward(&states, &mut pooled, rows, threads);
        for x in &mut pooled {
            *x = kernels::tanh(*x);
        }
        let labels = self.classifier.outputs();
        let mut logits = vec![0f32; rows * labels];
        self.classifier.forward(&pooled, &mut logits, rows, threads);
        logits
            .chunks_exact(labels.max(1))
            .map(<[f32]>::to_vec)
            .collect()
    }
}

struct Layer {
    /// Query, key and value projections fused into one [3·hidden, hidden] matrix at load.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Layer> {
        let attention = vb.pp("attention");
        let mut weight = Vec::with_capacity(3 * c.hidden * c.hidden);
        let mut bias = Vec::with_capacity(3 * c.hidden);
        for name in ["query", "key", "value"] {
            let (w, b) = dense(attention.pp("self").pp(name), c.hidden, c.hidden)?;
            weight.extend(w);
            bias.extend(b);
        }
        Ok(Layer {
            qkv: Linear::new(&weight, bias, c.hidden, 3 * c.hidden),
            attention_out: linear(attention.pp("output").pp("dense"), c.hidden, c.hidden)?,
            attention_norm: layer_norm(attention.pp("output").pp("LayerNorm"), c.hidden, c.eps)?,
            intermediate: linear(vb.pp("intermediate").pp("dense"), c.hidden, c.intermediate)?,
            output: linear(vb.pp("output").pp("dense"), c.intermediate, c.hidden)?,
            output_norm: layer_norm(vb.pp("output").pp("LayerNorm"), c.hidden, c.eps)?,
        })
    }
}

/// The working memory of one core's share of a batch. Kept between batches (see `Bert::scratch`), so that
/// a batch neither allocates nor page-faults its buffers in; they only ever grow.
#[derive(Default)]
struct Scratch {
    states: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    inner: Vec<f32>,
    scores: Vec<f32>,
}

/// A scratch bigger than this (a batch of several thousand tokens) is freed after use rather than kept.
const KEEP_SCRATCH_BYTES: usize = 64 << 20;

fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

impl Scratch {
    fn buffers(&mut self, tokens: usize, longest: usize, c: &Config) -> Buffers<'_> {
        Buffers {
            states: grown(&mut self.states, tokens * c.hidden),
            qkv: grown(&mut self.qkv, tokens * 3 * c.hidden),
            context: grown(&mut self.context, tokens * c.hidden),
            inner: grown(&mut self.inner, tokens * c.intermediate),
            scores: grown(&mut self.scores, Attention::scores_len(longest)),
        }
    }

    fn bytes(&self) -> usize {
        let floats = self.states.capacity()
            + self.qkv.capacity()
            + self.context.capacity()
            + self.inner.capacity()
            + self.scores.capacity();
        floats * std::mem::size_of::<f32>()
    }
}

/// One batch's views of a scratch.
struct Buffers<'a> {
    /// [tokens, hidden]: the hidden states, updated in place layer after layer.
    states: &'a mut [f32],
    /// [tokens, 3·hidden]
    qkv: &'a mut [f32],
    /// [tokens, hidden]
    context: &'a mut [f32],
    /// [tokens, intermediate]
    inner: &'a mut [f32],
    /// One head's attention scores for one block of queries.
    scores: &'a mut [f32],
}

pub struct Bert {
    config: Config,
    /// [vocab, hidden]
    word_embeddings: Vec<f32>,
    /// [max_positions, hidden]
    position_embeddings: Vec<f32>,
    /// [token_types, hidden]
    token_type_embeddings: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    pooling: Pooling,
    /// A cross-encoder's head: then `encode` gives its logits, not the pooled state.
    classifier: Option<Classifier>,
    /// Scratches of earlier batches, one per core that ran a share.
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

impl Bert {
    /// `weights` may hold f32, f16 or bf16 tensors (widened to f32 here), with or without the `bert.` prefix.
    /// With `labels`, the model is a cross-encoder with that many labels: its `bert.pooler` and `classifier`
    /// are loaded too, and `encode` gives the logits of the [CLS] state.
    pub fn load(
        config: &ModelConfig,
        weights: &[u8],
        pooling: Pooling,
        labels: Option<usize>,
    ) -> Result<Bert, ModelError> {
        let c = Config::parse(config)?;
        let vb = VarBuilder::from_slice_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| ModelError::new(format!("model.safetensors cannot be read: {e}")))?;
        // Checkpoints saved from BertModel have no prefix; those saved from a task head prefix "bert." (and
        // keep the head, `classifier.*`, at the top).
        let root = vb.clone();
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let load = || -> candle_core::Result<Bert> {
            let embeddings = vb.pp("embeddings");
            let layers = (0..c.layers)
                .map(|i| Layer::load(vb.pp("encoder").pp("layer").pp(i), &c))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Bert {
                word_embeddings: to_vec(
                    embeddings.get((c.vocab, c.hidden), "word_embeddings.weight")?,
                )?,
                position_embeddings: to_vec(
                    embeddings.get((c.max_positions, c.hidden), "position_embeddings.weight")?,
                )?,
                token_type_embeddings: to_vec(
                    embeddings.get((c.token_types, c.hidden), "token_type_embeddings.weight")?,
                )?,
                embedding_norm: layer_norm(embeddings.pp("LayerNorm"), c.hidden, c.eps)?,
                layers,
                pooling,
                classifier: labels
                    .map(|labels| {
                        Ok::<_, candle_core::Error>(Classifier {
                            pooler: linear(vb.pp("pooler").pp("dense"), c.hidden, c.hidden)?,
                            classifier: linear(root.pp("classifier"), c.hidden, labels)?,
                        })
                    })
                    .transpose()?,
                config: c,
                scratch: std::sync::Mutex::new(Vec::new()),
            })
        };
        load().map_err(|e| {
            ModelError::new(format!("model.safetensors does not fit config.json: {e}"))
        })
    }

    /// Relative cost of one sequence: the dense layers grow with its length, attention with its square.
    fn cost(&self, len: usize) -> f64 {
        let c = &self.config;
        let dense = c.hidden * (4 * c.hidden + 2 * c.intermediate);
        (len * dense + 2 * len * len * c.hidden) as f64
    }

    /// Runs `sequences` through the network on the calling thread (its GEMMs using `threads`); returns
    /// their pooled final states (a cross-encoder: their logits).
    fn forward(&self, sequences: &[Sequence], threads: Threads) -> Vec<Vec<f32>> {
        let c = &self.config;
        let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
        let tokens: usize = lengths.iter().sum();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut scratch = self.take_scratch();
        let pooled = self.forward_in(
            sequences,
            &lengths,
            scratch.buffers(tokens, longest, c),
            threads,
        );
        self.give_back(scratch);
        pooled
    }

    fn take_scratch(&self) -> Scratch {
        let mut pool = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        pool.pop().unwrap_or_default()
    }

    fn give_back(&self, scratch: Scratch) {
        if scratch.bytes() <= KEEP_SCRATCH_BYTES {
            let mut pool = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
            pool.push(scratch);
        }
    }

    fn forward_in(
        &self,
        sequences: &[Sequence],
        lengths: &[usize],
        mut buffers: Buffers,
        threads: Threads,
    ) -> Vec<Vec<f32>> {
        let c = &self.config;
        let hidden = c.hidden;
        let mut rows = buffers.states.chunks_exact_mut(hidden);
        for sequence in sequences {
            for (position, &id) in sequence.ids.iter().enumerate() {
                let row = rows.next().expect("one row per token");
                let word = &self.word_embeddings[id as usize * hidden..][..hidden];
                let place = &self.position_embeddings[position * hidden..][..hidden];
                let segment = sequence.token_type(position) as usize;
                let segment = &self.token_type_embeddings[segment * hidden..][..hidden];
                for (((x, w), p), t) in row.iter_mut().zip(word).zip(place).zip(segment) {
                    *x = w + p + t;
                }
            }
        }
        self.embedding_norm.forward(buffers.states);

        let attention = Attention {
            hidden,
            heads: c.heads,
        };
        for layer in &self.layers {
            self.layer(layer, &attention, lengths, &mut buffers, threads);
        }
        let pooled = pooling::pool(buffers.states, hidden, lengths, self.pooling);
        match &self.classifier {
            Some(classifier) => classifier.forward(&pooled, threads),
            None => pooled,
        }
    }

    fn layer(
        &self,
        layer: &Layer,
        attention: &Attention,
        lengths: &[usize],
        s: &mut Buffers,
        threads: Threads,
    ) {
        let hidden = self.config.hidden;
        let tokens = s.states.len() / hidden;
        layer.qkv.forward(s.states, s.qkv, tokens, threads);
        let mut start = 0;
        for &len in lengths {
            attention.forward(
                &s.qkv[start * 3 * hidden..(start + len) * 3 * hidden],
                len,
                &mut s.context[start * hidden..(start + len) * hidden],
                s.scores,
                threads,
            );
            start += len;
        }
        layer
            .attention_out
            .forward_residual(s.context, s.states, tokens, threads);
        layer.attention_norm.forward(s.states);
        layer.intermediate.forward_activation(
            s.states,
            s.inner,
            tokens,
            self.config.activation,
            threads,
        );
        layer
            .output
            .forward_residual(s.inner, s.states, tokens, threads);
        layer.output_norm.forward(s.states);
    }
}

impl Encoder for Bert {
    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn encode(&self, batch: &[Sequence]) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        check_batch(batch, c.max_positions, c.vocab, c.token_types)?;
        let cores = candle_core::utils::get_num_threads().max(1);
        let costs: Vec<f64> = batch.iter().map(|s| self.cost(s.ids.len())).collect();
        let total: f64 = costs.iter().sum();
        let groups = kernels::balance(&costs, cores);
        let heaviest = groups
            .iter()
            .map(|g| g.iter().map(|&i| costs[i]).sum::<f64>())
            .fold(0f64, f64::max);
        // Independent shares need no synchronisation, so they beat splitting every GEMM across the cores,
        // unless one sequence dominates the batch (a single input, one long among short ones).
        if groups.len() < 2 || heaviest > total * 1.2 / groups.len() as f64 {
            return Ok(self.forward(batch, Threads::Pool(cores)));
        }
        let shares: Vec<Vec<Sequence>> = groups
            .iter()
            .map(|g| g.iter().map(|&i| batch[i]).collect())
            .collect();
        let pooled: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let (first, rest) = shares.split_first().expect("at least two shares");
            let handles: Vec<_> = rest
                .iter()
                .map(|share| scope.spawn(move || self.forward(share, Threads::One)))
                .collect();
            let mut pooled = vec![self.forward(first, Threads::One)];
            for handle in handles {
                pooled.push(
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            pooled
        });
        let mut results = vec![Vec::new(); batch.len()];
        for (group, vectors) in groups.iter().zip(pooled) {
            for (&i, vector) in group.iter().zip(vectors) {
                results[i] = vector;
            }
        }
        Ok(results)
    }
}
