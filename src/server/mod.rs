//! The HTTP server: tiny_http with a pool of synchronous worker threads, each reading one request, handing
//! it to `routes`, and writing the answer. Models sit behind batching queues; this layer knows no tensors.

pub mod api;
mod auth;
mod compact;
mod config;
mod errors;
mod front_door;
mod lifecycle;
mod metrics;
pub mod notify;
mod queue;
mod rerank;
mod routes;
mod tokens;
mod ui;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiny_http::{Header, Response};

use crate::models::{Model, Task};
use auth::Auth;
pub use config::{AuthConfig, DoorConfig, Limits, ServeConfig};
use errors::ApiError;
use front_door::FrontDoor;
use lifecycle::Lifecycle;
use metrics::Metrics;
use queue::BatchQueue;
use routes::{Incoming, Outgoing};
pub use routes::{Route, ROUTES};

/// What every worker shares.
pub struct App {
    queues: Vec<BatchQueue>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Unix time the server started, reported as the models' `created` and by `/v1/info`.
    started: u64,
    /// The same moment on the monotonic clock, for `/v1/info`'s uptime.
    up_since: Instant,
    /// The page at `/`; `None` with `--no-ui`.
    ui: Option<ui::Page>,
    auth: Auth,
    lifecycle: Lifecycle,
    /// When a worker last picked up a request: the drain waits for a quiet moment before exiting.
    last_request: Mutex<Instant>,
    /// `--cors-allow-origin`: the origin browsers may call from; `None` sends no CORS headers.
    cors_allow_origin: Option<String>,
}

impl App {
    fn model_names(&self) -> Vec<&str> {
        self.queues
            .iter()
            .map(|q| q.model().spec.name.as_str())
            .collect()
    }

    fn queue(&self, name: &str) -> Result<&BatchQueue, ApiError> {
        self.queues
            .iter()
            .find(|q| q.model().spec.name == name)
            .ok_or_else(|| ApiError::model_not_found(name, &self.model_names()))
    }

    /// The first loaded model's queue (`serve` refuses to start without one).
    fn first_queue(&self) -> &BatchQueue {
        &self.queues[0]
    }

    /// The queue of the model a request for `task` names, or of the first model loaded for `task` when it
    /// names none; a model of the other task is a 400 that says which endpoint fits it.
    fn queue_for(&self, name: Option<&str>, task: Task) -> Result<&BatchQueue, ApiError> {
        let of_task = |t: Task| -> Vec<&str> {
            self.queues
                .iter()
                .filter(|q| q.model().spec.task == t)
                .map(|q| q.model().spec.name.as_str())
                .collect()
        };
        let (endpoint, other_endpoint, kind, other_kind) = match task {
            Task::Embed => (
                "/v1/embeddings",
                "/v1/rerank",
                "embedding model",
                "reranker",
            ),
            Task::Rerank => (
                "/v1/rerank",
                "/v1/embeddings",
                "reranker",
                "embedding model",
            ),
        };
        let listed = |names: Vec<&str>| {
            if names.is_empty() {
                "none is loaded".to_string()
            } else {
                names.join(", ")
            }
        };
        let queue = match name {
            Some(name) => self.queue(name)?,
            None => self
                .queues
                .iter()
                .find(|q| q.model().spec.task == task)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "model",
                        format!(
                            "This server has no {kind} to answer {endpoint}; its models ({}) are each a \
                             {other_kind}: use {other_endpoint}.",
                            self.model_names().join(", ")
                        ),
                    )
                })?,
        };
        let spec = &queue.model().spec;
        if spec.task != task {
            return Err(ApiError::invalid_param(
                "model",
                format!(
                    "{} is a {other_kind}: send its requests to {other_endpoint}. {endpoint} takes a {kind}: \
                     {}.",
                    spec.name,
                    listed(of_task(task))
                ),
            ));
        }
        Ok(queue)
    }
}

