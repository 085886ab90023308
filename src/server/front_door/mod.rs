//! The front door: one thread that owns the public socket and every client connection, so a connection
//! costs a few hundred bytes and no thread.
//!
//! It accepts (up to the connection cap; past it, a JSON 503), sets `TCP_NODELAY`, reads each client's
//! requests as they arrive and frames them (`http.rs`): a head that takes longer than the header timeout
//! closes the connection (slowloris), a body that takes longer than the body timeout gets 408, and a
//! connection that sends nothing and waits for nothing for the idle timeout is closed. A whole request is
//! handed to tiny_http over one of a fixed set of persistent internal connections, one per HTTP worker
//! (`internal.rs`), so tiny_http's thread count is fixed too and a worker never waits on a slow client.
//! While every internal connection is busy, requests wait here, in arrival order; the server's own
//! probe has one connection (and one worker) to itself, so that it measures the path, not the queue.
//! tiny_http still parses and answers every request the door hands on; the door answers only what it
//! refuses to hand on (400, 408, 413, 431, and 503 at the cap). Each client gets its answers in order:
//! the door reads its next request only after the previous one is answered.
//!
//! Buffered request bytes (heads, bodies and pipelined requests not yet handed to tiny_http) have a
//! global bound, `--max-buffered-bytes`: past it, the door stops reading from clients (the probe's
//! connection excepted) until requests move on. Answers are copied to the client as they come, and the door
//! stops reading an answer from tiny_http while more than [`OUT_HIGH_WATER`] of it waits for the client.
//!
//! Draining: the listener closes (new connections are refused), answers carry `Connection: close`,
//! connections with nothing in progress are closed after a second of quiet, and every request already
//! read is answered.
//!
//! This file has the door's public side, its event loop and its deadlines; `clients.rs` the client
//! connections, `upstreams.rs` the internal ones, `http.rs` the framing, `internal.rs` the private socket
//! and `epoll.rs` the system calls.

mod clients;
mod epoll;
mod http;
mod internal;
mod upstreams;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dialects::ErrorShape;
use super::errors::{excerpt, ApiError};
use super::lifecycle;
use super::metrics::Metrics;
use super::routes;
use clients::{Client, Stage};
use epoll::{Epoll, Waker, HANG_UP, READ, WRITE};
use http::{ConnectionHeader, Progress, Refusal, Request, RequestFramer, ResponseFramer};
use internal::InternalSocket;
use upstreams::{UpState, Upstream};

pub use http::{MAX_HEAD_BYTES, PROBE_HEADER};

/// What the door is told.
pub struct DoorSettings {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: u64,
    pub max_buffered_bytes: usize,
    /// Internal connections for clients' requests: one per HTTP worker but the probe's.
    pub connections: usize,
    /// Sent with the door's own answers too, so that browsers can read them.
    pub cors_allow_origin: Option<String>,
}

/// How often deadlines are checked; also the longest the loop sleeps.
const TICK: Duration = Duration::from_millis(100);
/// How much of one client's answer may wait in the door before it stops reading the answer.
const OUT_HIGH_WATER: usize = 1 << 20;
/// How far the door reads ahead of a request in progress (pipelined requests, or the end of the stream).
const READ_AHEAD: usize = 64 * 1024;
/// After its last answer, a closing connection's unread input is drained for this long, so that closing
/// with unread bytes does not reset the connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(2);
/// During a drain, a connection with nothing in progress is closed after this much quiet.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// An internal connection that cannot be re-established and answering for this long means tiny_http
/// cannot serve any more (its accept thread or its threads are gone): the process exits.
const RECOVERY: Duration = Duration::from_secs(10);
/// What a new internal connection is proven with before it carries a request.
const WARM_UP: &[u8] = b"GET /health HTTP/1.1\r\nHost: internal\r\nX-Embedding-Server-Probe: 1\r\nContent-Length: 0\r\n\r\n";

