//! Ollama's API, as its clients (the `ollama` package, Open WebUI, AnythingLLM, LangChain's
//! `OllamaEmbeddings`, LlamaIndex's `OllamaEmbedding`) call it: `POST /api/embed`, the older
//! `POST /api/embeddings`, `GET /api/tags` and `GET /api/version`. Errors are `{"error": "…"}`.
//!
//! Like Ollama, these routes read the body as JSON whatever its Content-Type (Ollama's own `curl`
//! examples send none), take a model name with or without the `:latest` tag, and answer an empty input
//! with no vectors (which Ollama's clients send to load a model). `keep_alive` and `options` are accepted
//! and ignored: the models are always loaded, and their settings are fixed.

use std::fmt::Write as _;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::super::api;
use super::super::errors::ApiError;
use super::super::pipeline::{self, EmbedJob, Fields, Prompt};
use super::super::routes::{Incoming, Outgoing};
use super::super::App;
use crate::models::catalog::Architecture;
use crate::models::{Input, TruncationDirection};

const FIELDS: Fields = Fields {
    input: "input",
    dimensions: "dimensions",
    truncate_hint: "\"truncate\": true",
    // Ollama has no compact forms.
    compact: "",
};

/// `{"error": "…"}`, with the status as it is.
pub fn error(error: &ApiError) -> (u16, String) {
    (error.status, json!({ "error": error.message }).to_string())
}

/// `POST /api/embed`: `{"model", "input": str | [str], "truncate"?, "dimensions"?, "keep_alive"?,
/// "options"?}` → `{"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}`.
pub fn embed(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    let started = Instant::now();
    let fields = api::json_object(
        request.body,
        r#"{"model": "all-MiniLM-L6-v2", "input": ["text"]}"#,
    )?;
    let (requested, model) = model_name(app, &fields)?;
    check_ignored_fields(&fields)?;
    let inputs = match fields.get("input") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) if text.is_empty() => Vec::new(),
        Some(Value::Array(items)) if items.is_empty() => Vec::new(),
        Some(input) => texts(api::parse_inputs(Some(input), "input")?)?,
    };
    // Ollama's zero value means "the full width".
    let dimensions = match fields.get("dimensions") {
        Some(v) if api::whole_number(v) == Some(0) => None,
        _ => api::optional_positive(&fields, "dimensions")?,
    };
    let truncate = api::optional_bool(&fields, "truncate")?;
    let mut body = String::from("{\"model\":");
    body.push_str(&Value::String(requested).to_string());
    body.push_str(",\"embeddings\":");
    let tokens = if inputs.is_empty() {
        body.push_str("[]");
        0
    } else {
        let embedded = pipeline::embed(
            app,
            EmbedJob {
                model: Some(model),
                inputs,
                dimensions,
                prompt: Prompt::None,
                truncate,
                direction: TruncationDirection::Right,
                max_tokens: None,
                normalize: true,
                compact: Vec::new(),
                api: "ollama",
                fields: FIELDS,
            },
        )?;
        api::write_vectors(&mut body, &embedded.vectors);
        embedded.tokens
    };
    let _ = write!(
        body,
        ",\"total_duration\":{},\"load_duration\":0,\"prompt_eval_count\":{tokens}}}",
        started.elapsed().as_nanos()
    );
    Ok(Outgoing {
        tokens,
        ..Outgoing::json(body)
    })
}

