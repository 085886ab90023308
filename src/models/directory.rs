//! Model directories: what `--model-dir DIR --model NAME` finds in `DIR/NAME/`, read as
//! sentence-transformers reads it, and the sentence-transformers files `export-models` writes.
//!
//! A directory named after a model of the catalog holds that model's files (checked against its pins) and
//! the catalog entry applies. Any other directory describes itself:
//! - `modules.json`: Transformer → Pooling → optional Normalize, in the classic layout
//!   (`sentence_transformers.models.*`) or the one sentence-transformers ≥ 5 writes
//!   (`sentence_transformers.base.modules.*`, `sentence_transformers.sentence_transformer.modules.*`);
//! - the Pooling module's `config.json`: `pooling_mode` (newer) or the `pooling_mode_*` booleans (classic);
//! - the maximum length: `sentence_bert_config.json` `max_seq_length`, else `tokenizer_config.json`
//!   `model_max_length`, else the position count (never `tokenizer.json`'s own truncation);
//! - `config_sentence_transformers.json`: `prompts` and `default_prompt_name`;
//! - `config.json`: the architecture and its size (`config.rs`).
//!
//! A plain transformers directory (no `modules.json`) pools as `--pooling` says and is not normalised, as
//! sentence-transformers builds such a model (Transformer → Pooling, nothing after).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use super::catalog::{self, Architecture, ModelSpec, Pooling, ScoreActivation, Task};
use super::config::ModelConfig;
use super::ModelError;

/// The spec of `dir/name/`: the catalog's for a published catalog model (one with a hub copy), else what
/// the directory's files say. A catalog model with no public copy (a `local-only` test fixture) is only a
/// compiled-in copy of such a directory: a directory of that name is read like any other, so that adding a
/// fixture to the catalog does not change what loading its directory tests. `pooling` is the `--pooling`
/// flag, needed only by a directory without `modules.json`.
pub fn spec(dir: &Path, name: &str, pooling: Option<Pooling>) -> Result<ModelSpec, ModelError> {
    if let Some(spec) = catalog::find(name).filter(|spec| spec.hub.is_some()) {
        return Ok(spec.clone());
    }
    let files = Files(dir.join(name));
    let config = ModelConfig::parse(&files.read("config.json")?)?;
    for (file, instead, how) in [
        (
            "tokenizer.json",
            "vocab.txt",
            "save it with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)",
        ),
        (
            "model.safetensors",
            "pytorch_model.bin",
            "convert the weights: AutoModel.from_pretrained(DIR).save_pretrained(DIR)",
        ),
    ] {
        if !files.path(file).is_file() {
            let found = if files.path(instead).is_file() {
                format!(" (it has {instead}, which this server does not read; {how})")
            } else {
                String::new()
            };
            return Err(ModelError::new(format!(
                "{} lacks {file}{found}",
                files.0.display()
            )));
        }
    }
    let width = config.width()?;
    let positions = config.positions()?;

    let modules = files.json_if_present("modules.json")?;
    let reranker = is_cross_encoder(&files, modules.as_ref(), &config)?;
    let (pooling, normalize) = match (&modules, reranker) {
        // BertForSequenceClassification reads the [CLS] state (through its pooler).
        (_, true) => (Pooling::Cls, false),
        (Some(modules), false) => read_modules(&files, modules, width)?,
        (None, false) => match pooling {
            Some(pooling) => (pooling, false),
            None => {
                return Err(ModelError::new(format!(
                    "{} has no modules.json, so it is a plain transformers model and does not say how to \
                     pool its token states: give --pooling {} (or EMBEDDING_SERVER_POOLING)",
                    files.0.display(),
                    Pooling::ALL.map(Pooling::name).join("|")
                )))
            }
        },
    };

    let st_config = files
        .json_if_present("config_sentence_transformers.json")?
        .map(|v| files.typed::<StConfig>("config_sentence_transformers.json", v))
        .transpose()?
        .unwrap_or_default();
    let prompts: Vec<(String, String)> = st_config.prompts.into_iter().collect();
    if let Some(default) = &st_config.default_prompt_name {
        if !prompts.iter().any(|(task, _)| task == default) {
            return Err(ModelError::new(format!(
                "{}: default_prompt_name {default:?} is not one of its prompts",
                files.path("config_sentence_transformers.json").display()
            )));
        }
    }

    let bert_config = files
        .json_if_present("sentence_bert_config.json")?
        .map(|v| files.typed::<SentenceBertConfig>("sentence_bert_config.json", v))
        .transpose()?
        .unwrap_or_default();
    if bert_config.do_lower_case {
        check_tokenizer_lowercases(&files)?;
    }
    let max_length = match bert_config.max_seq_length {
        Some(n) => Some(n),
        None => files
            .json_if_present("tokenizer_config.json")?
            // transformers writes a huge number (1e30) for "no limit": not an integer here, so ignored.
            .and_then(|v| v["model_max_length"].as_u64())
            .map(|n| n as usize),
    };
    let max_tokens = max_length.unwrap_or(positions).min(positions);
    // A pair needs [CLS] and two [SEP]s, a single text [CLS] and [SEP].
    let framing = if reranker { 3 } else { 2 };
    if max_tokens < framing {
        return Err(ModelError::new(format!(
            "{}: a maximum length of {max_tokens} tokens leaves no room for the {framing} special tokens",
            files.0.display()
        )));
    }
    let (task, activation) = if reranker {
        (
            Task::Rerank,
            cross_encoder_activation(&files, &config, st_config.activation_fn.as_deref())?,
        )
    } else {
        (Task::Embed, ScoreActivation::Identity)
    };

    Ok(ModelSpec {
        name: name.to_string(),
        architecture: config.architecture,
        hub: None,
        dims: width,
        matryoshka_dims: Vec::new(),
        max_tokens,
        pooling,
        task,
        activation,
        post_pooling_layer_norm: false,
        normalize,
        prompts,
        default_prompt_name: st_config.default_prompt_name,
        files: Vec::new(),
        embedded: false,
    })
}

