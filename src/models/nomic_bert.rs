//! NomicBERT (nomic-embed-text-v1 and v1.5): rotary attention (GPT-NeoX half-split), SwiGLU MLP, post-norm
//! layers, no position embeddings, no biases on the projections; mean-pooled like BERT.
//!
//! Sequences of a batch are laid end to end without padding: the projections and the MLP run once over all
//! tokens of the batch, attention runs per sequence over blocks of queries, so an 8192-token input never
//! materialises its [heads, L, L] score matrix and a padded batch gives the vectors of single inputs.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{ops, rotary_emb, Linear, VarBuilder};
use serde_json::Value;

use super::catalog::Pooling;
use super::config::ModelConfig;
use super::pooling;
use super::{check_batch, Encoder, ModelError, Sequence};

/// Most elements of one block of attention scores (heads × queries × keys): 2 Mi f32 is 8 MiB, so the
/// few temporaries of a block stay around 25 MiB however long the sequence, and the allocator reuses them
/// instead of mapping fresh pages for each block (larger blocks cost more system time, no less user time).
const SCORE_BLOCK_ELEMENTS: usize = 2 << 20;
/// Most tokens run through the layers at once; bounds the activations of a large batch of long inputs.
const TOKENS_PER_PASS: usize = 16_384;
/// Most tokens through the MLP at once: its four [tokens, inner] temporaries are 96 MiB at 768 wide.
const MLP_ROWS: usize = 2048;

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

fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((outputs, inputs), "weight")?, None))
}

/// The rotary angles' cosines and sines, [max_positions, head_dim / 2], computed as nomic's code does:
/// f32 inverse frequencies and f32 angles `position × inv_freq`, so that the rounding of long positions
/// matches the reference.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(c: &Config) -> candle_core::Result<Rotary> {
        let dim = c.head_dim();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / c.rotary_base.powf(i as f64 / dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(c.max_positions * inv_freq.len());
        let mut sin = Vec::with_capacity(c.max_positions * inv_freq.len());
        for position in 0..c.max_positions {
            for &f in &inv_freq {
                let angle = f64::from(position as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (c.max_positions, dim / 2);
        Ok(Rotary {
            cos: Tensor::from_vec(cos, shape, &Device::Cpu)?,
            sin: Tensor::from_vec(sin, shape, &Device::Cpu)?,
        })
    }

    /// `xs`: [heads, len, head_dim], contiguous.
    fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let len = xs.dim(1)?;
        let rotated = rotary_emb::rope(
            &xs.unsqueeze(0)?,
            &self.cos.narrow(0, 0, len)?,
            &self.sin.narrow(0, 0, len)?,
        )?;
        rotated.squeeze(0)
    }
}

struct Layer {
    /// Rows are [q; k; v], each with its heads contiguous.
    qkv: Linear,
    out_proj: Linear,
    norm1: LayerNorm,
    /// The value branch of the gated MLP.
    fc11: Linear,
    /// The gate branch, through SiLU.
    fc12: Linear,
    fc2: Linear,
    norm2: LayerNorm,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Layer> {
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Layer {
            qkv: linear(attn.pp("Wqkv"), c.hidden, 3 * c.hidden)?,
            out_proj: linear(attn.pp("out_proj"), c.hidden, c.hidden)?,
            norm1: LayerNorm::load(vb.pp("norm1"), c.hidden, c.eps)?,
            fc11: linear(mlp.pp("fc11"), c.hidden, c.inner)?,
            fc12: linear(mlp.pp("fc12"), c.hidden, c.inner)?,
            fc2: linear(mlp.pp("fc2"), c.inner, c.hidden)?,
            norm2: LayerNorm::load(vb.pp("norm2"), c.hidden, c.eps)?,
        })
    }

    /// `xs`: [tokens, hidden], the sequences of `spans` (start, length) end to end.
    fn forward(
        &self,
        xs: &Tensor,
        spans: &[(usize, usize)],
        c: &Config,
        rotary: &Rotary,
    ) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        let contexts = spans
            .iter()
            .map(|&(start, len)| attend(&qkv.narrow(0, start, len)?, c, rotary))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let context = Tensor::cat(&contexts, 0)?;
        let xs = self
            .norm1
            .forward(&(self.out_proj.forward(&context)? + xs)?)?;
        let tokens = xs.dim(0)?;
        let chunks = (0..tokens)
            .step_by(MLP_ROWS)
            .map(|first| self.mlp(&xs.narrow(0, first, MLP_ROWS.min(tokens - first))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.norm2.forward(&(Tensor::cat(&chunks, 0)? + xs)?)
    }

    /// SwiGLU: `fc2(fc11(x) * silu(fc12(x)))`.
    fn mlp(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gated = (self.fc11.forward(xs)? * self.fc12.forward(xs)?.silu()?)?;
        self.fc2.forward(&gated)
    }
}

/// Self-attention of one sequence: `qkv` [len, 3·hidden] in, context [len, hidden] out. A short sequence
/// takes all heads in one product; a long one goes head by head, in blocks of queries small enough that
/// a block's scores stay under [`SCORE_BLOCK_ELEMENTS`]. Head by head, each block is as tall as the budget
/// allows, so the keys are packed for the matrix product once per block rather than once per head and block.
fn attend(qkv: &Tensor, c: &Config, rotary: &Rotary) -> candle_core::Result<Tensor> {
    let len = qkv.dim(0)?;
    let head_dim = c.head_dim();
    let qkv = qkv.reshape((len, 3, c.heads, head_dim))?;
    let part = |i: usize| {
        qkv.narrow(1, i, 1)?
            .squeeze(1)?
            .transpose(0, 1)?
            .contiguous()
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = (rotary.apply(&part(0)?)? * scale)?;
    let k = rotary.apply(&part(1)?)?;
    let v = part(2)?;
    let weighted =
        |q: &Tensor, k: &Tensor, v: &Tensor| ops::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v);
    if c.heads * len * len <= SCORE_BLOCK_ELEMENTS {
        return weighted(&q, &k, &v)?
            .transpose(0, 1)?
            .reshape((len, c.hidden));
    }
    let block = (SCORE_BLOCK_ELEMENTS / len).clamp(1, len);
    let mut heads = Vec::with_capacity(c.heads);
    for head in 0..c.heads {
        let (q, k, v) = (q.get(head)?, k.get(head)?, v.get(head)?);
        let blocks = (0..len)
            .step_by(block)
            .map(|first| weighted(&q.narrow(0, first, block.min(len - first))?, &k, &v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        heads.push(Tensor::cat(&blocks, 0)?);
    }
    Tensor::cat(&heads, 1)
}

pub struct NomicBert {
    config: Config,
    word_embeddings: Tensor,
    token_type_embedding: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    rotary: Rotary,
    pooling: Pooling,
}

impl NomicBert {
    pub fn load(
        config: &ModelConfig,
        weights: &[u8],
        pooling: Pooling,
    ) -> Result<NomicBert, ModelError> {
        let c = Config::parse(config.json())?;
        let vb = VarBuilder::from_slice_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| ModelError::new(format!("model.safetensors cannot be read: {e}")))?;
        let load = || -> candle_core::Result<NomicBert> {
            let embeddings = vb.pp("embeddings");
            let layers = (0..c.layers)
                .map(|i| Layer::load(vb.pp("encoder").pp("layers").pp(i), &c))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(NomicBert {
                word_embeddings: embeddings.get((c.vocab, c.hidden), "word_embeddings.weight")?,
                // Every input is one segment, so only row 0 of the token-type table is ever added.
                token_type_embedding: embeddings
                    .get((c.type_vocab, c.hidden), "token_type_embeddings.weight")?
                    .get(0)?,
                embedding_norm: LayerNorm::load(vb.pp("emb_ln"), c.hidden, c.eps)?,
                layers,
                rotary: Rotary::new(&c)?,
                pooling,
                config: c,
            })
        };
        load().map_err(|e| {
            ModelError::new(format!("model.safetensors does not fit config.json: {e}"))
        })
    }

    /// Runs sequences laid end to end; returns their pooled final states.
    fn forward(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        for sequence in batch {
            spans.push((ids.len(), sequence.len()));
            ids.extend_from_slice(sequence);
        }
        let ids = Tensor::from_vec(
            ids,
            (spans.iter().map(|s| s.1).sum::<usize>(),),
            &Device::Cpu,
        )?;
        let embedded = self
            .word_embeddings
            .index_select(&ids, 0)?
            .broadcast_add(&self.token_type_embedding)?;
        let mut xs = self.embedding_norm.forward(&embedded)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &spans, &self.config, &self.rotary)?;
        }
        let states = xs.flatten_all()?.to_vec1::<f32>()?;
        let lengths: Vec<usize> = spans.iter().map(|&(_, len)| len).collect();
        Ok(pooling::pool(
            &states,
            self.config.hidden,
            &lengths,
            self.pooling,
        ))
    }
}

