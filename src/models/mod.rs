//! Models: the catalog, loading (from the embedded copy or a directory), tokenisation, the architectures and
//! pooling. The server reaches models only through [`Model`]; nothing here knows of HTTP.

mod bert;
pub mod byte_planes;
pub mod catalog;
mod config;
pub mod directory;
mod embedded;
pub mod kernels;
mod manifest;
mod nomic_bert;
mod pooling;
pub mod quantize;
mod tokenize;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use catalog::Architecture;
pub use catalog::{ModelSpec, Pooling, ScoreActivation, Task, CATALOG};
use config::ModelConfig;
use kernels::LayerNorm;
pub use kernels::Precision;
use quantize::{Calibrated, Calibration};
use tokenize::TextTokenizer;
pub use tokenize::{TokenSpan, TruncationDirection};

/// What went wrong, and whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input cannot be embedded (e.g. a token id outside the vocabulary); the caller should say so.
    InvalidInput,
    /// The model's files are missing or do not fit together.
    Load,
    /// A failure inside the engine.
    Internal,
}

#[derive(Debug, Clone)]
pub struct ModelError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ModelError {
    pub fn new(message: impl Into<String>) -> ModelError {
        ModelError {
            kind: ErrorKind::Load,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ModelError {
        ModelError {
            kind: ErrorKind::InvalidInput,
            message: message.into(),
        }
    }

    pub fn internal(error: impl fmt::Display) -> ModelError {
        ModelError {
            kind: ErrorKind::Internal,
            message: error.to_string(),
        }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ModelError {}

/// One input as a client sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    /// Token ids fed to the model exactly as given (special tokens included if the client wants them).
    Ids(Vec<u32>),
}

/// An input ready for the encoder.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// At most the model's maximum, special tokens included.
    pub ids: Vec<u32>,
    /// For a pair of texts, each token's segment (0 for `[CLS] query [SEP]`, 1 for `document [SEP]`);
    /// `None` for a single text, all segment 0.
    pub token_types: Option<Vec<u32>>,
    /// How many tokens the input had before truncation.
    pub untruncated: usize,
}

impl Tokens {
    /// The input as the encoder takes it.
    pub fn sequence(&self) -> Sequence<'_> {
        Sequence {
            ids: &self.ids,
            token_types: self.token_types.as_deref(),
        }
    }
}

/// One input of a batch as the encoder sees it: token ids, and for a pair of texts (a cross-encoder's
/// query and document) the segment of each token; without them every token is segment 0.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub token_types: Option<&'a [u32]>,
}