/// The names of the model directories in `dir` (those with a config.json), sorted; or, when `dir` is
/// itself a model directory, its own name.
pub fn list(dir: &Path) -> Result<Vec<String>, ModelError> {
    if let Some((_, name)) = itself(dir) {
        return Ok(vec![name]);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ModelError::new(format!("cannot read --model-dir {}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("config.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The directory that holds model `name` of `--model-dir dir`: `dir` when `dir/name/` exists, or the
/// parent of `dir` when `dir` is itself the model's directory (`--model-dir models/bge --model bge`).
pub fn locate(dir: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    if dir.join(name).is_dir() {
        return Some(dir.to_path_buf());
    }
    itself(dir)
        .filter(|(_, own)| own == name)
        .map(|(parent, _)| parent)
}

/// `(parent, name)` when `dir` is a model directory itself (it has a config.json).
fn itself(dir: &Path) -> Option<(PathBuf, String)> {
    if !dir.join("config.json").is_file() {
        return None;
    }
    let dir = dir.canonicalize().ok()?;
    let name = dir.file_name()?.to_str()?.to_string();
    Some((dir.parent()?.to_path_buf(), name))
}

/// One entry of `modules.json`.
#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// The Pooling module's config.json, in either layout.
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(alias = "word_embedding_dimension")]
    embedding_dimension: Option<usize>,
    /// sentence-transformers ≥ 5: one mode, or a list of modes whose results are concatenated.
    pooling_mode: Option<Value>,
    #[serde(default = "yes")]
    include_prompt: bool,
    /// The classic booleans, in the order sentence-transformers concatenates them.
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
struct StConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
    /// A cross-encoder's score function, as a dotted path (`torch.nn.modules.activation.Sigmoid`).
    #[serde(default)]
    activation_fn: Option<String>,
}

#[derive(Deserialize, Default)]
struct SentenceBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
    /// sentence-transformers >= 6: `"sequence-classification"` for a cross-encoder's Transformer.
    #[serde(default)]
    transformer_task: Option<String>,
}

/// The files of one model directory.
struct Files(PathBuf);

impl Files {
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn read(&self, file: &str) -> Result<Vec<u8>, ModelError> {
        let path = self.path(file);
        std::fs::read(&path)
            .map_err(|e| ModelError::new(format!("cannot read {}: {e}", path.display())))
    }

    fn json_if_present(&self, file: &str) -> Result<Option<Value>, ModelError> {
        if !self.path(file).is_file() {
            return Ok(None);
        }
        let bytes = self.read(file)?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ModelError::new(format!(
                "{} is not valid JSON: {e}",
                self.path(file).display()
            ))
        })
    }

    fn typed<T: serde::de::DeserializeOwned>(
        &self,
        file: &str,
        value: Value,
    ) -> Result<T, ModelError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            ModelError::new(format!(
                "{}: {}: {}",
                self.path(file).display(),
                e.path(),
                e.inner()
            ))
        })
    }
}

