//! Cohere's v2 embed API, as `cohere.ClientV2(base_url=…).embed(…)` calls it: `POST /v2/embed`
//! `{"model", "texts" | "inputs", "input_type", "embedding_types"?, "truncate"?, "output_dimension"?,
//! "max_tokens"?, "priority"?}` → `{"id", "embeddings": {type: […]}, "texts", "meta", "response_type":
//! "embeddings_by_type"}`. Errors are `{"message": "…"}`.
//!
//! `input_type` picks the model's prompt of the same meaning where it has one (nomic's `search_query`,
//! `search_document`, `classification`, `clustering`; `query`/`passage` style prompts for search); a model
//! without such a prompt embeds the text as it is, since Cohere's clients must send the field.
//! `embedding_types` are `float`, `base64` and the compact `int8`, `uint8`, `binary`, `ubinary` of
//! `encoding_format` on `/v1/embeddings` (`server::compact`). `truncate` is `END` (cut the end, the
//! default), `START` (cut the start, keeping `[CLS]`/`[SEP]`) or `NONE` (refuse over-long inputs), at the
//! model's maximum or at `max_tokens` where that is lower. Texts only: `images` and image parts are
//! refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::super::api;
use super::super::errors::{excerpt, ApiError};
use super::super::pipeline::{self, EmbedJob, Fields, Prompt};
use super::super::routes::{Incoming, Outgoing};
use super::super::App;
use crate::models::quantize::CompactFormat;
use crate::models::{sha256_hex, Input, TruncationDirection};

/// `{"message": "…"}`, with the status as it is.
pub fn error(error: &ApiError) -> (u16, String) {
    (
        error.status,
        json!({ "message": error.message }).to_string(),
    )
}

/// One of Cohere's `embedding_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmbeddingType {
    Float,
    /// The float vector's little-endian bytes, base64-encoded.
    Base64,
    /// int8, uint8, binary, ubinary: the compact vectors of `encoding_format` on `/v1/embeddings`.
    Compact(CompactFormat),
}

impl EmbeddingType {
    fn from_name(name: &str) -> Option<EmbeddingType> {
        match name {
            "float" => Some(EmbeddingType::Float),
            "base64" => Some(EmbeddingType::Base64),
            _ => CompactFormat::from_name(name).map(EmbeddingType::Compact),
        }
    }

    fn name(self) -> &'static str {
        match self {
            EmbeddingType::Float => "float",
            EmbeddingType::Base64 => "base64",
            EmbeddingType::Compact(precision) => precision.name(),
        }
    }
}

/// The prompts that mean what each `input_type` means, in order of preference.
fn prompts_for(input_type: &str) -> Option<&'static [&'static str]> {
    match input_type {
        "search_query" => Some(&["search_query", "query"]),
        "search_document" => Some(&["search_document", "document", "passage"]),
        "classification" => Some(&["classification"]),
        "clustering" => Some(&["clustering"]),
        _ => None,
    }
}

