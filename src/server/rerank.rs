//! The rerank endpoints: `POST /v1/rerank` in the Cohere / Jina shape (what LangChain, LlamaIndex and the
//! Cohere and Jina clients send; also at `/v2/rerank`, Cohere's version 2 path) and `POST /rerank` in
//! text-embeddings-inference's shape. Both read into
//! one [`RerankRequest`]; the (query, document) pairs go through the model's batching queue like embedding
//! inputs; each shape writes its own response, results sorted by score, highest first.

use serde_json::{json, Map, Value};

use super::api::{self, optional_bool, optional_string, whole_number};
use super::errors::{excerpt, ApiError};
use super::pipeline::queue_error;
use super::routes::{Incoming, Outgoing};
use super::App;
use crate::models::{ErrorKind, Task, Tokens};

/// Which of the two request and response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `/v1/rerank` and `/v2/rerank`: `{"model", "query", "documents", "top_n"?, "return_documents"?}` →
    /// `{"model", "results": [{"index", "relevance_score", "document"?}], "usage"}`.
    Cohere,
    /// `/rerank`: `{"query", "texts", "raw_scores"?, "return_text"?}` → `[{"index", "score", "text"?}]`.
    Tei,
}

impl Shape {
    /// The label of the `api` in metrics.
    fn label(self) -> &'static str {
        match self {
            Shape::Cohere => "v1_rerank",
            Shape::Tei => "rerank",
        }
    }

    /// The body's field that holds the documents.
    fn documents_field(self) -> &'static str {
        match self {
            Shape::Cohere => "documents",
            Shape::Tei => "texts",
        }
    }
}

/// A rerank request in either shape.
#[derive(Debug, PartialEq)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<String>,
    /// How many results to return, best first; all when `None`.
    pub top_n: Option<usize>,
    /// Whether each result carries its document's text.
    pub return_documents: bool,
    /// `/rerank`'s `raw_scores`: the logit instead of its activation.
    pub raw_scores: bool,
    /// `Some(false)`: refuse an over-long pair instead of cutting it.
    pub truncate: Option<bool>,
}

/// Reads a request body of `shape`.
pub fn parse(shape: Shape, body: &[u8]) -> Result<RerankRequest, ApiError> {
    let example = match shape {
        Shape::Cohere => r#"{"query": "q", "documents": ["a", "b"]}"#,
        Shape::Tei => r#"{"query": "q", "texts": ["a", "b"]}"#,
    };
    let fields = api::json_object(body, example)?;
    let query = match fields.get("query") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "query",
                "The body lacks \"query\".",
            ))
        }
        Some(Value::String(query)) => query.clone(),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param(
                "query",
                "query must be one string; to rank documents for several queries, send one request per query.",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "query",
                "query must be a string.",
            ))
        }
    };
    let documents = parse_documents(shape, &fields)?;
    let request = match shape {
        Shape::Cohere => RerankRequest {
            model: optional_string(&fields, "model")?,
            query,
            documents,
            top_n: match fields.get("top_n") {
                None | Some(Value::Null) => None,
                Some(value) => Some(
                    whole_number(value)
                        .filter(|&n| n > 0)
                        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                        .ok_or_else(|| {
                            ApiError::invalid_param(
                                "top_n",
                                "top_n must be a positive integer (1 or more): how many results to return.",
                            )
                        })?,
                ),
            },
            return_documents: optional_bool(&fields, "return_documents")?.unwrap_or(false),
            raw_scores: false,
            truncate: optional_bool(&fields, "truncate")?,
        },
        Shape::Tei => {
            // text-embeddings-inference cuts (or refuses) from the right only, for a pair as for a text.
            match optional_string(&fields, "truncation_direction")?.as_deref() {
                None | Some("Right" | "right") => {}
                Some(other) => {
                    return Err(ApiError::invalid_param(
                        "truncation_direction",
                        format!(
                            "truncation_direction `{}` is not supported for pairs: a pair is cut \"Right\", \
                             longest text first.",
                            excerpt(other)
                        ),
                    ))
                }
            }
            RerankRequest {
                model: optional_string(&fields, "model")?,
                query,
                documents,
                top_n: None,
                return_documents: optional_bool(&fields, "return_text")?.unwrap_or(false),
                raw_scores: optional_bool(&fields, "raw_scores")?.unwrap_or(false),
                truncate: optional_bool(&fields, "truncate")?,
            }
        }
    };
    Ok(request)
}