/// Whether the directory is a cross-encoder (reranker): in the layout sentence-transformers >= 6 writes,
/// `modules.json` with the Transformer alone (its `sentence_bert_config.json` says
/// `"transformer_task": "sequence-classification"`); in the older layouts (sentence-transformers < 6, or
/// transformers alone), no `modules.json` and a `config.json` whose `architectures` names
/// `…ForSequenceClassification`. It must be a BERT (`Model::load` checks that it has one label).
fn is_cross_encoder(
    files: &Files,
    modules: Option<&Value>,
    config: &ModelConfig,
) -> Result<bool, ModelError> {
    let cross_encoder = match modules {
        None => config.is_sequence_classifier(),
        Some(modules) => {
            let modules: Vec<Module> = files.typed("modules.json", modules.clone())?;
            let alone = matches!(modules.as_slice(), [m] if m.kind.rsplit('.').next() == Some("Transformer"));
            if !alone {
                return Ok(false);
            }
            let task = files
                .json_if_present("sentence_bert_config.json")?
                .map(|v| files.typed::<SentenceBertConfig>("sentence_bert_config.json", v))
                .transpose()?
                .and_then(|c| c.transformer_task);
            if task.as_deref() != Some("sequence-classification")
                && !config.is_sequence_classifier()
            {
                return Err(ModelError::new(format!(
                    "{}: the pipeline is a Transformer alone, which is neither an embedding model (it needs a \
                     Pooling module) nor a cross-encoder (config.json's architectures would name \
                     …ForSequenceClassification)",
                    files.path("modules.json").display()
                )));
            }
            true
        }
    };
    if !cross_encoder {
        return Ok(false);
    }
    if config.architecture != Architecture::Bert {
        return Err(ModelError::new(format!(
            "{}: a {} cross-encoder is not supported; rerankers run on BERT",
            files.0.display(),
            config.architecture.model_type()
        )));
    }
    Ok(true)
}

/// A cross-encoder's score function, found where sentence-transformers' `CrossEncoder` looks, in its order:
/// `config_sentence_transformers.json` `activation_fn`, then `config.json` `sentence_transformers.activation_fn`
/// (sentence-transformers 4 and 5), else `config.json` `sbert_ce_default_activation_function` (before 4),
/// else Sigmoid (for one label). Like `CrossEncoder` without `trust_remote_code`, a path outside `torch.`
/// is ignored with a warning.
fn cross_encoder_activation(
    files: &Files,
    config: &ModelConfig,
    from_st_config: Option<&str>,
) -> Result<ScoreActivation, ModelError> {
    let resolve = |path: &str, file: &str| -> Result<Option<ScoreActivation>, ModelError> {
        if !path.starts_with("torch.") {
            eprintln!(
                "warning: {}: activation {path:?} is not a torch function; sentence-transformers ignores it \
                 without trust_remote_code, and so does this server (the default applies)",
                files.path(file).display()
            );
            return Ok(None);
        }
        ScoreActivation::from_torch_path(path)
            .map(Some)
            .ok_or_else(|| {
                ModelError::new(format!(
                    "{}: activation {path:?} is not supported ({} are)",
                    files.path(file).display(),
                    ScoreActivation::ALL
                        .map(ScoreActivation::torch_class)
                        .join(", ")
                ))
            })
    };
    if let Some(path) = from_st_config {
        if let Some(activation) = resolve(path, "config_sentence_transformers.json")? {
            return Ok(activation);
        }
    }
    let json = config.json();
    let path = match json["sentence_transformers"].get("activation_fn") {
        Some(value) => value.as_str(),
        None => json["sbert_ce_default_activation_function"].as_str(),
    };
    if let Some(activation) = path
        .map(|p| resolve(p, "config.json"))
        .transpose()?
        .flatten()
    {
        return Ok(activation);
    }
    Ok(ScoreActivation::Sigmoid)
}

