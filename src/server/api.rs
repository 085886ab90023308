//! The API's request and response bodies: parsing `/v1/embeddings` and `/v1/encode` requests into plain
//! values, and writing the JSON the clients expect; also the pieces every dialect reads and writes JSON
//! with (a body as an object, typed fields, inputs, float vectors). No tensors here, and no sockets.

use serde_json::{json, Map, Value};

use super::errors::{excerpt, ApiError};
use crate::models::quantize::{Calibrated, Compact, CompactFormat};
use crate::models::{Input, Model, ModelSpec, Source, Task, TruncationDirection};

/// Which of the two embedding APIs a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The original's `/v1/encode`.
    Encode,
    /// OpenAI's `/v1/embeddings`.
    OpenAi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    /// Little-endian f32, base64-encoded, as OpenAI sends it.
    Base64,
    /// Integers, as sentence-transformers' `quantize_embeddings` gives them.
    Compact(CompactFormat),
}

/// A parsed embedding request.
#[derive(Debug)]
pub struct EmbedRequest {
    pub model: Option<String>,
    pub inputs: Vec<Input>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    /// A task prompt to put in front of every text ("search_query", …).
    pub task: Option<String>,
    /// `Some(false)`: refuse over-long inputs instead of truncating them.
    pub truncate: Option<bool>,
    /// Which end truncation cuts off.
    pub truncation_direction: TruncationDirection,
}

/// Refuses a body that is not declared as JSON (415), as every embedding route but Ollama's does.
pub fn require_json(content_type: Option<&str>) -> Result<(), ApiError> {
    let media = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    if media
        .as_deref()
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(content_type.unwrap_or("")))
    }
}

/// The body as a JSON object; `example` is shown to a client that sent something else. The deepest
/// nesting a valid request can have is 3 (`{"input": [[1, 2]]}`); serde_json stops at 128 on its own,
/// which keeps a hostile body from exhausting the stack.
pub fn json_object(body: &[u8], example: &str) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!(
            "The body is not valid UTF-8 (at byte {}).",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(format!(
            "The body is empty; send a JSON object such as {example}."
        )));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}.")))?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::invalid(format!(
            "The body must be a JSON object such as {example}."
        ))),
    }
}

/// The prefix of a task prompt (`"search_query: "`): the model's default prompt (often "") when the
/// request names none, as sentence-transformers does; a 400 about `param` (the field the client named it
/// in) naming the known tasks for a task the model does not know.
pub fn prompt_prefix<'a>(
    spec: &'a ModelSpec,
    task: Option<&str>,
    param: &str,
) -> Result<&'a str, ApiError> {
    match task {
        None => Ok(spec.default_prompt()),
        Some(_) if spec.prompts.is_empty() => Err(ApiError::invalid_param(
            param,
            format!("{} takes no task prompts.", spec.name),
        )),
        Some(task) => spec.prompt(task).ok_or_else(|| {
            let tasks: Vec<&str> = spec.prompts.iter().map(|(t, _)| t.as_str()).collect();
            ApiError::invalid_param(
                param,
                format!(
                    "Unknown task `{}`; {} knows: {}.",
                    excerpt(task),
                    spec.name,
                    tasks.join(", ")
                ),
            )
        }),
    }
}

