//! The one embedding pipeline every API dialect shares: from a typed request (model, inputs, width,
//! prompt, truncation, normalisation) to finished vectors, through the limits, the tokenizer, the batching
//! queue and the model's last steps, with the metrics recorded once. OpenAI's and the original's routes
//! (`routes.rs`) and Ollama's, Cohere's and text-embeddings-inference's (`dialects/`) only translate their
//! requests into an [`EmbedJob`] and the [`Embedded`] result into their answers.

use super::api;
use super::compact;
use super::errors::ApiError;
use super::queue::QueueError;
use super::App;
use crate::models::quantize::{Compact, CompactFormat};
use crate::models::{ErrorKind, Input, Task, Tokens, TruncationDirection};

/// What a dialect asks of the pipeline.
pub struct EmbedJob {
    /// `None`: the server's default model.
    pub model: Option<String>,
    pub inputs: Vec<Input>,
    /// `None`: the model's full width.
    pub dimensions: Option<usize>,
    pub prompt: Prompt,
    /// `Some(false)` refuses over-long inputs; `None` follows `--no-truncate`.
    pub truncate: Option<bool>,
    /// Which end of an over-long input is cut.
    pub direction: TruncationDirection,
    /// The request's own bound on each input's tokens (Cohere's `max_tokens`), where below the model's.
    pub max_tokens: Option<usize>,
    /// `false` stops before the model's L2 normalisation (text-embeddings-inference's `normalize`).
    pub normalize: bool,
    /// Compact forms wanted besides the floats (OpenAI's `encoding_format`, Cohere's `embedding_types`):
    /// checked against the width, and calibrated, before the engine spends anything.
    pub compact: Vec<CompactFormat>,
    /// The `api` label of the request metrics.
    pub api: &'static str,
    /// The dialect's names for its fields, so that an error points at what the client sent.
    pub fields: Fields,
}

/// How a dialect names the fields an error may be about.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// The inputs: `input`, `texts`, `inputs`, `prompt`.
    pub input: &'static str,
    /// The width: `dimensions`, `output_dimension`.
    pub dimensions: &'static str,
    /// What to send to have an over-long input cut, e.g. `"truncate": true`.
    pub truncate_hint: &'static str,
    /// The compact formats: `encoding_format`, `embedding_types`.
    pub compact: &'static str,
}

/// Which prompt goes in front of every text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The model's default prompt, if it has one.
    None,
    /// A prompt the client named (`task`, `prompt_name`); a name the model lacks is an error about `field`.
    Named { name: String, field: &'static str },
    /// The first of these names the model has a prompt for, or else as [`Prompt::None`]: Cohere's
    /// `input_type`, which every request must send whatever the model.
    FirstOf(&'static [&'static str]),
}

/// The pipeline's answer: one vector per input, in order.
pub struct Embedded {
    /// The name of the model that computed them.
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    /// The vectors again in each of the job's compact forms, in its order.
    pub compact: Vec<Vec<Compact>>,
    /// The width of every vector.
    pub dims: usize,
    /// The tokens the model saw, summed over the inputs (after truncation, prompts included).
    pub tokens: usize,
}

/// The answer to a request whose inputs the queue did not turn into vectors (or a reranker's scores);
/// `param` is the body's field that holds them.
pub fn queue_error(error: QueueError, model: &str, param: &str) -> ApiError {
    match error {
        QueueError::Full => {
            ApiError::overloaded(429, "The server's queue is full; retry shortly.", 1)
        }
        QueueError::TimedOut => {
            ApiError::overloaded(503, "The request waited too long for the engine; retry.", 1)
        }
        QueueError::Engine(e) if e.kind == ErrorKind::InvalidInput => {
            ApiError::invalid_param(param, e.message)
        }
        QueueError::Engine(e) => {
            eprintln!("error: the engine failed for {model}: {e}");
            ApiError::internal()
        }
    }
}

