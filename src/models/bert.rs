//! BERT (all-MiniLM-L6-v2): absolute position embeddings, post-norm layers, exact erf-GELU.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{ops, Linear, VarBuilder};
use serde_json::Value;

use super::pooling;
use super::{Encoder, ModelError};

/// The hyper-parameters read from the model's config.json.
struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    max_positions: usize,
    vocab: usize,
    eps: f64,
}

impl Config {
    fn parse(config: &Value) -> Result<Config, ModelError> {
        let int = |key: &str| {
            config[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::new(format!("config.json lacks the integer \"{key}\"")))
        };
        let act = config["hidden_act"].as_str().unwrap_or("gelu");
        if act != "gelu" {
            return Err(ModelError::new(format!(
                "unsupported BERT hidden_act {act:?} (only the exact \"gelu\")"
            )));
        }
        let config = Config {
            hidden: int("hidden_size")?,
            heads: int("num_attention_heads")?,
            layers: int("num_hidden_layers")?,
            intermediate: int("intermediate_size")?,
            max_positions: int("max_position_embeddings")?,
            vocab: int("vocab_size")?,
            eps: config["layer_norm_eps"].as_f64().unwrap_or(1e-12),
        };
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(ModelError::new(
                "config.json: hidden_size must be a multiple of num_attention_heads",
            ));
        }
        Ok(config)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
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

fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(
        vb.get((outputs, inputs), "weight")?,
        Some(vb.get(outputs, "bias")?),
    ))
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Layer> {
        let attention = vb.pp("attention");
        let projections = ["query", "key", "value"]
            .map(|name| linear(attention.pp("self").pp(name), c.hidden, c.hidden));
        let [q, k, v] = projections;
        let (q, k, v) = (q?, k?, v?);
        let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
        let bias = Tensor::cat(
            &[q.bias().unwrap(), k.bias().unwrap(), v.bias().unwrap()],
            0,
        )?;
        Ok(Layer {
            qkv: Linear::new(weight, Some(bias)),
            attention_out: linear(attention.pp("output").pp("dense"), c.hidden, c.hidden)?,
            attention_norm: LayerNorm::load(
                attention.pp("output").pp("LayerNorm"),
                c.hidden,
                c.eps,
            )?,
            intermediate: linear(vb.pp("intermediate").pp("dense"), c.hidden, c.intermediate)?,
            output: linear(vb.pp("output").pp("dense"), c.intermediate, c.hidden)?,
            output_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), c.hidden, c.eps)?,
        })
    }

    /// `xs`: [batch, seq, hidden]; `mask`: additive [batch, 1, 1, seq].
    fn forward(&self, xs: &Tensor, mask: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (batch, seq, hidden) = xs.dims3()?;
        let head_dim = hidden / heads;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((batch, seq, 3, heads, head_dim))?;
        let split = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        let xs = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + xs)?)?;
        let inner = self.intermediate.forward(&xs)?.gelu_erf()?;
        self.output_norm
            .forward(&(self.output.forward(&inner)? + xs)?)
    }
}

pub struct Bert {
    config: Config,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embedding: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn load(config: &Value, weights: &[u8]) -> Result<Bert, ModelError> {
        let c = Config::parse(config)?;
        let vb = VarBuilder::from_slice_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| ModelError::new(format!("model.safetensors cannot be read: {e}")))?;
        // Checkpoints saved from BertModel have no prefix; those saved from a task head prefix "bert.".
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
                word_embeddings: embeddings.get((c.vocab, c.hidden), "word_embeddings.weight")?,
                position_embeddings: embeddings
                    .get((c.max_positions, c.hidden), "position_embeddings.weight")?,
                token_type_embedding: embeddings
                    .get((2, c.hidden), "token_type_embeddings.weight")?
                    .get(0)?,
                embedding_norm: LayerNorm::load(embeddings.pp("LayerNorm"), c.hidden, c.eps)?,
                layers,
                config: c,
            })
        };
        load().map_err(|e| {
            ModelError::new(format!("model.safetensors does not fit config.json: {e}"))
        })
    }

    /// Runs one padded batch of sequences of similar length; returns the mean-pooled states.
    fn forward_padded(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let seq = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let mut mask = Vec::with_capacity(batch.len() * seq);
        for sequence in batch {
            ids.extend_from_slice(sequence);
            ids.resize(ids.len() + seq - sequence.len(), 0);
            mask.extend(std::iter::repeat_n(1f32, sequence.len()));
            mask.resize(mask.len() + seq - sequence.len(), 0.0);
        }
        let device = Device::Cpu;
        let ids = Tensor::from_vec(ids, (batch.len() * seq,), &device)?;
        let mask = Tensor::from_vec(mask, (batch.len(), seq), &device)?;
        let words = self.word_embeddings.index_select(&ids, 0)?.reshape((
            batch.len(),
            seq,
            self.config.hidden,
        ))?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?;
        let embedded = words
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type_embedding)?;
        let mut xs = self.embedding_norm.forward(&embedded)?;
        // Padded keys get -inf-like logits so that they weigh nothing, as the reference does.
        let additive = ((mask.ones_like()? - &mask)? * -1e30f64)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &additive, self.config.heads)?;
        }
        let states = xs.to_vec3::<f32>()?;
        Ok(batch
            .iter()
            .zip(states)
            .map(|(sequence, rows)| pooling::mean(&rows[..sequence.len()]))
            .collect())
    }
}

impl Encoder for Bert {
    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn encode(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        pooling::in_length_groups(batch, |group| {
            self.forward_padded(group).map_err(ModelError::internal)
        })
    }
}