/// `POST /v2/embed`.
pub fn embed(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let fields = api::json_object(
        request.body,
        r#"{"model": "all-MiniLM-L6-v2", "texts": ["text"], "input_type": "search_document"}"#,
    )?;
    let model = api::optional_string(&fields, "model")?;
    let texts = texts(&fields)?;
    let prompt = match api::optional_string(&fields, "input_type")?.as_deref() {
        None => Prompt::None,
        Some("image") => return Err(images_refused("input_type")),
        Some(input_type) => Prompt::FirstOf(prompts_for(input_type).ok_or_else(|| {
            ApiError::invalid_param(
                "input_type",
                format!(
                    "input_type must be search_document, search_query, classification or clustering, not `{}`.",
                    excerpt(input_type)
                ),
            )
        })?),
    };
    let types = embedding_types(&fields)?;
    let (truncate, direction) = match api::optional_string(&fields, "truncate")?
        .map(|t| t.to_ascii_uppercase())
        .as_deref()
    {
        None => (None, TruncationDirection::Right),
        Some("END") => (Some(true), TruncationDirection::Right),
        Some("START") => (Some(true), TruncationDirection::Left),
        Some("NONE") => (Some(false), TruncationDirection::Right),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "truncate",
                "truncate must be NONE, START or END.",
            ))
        }
    };
    let dimensions = api::optional_positive(&fields, "output_dimension")?;
    let max_tokens = api::optional_positive(&fields, "max_tokens")?;
    match fields.get("priority") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_f64().is_some_and(|f| f.fract() == 0.0) => {}
        Some(_) => {
            return Err(ApiError::invalid_param(
                "priority",
                "priority must be an integer.",
            ))
        }
    }

    let embedded = pipeline::embed(
        app,
        EmbedJob {
            model,
            inputs: texts.iter().cloned().map(Input::Text).collect(),
            dimensions,
            prompt,
            truncate,
            direction,
            max_tokens,
            normalize: true,
            compact: types
                .iter()
                .filter_map(|kind| match kind {
                    EmbeddingType::Compact(precision) => Some(*precision),
                    _ => None,
                })
                .collect(),
            api: "cohere",
            fields: Fields {
                input: "texts",
                dimensions: "output_dimension",
                truncate_hint: "\"truncate\": \"END\" or \"START\"",
                compact: "embedding_types",
            },
        },
    )?;

    let mut compact = embedded.compact.iter();
    let mut body = format!("{{\"id\":\"{}\",\"embeddings\":{{", response_id());
    for (i, kind) in types.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("\"{}\":", kind.name()));
        match kind {
            EmbeddingType::Float => api::write_vectors(&mut body, &embedded.vectors),
            EmbeddingType::Base64 => {
                body.push('[');
                for (j, vector) in embedded.vectors.iter().enumerate() {
                    if j > 0 {
                        body.push(',');
                    }
                    body.push('"');
                    api::write_base64_floats(&mut body, vector);
                    body.push('"');
                }
                body.push(']');
            }
            // The pipeline converted the compact types in the order they come here.
            EmbeddingType::Compact(_) => {
                body.push('[');
                for (j, vector) in compact.next().into_iter().flatten().enumerate() {
                    if j > 0 {
                        body.push(',');
                    }
                    api::write_integers(&mut body, vector);
                }
                body.push(']');
            }
        }
    }
    body.push_str("},\"texts\":");
    body.push_str(&Value::from(texts).to_string());
    body.push_str(&format!(
        ",\"meta\":{{\"api_version\":{{\"version\":\"2\"}},\"billed_units\":{{\"input_tokens\":{}}}}},\"response_type\":\"embeddings_by_type\"}}",
        embedded.tokens
    ));
    Ok(Outgoing::embeddings(body, &embedded))
}

/// The texts, from `texts` or from the text parts of `inputs`; images are refused.
fn texts(fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    if fields
        .get("images")
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(images_refused("images"));
    }
    let given = |key| fields.get(key).is_some_and(|v: &Value| !v.is_null());
    match (given("texts"), given("inputs")) {
        (true, true) => Err(ApiError::invalid_param(
            "texts",
            "Send texts or inputs, not both.",
        )),
        (false, true) => input_texts(&fields["inputs"]),
        (true, false) if !fields["texts"].is_array() => Err(ApiError::invalid_param(
            "texts",
            "texts must be an array of strings.",
        )),
        (_, false) => api::parse_inputs(fields.get("texts"), "texts")?
            .into_iter()
            .map(|input| match input {
                Input::Text(text) => Ok(text),
                Input::Ids(_) => Err(ApiError::invalid_param(
                    "texts",
                    "texts must be an array of strings.",
                )),
            })
            .collect(),
    }
}