/// Runs one job. (The router times the whole request, parsing included, for the processing metric.)
pub fn embed(app: &App, job: EmbedJob) -> Result<Embedded, ApiError> {
    let EmbedJob {
        model,
        inputs,
        dimensions,
        prompt,
        truncate,
        direction,
        max_tokens,
        normalize,
        compact,
        api,
        fields,
    } = job;
    let queue = app.queue_for(model.as_deref(), Task::Embed)?;
    let model = queue.model();
    let spec = &model.spec;
    let limits = &app.limits;

    if inputs.len() > limits.max_inputs {
        return Err(ApiError::invalid_param(
            fields.input,
            format!(
                "{} inputs is more than the limit of {} per request.",
                inputs.len(),
                limits.max_inputs
            ),
        ));
    }
    let dims = match dimensions {
        None => model.dims(),
        Some(d) if model.allowed_dims().contains(&d) => d,
        Some(d) => {
            let allowed: Vec<String> = model.allowed_dims().iter().map(usize::to_string).collect();
            return Err(ApiError::invalid_param(
                fields.dimensions,
                format!(
                    "{} cannot give {d} dimensions; allowed: {}.",
                    spec.name,
                    allowed.join(", ")
                ),
            ));
        }
    };
    let prefix = match &prompt {
        Prompt::None => api::prompt_prefix(spec, None, "")?,
        Prompt::FirstOf(names) => match names.iter().find_map(|n| spec.prompt(n)) {
            Some(prefix) => prefix,
            None => api::prompt_prefix(spec, None, "")?,
        },
        Prompt::Named { name, field } => api::prompt_prefix(spec, Some(name), field)?,
    };
    let truncate = truncate.unwrap_or(limits.truncate);
    let limit = max_tokens.map_or(model.max_tokens(), |m| m.min(model.max_tokens()));
    let prepared = compact
        .into_iter()
        .map(|precision| compact::prepare(model, precision, dims, fields.compact))
        .collect::<Result<Vec<_>, _>>()?;

    let mut tokenized: Vec<Tokens> = Vec::with_capacity(inputs.len());
    let mut total = 0usize;
    for (index, input) in inputs.iter().enumerate() {
        let tokens = model
            .tokenize_within(input, prefix, direction, limit)
            .map_err(|e| match e.kind {
                ErrorKind::InvalidInput => {
                    ApiError::invalid_param(fields.input, format!("{} {index}: {e}", fields.input))
                }
                _ => {
                    eprintln!("error: tokenising input {index} for {}: {e}", spec.name);
                    ApiError::internal()
                }
            })?;
        if !truncate && tokens.untruncated > limit {
            let bound = if limit < model.max_tokens() {
                format!("the request allows at most {limit}")
            } else {
                format!("{} takes at most {limit}", spec.name)
            };
            return Err(ApiError::invalid_param(
                fields.input,
                format!(
                    "{} {index} has {} tokens; {bound} (send {} to cut it).",
                    fields.input, tokens.untruncated, fields.truncate_hint
                ),
            ));
        }
        total += tokens.ids.len();
        if total > limits.max_request_tokens {
            return Err(ApiError::invalid_param(
                fields.input,
                format!(
                    "The request has more than {} tokens (the limit per request).",
                    limits.max_request_tokens
                ),
            ));
        }
        tokenized.push(tokens);
    }
    let truncated = tokenized
        .iter()
        .filter(|t| t.untruncated > t.ids.len())
        .count();
    let pooled = queue
        .embed(tokenized, limits.request_timeout)
        .map_err(|e| queue_error(e, &spec.name, fields.input))?;
    let count = pooled.len();
    let vectors: Vec<Vec<f32>> = pooled
        .into_iter()
        .map(|p| {
            if normalize {
                model.finish(p, dims)
            } else {
                model.finish_unnormalized(p, dims)
            }
        })
        .collect();
    let compact = prepared
        .iter()
        .map(|prepared| compact::convert(prepared, &vectors))
        .collect::<Result<Vec<_>, _>>()?;
    app.metrics
        .record_request(&spec.name, api, count, total, truncated);
    Ok(Embedded {
        model: spec.name.clone(),
        vectors,
        compact,
        dims,
        tokens: total,
    })
}
