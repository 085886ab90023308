//! The HTTP server: tiny_http with a pool of synchronous worker threads, each reading one request, handing
//! it to `routes`, and writing the answer. Models sit behind batching queues; this layer knows no tensors.

pub mod api;
mod errors;
mod metrics;
pub mod notify;
mod queue;
mod routes;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiny_http::{Header, Response};

use crate::cli::Options;
use crate::models::Model;
use errors::ApiError;
use metrics::Metrics;
use queue::BatchQueue;
use routes::{Incoming, Outgoing};

/// The limits every request is held to.
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_inputs: usize,
    pub max_request_tokens: usize,
    /// Whether over-long inputs are cut (the original's behaviour) rather than refused.
    pub truncate: bool,
    pub request_timeout: Duration,
}

/// What every worker shares.
pub struct App {
    queues: Vec<BatchQueue>,
    default_model: String,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Unix time the server started, reported as the models' `created`.
    started: u64,
    /// `--cors-allow-origin`: the origin browsers may call from; `None` sends no CORS headers.
    cors_allow_origin: Option<String>,
}

impl App {
    fn model_names(&self) -> Vec<&str> {
        self.queues.iter().map(|q| q.model().spec.name).collect()
    }

    fn queue(&self, name: &str) -> Result<&BatchQueue, ApiError> {
        self.queues
            .iter()
            .find(|q| q.model().spec.name == name)
            .ok_or_else(|| ApiError::model_not_found(name, &self.model_names()))
    }
}

pub fn serve(options: &Options, models: Vec<Model>) -> Result<(), String> {
    let limits = Limits {
        max_body_bytes: options.number("max-body-bytes")?,
        max_inputs: options.number("max-inputs")?,
        max_request_tokens: options.number("max-request-tokens")?,
        truncate: !options.switch("no-truncate"),
        request_timeout: Duration::from_secs_f64(options.number("request-timeout")?),
    };
    let threads: usize = options.number::<usize>("threads")?.max(1);
    let max_batch_tokens: usize = options.number("max-batch-tokens")?;
    let capacity: usize = options.number("queue-capacity")?;
    let host = options.text("host").unwrap_or("127.0.0.1");
    let port: u16 = options.number("port")?;

    let metrics = Arc::new(Metrics::new());
    let default_model = models
        .first()
        .map(|m| m.spec.name.to_string())
        .ok_or("no model to serve")?;
    let queues = models
        .into_iter()
        .map(|model| {
            BatchQueue::start(
                Arc::new(model),
                max_batch_tokens,
                capacity,
                Arc::clone(&metrics),
            )
        })
        .collect();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let app = Arc::new(App {
        queues,
        default_model,
        limits,
        metrics,
        started,
        cors_allow_origin: options.text("cors-allow-origin").map(String::from),
    });

    let address = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let server = tiny_http::Server::http(&address).map_err(|e| {
        format!("cannot listen on {address}: {e} (is the port taken? try --port 0 for a free one)")
    })?;
    let server = Arc::new(server);
    println!("listening on http://{}", server.server_addr());
    notify::ready();
    notify::start_watchdog();

    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let server = Arc::clone(&server);
            let app = Arc::clone(&app);
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        answer(&app, request);
                    }
                })
                .map_err(|e| format!("cannot start worker threads: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// Reads the body, routes, writes the response and the log line.
fn answer(app: &App, mut request: tiny_http::Request) {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let path = request.url().to_string();
    let header = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
    };
    let content_type = header("Content-Type");
    let declared: Option<u64> = header("Content-Length").and_then(|v| v.trim().parse().ok());
    let limit = app.limits.max_body_bytes;

    let outgoing = if declared.is_some_and(|n| n > limit) {
        Outgoing::error(ApiError::too_large(limit))
    } else {
        let mut body = Vec::new();
        match request.as_reader().take(limit + 1).read_to_end(&mut body) {
            Ok(_) if body.len() as u64 > limit => Outgoing::error(ApiError::too_large(limit)),
            Ok(_) => routes::handle(
                app,
                &Incoming {
                    method: &method,
                    path: &path,
                    content_type: content_type.as_deref(),
                    body: &body,
                },
            ),
            Err(e) => Outgoing::error(ApiError::invalid(format!(
                "The body could not be read: {e}."
            ))),
        }
    };

    let status = outgoing.status;
    let (inputs, tokens) = (outgoing.inputs, outgoing.tokens);
    let mut response = Response::from_data(outgoing.body.into_bytes()).with_status_code(status);
    let mut headers = vec![("Content-Type", outgoing.content_type.to_string())];
    headers.extend(outgoing.headers);
    for (name, value) in headers {
        if let Ok(header) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    // A client that went away mid-response costs only its own answer.
    let _ = request.respond(response);
    eprintln!(
        "{method} {} {status} inputs={inputs} tokens={tokens} {:.1}ms",
        path.split('?').next().unwrap_or(""),
        started.elapsed().as_secs_f64() * 1000.0
    );
}