/// `inputs: [{"content": [{"type": "text", "text": "…"}]}]`: one text part per input.
fn input_texts(inputs: &Value) -> Result<Vec<String>, ApiError> {
    let shape = || {
        ApiError::invalid_param(
            "inputs",
            "inputs must be an array of {\"content\": [{\"type\": \"text\", \"text\": \"…\"}]}.",
        )
    };
    let items = inputs.as_array().ok_or_else(shape)?;
    if items.is_empty() {
        return Err(ApiError::empty_input(
            "inputs",
            "inputs must not be an empty array.",
        ));
    }
    items
        .iter()
        .map(|item| {
            let parts = item["content"].as_array().ok_or_else(shape)?;
            match parts.as_slice() {
                [part] if part["type"] == "text" => {
                    part["text"].as_str().map(str::to_string).ok_or_else(shape)
                }
                [part] if part["type"] == "image_url" => Err(images_refused("inputs")),
                [_] => Err(shape()),
                _ => Err(ApiError::invalid_param(
                    "inputs",
                    "Each input must have exactly one text part here.",
                )),
            }
        })
        .collect()
}

fn images_refused(field: &str) -> ApiError {
    ApiError::invalid_param(
        field,
        "This server embeds text only; images are not supported.",
    )
}

/// `embedding_types`, without repeats, in the order given; `["float"]` when absent or empty.
fn embedding_types(fields: &Map<String, Value>) -> Result<Vec<EmbeddingType>, ApiError> {
    let names = match fields.get("embedding_types") {
        None | Some(Value::Null) => return Ok(vec![EmbeddingType::Float]),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "embedding_types",
                "embedding_types must be an array such as [\"float\"].",
            ))
        }
    };
    let mut types = Vec::new();
    for name in names {
        let name = name.as_str().unwrap_or("");
        let kind = EmbeddingType::from_name(name).ok_or_else(|| {
            ApiError::invalid_param(
                "embedding_types",
                format!(
                    "Unknown embedding type `{}`; known: float, int8, uint8, binary, ubinary, base64.",
                    excerpt(name)
                ),
            )
        })?;
        if !types.contains(&kind) {
            types.push(kind);
        }
    }
    if types.is_empty() {
        types.push(EmbeddingType::Float);
    }
    Ok(types)
}

/// A fresh id in UUID form for each answer, as Cohere gives: unique per process and time, not secret.
fn response_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let hex = sha256_hex(seed.as_bytes());
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: Value) -> Map<String, Value> {
        body.as_object().unwrap().clone()
    }

    #[test]
    fn embedding_types_default_to_float_and_keep_the_order_given_without_repeats() {
        let types = |body| embedding_types(&fields(body));
        assert_eq!(types(json!({})).unwrap(), [EmbeddingType::Float]);
        assert_eq!(
            types(json!({"embedding_types": []})).unwrap(),
            [EmbeddingType::Float]
        );
        assert_eq!(
            types(json!({"embedding_types": ["base64", "float", "base64", "ubinary"]})).unwrap(),
            [
                EmbeddingType::Base64,
                EmbeddingType::Float,
                EmbeddingType::Compact(CompactFormat::Ubinary)
            ]
        );
        for bad in [
            json!({"embedding_types": ["hex"]}),
            json!({"embedding_types": "float"}),
        ] {
            assert_eq!(
                types(bad).unwrap_err().param.as_deref(),
                Some("embedding_types")
            );
        }
    }

    #[test]
    fn texts_come_from_texts_or_from_one_text_part_per_input() {
        let get = |body| texts(&fields(body));
        assert_eq!(get(json!({"texts": ["a", "b"]})).unwrap(), ["a", "b"]);
        assert_eq!(
            get(json!({"inputs": [{"content": [{"type": "text", "text": "a"}]}]})).unwrap(),
            ["a"]
        );
        assert_eq!(get(json!({"texts": ["a"], "images": []})).unwrap(), ["a"]);
        for bad in [
            json!({}),
            json!({"texts": []}),
            json!({"texts": "a"}),
            json!({"texts": [[1, 2]]}),
            json!({"texts": ["a"], "inputs": []}),
            json!({"texts": ["a"], "images": ["data:image/png;base64,AA=="]}),
            json!({"inputs": [{"content": [{"type": "image_url", "image_url": "x"}]}]}),
            json!({"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
            json!({"inputs": [{"content": "a"}]}),
        ] {
            assert_eq!(get(bad.clone()).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn ids_look_like_uuids_and_differ() {
        let (a, b) = (response_id(), response_id());
        assert_ne!(a, b);
        let lengths: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12]);
    }
}
