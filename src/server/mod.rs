//! The HTTP server: a front door that owns every client connection on one thread (`front_door/`), tiny_http
//! behind it on a fixed set of internal connections, and a fixed pool of synchronous worker threads, each
//! reading one request, handing it to `routes`, and writing the answer; a self-probe (`probe.rs`) proves
//! the whole path. Models sit behind batching queues; this layer knows no tensors. The thread count is
//! fixed at start and does not grow with connections or load.

pub mod api;
mod auth;
mod compact;
mod config;
mod dialects;
mod errors;
mod front_door;
mod lifecycle;
mod metrics;
pub mod notify;
mod pipeline;
mod probe;
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
pub use config::{AuthConfig, DoorConfig, Limits, ProbeConfig, ServeConfig};
pub use dialects::ErrorShape;
use errors::ApiError;
use front_door::{DoorSettings, FrontDoor};
use lifecycle::Lifecycle;
use metrics::Metrics;
use probe::{Health, Prober};
use queue::BatchQueue;
use routes::{Incoming, Outgoing};
pub use routes::{Route, ROUTES};

/// What every worker shares.
pub struct App {
    queues: Vec<BatchQueue>,
    /// The model a request that names none gets: the first embedding model (the first model, should all
    /// be rerankers).
    default_model: String,
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
    /// When a worker last picked up a client's request (not the probe's): the heap is trimmed once
    /// traffic pauses.
    last_request: Mutex<Instant>,
    /// `--cors-allow-origin`: the origin browsers may call from; `None` sends no CORS headers.
    cors_allow_origin: Option<String>,
    /// Whether the self-probe has gone through lately; `/health` reports it.
    health: Health,
    /// Worker threads: the requests answered at once (text-embeddings-inference's `/info` reports it).
    threads: usize,
    /// The token budget of one engine batch (reported by `/info` too).
    max_batch_tokens: usize,
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
        probe: probe_config,
        ui,
    } = config;
    let auth = Auth::new(&auth.keys, &auth.key_files, auth.protect_metrics)?;
    let least_buffer = limits.max_body_bytes as usize + front_door::MAX_HEAD_BYTES;
    if door_config.max_buffered_bytes < least_buffer {
        return Err(format!(
            "--max-buffered-bytes ({}) must be at least --max-body-bytes plus 64 KiB ({least_buffer}), \
             or a request of the largest size could never be read",
            door_config.max_buffered_bytes
        ));
    }

    // One line per panic, whatever thread it happens on; the request it hit is answered 500 and logged.
    std::panic::set_hook(Box::new(|info| eprintln!("error: panic: {info}")));
    lifecycle::install_signal_handlers();
    let files = lifecycle::raise_fd_limit();
    // One worker more than asked for: it answers the self-probe, which has an internal connection of its
    // own, so that the probe never waits behind a busy queue.
    let workers = threads + 1;
    let max_connections = door_config.max_connections.unwrap_or_else(|| {
        files
            .saturating_sub(reserved_files(threads))
            .clamp(1, MOST_CONNECTIONS_BY_DEFAULT)
    });
    eprintln!(
        "open files: {files} allowed (soft limit, raised to the hard limit); at most {max_connections} \
         client connections"
    );

    let metrics = Arc::new(Metrics::new());
    let default_model = models
        .iter()
        .find(|m| m.spec.task == Task::Embed)
        .or(models.first())
        .map(|m| m.spec.name.to_string())
        .ok_or("no model to serve")?;
    let queues = models
        .into_iter()
        .map(|model| {
            metrics.record_model(&model.spec.name, model.precision().name());
            BatchQueue::start(
                Arc::new(model),
                max_batch_tokens,
                queue_capacity,
                Arc::clone(&metrics),
            )
        })
        .collect::<Result<Vec<_>, String>>()?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let address = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let settings = DoorSettings {
        max_connections,
        idle_timeout: door_config.idle_timeout,
        header_timeout: door_config.header_timeout,
        body_timeout: door_config.body_timeout,
        max_body_bytes: limits.max_body_bytes,
        max_buffered_bytes: door_config.max_buffered_bytes,
        connections: threads,
        cors_allow_origin: cors_allow_origin.clone(),
    };
    let (door, internal, door_ready) = FrontDoor::start(&address, settings, Arc::clone(&metrics))?;
    let prober = Prober::new(
        door.local_addr(),
        probe_config.interval,
        probe_config.unhealthy_exit,
    );
    let app = Arc::new(App {
        queues,
        default_model,
        limits,
        metrics,
        started,
        up_since: Instant::now(),
        ui: ui.then(ui::Page::new),
        auth,
        lifecycle: Lifecycle::new(),
        last_request: Mutex::new(Instant::now()),
        cors_allow_origin,
        health: prober.health(),
        threads,
        max_batch_tokens,
    });
    let server = tiny_http::Server::from_listener(internal, None)
        .map_err(|e| format!("cannot serve: {e}"))?;
    let server = Arc::new(server);
    for i in 0..workers {
        let server = Arc::clone(&server);
        let app = Arc::clone(&app);
        spawn(&format!("http-{i}"), move || work(&server, &app))?;
    }
    let trimmer = Arc::clone(&app);
    spawn("heap-trim", move || trim_when_idle(&trimmer))?;

    // Every internal connection answers, so tiny_http's threads and the workers run; then one request
    // through the public socket proves the rest of the path before the service manager hears READY=1.
    match door_ready.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(format!("cannot start serving: {why}")),
        Err(_) => return Err("cannot start serving: the front door did not start".into()),
    }
    prober
        .probe(&|peer| door.expect_probe_from(peer))
        .map_err(|why| format!("cannot start serving: the first self-probe failed: {why}"))?;
    println!("listening on http://{}", door.local_addr());
    notify::ready();
    let door = Arc::new(door);
    let (probing_door, probing_app) = (Arc::clone(&door), Arc::clone(&app));
    spawn("self-probe", move || {
        let probing = std::panic::AssertUnwindSafe(|| {
            prober.run(&probing_door, &probing_app.health, &|| {
                probing_app.lifecycle.draining()
            })
        });
        if std::panic::catch_unwind(probing).is_err() {
            lifecycle::fatal("the self-probe's thread panicked (logged above)");
        }
    })?;

    app.lifecycle.wait_for_signal();
    notify::stopping();
    eprintln!(
        "draining: no new connections; finishing {} request(s) on {} open connection(s)",
        app.lifecycle.in_flight(),
        door.open_connections()
    );
    door.close();
    let drained = app.lifecycle.wait_for(shutdown_timeout, &|| {
        door.open_connections() == 0 && app.lifecycle.in_flight() == 0
    });
    if drained {
        eprintln!("drained: every accepted request was answered; exiting");
    } else {
        eprintln!(
            "shutdown deadline passed with {} request(s) in flight on {} connection(s); exiting",
            app.lifecycle.in_flight(),
            door.open_connections()
        );
    }
    std::process::exit(0);
}

