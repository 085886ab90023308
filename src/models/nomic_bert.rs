//! NomicBERT (nomic-embed-text-v1 and v1.5): rotary attention (GPT-NeoX half-split), SwiGLU MLP, post-norm
//! layers, no position embeddings, no biases on the projections; pooled as the model says. The layers run on
//! the shared engine ([`kernels::layers`]): the fused qkv projection, rotary applied in place to its
//! queries and keys, the blocked attention, the fused SwiGLU epilogue; this file reads the config and the
//! weights and embeds the tokens.

use serde_json::Value;

use super::catalog::Pooling;
use super::config::ModelConfig;
use super::kernels::attention::Rotary;
use super::kernels::gemm::{Dense, Packed};
use super::kernels::layers::{Layer, Mlp, Stack};
use super::kernels::{LayerNorm, Precision};
use super::{check_batch, pooling, Encoder, ModelError, Sequence, Weights};

/// The hyper-parameters read from config.json, with every setting this implementation does not cover
/// refused at load rather than silently computed differently.
struct Config {
    hidden: usize,
    heads: usize,
    layers: usize,
    /// Rows of fc11/fc12: nomic's gated MLP rounds `n_inner` up to a multiple of 256.
    inner: usize,
    max_positions: usize,
    /// `vocab_size` padded to `pad_vocab_size_multiple`, as the embedding table is.
    vocab: usize,
    type_vocab: usize,
    eps: f64,
    rotary_base: f64,
}

