//! The model catalog: [`ModelSpec`], what the server knows about a model besides its weights, for the
//! models of `assets/models.json` (compiled in or not) and for the model directories read at run time
//! (`directory.rs`) alike.

use std::sync::LazyLock;

pub use super::manifest::{Architecture, Pooling, ScoreActivation, Task};
use super::manifest::{Entry, Manifest};

/// One file a model needs, pinned by hash.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub name: String,
    /// Lowercase hex; empty when the file is not pinned (a directory's own files, or a manifest entry
    /// that has not been pinned yet, which cannot be embedded).
    pub sha256: String,
    pub size: u64,
}

/// Everything about a model except its weights.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub architecture: Architecture,
    /// `repo@revision` on the model hub, for the models of the manifest that are published there.
    pub hub: Option<(String, String)>,
    /// The width of the full embedding.
    pub dims: usize,
    /// The `dimensions` a request may ask for (Matryoshka models); empty: only `dims`.
    pub matryoshka_dims: Vec<usize>,
    /// The longest input the model sees, [CLS] and [SEP] included.
    pub max_tokens: usize,
    pub pooling: Pooling,
    /// Embedding or reranking.
    pub task: Task,
    /// A reranker's score function, applied to its logit; `Identity` for an embedding model, whose vectors
    /// it never touches.
    pub activation: ScoreActivation,
    /// nomic-embed-text-v1.5: a layer norm without affine parameters between pooling and truncation.
    pub post_pooling_layer_norm: bool,
    pub normalize: bool,
    /// (task, prefix) pairs, e.g. ("search_query", "search_query: "), sorted by task.
    pub prompts: Vec<(String, String)>,
    /// The task whose prompt applies when a request names none.
    pub default_prompt_name: Option<String>,
    /// The files of the manifest, with their pins; empty for a directory read at run time.
    pub files: Vec<ModelFile>,
    /// Whether this build compiled the model's files in.
    pub embedded: bool,
}

/// Every model of the manifest, embedded in this build or not. build.rs checked the manifest with the
/// same reader, so reading it here cannot fail.
pub static CATALOG: LazyLock<Vec<ModelSpec>> = LazyLock::new(|| {
    let manifest = Manifest::parse(include_str!("../../assets/models.json"))
        .and_then(|m| m.entries())
        .expect("build.rs accepted assets/models.json");
    manifest.into_iter().map(ModelSpec::from_entry).collect()
});

/// Looks a model up by its public name.
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    CATALOG.iter().find(|spec| spec.name == name)
}

impl ModelSpec {
    fn from_entry(entry: Entry) -> ModelSpec {
        ModelSpec {
            embedded: super::embedded::has(&entry.name),
            architecture: entry.architecture,
            hub: entry.hub.map(|hub| (hub.repo, hub.revision)),
            dims: entry.dims,
            matryoshka_dims: entry.matryoshka_dims,
            max_tokens: entry.max_tokens,
            pooling: entry.pooling,
            task: entry.task,
            activation: match entry.task {
                Task::Embed => ScoreActivation::Identity,
                Task::Rerank => entry.activation.unwrap_or(ScoreActivation::Sigmoid),
            },
            post_pooling_layer_norm: entry.post_pooling_layer_norm,
            normalize: entry.normalize,
            prompts: entry.prompts.into_iter().collect(),
            default_prompt_name: entry.default_prompt_name,
            files: entry
                .files
                .into_iter()
                .map(|f| ModelFile {
                    sha256: f.sha256,
                    name: f.name,
                    size: f.size,
                })
                .collect(),
            name: entry.name,
        }
    }

    /// The embedding widths a request may ask for.
    pub fn allowed_dims(&self) -> Vec<usize> {
        if self.matryoshka_dims.is_empty() {
            vec![self.dims]
        } else {
            self.matryoshka_dims.clone()
        }
    }

    /// The prefix of task `task`.
    pub fn prompt(&self, task: &str) -> Option<&str> {
        self.prompts
            .iter()
            .find(|(name, _)| name == task)
            .map(|(_, prefix)| prefix.as_str())
    }

    /// The prefix applied when a request names no task ("" when the model has no default prompt).
    pub fn default_prompt(&self) -> &str {
        self.default_prompt_name
            .as_deref()
            .and_then(|task| self.prompt(task))
            .unwrap_or("")
    }

    /// `repo@revision`; for a model without a hub copy, what pins its files instead (a manifest entry
    /// with no public source), or "" (a directory read at run time).
    pub fn revision(&self) -> String {
        match &self.hub {
            Some((repo, rev)) => format!("{repo}@{rev}"),
            None if !self.files.is_empty() => "no public copy; files pinned by sha256".into(),
            None => String::new(),
        }
    }

    /// The pinned sha256 of `file`, or "" when it is not pinned.
    pub fn pin(&self, file: &str) -> &str {
        self.files
            .iter()
            .find(|f| f.name == file)
            .map_or("", |f| f.sha256.as_str())
    }
}