/// Transformer → Pooling → optional Normalize; returns the pooling mode and whether vectors are normalised.
fn read_modules(
    files: &Files,
    modules: &Value,
    width: usize,
) -> Result<(Pooling, bool), ModelError> {
    let modules: Vec<Module> = files.typed("modules.json", modules.clone())?;
    // The class name is the last part of the type, in every layout sentence-transformers has written.
    let class = |m: &Module| m.kind.rsplit('.').next().unwrap_or_default().to_string();
    let classes: Vec<String> = modules.iter().map(class).collect();
    let shape = classes.iter().map(String::as_str).collect::<Vec<_>>();
    let normalize = match shape.as_slice() {
        ["Transformer", "Pooling"] => false,
        ["Transformer", "Pooling", "Normalize"] => true,
        _ => {
            let types: Vec<&str> = modules.iter().map(|m| m.kind.as_str()).collect();
            return Err(ModelError::new(format!(
                "{}: the pipeline is {}; this server runs Transformer → Pooling → optional Normalize only",
                files.path("modules.json").display(),
                types.join(" → ")
            )));
        }
    };
    if !modules[0].path.is_empty() {
        return Err(ModelError::new(format!(
            "{}: the Transformer lives in {:?}; this server reads it from the directory itself (path \"\")",
            files.path("modules.json").display(),
            modules[0].path
        )));
    }
    let pooling_file = format!("{}/config.json", modules[1].path);
    let raw = files.json_if_present(&pooling_file)?.ok_or_else(|| {
        ModelError::new(format!(
            "{} is missing: modules.json names the Pooling module there",
            files.path(&pooling_file).display()
        ))
    })?;
    let config: PoolingConfig = files.typed(&pooling_file, raw)?;
    let modes: Vec<String> = match &config.pooling_mode {
        Some(Value::String(mode)) => vec![mode.clone()],
        Some(Value::Array(modes)) => modes
            .iter()
            .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
            .collect(),
        Some(other) => vec![other.to_string()],
        None => {
            let flags = [
                (config.pooling_mode_cls_token, "cls"),
                (config.pooling_mode_max_tokens, "max"),
                (config.pooling_mode_mean_tokens, "mean"),
                (
                    config.pooling_mode_mean_sqrt_len_tokens,
                    "mean_sqrt_len_tokens",
                ),
                (config.pooling_mode_weightedmean_tokens, "weightedmean"),
                (config.pooling_mode_lasttoken, "lasttoken"),
            ];
            let on: Vec<String> = flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, mode)| mode.to_string())
                .collect();
            // sentence-transformers' own default when no flag is set.
            if on.is_empty() {
                vec!["mean".to_string()]
            } else {
                on
            }
        }
    };
    let pooling = match modes.as_slice() {
        [mode] => Pooling::from_name(mode).ok_or_else(|| {
            ModelError::new(format!(
                "{}: pooling mode {mode:?} is not supported (cls, mean, max and mean_sqrt_len_tokens are)",
                files.path(&pooling_file).display()
            ))
        })?,
        _ => {
            return Err(ModelError::new(format!(
                "{}: pooling modes {} concatenated are not supported (one of cls, mean, max, \
                 mean_sqrt_len_tokens is)",
                files.path(&pooling_file).display(),
                modes.join(" + ")
            )))
        }
    };
    if !config.include_prompt {
        return Err(ModelError::new(format!(
            "{}: include_prompt false (pooling without the prompt's tokens) is not supported",
            files.path(&pooling_file).display()
        )));
    }
    if let Some(dimension) = config.embedding_dimension {
        if dimension != width {
            return Err(ModelError::new(format!(
                "{}: the pooling is {dimension} wide but config.json's model is {width} wide",
                files.path(&pooling_file).display()
            )));
        }
    }
    Ok((pooling, normalize))
}