impl Config {
    fn parse(config: &Value) -> Result<Config, ModelError> {
        let int = |key: &str| super::config::usize_of(config, key);
        let unsupported = |key: &str, found: &Value, supported: &str| {
            ModelError::new(format!(
                "config.json: NomicBERT with {key} = {found} is not supported (only {supported})"
            ))
        };
        let require = |key: &str, ok: fn(&Value) -> bool, supported: &str| {
            let found = &config[key];
            if ok(found) {
                Ok(())
            } else {
                Err(unsupported(key, found, supported))
            }
        };
        require(
            "activation_function",
            |v| v.is_null() || v == "swiglu",
            "\"swiglu\"",
        )?;
        require("prenorm", |v| v.is_null() || v == false, "false")?;
        require(
            "rotary_emb_fraction",
            |v| v.is_null() || v.as_f64() == Some(1.0),
            "1.0",
        )?;
        require(
            "rotary_emb_interleaved",
            |v| v.is_null() || v == false,
            "false",
        )?;
        // Dynamic NTK scaling would change sequences past max_trained_positions; the released configs have null.
        require("rotary_scaling_factor", Value::is_null, "null")?;
        require("rotary_emb_scale_base", Value::is_null, "null")?;
        for key in ["qkv_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias"] {
            require(key, |v| v.is_null() || v == false, "false")?;
        }
        require("use_rms_norm", |v| v.is_null() || v == false, "false")?;

        let hidden = int("n_embd")?;
        let heads = int("n_head")?;
        if heads == 0 || hidden % heads != 0 || (hidden / heads) % 2 != 0 {
            return Err(ModelError::new(
                "config.json: n_embd must be a multiple of n_head with an even head size",
            ));
        }
        let inner = match config["n_inner"].as_u64() {
            Some(n) => n as usize,
            None => 4 * hidden,
        };
        let vocab_size = int("vocab_size")?;
        let multiple = config["pad_vocab_size_multiple"]
            .as_u64()
            .unwrap_or(1)
            .max(1) as usize;
        Ok(Config {
            hidden,
            heads,
            layers: int("n_layer")?,
            inner: inner.div_ceil(256) * 256,
            max_positions: int("n_positions")?,
            vocab: vocab_size.div_ceil(multiple) * multiple,
            type_vocab: config["type_vocab_size"].as_u64().unwrap_or(2) as usize,
            eps: config["layer_norm_epsilon"].as_f64().unwrap_or(1e-12),
            rotary_base: config["rotary_emb_base"].as_f64().unwrap_or(10_000.0),
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

fn load_layer(w: &Weights, prefix: &str, c: &Config, p: Precision) -> Result<Layer, ModelError> {
    let (value, gate) = (
        w.get(&format!("{prefix}.mlp.fc11.weight"), &[c.inner, c.hidden])?,
        w.get(&format!("{prefix}.mlp.fc12.weight"), &[c.inner, c.hidden])?,
    );
    Ok(Layer {
        qkv: w.packed_linear(
            &format!("{prefix}.attn.Wqkv"),
            c.hidden,
            3 * c.hidden,
            false,
            p.of(Dense::Qkv),
        )?,
        attention_out: w.packed_linear(
            &format!("{prefix}.attn.out_proj"),
            c.hidden,
            c.hidden,
            false,
            p.of(Dense::AttentionOut),
        )?,
        attention_norm: w.layer_norm(&format!("{prefix}.norm1"), c.hidden, c.eps)?,
        mlp: Mlp::SwiGlu(Packed::swiglu(
            &value,
            &gate,
            c.hidden,
            c.inner,
            p.of(Dense::MlpIn),
        )),
        mlp_out: w.packed_linear(
            &format!("{prefix}.mlp.fc2"),
            c.inner,
            c.hidden,
            false,
            p.of(Dense::MlpOut),
        )?,
        mlp_norm: w.layer_norm(&format!("{prefix}.norm2"), c.hidden, c.eps)?,
    })
}

pub struct NomicBert {
    config: Config,
    /// [vocab, hidden]
    word_embeddings: Vec<f32>,
    /// [type_vocab, hidden]
    token_type_embeddings: Vec<f32>,
    embedding_norm: LayerNorm,
    stack: Stack,
    pooling: Pooling,
}

impl NomicBert {
    pub fn load(
        config: &ModelConfig,
        weights: &[u8],
        pooling: Pooling,
        precision: Precision,
    ) -> Result<NomicBert, ModelError> {
        let c = Config::parse(config.json())?;
        let w = Weights::new(weights)?;
        let layers = (0..c.layers)
            .map(|i| load_layer(&w, &format!("encoder.layers.{i}"), &c, precision))
            .collect::<Result<Vec<_>, _>>()?;
        let rotary = Rotary::new(c.head_dim(), c.max_positions, c.rotary_base);
        Ok(NomicBert {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[c.vocab, c.hidden])?,
            token_type_embeddings: w.get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab, c.hidden],
            )?,
            embedding_norm: w.layer_norm("emb_ln", c.hidden, c.eps)?,
            stack: Stack::new(c.hidden, c.heads, c.inner, layers, Some(rotary), precision),
            pooling,
            config: c,
        })
    }

    /// Word and token type embeddings of one sequence, summed and normalised into `rows`.
    fn embed(&self, sequence: &Sequence, rows: &mut [f32]) {
        let hidden = self.config.hidden;
        for (i, (row, &id)) in rows.chunks_exact_mut(hidden).zip(sequence.ids).enumerate() {
            let word = &self.word_embeddings[id as usize * hidden..][..hidden];
            let segment = sequence.token_type(i) as usize;
            let segment = &self.token_type_embeddings[segment * hidden..][..hidden];
            for ((x, w), t) in row.iter_mut().zip(word).zip(segment) {
                *x = w + t;
            }
        }
        self.embedding_norm.forward(rows);
    }
}

impl Encoder for NomicBert {
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
            &|states, lengths| pooling::pool(states, c.hidden, lengths, self.pooling),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_config() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/reference/nomic-tiny/config.json"
        );
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("the shared nomic-tiny fixture is missing: {path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn reads_the_fixture_config() {
        let c = Config::parse(&fixture_config()).unwrap();
        assert_eq!((c.hidden, c.heads, c.layers, c.inner), (64, 4, 2, 256));
        assert_eq!((c.max_positions, c.vocab, c.type_vocab), (8192, 30528, 2));
        assert_eq!((c.eps, c.rotary_base), (1e-12, 1000.0));
    }

    #[test]
    fn rounds_n_inner_up_and_pads_the_vocabulary_as_nomic_does() {
        let mut config = fixture_config();
        config["n_inner"] = 200.into();
        config["vocab_size"] = 30522.into();
        let c = Config::parse(&config).unwrap();
        assert_eq!((c.inner, c.vocab), (256, 30528));
    }

    #[test]
    fn refuses_settings_it_would_compute_differently() {
        let refused: [(&str, Value); 8] = [
            ("activation_function", "gelu".into()),
            ("prenorm", true.into()),
            ("rotary_emb_fraction", 0.5.into()),
            ("rotary_emb_interleaved", true.into()),
            ("rotary_scaling_factor", 2.0.into()),
            ("qkv_proj_bias", true.into()),
            ("mlp_fc1_bias", true.into()),
            ("use_rms_norm", true.into()),
        ];
        for (key, value) in refused {
            let mut config = fixture_config();
            config[key] = value;
            let error = Config::parse(&config).err().map(|e| e.message);
            assert!(
                error.as_deref().is_some_and(|m| m.contains(key)),
                "{key}: {error:?}"
            );
        }
    }
}
