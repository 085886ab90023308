//! BERT (all-MiniLM-L6-v2 and the BERT family): absolute position embeddings, token types, post-norm
//! layers with biases, exact erf-GELU; mean-pooled. The layers run on the shared engine
//! ([`kernels::layers`]); this file reads the config and the weights and embeds the tokens.

use serde_json::Value;

use super::kernels::attention::Rotary;
use super::kernels::layers::{Layer, Linear, Mlp, Stack};
use super::kernels::{self, LayerNorm, Precision};
use super::{check_batch, Encoder, ModelError, Sequence, Weights};

/// The hyper-parameters read from the model's config.json.
struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    intermediate: usize,
    max_positions: usize,
    vocab: usize,
    type_vocab: usize,
    eps: f64,
}

impl Config {
    fn parse(config: &Value) -> Result<Config, ModelError> {
        let int = |key: &str| super::config_usize(config, key);
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
            type_vocab: config["type_vocab_size"].as_u64().unwrap_or(2) as usize,
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

fn layer_norm(w: &Weights, prefix: &str, size: usize, eps: f64) -> Result<LayerNorm, ModelError> {
    Ok(LayerNorm {
        weight: w.get(&format!("{prefix}.weight"), &[size])?,
        bias: w.get(&format!("{prefix}.bias"), &[size])?,
        eps: eps as f32,
    })
}

/// `(weight [outputs, inputs], bias)` of one PyTorch `Linear`.
fn dense(
    w: &Weights,
    prefix: &str,
    inputs: usize,
    outputs: usize,
) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    Ok((
        w.get(&format!("{prefix}.weight"), &[outputs, inputs])?,
        w.get(&format!("{prefix}.bias"), &[outputs])?,
    ))
}

fn linear(
    w: &Weights,
    prefix: &str,
    inputs: usize,
    outputs: usize,
    precision: Precision,
) -> Result<Linear, ModelError> {
    let (weight, bias) = dense(w, prefix, inputs, outputs)?;
    Ok(Linear::new(&weight, Some(bias), inputs, outputs, precision))
}

fn load_layer(w: &Weights, prefix: &str, c: &Config, p: Precision) -> Result<Layer, ModelError> {
    let attention = format!("{prefix}.attention");
    // Query, key and value fused into one [3·hidden, hidden] weight at load.
    let mut weight = Vec::with_capacity(3 * c.hidden * c.hidden);
    let mut bias = Vec::with_capacity(3 * c.hidden);
    for name in ["query", "key", "value"] {
        let (w, b) = dense(w, &format!("{attention}.self.{name}"), c.hidden, c.hidden)?;
        weight.extend(w);
        bias.extend(b);
    }
    Ok(Layer {
        qkv: Linear::new(&weight, Some(bias), c.hidden, 3 * c.hidden, p),
        attention_out: linear(
            w,
            &format!("{attention}.output.dense"),
            c.hidden,
            c.hidden,
            p,
        )?,
        attention_norm: layer_norm(w, &format!("{attention}.output.LayerNorm"), c.hidden, c.eps)?,
        mlp: Mlp::Gelu(linear(
            w,
            &format!("{prefix}.intermediate.dense"),
            c.hidden,
            c.intermediate,
            p,
        )?),
        mlp_out: linear(
            w,
            &format!("{prefix}.output.dense"),
            c.intermediate,
            c.hidden,
            p,
        )?,
        mlp_norm: layer_norm(w, &format!("{prefix}.output.LayerNorm"), c.hidden, c.eps)?,
    })
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
}

impl Bert {
    pub fn load(config: &Value, weights: &[u8], precision: Precision) -> Result<Bert, ModelError> {
        let c = Config::parse(config)?;
        let w = Weights::new(weights)?;
        // Checkpoints saved from BertModel have no prefix; those saved from a task head prefix "bert.".
        let prefix = if w.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let layers = (0..c.layers)
            .map(|i| load_layer(&w, &format!("{prefix}encoder.layer.{i}"), &c, precision))
            .collect::<Result<Vec<_>, _>>()?;
        let embeddings = format!("{prefix}embeddings");
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
                &[c.type_vocab, c.hidden],
            )?,
            embedding_norm: layer_norm(&w, &format!("{embeddings}.LayerNorm"), c.hidden, c.eps)?,
            stack: Stack::new(c.hidden, c.heads, c.intermediate, layers, None::<Rotary>),
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
        check_batch(batch, c.max_positions, c.vocab, c.type_vocab)?;
        let lengths: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        Ok(self.stack.run(
            &lengths,
            &|i, rows| self.embed(&batch[i], rows),
            &|states, lengths| kernels::mean_rows(states, c.hidden, lengths),
        ))
    }
}