/// `do_lower_case: true` makes sentence-transformers lowercase the text if the tokenizer does not already;
/// this server uses tokenizer.json as it is, so it accepts the setting only where it changes nothing.
fn check_tokenizer_lowercases(files: &Files) -> Result<(), ModelError> {
    let tokenizer = files.json_if_present("tokenizer.json")?.unwrap_or_default();
    fn lowercases(normalizer: &Value) -> bool {
        match normalizer["type"].as_str() {
            Some("Lowercase") => true,
            Some("BertNormalizer") => normalizer["lowercase"] != false,
            Some("Sequence") => normalizer["normalizers"]
                .as_array()
                .is_some_and(|list| list.iter().any(lowercases)),
            _ => false,
        }
    }
    if lowercases(&tokenizer["normalizer"]) {
        Ok(())
    } else {
        Err(ModelError::new(format!(
            "{}: do_lower_case is true but tokenizer.json does not lowercase; this server does not \
             change the tokenizer",
            files.path("sentence_bert_config.json").display()
        )))
    }
}

/// The sentence-transformers files describing `spec`, as (relative path, contents): the classic layout,
/// which every version of sentence-transformers reads. None for a model whose recipe sentence-transformers
/// cannot express (nomic-embed-text-v1.5's layer norm between pooling and normalisation).
pub fn sentence_transformers_files(spec: &ModelSpec) -> Option<Vec<(String, String)>> {
    if spec.post_pooling_layer_norm {
        return None;
    }
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
    let prompts: BTreeMap<&str, &str> = spec
        .prompts
        .iter()
        .map(|(task, prefix)| (task.as_str(), prefix.as_str()))
        .collect();
    if spec.task == Task::Rerank {
        // The layout sentence-transformers >= 6 writes for a CrossEncoder: the only one where it reads the
        // activation and the maximum length from files beside a config.json that says neither.
        let modules = json!([{"idx": 0, "name": "0", "path": "",
            "type": "sentence_transformers.base.modules.transformer.Transformer"}]);
        let bert_config = json!({
            "transformer_task": "sequence-classification",
            "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
            "module_output_name": "scores",
            "max_seq_length": spec.max_tokens,
        });
        let st_config = json!({
            "model_type": "CrossEncoder",
            "activation_fn": spec.activation.torch_path(),
            "prompts": prompts,
            "default_prompt_name": spec.default_prompt_name,
        });
        return Some(vec![
            ("modules.json".to_string(), pretty(&modules)),
            (
                "sentence_bert_config.json".to_string(),
                pretty(&bert_config),
            ),
            (
                "config_sentence_transformers.json".to_string(),
                pretty(&st_config),
            ),
        ]);
    }
    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    let mut files = Vec::new();
    if spec.normalize {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        files.push(("2_Normalize/config.json".to_string(), "{}".to_string()));
    }
    let flag = |mode: Pooling| spec.pooling == mode;
    let pooling = json!({
        "word_embedding_dimension": spec.dims,
        "pooling_mode_cls_token": flag(Pooling::Cls),
        "pooling_mode_mean_tokens": flag(Pooling::Mean),
        "pooling_mode_max_tokens": flag(Pooling::Max),
        "pooling_mode_mean_sqrt_len_tokens": flag(Pooling::MeanSqrtLen),
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true,
    });
    let st_config = json!({
        "prompts": prompts,
        "default_prompt_name": spec.default_prompt_name,
        "similarity_fn_name": "cosine",
    });
    files.extend([
        ("modules.json".to_string(), pretty(&Value::Array(modules))),
        ("1_Pooling/config.json".to_string(), pretty(&pooling)),
        (
            "sentence_bert_config.json".to_string(),
            pretty(&json!({"max_seq_length": spec.max_tokens, "do_lower_case": false})),
        ),
        (
            "config_sentence_transformers.json".to_string(),
            pretty(&st_config),
        ),
    ]);
    Some(files)
}