/// `documents` (strings, or objects with a string `text`, as Cohere takes them) or `texts` (strings).
fn parse_documents(shape: Shape, fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let field = shape.documents_field();
    let what = match shape {
        Shape::Cohere => "a string or an object with a string \"text\"",
        Shape::Tei => "a string",
    };
    let items = match fields.get(field) {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                field,
                format!("The body lacks \"{field}\": the texts to rank against the query."),
            ))
        }
        Some(Value::Array(items)) if items.is_empty() => {
            // text-embeddings-inference answers no texts with its own status (400 `Empty`, not 422).
            return Err(ApiError::empty_input(
                field,
                format!("{field} must not be an empty array: give at least one text to rank."),
            ));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid_param(
                field,
                format!("{field} must be an array, each item {what}."),
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match (shape, item) {
            (_, Value::String(text)) => Ok(text.clone()),
            (Shape::Cohere, Value::Object(object)) => match object.get("text") {
                Some(Value::String(text)) => Ok(text.clone()),
                _ => Err(ApiError::invalid_param(
                    field,
                    format!("{field}[{i}] is an object without a string \"text\"."),
                )),
            },
            _ => Err(ApiError::invalid_param(
                field,
                format!("{field}[{i}] must be {what}, not {}.", kind_of(item)),
            )),
        })
        .collect()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One document's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    pub index: usize,
    /// The activation of the logit (the model's score).
    pub score: f32,
    /// The logit itself.
    pub raw: f32,
}

/// Sorts results best first (ties keep the documents' order) and keeps the first `top_n`.
fn rank(mut results: Vec<Ranked>, by_raw: bool, top_n: Option<usize>) -> Vec<Ranked> {
    let key = |r: &Ranked| if by_raw { r.raw } else { r.score };
    results.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.index.cmp(&b.index)));
    if let Some(n) = top_n {
        results.truncate(n);
    }
    results
}

/// The response body in `shape`.
pub fn response(
    shape: Shape,
    model: &str,
    request: &RerankRequest,
    ranked: &[Ranked],
    tokens: usize,
) -> String {
    match shape {
        Shape::Cohere => {
            let results: Vec<Value> = ranked
                .iter()
                .map(|r| {
                    let mut result = json!({"index": r.index, "relevance_score": r.score});
                    if request.return_documents {
                        result["document"] = json!({"text": request.documents[r.index]});
                    }
                    result
                })
                .collect();
            json!({
                "model": model,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })
            .to_string()
        }
        Shape::Tei => {
            let results: Vec<Value> = ranked
                .iter()
                .map(|r| {
                    let score = if request.raw_scores { r.raw } else { r.score };
                    let mut result = json!({"index": r.index, "score": score});
                    if request.return_documents {
                        result["text"] = json!(request.documents[r.index]);
                    }
                    result
                })
                .collect();
            Value::Array(results).to_string()
        }
    }
}