impl<'a> Sequence<'a> {
    /// A single text's ids, all in segment 0.
    pub fn single(ids: &'a [u32]) -> Sequence<'a> {
        Sequence {
            ids,
            token_types: None,
        }
    }

    /// The segment of token `i`.
    pub fn token_type(&self, i: usize) -> u32 {
        self.token_types.map_or(0, |t| t[i])
    }
}

/// An architecture: token ids in, one pooled (not yet normalised) vector per sequence out; for a
/// cross-encoder, its logits.
pub trait Encoder: Send + Sync {
    /// The longest sequence the weights can position.
    fn max_positions(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The arithmetic of the dense layers, chosen at load.
    fn precision(&self) -> Precision;
    /// Pooled final states (a cross-encoder: logits), in the order of `batch`. Sequences may differ in
    /// length.
    fn encode(&self, batch: &[Sequence]) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// Refuses a batch the weights cannot run: an empty sequence, one longer than the positions, an id
/// outside the vocabulary, token types of another length or outside `0..type_vocab`.
fn check_batch(
    batch: &[Sequence],
    max_positions: usize,
    vocab: usize,
    type_vocab: usize,
) -> Result<(), ModelError> {
    for sequence in batch {
        let len = sequence.ids.len();
        if len == 0 || len > max_positions {
            return Err(ModelError::invalid(format!(
                "a sequence of {len} tokens cannot be encoded (1..={max_positions} tokens)"
            )));
        }
        if let Some(bad) = sequence.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::invalid(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        if let Some(types) = sequence.token_types {
            if types.len() != len {
                return Err(ModelError::invalid(format!(
                    "{} token types for {len} tokens",
                    types.len()
                )));
            }
            if let Some(bad) = types.iter().find(|&&t| t as usize >= type_vocab) {
                return Err(ModelError::invalid(format!(
                    "token type {bad} is outside the model's {type_vocab} segments"
                )));
            }
        }
    }
    Ok(())
}

/// Reads the tensors of a safetensors file as f32 (whatever their stored dtype: f32, f16 or bf16 are
/// widened here), with errors that name the tensor and what the config expected.
struct Weights<'a> {
    vb: candle_nn::VarBuilder<'a>,
}

impl<'a> Weights<'a> {
    fn new(bytes: &'a [u8]) -> Result<Weights<'a>, ModelError> {
        let vb = candle_nn::VarBuilder::from_slice_safetensors(
            bytes,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .map_err(|e| ModelError::new(format!("model.safetensors cannot be read: {e}")))?;
        Ok(Weights { vb })
    }

    fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// A layer norm's `weight` and `bias` under `prefix`.
    fn layer_norm(&self, prefix: &str, size: usize, eps: f64) -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm {
            weight: self.get(&format!("{prefix}.weight"), &[size])?,
            bias: self.get(&format!("{prefix}.bias"), &[size])?,
            eps: eps as f32,
        })
    }

    /// A PyTorch `Linear` under `prefix`: its `weight` [outputs, inputs] and, if it has one, its `bias`.
    fn linear(
        &self,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), ModelError> {
        let weight = self.get(&format!("{prefix}.weight"), &[outputs, inputs])?;
        let bias = match bias {
            true => Some(self.get(&format!("{prefix}.bias"), &[outputs])?),
            false => None,
        };
        Ok((weight, bias))
    }

    /// [`Weights::linear`] packed for `precision`.
    fn packed_linear(
        &self,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
        precision: Precision,
    ) -> Result<kernels::layers::Linear, ModelError> {
        let (weight, bias) = self.linear(prefix, inputs, outputs, bias)?;
        Ok(kernels::layers::Linear::new(
            &weight, bias, inputs, outputs, precision,
        ))
    }

    /// The tensor `name` of `shape`, flattened row-major.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let read = || -> candle_core::Result<Vec<f32>> {
            self.vb.get(shape, name)?.flatten_all()?.to_vec1::<f32>()
        };
        read().map_err(|e| {
            ModelError::new(format!(
                "model.safetensors does not fit config.json: {name} {shape:?}: {e}"
            ))
        })
    }
}

/// Where a model's files come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The copy compiled into this binary.
    Embedded,
    /// `DIR/<model name>/<file>`, the layout `export-models` writes.
    Dir(PathBuf),
}

impl Source {
    /// The verified bytes of one file of `spec`.
    pub fn read(&self, spec: &ModelSpec, file: &str) -> Result<Vec<u8>, ModelError> {
        let bytes = match self {
            Source::Embedded => embedded::read(spec, file)?,
            Source::Dir(_) => {
                let path = self.model_dir(spec).join(file);
                std::fs::read(&path)
                    .map_err(|e| ModelError::new(format!("cannot read {}: {e}", path.display())))?
            }
        };
        let pinned = spec.pin(file);
        if !pinned.is_empty() {
            let actual = sha256_hex(&bytes);
            if actual != pinned {
                return Err(ModelError::new(format!(
                    "{}/{file} has sha256 {actual}, but the catalog pins {pinned}: these are not the files of {}",
                    spec.name,
                    spec.revision()
                )));
            }
        }
        Ok(bytes)
    }

    /// Whether this source has the files of `spec` at all.
    pub fn has(&self, spec: &ModelSpec) -> bool {
        match self {
            Source::Embedded => spec.embedded,
            Source::Dir(_) => self.model_dir(spec).join("config.json").is_file(),
        }
    }