const LISTENER: u64 = 0;
const WAKER: u64 = 1;
const UPSTREAM: u64 = 2;
const CLIENT: u64 = 1 << 63;

/// What other threads see of the door.
pub struct FrontDoor {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    draining: AtomicBool,
    waker: Waker,
    open: AtomicUsize,
    /// The address the probe connects from: exempt from the cap and the buffer bound, and marked.
    probe_peer: Mutex<Option<SocketAddr>>,
}

impl FrontDoor {
    /// Binds the public address and the internal socket, and starts the door's thread. Returns the door
    /// and the listener for tiny_http, and a receiver that says when every internal connection answers
    /// (the workers must be running by then) or why they do not.
    pub fn start(
        address: &str,
        settings: DoorSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(FrontDoor, UnixListener, Ready), String> {
        let listener = TcpListener::bind(address).map_err(|e| {
            format!(
                "cannot listen on {address}: {e} (is the port taken? --port 0 picks a free one)"
            )
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot set up the listener: {e}"))?;
        // A longer accept queue than std's: a burst of connections waits in it rather than having its
        // handshakes dropped and retried a second later (the kernel caps it at net.core.somaxconn).
        // SAFETY: listen() on our own listening socket only changes its backlog.
        unsafe {
            libc::listen(listener.as_raw_fd(), 4096);
        }
        let local_addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        let (internal, internal_listener) = InternalSocket::create()?;
        let epoll = Epoll::new().map_err(|e| format!("cannot create an epoll instance: {e}"))?;
        let waker = Waker::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
        epoll
            .add(&listener, READ, LISTENER)
            .and_then(|()| epoll.add(&waker, READ, WAKER))
            .map_err(|e| format!("cannot watch the listener: {e}"))?;
        let shared = Arc::new(Shared {
            draining: AtomicBool::new(false),
            waker,
            open: AtomicUsize::new(0),
            probe_peer: Mutex::new(None),
        });
        let (ready, ready_rx) = sync_channel(1);
        // Upstream 0 is the probe's own; the rest carry clients' requests.
        let upstreams = (0..=settings.connections)
            .map(|_| Upstream::new())
            .collect();
        let door = Door {
            settings,
            epoll,
            listener: Some(listener),
            internal,
            shared: Arc::clone(&shared),
            metrics,
            clients: Vec::new(),
            free: Vec::new(),
            next_generation: 0,
            upstreams,
            waiting: VecDeque::new(),
            probe_waiting: VecDeque::new(),
            buffered: 0,
            paused: Vec::new(),
            accept_paused_until: None,
            accept_warned: None,
            pause_warned: None,
            ready: Some(ready),
            scratch: vec![0; 64 * 1024],
        };
        std::thread::Builder::new()
            .name("front-door".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| door.run()));
                if outcome.is_err() {
                    lifecycle::fatal("the front door's thread panicked (logged above)");
                }
            })
            .map_err(|e| format!("cannot start the front door's thread: {e}"))?;
        Ok((
            FrontDoor { local_addr, shared },
            internal_listener,
            ready_rx,
        ))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Starts the drain: the listener closes; connections end as their answers are sent.
    pub fn close(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
    }

    /// Names the address the next probe connects from.
    pub fn expect_probe_from(&self, peer: SocketAddr) {
        *self
            .shared
            .probe_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(peer);
    }
}

/// Says once whether every internal connection answers (the door is ready) or why not.
pub type Ready = Receiver<Result<(), String>>;

/// A client's slot and the generation of the connection in it (slots are reused).
type Key = (usize, u32);

struct Door {
    settings: DoorSettings,
    epoll: Epoll,
    listener: Option<TcpListener>,
    internal: InternalSocket,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    next_generation: u32,
    upstreams: Vec<Upstream>,
    waiting: VecDeque<Key>,
    probe_waiting: VecDeque<Key>,
    /// Request bytes held for all clients together (see `--max-buffered-bytes`).
    buffered: usize,
    /// Clients whose reading waits for the total to fall below the bound.
    paused: Vec<Key>,
    accept_paused_until: Option<Instant>,
    /// When the door last said that accepting fails.
    accept_warned: Option<Instant>,
    /// When the door last said that the buffer bound holds reading back.
    pause_warned: Option<Instant>,
    /// Told once every internal connection has answered, or why they do not.
    ready: Option<SyncSender<Result<(), String>>>,
    scratch: Vec<u8>,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Door {
    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut last_tick = Instant::now();
        self.connect_next();
        loop {
            let n = match self.epoll.wait(&mut events, TICK) {
                Ok(n) => n,
                Err(e) => lifecycle::fatal(&format!("the front door's epoll_wait failed: {e}")),
            };
            for event in &events[..n] {
                let (token, flags) = (event.u64, event.events);
                match token {
                    LISTENER => self.accept(),
                    WAKER => self.shared.waker.reset(),
                    t if t & CLIENT != 0 => {
                        let key = ((t & 0xffff_ffff) as usize, ((t >> 32) as u32) & 0x7fff_ffff);
                        self.client_event(key, flags);
                    }
                    t => self.upstream_event((t - UPSTREAM) as usize, flags),
                }
            }
            if self.shared.draining.load(Ordering::SeqCst) {
                if let Some(listener) = self.listener.take() {
                    let _ = self.epoll.remove(&listener);
                }
            }
            self.dispatch();
            self.resume_paused();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick();
            }
        }
    }

