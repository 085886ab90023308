//! Routing: from method and path to a handler, and from a handler's result to an HTTP response. Handlers
//! get plain values (method, path, headers, body) and return plain values, so a panic in one is caught and
//! answered with a 500 while the worker thread goes on.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::api::{self, Api, EmbedRequest, EncodingFormat, Vectors};
use super::errors::{excerpt, ApiError};
use super::queue::QueueError;
use super::rerank::{self, Shape};
use super::{compact, tokens, App};
use crate::models::{ErrorKind, Task, Tokens};

/// The API's OpenAPI 3.1 document, written by hand and kept true by tests/openapi.rs.
const OPENAPI: &str = include_str!("../../assets/openapi.json");

/// A request with its body read, as the handlers see it.
pub struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

/// A handler's answer.
pub struct Outgoing {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    /// For the log line: inputs and tokens of an embedding request.
    pub inputs: usize,
    pub tokens: usize,
}

impl Outgoing {
    pub fn json(body: String) -> Outgoing {
        Outgoing {
            status: 200,
            content_type: "application/json",
            body,
            headers: Vec::new(),
            inputs: 0,
            tokens: 0,
        }
    }

    pub fn error(error: ApiError) -> Outgoing {
        Outgoing {
            status: error.status,
            content_type: "application/json",
            body: error.body(),
            headers: error.headers.clone(),
            inputs: 0,
            tokens: 0,
        }
    }
}

/// Answers one request; never panics (a panicking handler becomes a 500).
pub fn handle(app: &App, request: &Incoming) -> Outgoing {
    contain_panics(
        request,
        || app.metrics.record_panic(),
        || route_request(app, request),
    )
}

/// Whether `method` is a CORS preflight this server answers: only with `--cors-allow-origin`. Browsers send
/// preflights without credentials, so they are answered before authentication counts.
pub fn is_cors_preflight(app: &App, method: &str) -> bool {
    app.cors_allow_origin.is_some() && method == "OPTIONS"
}

/// The answer to a CORS preflight: which methods and headers a cross-origin request may use.
pub fn cors_preflight() -> Outgoing {
    Outgoing {
        status: 204,
        headers: vec![
            (
                "Access-Control-Allow-Methods",
                "GET, POST, OPTIONS".to_string(),
            ),
            (
                "Access-Control-Allow-Headers",
                "Content-Type, Authorization".to_string(),
            ),
            ("Access-Control-Max-Age", "86400".to_string()),
        ],
        ..Outgoing::json(String::new())
    }
}

/// Adds the CORS headers `--cors-allow-origin` asks for to any answer, errors included (a browser hides
/// an error's body from the page otherwise).
pub fn with_cors(app: &App, mut outgoing: Outgoing) -> Outgoing {
    if let Some(origin) = &app.cors_allow_origin {
        outgoing
            .headers
            .push(("Access-Control-Allow-Origin", origin.clone()));
        // A cache must not hand one origin's answer to another when the allowed origin is not a wildcard.
        if origin != "*" {
            outgoing.headers.push(("Vary", "Origin".to_string()));
        }
    }
    outgoing
}

fn contain_panics(
    request: &Incoming,
    count_panic: impl FnOnce(),
    handler: impl FnOnce() -> Result<Outgoing, ApiError>,
) -> Outgoing {
    match std::panic::catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(outgoing)) => outgoing,
        Ok(Err(error)) => Outgoing::error(error),
        Err(_) => {
            // The panic hook has logged the panic itself; this line ties it to the request.
            eprintln!(
                "error: the panic above happened handling {} {}",
                excerpt(request.method),
                excerpt(request.path)
            );
            count_panic();
            Outgoing::error(ApiError::internal())
        }
    }
}

/// A handler: the app, the request, and the values of the path's `{...}` segments, in order.
type Handler = fn(&App, &Incoming, &[&str]) -> Result<Outgoing, ApiError>;

/// One row of the route table: a path, the methods it answers and its handler. In `path`, a `{name}`
/// segment matches one non-empty path segment; everything else matches exactly.
pub struct Route {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    handler: Handler,
}