pub fn parse_embed_request(body: &[u8]) -> Result<EmbedRequest, ApiError> {
    let fields = json_object(body, "{\"input\": [\"text\"]}")?;
    // OpenAI's clients send `user`; nothing reads it, but a non-string is as malformed as anywhere else.
    optional_string(&fields, "user")?;
    Ok(EmbedRequest {
        model: optional_string(&fields, "model")?,
        inputs: parse_inputs(fields.get("input"), "input")?,
        encoding_format: match optional_string(&fields, "encoding_format")?.as_deref() {
            None | Some("float") => EncodingFormat::Float,
            Some("base64") => EncodingFormat::Base64,
            Some(other) => match CompactFormat::from_name(other) {
                Some(precision) => EncodingFormat::Compact(precision),
                None => {
                    return Err(ApiError::invalid_param(
                        "encoding_format",
                        format!(
                            "Unknown encoding_format `{}`; use float, base64, int8, uint8, binary or ubinary.",
                            excerpt(other)
                        ),
                    ))
                }
            },
        },
        dimensions: optional_positive(&fields, "dimensions")?,
        task: match optional_string(&fields, "task")? {
            Some(task) => Some(task),
            None => optional_string(&fields, "prompt_name")?,
        },
        truncate: optional_bool(&fields, "truncate")?,
        truncation_direction: match optional_string(&fields, "truncation_direction")?.as_deref() {
            None | Some("right" | "Right") => TruncationDirection::Right,
            Some("left" | "Left") => TruncationDirection::Left,
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "truncation_direction",
                    format!(
                        "truncation_direction must be \"right\" (cut the end) or \"left\" (cut the start), not `{}`.",
                        excerpt(other)
                    ),
                ))
            }
        },
    })
}

pub fn optional_bool(fields: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_param(
            key,
            format!("{key} must be true or false."),
        )),
    }
}

/// A positive integer field such as `dimensions`, also when written as `384.0`.
pub fn optional_positive(
    fields: &Map<String, Value>,
    key: &str,
) -> Result<Option<usize>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => whole_number(v)
            .filter(|&d| d > 0)
            .map(|d| Some(d as usize))
            .ok_or_else(|| {
                ApiError::invalid_param(key, format!("{key} must be a positive integer."))
            }),
    }
}

/// A non-negative integer, also when written as `3.0`: JSON (and JSON Schema) make no difference.
pub fn whole_number(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// Token ids in the request field `field`: each a whole number below 2^32, else a 400 naming the field.
pub fn token_ids(items: &[Value], field: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            whole_number(v)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        field,
                        "token ids must be non-negative integers below 2^32.",
                    )
                })
        })
        .collect()
}

pub fn optional_string(fields: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid_param(
            key,
            format!("{key} must be a string."),
        )),
    }
}

/// The inputs of a request, in the field `field`: a string, an array of strings, an array of token ids, or
/// an array of arrays of token ids.
pub fn parse_inputs(input: Option<&Value>, field: &str) -> Result<Vec<Input>, ApiError> {
    let shape_error = || {
        ApiError::invalid_param(
            field,
            format!("{field} must be a string, an array of strings, an array of token ids, or an array of arrays of token ids."),
        )
    };
    match input {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            field,
            format!("The body lacks \"{field}\"."),
        )),
        Some(Value::String(text)) => Ok(vec![Input::Text(text.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::empty_input(
            field,
            format!("{field} must not be an empty array."),
        )),
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| Input::Text(s.to_string()))
                        .ok_or_else(shape_error)
                })
                .collect(),
            Value::Number(_) => Ok(vec![Input::Ids(token_ids(items, field)?)]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) if ids.is_empty() => Err(ApiError::empty_input(
                        field,
                        "a token id array must not be empty.",
                    )),
                    Value::Array(ids) => Ok(Input::Ids(token_ids(ids, field)?)),
                    _ => Err(shape_error()),
                })
                .collect(),
            _ => Err(shape_error()),
        },
        Some(_) => Err(shape_error()),
    }
}

/// Embeddings in the form a client asked for.
pub enum Vectors {
    Float(Vec<Vec<f32>>),
    Base64(Vec<Vec<f32>>),
    Compact(Vec<Compact>),
}

impl Vectors {
    fn len(&self) -> usize {
        match self {
            Vectors::Float(v) | Vectors::Base64(v) => v.len(),
            Vectors::Compact(v) => v.len(),
        }
    }
}