/// Starts a named thread; a failure (the host's task limit) is an error that says so.
fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot start the thread {name}: {e} (the host's task limit, e.g. pids.max or systemd's \
                 TasksMax, is below what the server needs; see deploy/README.md)"
            )
        })
}

/// The default `--max-connections` never exceeds this, however many files the host allows (container
/// runtimes often allow a million): an idle connection costs a descriptor, 250–400 bytes in the front
/// door and 3–4 KiB of kernel memory, so this many cost at most about 256 MiB.
const MOST_CONNECTIONS_BY_DEFAULT: usize = 65_536;

/// File descriptors the server needs besides its client connections: both ends of each internal
/// connection (one per worker, the probe's included), the probe's own connection, and a margin for stdio,
/// the listener, epoll, the model files at start and the notify socket. The default `--max-connections`
/// is the open-file limit less this (at most [`MOST_CONNECTIONS_BY_DEFAULT`]).
fn reserved_files(threads: usize) -> usize {
    64 + 2 * (threads + 1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker: takes requests until the process exits. A panic while answering costs that request only
/// (tiny_http answers a dropped request 500); the worker goes on.
fn work(server: &tiny_http::Server, app: &App) {
    loop {
        match server.recv() {
            Ok(request) => {
                let _in_flight = app.lifecycle.track();
                let answered =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(app, request)));
                if answered.is_err() {
                    app.metrics.record_panic();
                }
            }
            // tiny_http's accept loop has ended: no internal connection can be replaced any more.
            Err(e) => lifecycle::fatal(&format!("tiny_http stopped accepting connections: {e}")),
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

/// Reads the body, at most `limit` bytes of it. The front door hands on only whole bodies within the
/// limit, so this never waits; the limit is checked again all the same.
fn read_body(reader: &mut dyn Read, limit: u64) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    match reader.take(limit + 1).read_to_end(&mut body) {
        Ok(_) if body.len() as u64 > limit => Err(ApiError::too_large(limit)),
        Ok(_) => Ok(body),
        Err(e) => Err(ApiError::invalid(format!(
            "The body could not be read: {e}."
        ))),
    }
}

/// Reads the body, routes, writes the response and the log line (none for the self-probe).
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
    // Only the front door sets this, and only on the self-probe's requests.
    let probe = header(front_door::PROBE_HEADER).is_some();
    if !probe {
        *lock(&app.last_request) = started;
    }
    let limit = app.limits.max_body_bytes;
    let route_path = path.split('?').next().unwrap_or("").to_string();
    // Errors met before the handler runs are still written in the shape of the route's API.
    let error = |error| Outgoing::error_as(routes::error_shape(&method, &route_path), error);

    let outgoing = match app
        .auth
        .check(&method, &route_path, authorization.as_deref())
    {
        _ if routes::is_cors_preflight(app, &method) => routes::cors_preflight(),
        Err(e) => error(e),
        Ok(()) => match read_body(request.as_reader(), limit) {
            Ok(body) => routes::handle(
                app,
                &Incoming {
                    method: &method,
                    path: &path,
                    content_type: content_type.as_deref(),
                    body: &body,
                    probe,
                },
            ),
            Err(e) => error(e),
        },
    };
    let outgoing = routes::with_cors(app, outgoing);
    if outgoing.status >= 400 && !probe {
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
    if probe {
        return;
    }
    let shown = errors::excerpt(&route_path);
    eprintln!(
        "{method} {shown} {status} inputs={inputs} tokens={tokens} {:.1}ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
}
