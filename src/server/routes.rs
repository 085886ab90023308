//! Routing: from method and path to a handler, and from a handler's result to an HTTP response. Handlers
//! get plain values (method, path, headers, body) and return plain values, so a panic in one is caught and
//! answered with a 500 while the worker thread goes on.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use super::api::{self, Api, EmbedRequest, EncodingFormat, Vectors};
use super::dialects::{cohere, ollama, tei, ErrorShape};
use super::errors::{excerpt, ApiError};
use super::pipeline::{self, EmbedJob, Embedded, Fields, Prompt};
use super::rerank::{self, Shape};
use super::{compact, tokens, App};
use crate::models::Task;

/// The API's OpenAPI 3.1 document, written by hand and kept true by tests/openapi.rs.
const OPENAPI: &str = include_str!("../../assets/openapi.json");

/// A request with its body read, as the handlers see it.
pub struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    /// The server's own probe (`probe.rs`), marked by the front door.
    pub probe: bool,
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

    /// An error in the shape of the API `shape` names.
    pub fn error_as(shape: ErrorShape, error: ApiError) -> Outgoing {
        let (status, body) = shape.render(&error);
        Outgoing {
            status,
            content_type: "application/json",
            body,
            headers: error.headers,
            inputs: 0,
            tokens: 0,
        }
    }

    /// An embedding answer, counted for the log line.
    pub fn embeddings(body: String, embedded: &Embedded) -> Outgoing {
        Outgoing {
            inputs: embedded.vectors.len(),
            tokens: embedded.tokens,
            ..Outgoing::json(body)
        }
    }
}

/// Answers one request; never panics (a panicking handler becomes a 500).
pub fn handle(app: &App, request: &Incoming) -> Outgoing {
    contain_panics(
        request,
        error_shape(request.method, request.path),
        || app.metrics.record_panic(),
        || route_request(app, request),
    )
}

/// The error shape of the row that answers `method` on `path` (with or without its query): of the path's
/// first row when none takes the method, and OpenAI's for a path the server does not know.
pub fn error_shape(method: &str, path: &str) -> ErrorShape {
    let mut rows = rows_for(path).map(|(route, _)| route).peekable();
    let first = rows.peek().map(|route| route.errors);
    rows.find(|route| route.methods.contains(&method))
        .map(|route| route.errors)
        .or(first)
        .unwrap_or(ErrorShape::OpenAi)
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
    shape: ErrorShape,
    count_panic: impl FnOnce(),
    handler: impl FnOnce() -> Result<Outgoing, ApiError>,
) -> Outgoing {
    match std::panic::catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(outgoing)) => outgoing,
        Ok(Err(error)) => Outgoing::error_as(shape, error),
        Err(_) => {
            // The panic hook has logged the panic itself; this line ties it to the request.
            eprintln!(
                "error: the panic above happened handling {} {}",
                excerpt(request.method),
                excerpt(request.path)
            );
            count_panic();
            Outgoing::error_as(shape, ApiError::internal())
        }
    }
}

/// A handler: the app, the request, and the values of the path's `{...}` segments, in order.
type Handler = fn(&App, &Incoming, &[&str]) -> Result<Outgoing, ApiError>;

/// One row of the route table: a path, the methods it answers, its handler and the shape of its errors.
/// In `path`, a `{name}` segment matches one non-empty path segment; everything else matches exactly.
pub struct Route {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    handler: Handler,
    /// Whose error body the route answers with, whatever goes wrong (401, 405, 413, 500 included).
    pub errors: ErrorShape,
    /// An embedding route: the time of each of its requests, failed ones included, counts in the
    /// original's `encode_request_processing_seconds`.
    embeds: bool,
}