pub fn serve(config: ServeConfig, models: Vec<Model>) -> Result<(), String> {
    let ServeConfig {
        host,
        port,
        threads,
        limits,
        door: door_config,
        max_batch_tokens,
        queue_capacity,
        shutdown_timeout,
        auth,
        cors_allow_origin,
        ui,
    } = config;
    let auth = Auth::new(&auth.keys, &auth.key_files, auth.protect_metrics)?;

    let metrics = Arc::new(Metrics::new());
    if models.is_empty() {
        return Err("no model to serve".into());
    }
    let queues = models
        .into_iter()
        .map(|model| {
            BatchQueue::start(
                Arc::new(model),
                max_batch_tokens,
                queue_capacity,
                Arc::clone(&metrics),
            )
        })
        .collect();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let app = Arc::new(App {
        queues,
        limits,
        metrics,
        started,
        up_since: Instant::now(),
        ui: ui.then(ui::Page::new),
        auth,
        lifecycle: Lifecycle::new(),
        last_request: Mutex::new(Instant::now()),
        cors_allow_origin,
    });

    // One line per panic, whatever thread it happens on; the request it hit is answered 500 and logged.
    std::panic::set_hook(Box::new(|info| eprintln!("error: panic: {info}")));
    lifecycle::install_signal_handlers();
    let files = lifecycle::raise_fd_limit();
    let address = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let max_connections = door_config
        .max_connections
        .unwrap_or_else(|| files.saturating_sub(reserved_files(threads)).max(1));
    eprintln!("open files: soft limit {files}; serving at most {max_connections} connections");
    let (door, internal) = FrontDoor::bind(
        &address,
        &door_config,
        max_connections,
        app.limits.body_timeout,
    )?;
    let server = tiny_http::Server::from_listener(internal, None)
        .map_err(|e| format!("cannot serve: {e}"))?;
    let server = Arc::new(server);
    let accepting = Arc::clone(&door);
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accepting.run())
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    println!("listening on http://{}", door.local_addr());
    notify::ready();
    notify::start_watchdog();

    for i in 0..threads {
        let server = Arc::clone(&server);
        let app = Arc::clone(&app);
        std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || work(&server, &app))
            .map_err(|e| format!("cannot start worker threads: {e}"))?;
    }
    let trimmer = Arc::clone(&app);
    std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(move || trim_when_idle(&trimmer))
        .map_err(|e| format!("cannot start a thread: {e}"))?;

    app.lifecycle.wait_for_signal();
    notify::stopping();
    eprintln!(
        "draining: no new connections; finishing {} request(s) on {} open connection(s)",
        app.lifecycle.in_flight(),
        door.open_connections()
    );
    door.close();
    let last_request = || *lock(&app.last_request);
    let left =
        app.lifecycle
            .wait_for_idle(shutdown_timeout, Duration::from_millis(300), &last_request);
    if left == 0 {
        eprintln!("drained: every accepted request was answered; exiting");
    } else {
        eprintln!("shutdown deadline passed with {left} request(s) still in flight; exiting");
    }
    std::process::exit(0);
}

/// File descriptors the server needs besides its client connections: stdio, the listener, the internal
/// socket and both ends of each internal connection (one per worker, plus the probe's), and a margin for
/// the model files at start and the notify socket. The default `--max-connections` is the open-file limit
/// less this.
fn reserved_files(threads: usize) -> usize {
    64 + 2 * (threads + 1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker: takes requests until the drain ends the process.
fn work(server: &tiny_http::Server, app: &App) {
    loop {
        match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(request)) => {
                let _in_flight = app.lifecycle.track();
                *lock(&app.last_request) = Instant::now();
                answer(app, request);
            }
            Ok(None) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Gives freed memory back once traffic pauses, so RSS follows the load down.
fn trim_when_idle(app: &App) {
    let mut trimmed_after = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let last = *lock(&app.last_request);
        if last > trimmed_after
            && last.elapsed() >= Duration::from_secs(1)
            && app.lifecycle.in_flight() == 0
        {
            lifecycle::trim_heap();
            trimmed_after = Instant::now();
        }
    }
}

/// Reads at most `limit` bytes of body, and for at most `deadline` in all: a client trickling its body
/// byte by byte holds a worker no longer than that.
fn read_body(reader: &mut dyn Read, limit: u64, deadline: Duration) -> Result<Vec<u8>, ApiError> {
    let started = Instant::now();
    let mut body = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if started.elapsed() > deadline {
            return Err(ApiError::timeout_reading_body(deadline));
        }
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(body),
            Ok(n) => {
                body.extend_from_slice(&chunk[..n]);
                if body.len() as u64 > limit {
                    return Err(ApiError::too_large(limit));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ApiError::timeout_reading_body(deadline));
            }
            Err(e) => {
                return Err(ApiError::invalid(format!(
                    "The body could not be read: {e}."
                )))
            }
        }
    }
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
    let authorization = header("Authorization");
    let declared: Option<u64> = header("Content-Length").and_then(|v| v.trim().parse().ok());
    let limit = app.limits.max_body_bytes;
    let route_path = path.split('?').next().unwrap_or("").to_string();

    let outgoing = match app.auth.check(&route_path, authorization.as_deref()) {
        _ if routes::is_cors_preflight(app, &method) => routes::cors_preflight(),
        Err(error) => Outgoing::error(error),
        Ok(()) if declared.is_some_and(|n| n > limit) => {
            Outgoing::error(ApiError::too_large(limit))
        }
        Ok(()) => match read_body(request.as_reader(), limit, app.limits.body_timeout) {
            // The front door cut a stalled body short: tiny_http reports that as an early end.
            Ok(body) if declared.is_some_and(|n| (body.len() as u64) < n) => {
                Outgoing::error(ApiError::timeout_reading_body(app.limits.body_timeout))
            }
            Ok(body) => routes::handle(
                app,
                &Incoming {
                    method: &method,
                    path: &path,
                    content_type: content_type.as_deref(),
                    body: &body,
                },
            ),
            Err(error) => Outgoing::error(error),
        },
    };
    let outgoing = routes::with_cors(app, outgoing);
    if outgoing.status >= 400 {
        app.metrics.record_error(outgoing.status);
    }

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
    let shown = errors::excerpt(&route_path);
    eprintln!(
        "{method} {shown} {status} inputs={inputs} tokens={tokens} {:.1}ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
}
