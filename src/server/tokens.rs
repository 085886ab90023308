//! The tokenizer endpoints, in text-embeddings-inference's shapes: `POST /tokenize` (each token of each
//! input with its byte offsets) and `POST /decode` (ids back to text), for any loaded model. They run on
//! the HTTP worker (no engine work), under the same input, token and body limits as embeddings.

use serde_json::{json, Map, Value};

use super::api::{self, token_ids};
use super::errors::ApiError;
use super::routes::{Incoming, Outgoing};
use super::App;
use crate::models::{ErrorKind, Model, ModelError, TokenSpan};

/// `POST /tokenize`: `{"model"?, "inputs": str | [str], "add_special_tokens"?: true, "prompt_name"?}` →
/// `[[{"id", "text", "special", "start", "stop"}]]`.
pub fn tokenize(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let fields = api::json_object(request.body, "{\"inputs\": \"text\"}")?;
    let inputs = texts(fields.get("inputs"))?;
    let add_special_tokens = api::optional_bool(&fields, "add_special_tokens")?.unwrap_or(true);
    // text-embeddings-inference calls it `prompt_name`; `task` as on /v1/embeddings.
    let (task, param) = match api::optional_string(&fields, "prompt_name")? {
        Some(task) => (Some(task), "prompt_name"),
        None => (api::optional_string(&fields, "task")?, "task"),
    };
    let model = model(app, &fields)?;
    let prefix = api::prompt_prefix(&model.spec, task.as_deref(), param)?;
    let limits = &app.limits;
    within_inputs(inputs.len(), limits.max_inputs, "inputs")?;

    let mut out = Vec::with_capacity(inputs.len());
    let mut total = 0usize;
    for (index, text) in inputs.iter().enumerate() {
        let spans = model
            .token_spans(text, prefix, add_special_tokens)
            .map_err(|e| model_error(model, "inputs", index, e))?;
        total += spans.len();
        if total > limits.max_request_tokens {
            return Err(ApiError::invalid_param(
                "inputs",
                format!(
                    "The request has more than {} tokens (the limit per request).",
                    limits.max_request_tokens
                ),
            ));
        }
        out.push(tokens_json(&format!("{prefix}{text}"), &spans));
    }
    app.metrics
        .record_tokenizer(&model.spec.name, "tokenize", total);
    Ok(Outgoing {
        inputs: inputs.len(),
        tokens: total,
        ..Outgoing::json(Value::Array(out).to_string())
    })
}

/// `POST /decode`: `{"model"?, "ids": [int] | [[int]], "skip_special_tokens"?: true}` → `[str]`.
pub fn decode(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let fields = api::json_object(request.body, "{\"ids\": [101, 7592, 102]}")?;
    let sequences = id_lists(fields.get("ids"))?;
    let skip_special_tokens = api::optional_bool(&fields, "skip_special_tokens")?.unwrap_or(true);
    let model = model(app, &fields)?;
    let limits = &app.limits;
    within_inputs(sequences.len(), limits.max_inputs, "ids")?;
    let total: usize = sequences.iter().map(Vec::len).sum();
    if total > limits.max_request_tokens {
        return Err(ApiError::invalid_param(
            "ids",
            format!(
                "The request has {total} ids, more than the limit of {} per request.",
                limits.max_request_tokens
            ),
        ));
    }
    let texts = sequences
        .iter()
        .enumerate()
        .map(|(index, ids)| {
            model
                .decode(ids, skip_special_tokens)
                .map_err(|e| model_error(model, "ids", index, e))
        })
        .collect::<Result<Vec<String>, ApiError>>()?;
    app.metrics
        .record_tokenizer(&model.spec.name, "decode", total);
    Ok(Outgoing {
        inputs: sequences.len(),
        tokens: total,
        ..Outgoing::json(json!(texts).to_string())
    })
}

fn model<'a>(app: &'a App, fields: &Map<String, Value>) -> Result<&'a Model, ApiError> {
    let name = api::optional_string(fields, "model")?;
    Ok(app
        .queue(name.as_deref().unwrap_or(&app.default_model))?
        .model())
}

fn within_inputs(count: usize, limit: usize, param: &str) -> Result<(), ApiError> {
    if count > limit {
        return Err(ApiError::invalid_param(
            param,
            format!("{count} {param} is more than the limit of {limit} per request."),
        ));
    }
    Ok(())
}