impl Encoder for NomicBert {
    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn encode(&self, batch: &[Sequence]) -> Result<Vec<Vec<f32>>, ModelError> {
        // Only row 0 of the token-type table is loaded: one segment per input.
        check_batch(batch, self.config.max_positions, self.config.vocab, 1)?;
        let batch: Vec<&[u32]> = batch.iter().map(|s| s.ids).collect();
        let mut pooled = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            // A pass takes sequences while they fit the token budget, and always at least one.
            let mut end = start + 1;
            let mut tokens = batch[start].len();
            while end < batch.len() && tokens + batch[end].len() <= TOKENS_PER_PASS {
                tokens += batch[end].len();
                end += 1;
            }
            pooled.extend(
                self.forward(&batch[start..end])
                    .map_err(ModelError::internal)?,
            );
            start = end;
        }
        Ok(pooled)
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

    #[test]
    fn rotary_angles_are_f32_products_like_the_reference() {
        let c = Config::parse(&fixture_config()).unwrap();
        let rotary = Rotary::new(&c).unwrap();
        let cos = rotary.cos.to_vec2::<f32>().unwrap();
        let sin = rotary.sin.to_vec2::<f32>().unwrap();
        // inv_freq[0] is 1, so column 0 holds cos and sin of the position itself.
        assert_eq!(cos[1500][0], (1500f64).cos() as f32);
        assert_eq!(sin[1500][0], (1500f64).sin() as f32);
        // The last frequency is 1000^(-14/16).
        let f = (1.0 / 1000f64.powf(14.0 / 16.0)) as f32;
        assert_eq!(cos[700][7], f64::from(700f32 * f).cos() as f32);
    }
}