/// Answers a rerank request of `shape`.
pub fn handle(app: &App, shape: Shape, request: &Incoming) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let body = parse(shape, request.body)?;
    let queue = app.queue_for(body.model.as_deref(), Task::Rerank)?;
    let model = queue.model();
    let spec = &model.spec;
    let limits = &app.limits;
    let field = shape.documents_field();

    if body.documents.len() > limits.max_documents {
        return Err(ApiError::invalid_param(
            field,
            format!(
                "{} documents is more than the limit of {} per request.",
                body.documents.len(),
                limits.max_documents
            ),
        ));
    }
    let documents: Vec<&str> = body.documents.iter().map(String::as_str).collect();
    let pairs: Vec<Tokens> =
        model
            .tokenize_pairs(&body.query, &documents)
            .map_err(|e| match e.kind {
                ErrorKind::InvalidInput => ApiError::invalid_param(field, e.message),
                _ => {
                    eprintln!("error: tokenising pairs for {}: {e}", spec.name);
                    ApiError::internal()
                }
            })?;
    let truncate = body.truncate.unwrap_or(limits.truncate);
    let mut total = 0usize;
    for (index, pair) in pairs.iter().enumerate() {
        if !truncate && pair.untruncated > model.max_tokens() {
            return Err(ApiError::invalid_param(
                field,
                format!(
                    "the query with {field}[{index}] has {} tokens; {} takes at most {} (send \"truncate\": \
                     true to cut the longer of the two).",
                    pair.untruncated,
                    spec.name,
                    model.max_tokens()
                ),
            ));
        }
        total += pair.ids.len();
    }
    if total > limits.max_request_tokens {
        return Err(ApiError::invalid_param(
            field,
            format!(
                "The query with every document comes to {total} tokens, more than the limit of {} per request.",
                limits.max_request_tokens
            ),
        ));
    }
    let truncated = pairs.iter().filter(|p| p.untruncated > p.ids.len()).count();
    let count = pairs.len();

    let logits = queue
        .embed(pairs, limits.request_timeout)
        .map_err(|e| queue_error(e, &spec.name, field))?;
    let results = logits
        .iter()
        .enumerate()
        .map(|(index, logits)| Ranked {
            index,
            score: model.score(logits),
            raw: logits.first().copied().unwrap_or(0.0),
        })
        .collect();
    let ranked = rank(results, body.raw_scores, body.top_n);
    app.metrics
        .record_rerank(&spec.name, shape.label(), count, total, truncated);
    Ok(Outgoing {
        inputs: count,
        tokens: total,
        ..Outgoing::json(response(shape, &spec.name, &body, &ranked, total))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_read_into_one_request() {
        let cohere = parse(
            Shape::Cohere,
            br#"{"model":"m","query":"q","documents":["a",{"text":"b"}],"top_n":1.0,"return_documents":true}"#,
        )
        .unwrap();
        assert_eq!(
            cohere,
            RerankRequest {
                model: Some("m".into()),
                query: "q".into(),
                documents: vec!["a".into(), "b".into()],
                top_n: Some(1),
                return_documents: true,
                raw_scores: false,
                truncate: None,
            }
        );
        let tei = parse(
            Shape::Tei,
            br#"{"query":"","texts":["a"],"raw_scores":true,"return_text":true,"truncate":false}"#,
        )
        .unwrap();
        assert_eq!(
            (
                tei.query.as_str(),
                tei.raw_scores,
                tei.return_documents,
                tei.truncate
            ),
            ("", true, true, Some(false))
        );
    }

    #[test]
    fn each_malformed_field_is_a_400_naming_it() {
        let cases: [(Shape, &str, &str); 12] = [
            (Shape::Cohere, r#"{"documents":["a"]}"#, "query"),
            (Shape::Cohere, r#"{"query":[],"documents":["a"]}"#, "query"),
            (
                Shape::Cohere,
                r#"{"query":["q"],"documents":["a"]}"#,
                "query",
            ),
            (Shape::Cohere, r#"{"query":"q"}"#, "documents"),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":[]}"#,
                "documents",
            ),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":["a",3]}"#,
                "documents",
            ),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":[{"text":4}]}"#,
                "documents",
            ),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":["a"],"top_n":0}"#,
                "top_n",
            ),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":["a"],"top_n":-2}"#,
                "top_n",
            ),
            (
                Shape::Cohere,
                r#"{"query":"q","documents":["a"],"top_n":1.5}"#,
                "top_n",
            ),
            (
                Shape::Tei,
                r#"{"query":"q","texts":[{"text":"a"}]}"#,
                "texts",
            ),
            (
                Shape::Tei,
                r#"{"query":"q","texts":["a"],"truncation_direction":"Left"}"#,
                "truncation_direction",
            ),
        ];
        for (shape, body, param) in cases {
            let error = parse(shape, body.as_bytes()).unwrap_err();
            assert_eq!(error.status, 400, "{body}");
            assert_eq!(
                error.param.as_deref(),
                Some(param),
                "{body}: {}",
                error.message
            );
        }
    }

    #[test]
    fn results_are_sorted_best_first_ties_in_order_and_cut_to_top_n() {
        let results = vec![
            Ranked {
                index: 0,
                score: 0.2,
                raw: -1.0,
            },
            Ranked {
                index: 1,
                score: 0.9,
                raw: 2.0,
            },
            Ranked {
                index: 2,
                score: 0.2,
                raw: -1.0,
            },
            Ranked {
                index: 3,
                score: 0.5,
                raw: 0.0,
            },
        ];
        let order = |ranked: Vec<Ranked>| ranked.iter().map(|r| r.index).collect::<Vec<_>>();
        assert_eq!(order(rank(results.clone(), false, None)), [1, 3, 0, 2]);
        assert_eq!(order(rank(results.clone(), true, Some(2))), [1, 3]);
        assert_eq!(order(rank(results, false, Some(10))).len(), 4);
    }
}
