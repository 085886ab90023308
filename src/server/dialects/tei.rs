//! text-embeddings-inference's API, as `huggingface_hub.InferenceClient(base_url=…).feature_extraction`,
//! Haystack's and LangChain's Hugging Face endpoints call it: `POST /embed` (and `POST /`, where
//! text-embeddings-inference answers an embedding model's requests) `{"inputs": str | [str] | ids | [ids],
//! "normalize"?, "truncate"?, "truncation_direction"?, "prompt_name"?, "dimensions"?}` → `[[…]]`, and
//! `GET /info`. Errors are `{"error": "…", "error_type": "…"}` with text-embeddings-inference's statuses:
//! 422 `Validation` for a request it cannot take, 400 `Empty` for no inputs, 429 `Overloaded`.
//!
//! text-embeddings-inference serves one model; here `model` (an addition) picks one, the default model
//! otherwise. `normalize: false` gives the vector before the model's L2 normalisation.

use serde_json::{json, Value};

use super::super::api;
use super::super::errors::{excerpt, ApiError};
use super::super::pipeline::{self, EmbedJob, Fields, Prompt};
use super::super::routes::{Incoming, Outgoing};
use super::super::App;
use crate::models::TruncationDirection;

/// text-embeddings-inference's status and `error_type` for an error.
pub fn error(error: &ApiError) -> (u16, String) {
    let (status, error_type) = match (error.status, error.code) {
        (400, Some("empty_input")) => (400, "Empty"),
        (400, _) => (422, "Validation"),
        (429, _) => (429, "Overloaded"),
        (503, Some("timeout")) => (503, "Overloaded"),
        (503, _) => (503, "Unhealthy"),
        (status, _) if status >= 500 => (status, "Backend"),
        (status, _) => (status, "Validation"),
    };
    (
        status,
        json!({ "error": error.message, "error_type": error_type }).to_string(),
    )
}

/// `POST /embed` and `POST /`.
pub fn embed(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let fields = api::json_object(request.body, r#"{"inputs": ["text"]}"#)?;
    if fields
        .get("inputs")
        .is_some_and(|v| v.as_array().is_some_and(Vec::is_empty))
    {
        return Err(ApiError::empty_input("inputs", "`inputs` cannot be empty."));
    }
    let inputs = api::parse_inputs(fields.get("inputs"), "inputs")?;
    // text-embeddings-inference writes `Left`/`Right`; huggingface_hub sends `left`/`right`.
    let direction = match api::optional_string(&fields, "truncation_direction")?.as_deref() {
        None | Some("Right" | "right") => TruncationDirection::Right,
        Some("Left" | "left") => TruncationDirection::Left,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "truncation_direction",
                format!(
                    "truncation_direction must be \"Right\" (cut the end) or \"Left\" (cut the start), not `{}`.",
                    excerpt(other)
                ),
            ))
        }
    };
    // huggingface_hub passes `encoding_format` along when asked; this route writes floats only.
    match api::optional_string(&fields, "encoding_format")?.as_deref() {
        None | Some("float") => {}
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!(
                    "/embed writes floats only, not `{}`; /v1/embeddings writes base64.",
                    excerpt(other)
                ),
            ))
        }
    }
    let embedded = pipeline::embed(
        app,
        EmbedJob {
            model: api::optional_string(&fields, "model")?,
            inputs,
            dimensions: api::optional_positive(&fields, "dimensions")?,
            prompt: match api::optional_string(&fields, "prompt_name")? {
                Some(name) => Prompt::Named {
                    name,
                    field: "prompt_name",
                },
                None => Prompt::None,
            },
            truncate: api::optional_bool(&fields, "truncate")?,
            direction,
            max_tokens: None,
            normalize: api::optional_bool(&fields, "normalize")?.unwrap_or(true),
            compact: Vec::new(),
            api: "tei",
            fields: Fields {
                input: "inputs",
                dimensions: "dimensions",
                truncate_hint: "\"truncate\": true",
                compact: "encoding_format",
            },
        },
    )?;
    let mut body = String::new();
    api::write_vectors(&mut body, &embedded.vectors);
    Ok(Outgoing::embeddings(body, &embedded))
}

/// `GET /info`: text-embeddings-inference's description of the (default) model and the server's limits.
pub fn info(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    let model = app.queue(&app.default_model)?.model();
    let spec = &model.spec;
    let (model_id, revision) = match &spec.hub {
        Some((repo, revision)) => (repo.as_str(), Some(revision.as_str())),
        None => (spec.name.as_str(), None),
    };
    Ok(Outgoing::json(
        json!({
            "model_id": model_id,
            "model_sha": revision,
            "model_dtype": "float32",
            "served_model_name": spec.name,
            "model_type": {"embedding": {"pooling": spec.pooling.name()}},
            "max_concurrent_requests": app.threads,
            "max_input_length": model.max_tokens(),
            "max_batch_tokens": app.max_batch_tokens,
            "max_batch_requests": Value::Null,
            "max_client_batch_size": app.limits.max_inputs,
            "auto_truncate": app.limits.truncate,
            "tokenization_workers": app.threads,
            "version": env!("CARGO_PKG_VERSION"),
            "sha": Value::Null,
            "docker_label": Value::Null,
        })
        .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_take_text_embeddings_inference_statuses_and_types() {
        let shape = |e: ApiError| {
            let (status, body) = error(&e);
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], e.message.as_str());
            (status, body["error_type"].as_str().unwrap().to_string())
        };
        let cases = [
            (ApiError::invalid_param("inputs", "x"), 422, "Validation"),
            (ApiError::empty_input("inputs", "x"), 400, "Empty"),
            (ApiError::overloaded(429, "x", 1), 429, "Overloaded"),
            (ApiError::overloaded(503, "x", 1), 503, "Overloaded"),
            (ApiError::unavailable("x"), 503, "Unhealthy"),
            (ApiError::internal(), 500, "Backend"),
            (ApiError::too_large(10), 413, "Validation"),
            (ApiError::unauthorized("x"), 401, "Validation"),
        ];
        for (e, status, kind) in cases {
            assert_eq!(shape(e), (status, kind.to_string()));
        }
    }
}