/// `POST /api/embeddings` (Ollama's older route): `{"model", "prompt"}` → `{"embedding": […]}`; no prompt
/// gives an empty vector, as in Ollama.
pub fn embeddings(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    let fields = api::json_object(
        request.body,
        r#"{"model": "all-MiniLM-L6-v2", "prompt": "text"}"#,
    )?;
    let (_, model) = model_name(app, &fields)?;
    check_ignored_fields(&fields)?;
    let prompt = api::optional_string(&fields, "prompt")?.unwrap_or_default();
    if prompt.is_empty() {
        return Ok(Outgoing::json(r#"{"embedding":[]}"#.into()));
    }
    let embedded = pipeline::embed(
        app,
        EmbedJob {
            model: Some(model),
            inputs: vec![Input::Text(prompt)],
            dimensions: None,
            prompt: Prompt::None,
            truncate: None,
            direction: TruncationDirection::Right,
            max_tokens: None,
            normalize: true,
            compact: Vec::new(),
            api: "ollama",
            fields: Fields {
                input: "prompt",
                ..FIELDS
            },
        },
    )?;
    let mut body = String::from("{\"embedding\":");
    api::write_floats(&mut body, &embedded.vectors[0]);
    body.push('}');
    Ok(Outgoing::embeddings(body, &embedded))
}

/// `GET /api/tags`: the models, in Ollama's shape, tagged `:latest` as Ollama lists them.
pub fn tags(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    let modified_at = rfc3339(app.started);
    let models: Vec<Value> = app
        .queues
        .iter()
        .map(|queue| {
            let model = queue.model();
            let spec = &model.spec;
            // Ollama's names for the families (from the GGUF architecture).
            let family = match spec.architecture {
                Architecture::Bert => "bert",
                Architecture::NomicBert => "nomic-bert",
            };
            let weights = spec.files.iter().find(|f| f.name == "model.safetensors");
            let name = format!("{}:latest", spec.name);
            json!({
                "name": name,
                "model": name,
                "modified_at": modified_at,
                "size": spec.files.iter().map(|f| f.size).sum::<u64>(),
                "digest": weights.map_or("", |f| f.sha256.as_str()),
                "details": {
                    "parent_model": "",
                    "format": "safetensors",
                    "family": family,
                    "families": [family],
                    "parameter_size": "",
                    "quantization_level": "",
                    "context_length": model.max_tokens(),
                    "embedding_length": model.dims(),
                },
                "capabilities": ["embedding"],
            })
        })
        .collect();
    Ok(Outgoing::json(json!({ "models": models }).to_string()))
}

/// `GET /api/version`: this server's version.
pub fn version(_: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    Ok(Outgoing::json(
        json!({ "version": env!("CARGO_PKG_VERSION") }).to_string(),
    ))
}

/// The model as the client named it (echoed in the answer) and as the server knows it (without Ollama's
/// `:latest` tag). No model means the server's default one.
fn model_name(app: &App, fields: &Map<String, Value>) -> Result<(String, String), ApiError> {
    let requested = api::optional_string(fields, "model")?
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| app.default_model.clone());
    let name = requested
        .strip_suffix(":latest")
        .unwrap_or(&requested)
        .to_string();
    app.queue(&name)?;
    Ok((requested, name))
}

/// `keep_alive` (a duration as a string or a number) and `options` (an object) change nothing here, but a
/// malformed one is as wrong as in Ollama.
fn check_ignored_fields(fields: &Map<String, Value>) -> Result<(), ApiError> {
    match fields.get("keep_alive") {
        None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
        Some(_) => {
            return Err(ApiError::invalid_param(
                "keep_alive",
                "keep_alive must be a duration such as \"5m\" or a number of seconds.",
            ))
        }
    }
    match fields.get("options") {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::invalid_param(
            "options",
            "options must be an object.",
        )),
    }
}

/// Ollama embeds text only: token ids are refused.
fn texts(inputs: Vec<Input>) -> Result<Vec<Input>, ApiError> {
    if inputs.iter().any(|i| matches!(i, Input::Ids(_))) {
        return Err(ApiError::invalid_param(
            "input",
            "input must be a string or an array of strings.",
        ));
    }
    Ok(inputs)
}

/// `2024-05-01T12:00:00Z` for a Unix time.
fn rfc3339(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let seconds = unix_seconds % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3_600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_become_rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn errors_are_one_string_with_the_status_as_it_is() {
        let (status, body) = error(&ApiError::model_not_found("x", &["m"]));
        assert_eq!(status, 404);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("`x`"));
        assert_eq!(body.as_object().unwrap().len(), 1);
    }
}
