//! What `serve` is told: every setting of the HTTP layer, typed and already checked. `cli.rs` builds it
//! from the flags; nothing under `src/server/` reads a flag or the environment.

use std::time::Duration;

/// Everything `serve` needs besides the models.
pub struct ServeConfig {
    /// The address to listen on, as given (`127.0.0.1`, `::1`, `0.0.0.0`, a name).
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// HTTP worker threads, each answering one request at a time (at least 1).
    pub threads: usize,
    pub limits: Limits,
    pub door: DoorConfig,
    /// The token budget of one engine batch.
    pub max_batch_tokens: usize,
    /// The most inputs waiting for the engine, per model.
    pub queue_capacity: usize,
    /// How long a drain may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    pub auth: AuthConfig,
    /// `--cors-allow-origin`: the origin browsers may call from; `None` sends no CORS headers.
    pub cors_allow_origin: Option<String>,
    pub probe: ProbeConfig,
    /// Whether `/` serves the page (`--no-ui` turns it off).
    pub ui: bool,
}

/// The limits every request is held to.
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_inputs: usize,
    /// The most documents one rerank request may rank.
    pub max_documents: usize,
    /// Summed after truncation over a request's inputs, or over a rerank request's pairs.
    pub max_request_tokens: usize,
    /// Whether over-long inputs are cut (the original's behaviour) rather than refused.
    pub truncate: bool,
    pub request_timeout: Duration,
}

/// The front door's protections.
pub struct DoorConfig {
    /// The most open client connections; `None` derives it from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// A connection that sends nothing (and waits for no answer) for this long is closed.
    pub idle_timeout: Duration,
    /// A request head that takes longer than this closes its connection.
    pub header_timeout: Duration,
    /// A request body that takes longer than this (after its head) is answered 408.
    pub body_timeout: Duration,
    /// The most request bytes the door holds for all clients together; past it, it stops reading.
    pub max_buffered_bytes: usize,
}

/// API keys, as given; `auth.rs` reads the files.
pub struct AuthConfig {
    pub keys: Vec<String>,
    pub key_files: Vec<String>,
    /// Whether /metrics needs a key too.
    pub protect_metrics: bool,
}

/// The self-probe that proves the serving path works (see `probe.rs`).
pub struct ProbeConfig {
    /// How often the server sends itself a request (shortened to half of a systemd watchdog's interval).
    pub interval: Duration,
    /// With no successful probe for this long, the process exits 1 so that a supervisor restarts it;
    /// zero never exits.
    pub unhealthy_exit: Duration,
}
