//! BERT (all-MiniLM-L6-v2, bge, e5, gte, …): absolute position embeddings, token types, post-norm layers
//! with biases, the GELU config.json names (erf or tanh form), any size, pooled as the model says; and BERT
//! cross-encoders (`BertForSequenceClassification`), whose [CLS] state goes through the pooler and the
//! classifier. The layers run on the shared engine ([`kernels::layers`]); this file reads the config and
//! the weights, embeds the tokens and applies the classification head.

use serde_json::Value;

use super::catalog::Pooling;
use super::config::{self, ModelConfig};
use super::kernels::gemm::Dense;
use super::kernels::layers::{Layer, Linear, Mlp, Stack};
use super::kernels::{self, Activation, LayerNorm, Precision};
use super::{check_batch, pooling, Encoder, ModelError, Sequence, Weights};

/// The hyper-parameters read from the model's config.json.
struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    max_positions: usize,
    vocab: usize,
    /// Rows of the token-type table (segments: 0 for a single text, 0 and 1 for a pair).
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

fn load_layer(w: &Weights, prefix: &str, c: &Config, p: Precision) -> Result<Layer, ModelError> {
    let attention = format!("{prefix}.attention");
    // Query, key and value fused into one [3·hidden, hidden] weight at load.
    let mut weight = Vec::with_capacity(3 * c.hidden * c.hidden);
    let mut bias = Vec::with_capacity(3 * c.hidden);
    for name in ["query", "key", "value"] {
        let (w, b) = w.linear(
            &format!("{attention}.self.{name}"),
            c.hidden,
            c.hidden,
            true,
        )?;
        weight.extend(w);
        bias.extend(b.unwrap_or_default());
    }
    Ok(Layer {
        qkv: Linear::new(
            &weight,
            Some(bias),
            c.hidden,
            3 * c.hidden,
            p.of(Dense::Qkv),
        ),
        attention_out: w.packed_linear(
            &format!("{attention}.output.dense"),
            c.hidden,
            c.hidden,
            true,
            p.of(Dense::AttentionOut),
        )?,
        attention_norm: w.layer_norm(&format!("{attention}.output.LayerNorm"), c.hidden, c.eps)?,
        mlp: Mlp::Activation(
            w.packed_linear(
                &format!("{prefix}.intermediate.dense"),
                c.hidden,
                c.intermediate,
                true,
                p.of(Dense::MlpIn),
            )?,
            c.activation,
        ),
        mlp_out: w.packed_linear(
            &format!("{prefix}.output.dense"),
            c.intermediate,
            c.hidden,
            true,
            p.of(Dense::MlpOut),
        )?,
        mlp_norm: w.layer_norm(&format!("{prefix}.output.LayerNorm"), c.hidden, c.eps)?,
    })
}

/// `BertForSequenceClassification`'s head: the pooler (dense and tanh over the [CLS] state) and the
/// classifier (dense, to one logit per label). Dropout does nothing at inference. Both stay f32 whatever
/// the precision: a handful of rows per batch, so they cost nothing next to the layers.
struct Classifier {
    pooler: Linear,
    classifier: Linear,
}

impl Classifier {
    /// The logits of each pooled [CLS] state of `cls`.
    fn forward(&self, cls: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let states: Vec<f32> = cls.concat();
        let mut pooled = self.pooler.forward(&states, cls.len());
        for x in &mut pooled {
            *x = kernels::tanh(*x);
        }
        let labels = self.classifier.weight.outputs();
        self.classifier
            .forward(&pooled, cls.len())
            .chunks_exact(labels.max(1))
            .map(<[f32]>::to_vec)
            .collect()
    }
}

pub struct Bert {
    config: Config,
    /// [vocab, hidden]
    word_embeddings: Vec<f32>,
    /// [max_positions, hidden]
    position_embeddings: Vec<f32>,
    /// [type_vocab, hidden]
    token_type_embeddings: Vec<f32>,
    embedding_norm: LayerNorm,
    stack: Stack,
    pooling: Pooling,
    /// A cross-encoder's head: then `encode` gives its logits, not the pooled state.
    classifier: Option<Classifier>,
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
        precision: Precision,
    ) -> Result<Bert, ModelError> {
        let c = Config::parse(config)?;
        let w = Weights::new(weights)?;
        // Checkpoints saved from BertModel have no prefix; those saved from a task head prefix "bert." (and
        // keep the head, `classifier.*`, at the top).
        let prefix = if w.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let layers = (0..c.layers)
            .map(|i| load_layer(&w, &format!("{prefix}encoder.layer.{i}"), &c, precision))
            .collect::<Result<Vec<_>, _>>()?;
        let embeddings = format!("{prefix}embeddings");
        let classifier = match labels {
            None => None,
            Some(labels) => Some(Classifier {
                pooler: w.packed_linear(
                    &format!("{prefix}pooler.dense"),
                    c.hidden,
                    c.hidden,
                    true,
                    Precision::F32,
                )?,
                classifier: w.packed_linear(
                    "classifier",
                    c.hidden,
                    labels,
                    true,
                    Precision::F32,
                )?,
            }),
        };
        Ok(Bert {
            word_embeddings: w.get(
                &format!("{embeddings}.word_embeddings.weight"),
                &[c.vocab, c.hidden],
            )?,
            position_embeddings: w.get(
                &format!("{embeddings}.position_embeddings.weight"),
                &[c.max_positions, c.hidden],
            )?,
            token_type_embeddings: w.get(
                &format!("{embeddings}.token_type_embeddings.weight"),
                &[c.token_types, c.hidden],
            )?,
            embedding_norm: w.layer_norm(&format!("{embeddings}.LayerNorm"), c.hidden, c.eps)?,
            stack: Stack::new(c.hidden, c.heads, c.intermediate, layers, None, precision),
            pooling,
            classifier,
            config: c,
        })
    }

    /// Word, position and token type embeddings of one sequence, summed and normalised into `rows`.
    fn embed(&self, sequence: &Sequence, rows: &mut [f32]) {
        let hidden = self.config.hidden;
        for (position, (row, &id)) in rows.chunks_exact_mut(hidden).zip(sequence.ids).enumerate() {
            let word = &self.word_embeddings[id as usize * hidden..][..hidden];
            let place = &self.position_embeddings[position * hidden..][..hidden];
            let segment = sequence.token_type(position) as usize;
            let segment = &self.token_type_embeddings[segment * hidden..][..hidden];
            for (((x, w), p), t) in row.iter_mut().zip(word).zip(place).zip(segment) {
                *x = w + p + t;
            }
        }
        self.embedding_norm.forward(rows);
    }
}

impl Encoder for Bert {
    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn precision(&self) -> Precision {
        self.stack.precision()
    }

    fn encode(&self, batch: &[Sequence]) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        check_batch(batch, c.max_positions, c.vocab, c.token_types)?;
        let lengths: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        Ok(self.stack.run(
            &lengths,
            &|i, rows| self.embed(&batch[i], rows),
            &|states, lengths| {
                let pooled = pooling::pool(states, c.hidden, lengths, self.pooling);
                match &self.classifier {
                    Some(classifier) => classifier.forward(&pooled),
                    None => pooled,
                }
            },
        ))
    }
}