const fn route(path: &'static str, methods: &'static [&'static str], handler: Handler) -> Route {
    Route {
        path,
        methods,
        handler,
    }
}

/// Every route the server answers. The router reads it, and tests/openapi.rs checks it against
/// `/openapi.json` both ways, so adding a route is one row here, its handler, and its documentation.
pub const ROUTES: &[Route] = &[
    route("/", &["GET"], page),
    route("/openapi.json", &["GET"], openapi),
    route("/health", &["GET"], health),
    route("/metrics", &["GET"], metrics),
    route("/metrics/", &["GET"], metrics),
    route("/v1/info", &["GET"], info),
    route("/v1/models", &["GET"], models_list),
    route("/v1/models/", &["GET"], models_list),
    route("/v1/models/{id}", &["GET"], model_card),
    route("/v1/encode", &["GET", "POST"], encode),
    route("/v1/encode/", &["GET", "POST"], encode),
    route("/v1/embeddings", &["POST"], embeddings),
    route("/v1/embeddings/", &["POST"], embeddings),
    route("/embeddings", &["POST"], embeddings),
    route("/embeddings/", &["POST"], embeddings),
    route("/v1/rerank", &["POST"], rerank_cohere),
    // Cohere's version 2 path: what LangChain's CohereRerank calls.
    route("/v2/rerank", &["POST"], rerank_cohere),
    route("/rerank", &["POST"], rerank_tei),
    route("/tokenize", &["POST"], tokens::tokenize),
    route("/decode", &["POST"], tokens::decode),
    route("/v1/models/{id}/quantization", &["GET"], quantization),
];

impl Route {
    /// The values of the `{...}` segments if `path` matches this route.
    fn matches<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let mut pattern = self.path.split('/');
        let mut given = path.split('/');
        let mut params = Vec::new();
        loop {
            match (pattern.next(), given.next()) {
                (None, None) => return Some(params),
                (Some(p), Some(g)) if p.starts_with('{') && p.ends_with('}') && !g.is_empty() => {
                    params.push(g)
                }
                (Some(p), Some(g)) if p == g => {}
                _ => return None,
            }
        }
    }
}

fn route_request(app: &App, request: &Incoming) -> Result<Outgoing, ApiError> {
    let path = request.path.split('?').next().unwrap_or("");
    let (route, params) = ROUTES
        .iter()
        .find_map(|route| route.matches(path).map(|params| (route, params)))
        .ok_or_else(|| ApiError::not_found(path))?;
    if !route.methods.contains(&request.method) {
        return Err(ApiError::method_not_allowed(
            request.method,
            &route.methods.join(", "),
        ));
    }
    (route.handler)(app, request, &params)
}

/// With `--no-ui` the page is not there: 404, as for any path the server does not know.
fn page(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    match &app.ui {
        Some(page) => Ok(page.answer()),
        None => Err(ApiError::not_found("/")),
    }
}

fn openapi(_: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    Ok(Outgoing::json(OPENAPI.into()))
}