fn model_error(model: &Model, param: &str, index: usize, error: ModelError) -> ApiError {
    match error.kind {
        ErrorKind::InvalidInput => {
            ApiError::invalid_param(param, format!("{param} {index}: {error}."))
        }
        _ => {
            eprintln!(
                "error: the tokenizer of {} failed on {param} {index}: {error}",
                model.spec.name
            );
            ApiError::internal()
        }
    }
}

/// `inputs`: a string or a non-empty array of strings.
fn texts(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let shape =
        || ApiError::invalid_param("inputs", "inputs must be a string or an array of strings.");
    match value {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            "inputs",
            "The body lacks \"inputs\".",
        )),
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid_param(
            "inputs",
            "inputs must not be an empty array.",
        )),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(shape))
            .collect(),
        Some(_) => Err(shape()),
    }
}

/// `ids`: a non-empty array of token ids, or a non-empty array of them.
fn id_lists(value: Option<&Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let shape = || {
        ApiError::invalid_param(
            "ids",
            "ids must be an array of token ids or an array of arrays of token ids.",
        )
    };
    let ids = |items: &[Value], index: usize| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(ApiError::invalid_param(
                "ids",
                format!("ids {index} is empty; send at least one id."),
            ));
        }
        token_ids(items, "ids")
    };
    match value {
        None | Some(Value::Null) => Err(ApiError::invalid_param("ids", "The body lacks \"ids\".")),
        Some(Value::Array(items)) => match items.first() {
            None => Err(ApiError::invalid_param(
                "ids",
                "ids must not be an empty array.",
            )),
            Some(Value::Array(_)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_array().ok_or_else(shape).and_then(|a| ids(a, i)))
                .collect(),
            Some(_) => Ok(vec![ids(items, 0)?]),
        },
        Some(_) => Err(shape()),
    }
}

/// One input's tokens, as text-embeddings-inference writes them: a special token shows its vocabulary
/// string and no offsets; any other token the bytes of `text` it came from (`text` with the prompt in front,
/// as the model saw it).
fn tokens_json(text: &str, spans: &[TokenSpan]) -> Value {
    Value::Array(
        spans
            .iter()
            .map(|span| {
                if span.special {
                    json!({"id": span.id, "text": span.token, "special": true, "start": null, "stop": null})
                } else {
                    let (start, stop) = span.offsets;
                    let piece = text
                        .as_bytes()
                        .get(start..stop)
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    json!({"id": span.id, "text": piece, "special": false, "start": start, "stop": stop})
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_take_one_list_or_several_and_refuse_the_rest() {
        assert_eq!(
            id_lists(Some(&json!([101, 102]))).unwrap(),
            [vec![101, 102]]
        );
        assert_eq!(
            id_lists(Some(&json!([[101], [7592.0, 102]]))).unwrap(),
            [vec![101], vec![7592, 102]]
        );
        for bad in [
            json!([]),
            json!([[]]),
            json!([[1], []]),
            json!([-1]),
            json!([1.5]),
            json!(["a"]),
            json!([[1], 2]),
            json!([1, [2]]),
            json!("101"),
            json!({"ids": [1]}),
            json!([4_294_967_296u64]),
        ] {
            let error = id_lists(Some(&bad)).unwrap_err();
            assert_eq!(
                (error.status, error.param.as_deref()),
                (400, Some("ids")),
                "{bad}"
            );
        }
    }

    #[test]
    fn inputs_are_a_string_or_strings() {
        assert_eq!(texts(Some(&json!(""))).unwrap(), [""]);
        assert_eq!(texts(Some(&json!(["a", "b"]))).unwrap(), ["a", "b"]);
        for bad in [
            json!([]),
            json!([1]),
            json!(["a", null]),
            json!(5),
            json!(null),
        ] {
            assert_eq!(texts(Some(&bad)).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn special_tokens_show_their_string_and_others_their_bytes() {
        let spans = [
            TokenSpan {
                id: 101,
                token: "[CLS]".into(),
                special: true,
                offsets: (0, 0),
            },
            TokenSpan {
                id: 7,
                token: "##e".into(),
                special: false,
                offsets: (1, 3),
            },
        ];
        let out = tokens_json("xé", &spans);
        assert_eq!(
            out,
            json!([
                {"id": 101, "text": "[CLS]", "special": true, "start": null, "stop": null},
                {"id": 7, "text": "é", "special": false, "start": 1, "stop": 3}
            ])
        );
    }
}