const fn route(path: &'static str, methods: &'static [&'static str], handler: Handler) -> Route {
    Route {
        path,
        methods,
        handler,
        errors: ErrorShape::OpenAi,
        embeds: false,
    }
}

impl Route {
    /// The same route, as an embedding route.
    const fn embedding(self) -> Route {
        Route {
            embeds: true,
            ..self
        }
    }

    /// The same route, answering its errors in `shape`.
    const fn speaking(self, shape: ErrorShape) -> Route {
        Route {
            errors: shape,
            ..self
        }
    }
}

/// Every route the server answers. The router reads it, and tests/openapi.rs checks it against
/// `/openapi.json` both ways, so adding a route is one row here, its handler, and its documentation. A
/// path may have a row per method when the methods belong to different APIs (`GET /` is the page,
/// `POST /` text-embeddings-inference's embed); a method it has no row for gets 405 naming them all.
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
    route("/v1/encode", &["GET", "POST"], encode).embedding(),
    route("/v1/encode/", &["GET", "POST"], encode).embedding(),
    route("/v1/embeddings", &["POST"], embeddings).embedding(),
    route("/v1/embeddings/", &["POST"], embeddings).embedding(),
    route("/embeddings", &["POST"], embeddings).embedding(),
    route("/embeddings/", &["POST"], embeddings).embedding(),
    route("/tokenize", &["POST"], tokens::tokenize),
    route("/decode", &["POST"], tokens::decode),
    route("/v1/models/{id}/quantization", &["GET"], quantization),
    // Ollama.
    route("/api/embed", &["POST"], ollama::embed)
        .embedding()
        .speaking(ErrorShape::Ollama),
    route("/api/embeddings", &["POST"], ollama::embeddings)
        .embedding()
        .speaking(ErrorShape::Ollama),
    route("/api/tags", &["GET"], ollama::tags).speaking(ErrorShape::Ollama),
    route("/api/version", &["GET"], ollama::version).speaking(ErrorShape::Ollama),
    // Cohere (v2).
    route("/v2/embed", &["POST"], cohere::embed)
        .embedding()
        .speaking(ErrorShape::Cohere),
    // text-embeddings-inference; `POST /` is what `InferenceClient(base_url=…)` calls.
    route("/", &["POST"], tei::embed)
        .embedding()
        .speaking(ErrorShape::Tei),
    route("/embed", &["POST"], tei::embed)
        .embedding()
        .speaking(ErrorShape::Tei),
    route("/info", &["GET"], tei::info).speaking(ErrorShape::Tei),
    // Rerankers: the Cohere / Jina shape, also at Cohere's version 2 path (what LangChain's CohereRerank
    // calls, answering errors as Cohere does there), and text-embeddings-inference's.
    route("/v1/rerank", &["POST"], rerank_cohere),
    route("/v2/rerank", &["POST"], rerank_cohere).speaking(ErrorShape::Cohere),
    route("/rerank", &["POST"], rerank_tei).speaking(ErrorShape::Tei),
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

/// The rows of the table that match `path` (with or without its query), with their `{...}` values.
fn rows_for(path: &str) -> impl Iterator<Item = (&'static Route, Vec<&str>)> {
    let path = path.split('?').next().unwrap_or("");
    ROUTES
        .iter()
        .filter_map(move |route| route.matches(path).map(|params| (route, params)))
}

fn route_request(app: &App, request: &Incoming) -> Result<Outgoing, ApiError> {
    let rows: Vec<_> = rows_for(request.path).collect();
    if rows.is_empty() {
        return Err(ApiError::not_found(
            request.path.split('?').next().unwrap_or(""),
        ));
    }
    match rows
        .iter()
        .find(|(route, _)| route.methods.contains(&request.method))
    {
        Some((route, params)) if route.embeds => {
            let started = Instant::now();
            let result = (route.handler)(app, request, params);
            app.metrics.record_processing(started.elapsed());
            result
        }
        Some((route, params)) => (route.handler)(app, request, params),
        None => {
            let allowed: Vec<&str> = rows
                .iter()
                .flat_map(|(route, _)| route.methods.iter().copied())
                .collect();
            Err(ApiError::method_not_allowed(
                request.method,
                &allowed.join(", "),
            ))
        }
    }
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

fn health(app: &App, request: &Incoming, _: &[&str]) -> Result<Outgoing, ApiError> {
    if app.lifecycle.draining() {
        // Load balancers take this as the signal to stop sending here.
        return Err(ApiError::unavailable("The server is shutting down."));
    }
    // The probe's own request having got here is the success it measures; anyone else hears whether the
    // probe has been getting through.
    if !request.probe && !app.health.healthy() {
        return Err(ApiError::unavailable(format!(
            "The server's self-probe has not got through for {:.0} s; see the server's log.",
            app.health.since_success().as_secs_f64()
        )));
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

fn embed(app: &App, api: Api, request: &Incoming) -> Result<Outgoing, ApiError> {
    api::require_json(request.content_type)?;
    let EmbedRequest {
        model,
        inputs,
        encoding_format,
        dimensions,
        task,
        truncate,
        truncation_direction,
    } = api::parse_embed_request(request.body)?;
    let job = EmbedJob {
        model,
        inputs,
        dimensions,
        prompt: match task {
            Some(name) => Prompt::Named {
                name,
                field: "task",
            },
            None => Prompt::None,
        },
        truncate,
        direction: truncation_direction,
        max_tokens: None,
        normalize: true,
        compact: match encoding_format {
            EncodingFormat::Compact(precision) => vec![precision],
            _ => Vec::new(),
        },
        api: match api {
            Api::Encode => "encode",
            Api::OpenAi => "embeddings",
        },
        fields: Fields {
            input: "input",
            dimensions: "dimensions",
            truncate_hint: "\"truncate\": true",
            compact: "encoding_format",
        },
    };
    let mut embedded = pipeline::embed(app, job)?;
    let count = embedded.vectors.len();
    let vectors = match encoding_format {
        EncodingFormat::Compact(_) => Vectors::Compact(embedded.compact.pop().unwrap_or_default()),
        EncodingFormat::Base64 => Vectors::Base64(std::mem::take(&mut embedded.vectors)),
        EncodingFormat::Float => Vectors::Float(std::mem::take(&mut embedded.vectors)),
    };
    let body = api::embeddings_response(&embedded.model, &vectors, embedded.dims, embedded.tokens);
    Ok(Outgoing {
        inputs: count,
        tokens: embedded.tokens,
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
    fn no_two_routes_share_a_path_and_a_method() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    b.path != a.path || b.methods.iter().all(|m| !a.methods.contains(m)),
                    "{} {:?} is in the table twice",
                    a.path,
                    a.methods
                );
            }
        }
    }

    #[test]
    fn errors_take_the_shape_of_the_row_that_answers_the_method() {
        assert_eq!(error_shape("GET", "/"), ErrorShape::OpenAi);
        assert_eq!(error_shape("POST", "/"), ErrorShape::Tei);
        assert_eq!(error_shape("DELETE", "/"), ErrorShape::OpenAi);
        assert_eq!(error_shape("GET", "/api/tags?x=1"), ErrorShape::Ollama);
        assert_eq!(error_shape("POST", "/v2/embed"), ErrorShape::Cohere);
        assert_eq!(error_shape("POST", "/nowhere"), ErrorShape::OpenAi);
    }

    #[test]
    fn a_panicking_handler_becomes_one_counted_500() {
        let request = Incoming {
            method: "POST",
            path: "/v1/embeddings",
            content_type: None,
            body: b"",
            probe: false,
        };
        let mut counted = 0;
        let outgoing = contain_panics(
            &request,
            ErrorShape::OpenAi,
            || counted += 1,
            || panic!("boom"),
        );
        assert_eq!((outgoing.status, counted), (500, 1));
        assert!(
            !outgoing.body.contains("boom"),
            "internals stay in the log: {}",
            outgoing.body
        );
    }
}