fn health(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    if app.lifecycle.draining() {
        // Load balancers take this as the signal to stop sending here.
        return Err(ApiError::unavailable("The server is shutting down."));
    }
    Ok(Outgoing::json(r#"{"status":"ok"}"#.into()))
}

fn metrics(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    Ok(Outgoing {
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        ..Outgoing::json(app.metrics.render())
    })
}

fn info(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    let uptime = app.up_since.elapsed().as_secs();
    Ok(Outgoing::json(api::info(app.started, uptime)))
}

fn models_list(app: &App, _: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    Ok(Outgoing::json(api::models_list(&app.model_names())))
}

fn model_card(app: &App, _: &Incoming, params: &[&str]) -> Result<Outgoing, ApiError> {
    let model = app.queue(params[0])?.model();
    Ok(Outgoing::json(api::model_card(model, app.started)))
}

fn quantization(app: &App, _: &Incoming, params: &[&str]) -> Result<Outgoing, ApiError> {
    // A reranker gives scores, not vectors: nothing to quantize.
    let model = app.queue_for(Some(params[0]), Task::Embed)?.model();
    let calibrated = compact::ranges(model)?;
    Ok(Outgoing::json(api::quantization_card(model, &calibrated)))
}

fn encode(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    embed(app, Api::Encode, request)
}

fn embeddings(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    embed(app, Api::OpenAi, request)
}

fn rerank_cohere(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    rerank::handle(app, Shape::Cohere, request)
}

fn rerank_tei(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    rerank::handle(app, Shape::Tei, request)
}

/// The answer to a request whose inputs the queue did not turn into vectors; `param` is the body's field
/// that holds them.
pub(super) fn engine_error(error: QueueError, model: &str, param: &str) -> ApiError {
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

fn embed(app: &App, api: Api, request: &Incoming) -> Result<Outgoing, ApiError> {
    let started = Instant::now();
    let result = embed_inner(app, api, request);
    app.metrics.record_processing(started.elapsed());
    result
}

fn embed_inner(app: &App, api: Api, request: &Incoming) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let body = api::parse_embed_request(request.body)?;
    let EmbedRequest {
        model,
        inputs,
        encoding_format,
        dimensions,
        task,
        truncate,
        truncation_direction,
    } = body;
    let queue = app.queue_for(model.as_deref(), Task::Embed)?;
    let model = queue.model();
    let spec = &model.spec;
    let limits = &app.limits;

    if inputs.len() > limits.max_inputs {
        return Err(ApiError::invalid_param(
            "input",
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
                "dimensions",
                format!(
                    "{} cannot give {d} dimensions; allowed: {}.",
                    spec.name,
                    allowed.join(", ")
                ),
            ));
        }
    };
    let prefix = api::prompt_prefix(spec, task.as_deref(), "task")?;
    let truncate = truncate.unwrap_or(limits.truncate);
    // A compact format is checked (and int8/uint8 calibrated) before the engine spends anything.
    let compact = match encoding_format {
        EncodingFormat::Compact(precision) => {
            Some(compact::prepare(model, precision, dims, "encoding_format")?)
        }
        _ => None,
    };

    let mut tokenized: Vec<Tokens> = Vec::with_capacity(inputs.len());
    let mut total = 0usize;
    for (index, input) in inputs.iter().enumerate() {
        let tokens = model
            .tokenize(input, prefix, truncation_direction)
            .map_err(|e| match e.kind {
                ErrorKind::InvalidInput => {
                    ApiError::invalid_param("input", format!("input {index}: {e}"))
                }
                _ => {
                    eprintln!("error: tokenising input {index} for {}: {e}", spec.name);
                    ApiError::internal()
                }
            })?;
        if !truncate && tokens.untruncated > model.max_tokens() {
            return Err(ApiError::invalid_param(
                "input",
                format!(
                    "input {index} has {} tokens; {} takes at most {} (send \"truncate\": true to cut it).",
                    tokens.untruncated,
                    spec.name,
                    model.max_tokens()
                ),
            ));
        }
        total += tokens.ids.len();
        if total > limits.max_request_tokens {
            return Err(ApiError::invalid_param(
                "input",
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
        .map_err(|e| engine_error(e, &spec.name, "input"))?;
    let count = pooled.len();
    let embeddings: Vec<Vec<f32>> = pooled.into_iter().map(|p| model.finish(p, dims)).collect();
    let vectors = match (encoding_format, &compact) {
        (_, Some(prepared)) => Vectors::Compact(compact::convert(prepared, &embeddings)?),
        (EncodingFormat::Base64, None) => Vectors::Base64(embeddings),
        _ => Vectors::Float(embeddings),
    };
    let api_label = if api == Api::Encode {
        "encode"
    } else {
        "embeddings"
    };
    app.metrics
        .record_request(&spec.name, api_label, count, total, truncated);
    let body = api::embeddings_response(&spec.name, &vectors, dims, total);
    Ok(Outgoing {
        inputs: count,
        tokens: total,
        ..Outgoing::json(body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_segment_matches_one_non_empty_segment() {
        let card = ROUTES.iter().find(|r| r.path == "/v1/models/{id}").unwrap();
        assert_eq!(card.matches("/v1/models/m"), Some(vec!["m"]));
        assert_eq!(card.matches("/v1/models/"), None);
        assert_eq!(card.matches("/v1/models/a/b"), None);
        assert_eq!(card.matches("/v1/models"), None);
        let health = ROUTES.iter().find(|r| r.path == "/health").unwrap();
        assert_eq!(health.matches("/health"), Some(vec![]));
        assert_eq!(health.matches("/health/"), None);
    }

    #[test]
    fn no_two_routes_share_a_path() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(
                ROUTES[i + 1..].iter().all(|b| b.path != a.path),
                "{} is in the table twice",
                a.path
            );
        }
    }

    #[test]
    fn a_panicking_handler_becomes_one_counted_500() {
        let request = Incoming {
            method: "POST",
            path: "/v1/embeddings",
            content_type: None,
            body: b"",
        };
        let mut counted = 0;
        let outgoing = contain_panics(&request, || counted += 1, || panic!("boom"));
        assert_eq!((outgoing.status, counted), (500, 1));
        assert!(
            !outgoing.body.contains("boom"),
            "internals stay in the log: {}",
            outgoing.body
        );
    }
}