    /// `DIR/<model>` for a directory source; the empty path for the embedded copy.
    pub fn model_dir(&self, spec: &ModelSpec) -> PathBuf {
        match self {
            Source::Embedded => PathBuf::new(),
            Source::Dir(dir) => dir.join(&spec.name),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The compressed size of the files of `spec` inside this binary.
pub fn embedded_size(spec: &ModelSpec) -> u64 {
    embedded::compressed_size(spec)
}

/// A loaded model: tokenizer, weights and the catalog's promises.
pub struct Model {
    pub spec: ModelSpec,
    /// Where its files were read from.
    pub source: Source,
    tokenizer: TextTokenizer,
    encoder: Box<dyn Encoder>,
    max_tokens: usize,
    /// The width of the vectors these weights give: the catalog's `dims`, or less for smaller weights of the
    /// same architecture loaded from a directory (such as a test fixture).
    dims: usize,
    /// The int8/uint8 ranges, computed at first use.
    calibration: Calibration,
}

impl Model {
    /// Loads `spec` from `source` in f32, the exact default.
    pub fn load(spec: &ModelSpec, source: &Source) -> Result<Model, ModelError> {
        Model::load_in(spec, source, Precision::F32)
    }

    /// Loads `spec` from `source` with its dense layers in `precision`; fails if this CPU cannot run it.
    pub fn load_in(
        spec: &ModelSpec,
        source: &Source,
        precision: Precision,
    ) -> Result<Model, ModelError> {
        precision.check_cpu().map_err(ModelError::new)?;
        let config = ModelConfig::parse(&source.read(spec, "config.json")?)
            .map_err(|e| ModelError::new(format!("{}: {e}", spec.name)))?;
        if config.architecture != spec.architecture {
            return Err(ModelError::new(format!(
                "{}/config.json describes a {} model, but the catalog says {}",
                spec.name,
                config.architecture.model_type(),
                spec.architecture.model_type()
            )));
        }
        let tokenizer = TextTokenizer::from_bytes(&source.read(spec, "tokenizer.json")?)?;
        let weights = source.read(spec, "model.safetensors")?;
        let width = config.width()?;
        let labels = match spec.task {
            Task::Embed => None,
            Task::Rerank => {
                let labels = config.labels();
                if labels.len() != 1 {
                    return Err(ModelError::new(format!(
                        "{}/config.json: a classifier with {} labels ({}); a reranker gives one relevance score \
                         per pair, so this server serves one-label cross-encoders only (sentence-transformers' \
                         CrossEncoder.rank requires num_labels=1 too)",
                        spec.name,
                        labels.len(),
                        labels.join(", ")
                    )));
                }
                Some(1)
            }
        };
        let encoder: Box<dyn Encoder> = match spec.architecture {
            Architecture::Bert => Box::new(bert::Bert::load(
                &config,
                &weights,
                spec.pooling,
                labels,
                precision,
            )?),
            Architecture::NomicBert => Box::new(nomic_bert::NomicBert::load(
                &config,
                &weights,
                spec.pooling,
                precision,
            )?),
        };
        if width != spec.dims {
            eprintln!(
                "warning: {} has width {width}, not the catalog's {}: these are not its released weights",
                spec.name, spec.dims
            );
        }
        // Caught here, an id past the embedding table would otherwise be a 400 blaming the client's text.
        if tokenizer.vocab_size() > encoder.vocab_size() {
            return Err(ModelError::new(format!(
                "{}: tokenizer.json has {} tokens but the model's embedding table only {}: they do not belong together",
                spec.name,
                tokenizer.vocab_size(),
                encoder.vocab_size()
            )));
        }
        let max_tokens = spec.max_tokens.min(encoder.max_positions());
        Ok(Model {
            spec: spec.clone(),
            source: source.clone(),
            tokenizer,
            encoder,
            max_tokens,
            dims: width.min(spec.dims),
            calibration: Calibration::default(),
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The arithmetic of the dense layers this model was loaded with.
    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }

    /// The width of a full embedding.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The `dimensions` a request may ask for: the catalog's, up to the width of the loaded weights.
    pub fn allowed_dims(&self) -> Vec<usize> {
        let allowed: Vec<usize> = self
            .spec
            .allowed_dims()
            .into_iter()
            .filter(|&d| d <= self.dims)
            .collect();
        if allowed.is_empty() {
            vec![self.dims]
        } else {
            allowed
        }
    }

    /// Tokenises one input, with `prefix` (a task prompt, or "") in front of a text, and cuts it to the
    /// model's maximum from the end or the start, keeping its special tokens either way (the tokens
    /// sentence-transformers keeps with `truncation_side` right or left). Ids must be framed as the model's
    /// tokenizer frames a text, and are cut the same way.
    pub fn tokenize(
        &self,
        input: &Input,
        prefix: &str,
        direction: TruncationDirection,
    ) -> Result<Tokens, ModelError> {
        self.tokenize_within(input, prefix, direction, self.max_tokens)
    }

    /// [`Model::tokenize`], cutting at `limit` tokens (a request's own bound, such as Cohere's
    /// `max_tokens`) where that is below the model's maximum.
    pub fn tokenize_within(
        &self,
        input: &Input,
        prefix: &str,
        direction: TruncationDirection,
        limit: usize,
    ) -> Result<Tokens, ModelError> {
        let limit = limit.min(self.max_tokens);
        let mut ids = match input {
            Input::Text(text) if prefix.is_empty() => self.tokenizer.encode(text)?,
            Input::Text(text) => self.tokenizer.encode(&format!("{prefix}{text}"))?,
            Input::Ids(ids) => {
                // Ids from another tokenizer (LangChain's OpenAIEmbeddings sends tiktoken's by default) are
                // numbers this model reads as other words: refused, rather than embedded into nonsense.
                if let Err(framing) = self.tokenizer.check_framing(ids) {
                    return Err(ModelError::invalid(format!(
                        "these token ids are not {}'s: ids from its tokenizer {framing}. Send the text \
                         instead (LangChain's OpenAIEmbeddings sends OpenAI's token ids unless created with \
                         check_embedding_ctx_length=False)",
                        self.spec.name
                    )));
                }
                let vocab = self.encoder.vocab_size();
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ModelError::invalid(format!(
                        "token id {bad} is outside the vocabulary of {} (0..{vocab})",
                        self.spec.name
                    )));
                }
                ids.clone()
            }
        };
        let untruncated = ids.len();
        // Ids are framed like a text's (checked above), so they are cut like one: the framing stays.
        self.tokenizer.truncate(&mut ids, limit, direction);
        Ok(Tokens {
            ids,
            token_types: None,
            untruncated,
        })
    }

    /// A reranker's inputs: `query` (after the model's default prompt, which sentence-transformers puts in
    /// front of a pair's first text) with each document, as `[CLS] query [SEP] document [SEP]` with token
    /// types, cut `longest_first` to the model's maximum.
    pub fn tokenize_pairs(
        &self,
        query: &str,
        documents: &[&str],
    ) -> Result<Vec<Tokens>, ModelError> {
        let prompt = self.spec.default_prompt();
        let query = if prompt.is_empty() {
            self.tokenizer.encode_plain(query)?
        } else {
            self.tokenizer.encode_plain(&format!("{prompt}{query}"))?
        };
        documents
            .iter()
            .map(|document| {
                let pair = self
                    .tokenizer
                    .encode_pair(&query, document, self.max_tokens)?;
                Ok(Tokens {
                    ids: pair.ids,
                    token_types: Some(pair.token_types),
                    untruncated: pair.untruncated,
                })
            })
            .collect()
    }

    /// Every token of `prefix` + `text`, untruncated, with byte offsets into that string; the special tokens
    /// only if `add_special_tokens`.
    pub fn token_spans(
        &self,
        text: &str,
        prefix: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenSpan>, ModelError> {
        if prefix.is_empty() {
            self.tokenizer.spans(text, add_special_tokens)
        } else {
            self.tokenizer
                .spans(&format!("{prefix}{text}"), add_special_tokens)
        }
    }

    /// The text of token ids; an id outside the vocabulary is an [`ErrorKind::InvalidInput`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.tokenizer.decode(ids, skip_special_tokens)
    }

    /// The int8/uint8 ranges of every width a request can get (see [`Model::allowed_dims`]), from the
    /// calibration sentences through this model's engine as a request that names no prompt has them embedded
    /// (the default prompt, if the model has one; cut at the end). Computed on the first call, in fixed
    /// batches so that they are the same on every run; a concurrent first call waits for that one.
    pub fn quantization_ranges(&self) -> Result<Arc<Calibrated>, ModelError> {
        let mut dims = self.allowed_dims();
        if !dims.contains(&self.dims) {
            // Weights narrower than the catalog's widths (a test fixture) are served at their own width.
            dims.push(self.dims);
        }
        let mut computed = false;
        let calibrated = self.calibration.get_or_compute(&dims, |sentences| {
            computed = true;
            let tokens = sentences
                .iter()
                .map(|s| {
                    let input = Input::Text(s.to_string());
                    self.tokenize(
                        &input,
                        self.spec.default_prompt(),
                        TruncationDirection::Right,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let batch: Vec<&[u32]> = tokens.iter().map(|t| t.ids.as_slice()).collect();
            Ok(self
                .encode(&batch)?
                .into_iter()
                .map(|pooled| {
                    dims.iter()
                        .map(|&d| self.finish(pooled.clone(), d))
                        .collect()
                })
                .collect())
        })?;
        if computed {
            eprintln!(
                "calibrated the int8/uint8 ranges of {} on {} sentences in {:.2} s",
                self.spec.name, calibrated.sentences, calibrated.seconds
            );
        }
        Ok(calibrated)
    }

    /// Pooled vectors of full width for a batch of tokenised single texts; `finish` turns each into an
    /// embedding.
    pub fn encode(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let sequences: Vec<Sequence> = batch.iter().map(|ids| Sequence::single(ids)).collect();
        self.encode_sequences(&sequences)
    }

    /// [`Model::encode`] for inputs that may carry token types (pairs of texts); a reranker's logits.
    pub fn encode_sequences(&self, batch: &[Sequence]) -> Result<Vec<Vec<f32>>, ModelError> {
        let pooled = self.encoder.encode(batch)?;
        if pooled.iter().flatten().any(|x| !x.is_finite()) {
            return Err(ModelError::internal(
                "the encoder produced a non-finite value",
            ));
        }
        Ok(pooled)
    }

    /// The embedding of width `dims` (one of [`Model::allowed_dims`]) from a pooled vector.
    pub fn finish(&self, pooled: Vec<f32>, dims: usize) -> Vec<f32> {
        pooling::finish(&self.spec, pooled, dims)
    }

    /// A reranker's score from its logits (one label): the model's activation of the logit.
    pub fn score(&self, logits: &[f32]) -> f32 {
        pooling::score(self.spec.activation, logits)
    }

    /// Tokenise, encode and score `query` against each document in one call: `(score, logit)` per
    /// document, in order, what sentence-transformers' `CrossEncoder.predict` gives (with and without its
    /// activation).
    pub fn rerank(&self, query: &str, documents: &[&str]) -> Result<Vec<(f32, f32)>, ModelError> {
        if self.spec.task != Task::Rerank {
            return Err(ModelError::invalid(format!(
                "{} is an embedding model, not a reranker: it gives vectors, not scores of pairs",
                self.spec.name
            )));
        }
        let tokens = self.tokenize_pairs(query, documents)?;
        let batch: Vec<Sequence> = tokens.iter().map(Tokens::sequence).collect();
        let logits = self.encode_sequences(&batch)?;
        Ok(logits
            .iter()
            .map(|l| (self.score(l), l.first().copied().unwrap_or(0.0)))
            .collect())
    }

    /// [`Model::finish`] without the final L2 normalisation (for a model that has one): the v1.5 layer
    /// norm and the cut to `dims` still apply.
    pub fn finish_unnormalized(&self, pooled: Vec<f32>, dims: usize) -> Vec<f32> {
        pooling::finish_unnormalized(&self.spec, pooled, dims)
    }

    /// Tokenise (with the model's default prompt, if it has one), encode and finish in one call, at full
    /// width: what sentence-transformers' `encode` gives.
    pub fn embed(&self, inputs: &[Input]) -> Result<Vec<Vec<f32>>, ModelError> {
        if self.spec.task == Task::Rerank {
            return Err(ModelError::invalid(format!(
                "{} is a reranker (a cross-encoder): it scores (query, document) pairs (`/v1/rerank`) and \
                 gives no embeddings",
                self.spec.name
            )));
        }
        let tokens = inputs
            .iter()
            .map(|input| {
                self.tokenize(
                    input,
                    self.spec.default_prompt(),
                    TruncationDirection::Right,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch: Vec<&[u32]> = tokens.iter().map(|t| t.ids.as_slice()).collect();
        let pooled = self.encode(&batch)?;
        Ok(pooled
            .into_iter()
            .map(|p| self.finish(p, self.dims))
            .collect())
    }
}

/// Writes every file of `spec` from `source` to `dir/<name>/`, verified, and the sentence-transformers files
/// that describe it (where sentence-transformers can express its recipe); returns the paths written.
pub fn export(spec: &ModelSpec, source: &Source, dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let target = dir.join(&spec.name);
    let mut written = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<(), ModelError> {
        let path = target.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| ModelError::new(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(&path, bytes)
            .map_err(|e| ModelError::new(format!("cannot write {}: {e}", path.display())))?;
        written.push(path);
        Ok(())
    };
    for file in &spec.files {
        write(&file.name, &source.read(spec, &file.name)?)?;
    }
    for (name, text) in directory::sentence_transformers_files(spec).unwrap_or_default() {
        write(&name, text.as_bytes())?;
    }
    Ok(written)
}