    /// Deadlines: closes or answers what has waited too long, reconnects internal connections that are
    /// down (and gives up on tiny_http when one stays down), and refreshes the door's metrics.
    fn tick(&mut self) {
        let now = Instant::now();
        let draining = self.shared.draining.load(Ordering::SeqCst);
        for index in 0..self.clients.len() {
            let Some(c) = &self.clients[index] else {
                continue;
            };
            let key = (index, c.generation);
            let s = &self.settings;
            if let Stage::Lingering(until) = c.stage {
                if now >= until {
                    self.close_client(key);
                }
                continue;
            }
            if c.unsent() > 0 {
                // The client does not take its answer.
                if now.duration_since(c.last_write) >= s.idle_timeout {
                    self.close_client(key);
                }
                continue;
            }
            if !matches!(c.stage, Stage::Reading) || c.closing {
                continue;
            }
            if let Some(since) = c.framer.body_started {
                if now.duration_since(since) >= s.body_timeout {
                    let error = ApiError::timeout_reading_body(s.body_timeout);
                    self.answer_and_close(key, &error);
                }
            } else if let Some(since) = c.framer.head_started {
                if now.duration_since(since) >= s.header_timeout {
                    self.close_client(key);
                }
            } else {
                let quiet = now.duration_since(c.last_activity);
                if quiet >= s.idle_timeout || (draining && quiet >= DRAIN_QUIET) {
                    self.close_client(key);
                }
            }
        }
        for up in 0..self.upstreams.len() {
            let upstream = &self.upstreams[up];
            if let Some(since) = upstream.down_since {
                if now.duration_since(since) >= RECOVERY {
                    let message = format!(
                        "tiny_http has not answered on internal connection {up} for {} s; its \
                         threads may not start (is the host's task limit, pids.max or TasksMax, too \
                         low?)",
                        RECOVERY.as_secs()
                    );
                    match self.ready.take() {
                        Some(ready) => {
                            let _ = ready.send(Err(message));
                            // Startup failed; serve() reports it and exits.
                            loop {
                                std::thread::park();
                            }
                        }
                        None => lifecycle::fatal(&message),
                    }
                }
            }
        }
        self.connect_next();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            if let Some(listener) = &self.listener {
                let _ = self.epoll.modify(listener, READ, LISTENER);
            }
        }
        self.metrics.record_door(
            self.shared.open.load(Ordering::SeqCst),
            self.buffered,
            self.waiting.len() + self.probe_waiting.len(),
        );
    }
}
