//! The API's errors: one [`ApiError`] (status, message, field, code, headers) for every route, written as
//! OpenAI's nested body `{"error":{"message","type","param","code"}}`, except on the routes of another
//! API's dialect, which write the same error in that API's shape (`dialects::ErrorShape`).

use serde_json::json;

/// The most characters of client data an error message repeats: enough to recognise it, too few to turn
/// an error into an echo of a whole input.
const EXCERPT_CHARS: usize = 64;

/// Client data as an error message may quote it: at most [`EXCERPT_CHARS`] characters, then `…`, with
/// control characters shown as `�`. Quote it with Display, not Debug, whose escapes would make each
/// character up to ten long again.
pub fn excerpt(text: &str) -> String {
    let mut chars = text.chars();
    let mut quoted: String = chars
        .by_ref()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if chars.next().is_some() {
        quoted.push('…');
    }
    quoted
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error, authentication_error, server_error, …
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Extra response headers (`Allow` on 405, `Retry-After` on 429/503).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: Vec::new(),
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }

    /// 400 about one field of the body.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::invalid(message)
        }
    }

    /// 400: an empty list of inputs (text-embeddings-inference answers it apart from other mistakes).
    pub fn empty_input(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("empty_input"),
            ..ApiError::invalid_param(param, message)
        }
    }

    pub fn model_not_found(model: &str, available: &[&str]) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                404,
                "invalid_request_error",
                format!(
                    "The model `{}` does not exist. Available models: {}.",
                    excerpt(model),
                    available.join(", ")
                ),
            )
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            code: Some("not_found"),
            ..ApiError::new(
                404,
                "invalid_request_error",
                format!("No route for {}.", excerpt(path)),
            )
        }
    }

    pub fn method_not_allowed(method: &str, allowed: &str) -> ApiError {
        ApiError {
            code: Some("method_not_allowed"),
            headers: vec![("Allow", allowed.to_string())],
            ..ApiError::new(
                405,
                "invalid_request_error",
                format!(
                    "Method {} is not allowed here; use {allowed}.",
                    excerpt(method)
                ),
            )
        }
    }

    pub fn too_large(limit: u64) -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                413,
                "invalid_request_error",
                format!("The request body exceeds {limit} bytes."),
            )
        }
    }

    pub fn timeout_reading_body(deadline: std::time::Duration) -> ApiError {
        ApiError {
            code: Some("request_timeout"),
            ..ApiError::new(
                408,
                "invalid_request_error",
                format!(
                    "The body did not arrive within {} s (or was shorter than its Content-Length).",
                    deadline.as_secs_f64()
                ),
            )
        }
    }

    /// 431: a request head (request line and headers) over the front door's limit.
    pub fn head_too_large(bytes: usize, lines: usize) -> ApiError {
        ApiError {
            code: Some("request_header_fields_too_large"),
            ..ApiError::new(
                431,
                "invalid_request_error",
                format!("The request head exceeds {bytes} bytes or {lines} header lines."),
            )
        }
    }

    /// 503 at the connection cap.
    pub fn too_many_connections() -> ApiError {
        ApiError {
            code: Some("too_many_connections"),
            headers: vec![("Retry-After", "1".into())],
            ..ApiError::new(
                503,
                "server_error",
                "Too many open connections; retry shortly.",
            )
        }
    }

    pub fn unsupported_media_type(found: &str) -> ApiError {
        ApiError {
            code: Some("unsupported_media_type"),
            ..ApiError::new(
                415,
                "invalid_request_error",
                if found.is_empty() {
                    "The body must be JSON, sent with Content-Type: application/json.".to_string()
                } else {
                    format!(
                        "The body must be JSON (Content-Type: application/json), not `{}`.",
                        excerpt(found)
                    )
                },
            )
        }
    }

    pub fn overloaded(
        status: u16,
        message: impl Into<String>,
        retry_after_seconds: u64,
    ) -> ApiError {
        ApiError {
            code: Some(if status == 429 {
                "queue_full"
            } else {
                "timeout"
            }),
            headers: vec![("Retry-After", retry_after_seconds.to_string())],
            ..ApiError::new(
                status,
                if status == 429 {
                    "rate_limit_error"
                } else {
                    "server_error"
                },
                message,
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            headers: vec![("WWW-Authenticate", "Bearer".into())],
            ..ApiError::new(401, "authentication_error", message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("unavailable"),
            headers: vec![("Retry-After", "1".into())],
            ..ApiError::new(503, "server_error", message)
        }
    }

    /// 500 without internals: the details go to the log, not to the client.
    pub fn internal() -> ApiError {
        ApiError::new(
            500,
            "server_error",
            "The server failed to handle this request; it has been logged.",
        )
    }

    pub fn body(&self) -> String {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_keep_short_text_and_cut_long_text_on_a_character_boundary() {
        assert_eq!(excerpt("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2");
        let exact = "x".repeat(EXCERPT_CHARS);
        assert_eq!(excerpt(&exact), exact);
        let long = "é".repeat(10_000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt("a\u{7f}\nb"), "a\u{fffd}\u{fffd}b");
    }

    #[test]
    fn every_message_that_quotes_the_client_quotes_an_excerpt() {
        let long = "A".repeat(5_000);
        let messages = [
            ApiError::model_not_found(&long, &["all-MiniLM-L6-v2"]).message,
            ApiError::not_found(&long).message,
            ApiError::method_not_allowed(&long, "GET").message,
            ApiError::unsupported_media_type(&long).message,
        ];
        for message in messages {
            assert!(message.len() < 300, "{message}");
            assert!(message.contains(&format!("{}…", "A".repeat(EXCERPT_CHARS))));
        }
    }
}