/// Writes the embeddings response. `vectors` are at the width the client asked for, `dims` (reported as
/// each item's `dims`, also for compact formats, whose arrays may be shorter).
pub fn embeddings_response(
    model: &str,
    vectors: &Vectors,
    dims: usize,
    prompt_tokens: usize,
) -> String {
    let mut out = String::with_capacity(128 + vectors.len() * (96 + dims * 12));
    out.push_str("{\"object\":\"list\",\"model\":");
    out.push_str(&Value::String(model.to_string()).to_string());
    out.push_str(",\"data\":[");
    for index in 0..vectors.len() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"object\":\"embedding\",\"index\":{index},\"dims\":{dims},\"embedding\":"
        ));
        match vectors {
            Vectors::Float(v) => write_floats(&mut out, &v[index]),
            Vectors::Base64(v) => {
                out.push('"');
                write_base64_floats(&mut out, &v[index]);
                out.push('"');
            }
            Vectors::Compact(v) => write_integers(&mut out, &v[index]),
        }
        out.push('}');
    }
    out.push(']');
    out.push_str(&format!(
        ",\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"total_tokens\":{prompt_tokens}}}"
    ));
    out.push('}');
    out
}

/// `[x,y,…]` with each float in the shortest form that reads back to the same f32.
pub fn write_floats(out: &mut String, values: &[f32]) {
    let mut buffer = Vec::with_capacity(values.len() * 12);
    // Serialising a slice of finite f32 cannot fail; the engine rejects non-finite output before this.
    let _ = serde_json::to_writer(&mut buffer, values);
    out.push_str(std::str::from_utf8(&buffer).unwrap_or("[]"));
}

/// The little-endian bytes of `values`, base64-encoded, as OpenAI and Cohere send float vectors.
pub fn write_base64_floats(out: &mut String, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64_into(out, &bytes);
}

/// `[[x,…],[y,…]]`.
pub fn write_vectors(out: &mut String, vectors: &[Vec<f32>]) {
    out.push('[');
    for (i, vector) in vectors.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_floats(out, vector);
    }
    out.push(']');
}

/// `[1,-2,…]`.
pub fn write_integers(out: &mut String, compact: &Compact) {
    use std::fmt::Write as _;
    out.push('[');
    let mut first = true;
    let mut push = |value: i16| {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{value}");
    };
    match compact {
        Compact::Signed(values) => values.iter().for_each(|&v| push(i16::from(v))),
        Compact::Unsigned(values) => values.iter().for_each(|&v| push(i16::from(v))),
    }
    out.push(']');
}

pub fn base64_into(out: &mut String, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
}

/// `GET /v1/info`: what is running and for how long.
pub fn info(started: u64, uptime_seconds: u64) -> String {
    json!({
        "name": env!("CARGO_PKG_NAME"),
        "version": env!("CARGO_PKG_VERSION"),
        "started": started,
        "uptime_seconds": uptime_seconds,
    })
    .to_string()
}

/// `GET /v1/models`: exactly the original's shape.
pub fn models_list(names: &[&str]) -> String {
    json!({"object": "list", "data": names}).to_string()
}

/// `GET /v1/models/{id}`: the model, its task (`embed` or `rerank`) and what was read about it (pooling, normalisation, length, prompts,
/// where its files are).
pub fn model_card(model: &Model, created: u64) -> String {
    let spec = &model.spec;
    let tasks: Vec<&str> = spec.prompts.iter().map(|(task, _)| task.as_str()).collect();
    let prompts: Map<String, Value> = spec
        .prompts
        .iter()
        .map(|(task, prefix)| (task.clone(), Value::from(prefix.as_str())))
        .collect();
    let (owner, revision) = match &spec.hub {
        Some((repo, _)) => (
            repo.split('/').next().unwrap_or("embedding-server"),
            Value::from(spec.revision()),
        ),
        None => ("embedding-server", Value::Null),
    };
    let (source, directory) = match &model.source {
        Source::Embedded => ("embedded", Value::Null),
        Source::Dir(_) => (
            "directory",
            Value::from(model.source.model_dir(spec).display().to_string()),
        ),
    };
    let mut card = json!({
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": owner,
        "task": spec.task.name(),
        "max_tokens": model.max_tokens(),
        "tasks": tasks,
        "prompts": prompts,
        "default_prompt_name": spec.default_prompt_name,
        "precision": model.precision().name(),
        "architecture": format!("{:?}", spec.architecture),
        "revision": revision,
        "source": source,
        "directory": directory,
    });
    match spec.task {
        Task::Embed => {
            card["dims"] = json!(model.dims());
            card["dimensions"] = json!(model.allowed_dims());
            card["matryoshka"] = json!(!spec.matryoshka_dims.is_empty());
            card["pooling"] = json!(spec.pooling.name());
            card["normalized"] = json!(spec.normalize);
            card["encoding_formats"] = json!(encoding_formats());
        }
        Task::Rerank => {
            // A reranker's default prompt goes in front of the query; there is no `task` to choose one by.
            card["activation"] = json!(spec.activation.torch_class());
        }
    }
    card.to_string()
}

fn encoding_formats() -> Vec<&'static str> {
    ["float", "base64"]
        .into_iter()
        .chain(CompactFormat::ALL.map(CompactFormat::name))
        .collect()
}

/// `GET /v1/models/{id}/quantization`: the int8/uint8 ranges of each width, in the form
/// `quantize_embeddings(..., ranges=np.array([min, max], dtype=np.float32))` takes; each value the shortest
/// decimal that reads back as the same f32.
pub fn quantization_card(model: &Model, calibrated: &Calibrated) -> String {
    let mut out = json!({
        "object": "quantization",
        "model": model.spec.name,
        "calibration": {
            "sentences": calibrated.sentences,
            "sha256": calibrated.sha256,
        },
    })
    .to_string();
    out.pop();
    out.push_str(",\"ranges\":[");
    for (i, (dims, ranges)) in calibrated.ranges.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{{\"dimensions\":{dims},\"min\":"));
        write_floats(&mut out, &ranges.min);
        out.push_str(",\"max\":");
        write_floats(&mut out, &ranges.max);
        out.push('}');
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        let cases: [(&[u8], &str); 4] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            let mut out = String::new();
            base64_into(&mut out, input);
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn inputs_take_every_openai_shape_and_refuse_mixtures() {
        let parse = |body: &str| parse_embed_request(body.as_bytes()).map(|r| r.inputs);
        assert_eq!(
            parse(r#"{"input":"a"}"#).unwrap(),
            vec![Input::Text("a".into())]
        );
        assert_eq!(
            parse(r#"{"input":[1,2]}"#).unwrap(),
            vec![Input::Ids(vec![1, 2])]
        );
        assert_eq!(parse(r#"{"input":[[1],[2]]}"#).unwrap().len(), 2);
        for bad in [
            r#"{"input":[]}"#,
            r#"{"input":["a",1]}"#,
            r#"{"input":[-1]}"#,
            r#"{"input":{}}"#,
            "[]",
            "{",
        ] {
            assert_eq!(parse(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn whole_numbers_count_as_integers_and_fractions_do_not() {
        let request = parse_embed_request(br#"{"input":[101.0,102],"dimensions":384.0}"#).unwrap();
        assert_eq!(request.inputs, vec![Input::Ids(vec![101, 102])]);
        assert_eq!(request.dimensions, Some(384));
        for bad in [
            r#"{"input":[1.5]}"#,
            r#"{"input":[-1.0]}"#,
            r#"{"input":[1e300]}"#,
            r#"{"input":"a","dimensions":2.5}"#,
        ] {
            assert_eq!(
                parse_embed_request(bad.as_bytes()).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn user_must_be_a_string_when_given() {
        assert!(parse_embed_request(br#"{"input":"a","user":"u"}"#).is_ok());
        assert!(parse_embed_request(br#"{"input":"a","user":null}"#).is_ok());
        let error = parse_embed_request(br#"{"input":"a","user":5}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("user"));
    }

    #[test]
    fn an_unknown_encoding_is_quoted_only_in_part() {
        // Plain letters, control characters and backslashes: none may make the quote long again.
        for filler in ["z", r"\u007f", r"\\"] {
            let body = format!(
                r#"{{"input":"a","encoding_format":"{}"}}"#,
                filler.repeat(10_000)
            );
            let error = parse_embed_request(body.as_bytes()).unwrap_err();
            assert!(error.message.chars().count() < 150, "{}", error.message);
        }
    }
}
