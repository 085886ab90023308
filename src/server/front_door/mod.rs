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

mod epoll;
mod http;
mod internal;

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
use epoll::{Epoll, Waker, HANG_UP, READ, WRITE};
use http::{ConnectionHeader, Progress, Refusal, Request, RequestFramer, ResponseFramer};
use internal::InternalSocket;

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

/// Where a client is with its current request.
enum Stage {
    /// Reading (or waiting for) its next request.
    Reading,
    /// A whole request waits for an internal connection.
    Waiting(Request),
    /// Handed to tiny_http on this internal connection.
    InFlight(usize),
    /// Its last answer sent and its writing side shut: unread input is discarded until this instant.
    Lingering(Instant),
}

struct Client {
    stream: TcpStream,
    generation: u32,
    probe: bool,
    /// Bytes read and not yet framed.
    inbound: Vec<u8>,
    framer: RequestFramer,
    stage: Stage,
    /// Bytes for the client; `written` of them already sent.
    outbound: Vec<u8>,
    written: usize,
    /// Close once `outbound` is sent (its last answer is in it).
    closing: bool,
    /// The client has sent its last byte (it may still read).
    read_closed: bool,
    /// Reading held back by the buffer bound.
    paused: bool,
    last_activity: Instant,
    /// When the client last took bytes of `outbound` (or when they started waiting).
    last_write: Instant,
    /// Request bytes counted in the door's total.
    counted: usize,
    interest: u32,
}

impl Client {
    fn held(&self) -> usize {
        let waiting = match &self.stage {
            Stage::Waiting(request) => request.bytes.len(),
            _ => 0,
        };
        self.inbound.len() + self.framer.buffered() + waiting
    }

    fn wants_read(&self) -> bool {
        if self.paused || self.read_closed {
            return false;
        }
        match self.stage {
            Stage::Reading => !self.closing,
            Stage::Lingering(_) => true,
            Stage::Waiting(_) | Stage::InFlight(_) => self.inbound.len() < READ_AHEAD,
        }
    }

    fn unsent(&self) -> usize {
        self.outbound.len() - self.written
    }
}

/// One persistent internal connection to tiny_http.
struct Upstream {
    stream: Option<UnixStream>,
    state: UpState,
    /// Request bytes to write; `written` of them sent.
    out: Vec<u8>,
    written: usize,
    interest: u32,
    /// Since when it has been unable to carry requests; `None` while it can.
    down_since: Option<Instant>,
    retry_at: Instant,
}

enum UpState {
    /// Not connected.
    Down,
    /// Connected; its warm-up request is out.
    WarmingUp(ResponseFramer),
    Idle,
    Busy(Exchange),
}

/// A request on an internal connection and its answer as it comes back.
struct Exchange {
    client: Key,
    framer: ResponseFramer,
    keep_alive: bool,
    http10: bool,
    /// The client is gone: the answer is read and dropped.
    discard: bool,
    /// The answer's head told the client that the connection closes after it.
    closes: bool,
}

impl Upstream {
    fn new() -> Upstream {
        let now = Instant::now();
        Upstream {
            stream: None,
            state: UpState::Down,
            out: Vec::new(),
            written: 0,
            interest: 0,
            down_since: Some(now),
            retry_at: now,
        }
    }
}

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

    // ---- clients ---------------------------------------------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Out of descriptors or memory: stop accepting for a moment rather than spin, and
                    // say so at most every ten seconds.
                    let now = Instant::now();
                    if self
                        .accept_warned
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                    {
                        eprintln!(
                            "warning: cannot accept connections ({e}); retrying every 100 ms"
                        );
                        self.accept_warned = Some(now);
                    }
                    let _ = self.epoll.modify(listener, 0, LISTENER);
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let probe = *self
            .shared
            .probe_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == Some(peer);
        let open = self.shared.open.load(Ordering::SeqCst);
        if open >= self.settings.max_connections && !probe {
            let _ = stream.set_nonblocking(true);
            let busy = self.error_response(&ApiError::too_many_connections(), ErrorShape::OpenAi);
            let _ = (&stream).write_all(&busy);
            self.metrics.record_error(503);
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let index = self.free.pop().unwrap_or_else(|| {
            self.clients.push(None);
            self.clients.len() - 1
        });
        self.next_generation = (self.next_generation + 1) & 0x7fff_ffff;
        let generation = self.next_generation;
        let token = CLIENT | (u64::from(generation) << 32) | index as u64;
        if self.epoll.add(&stream, READ, token).is_err() {
            self.free.push(index);
            return;
        }
        let now = Instant::now();
        self.clients[index] = Some(Client {
            stream,
            generation,
            probe,
            inbound: Vec::new(),
            framer: RequestFramer::default(),
            stage: Stage::Reading,
            outbound: Vec::new(),
            written: 0,
            closing: false,
            read_closed: false,
            paused: false,
            last_activity: now,
            last_write: now,
            counted: 0,
            interest: READ,
        });
        self.shared.open.fetch_add(1, Ordering::SeqCst);
    }

    fn client(&mut self, key: Key) -> Option<&mut Client> {
        self.clients
            .get_mut(key.0)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == key.1)
    }

    fn client_event(&mut self, key: Key, flags: u32) {
        if self.client(key).is_none() {
            return;
        }
        if flags & WRITE != 0 {
            self.client_write(key);
        }
        if flags & (READ | HANG_UP) != 0 {
            self.client_read(key, flags & HANG_UP != 0);
        }
        self.update_client(key);
    }

    fn client_read(&mut self, key: Key, hung_up: bool) {
        let bound = self.settings.max_buffered_bytes;
        let over_bound = self.buffered >= bound;
        let scratch = &mut self.scratch;
        let Some(c) = self
            .clients
            .get_mut(key.0)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == key.1)
        else {
            return;
        };
        if let Stage::Lingering(_) = c.stage {
            loop {
                match c.stream.read(scratch) {
                    Ok(0) => return self.close_client(key),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return self.close_client(key),
                }
            }
        }
        if !c.wants_read() {
            if hung_up {
                // Both directions are gone: nothing more can be read or delivered.
                self.close_client(key);
            }
            return;
        }
        if over_bound && !c.probe {
            c.paused = true;
            self.paused.push(key);
            let now = Instant::now();
            if self
                .pause_warned
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                self.pause_warned = Some(now);
                eprintln!(
                    "warning: the front door holds {} request bytes, its bound \
                     (--max-buffered-bytes); it reads no more from clients until requests move on",
                    self.buffered
                );
            }
            return;
        }
        // A few reads per wake-up, so that one fast client cannot hold the loop, and none past the bound
        // (which one read may pass by at most the scratch buffer's size).
        let room = bound.saturating_sub(self.buffered);
        let mut taken = 0;
        for _ in 0..4 {
            match c.stream.read(scratch) {
                Ok(0) => {
                    c.read_closed = true;
                    break;
                }
                Ok(n) => {
                    c.inbound.extend_from_slice(&scratch[..n]);
                    c.last_activity = Instant::now();
                    taken += n;
                    if !c.wants_read() || (taken >= room && !c.probe) {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close_client(key),
            }
        }
        self.settle(key);
        self.client_progress(key);
    }

    /// Frames what the client has sent, if it is between requests: queues a whole request, answers a
    /// refused one, or closes a connection that can send no more.
    fn client_progress(&mut self, key: Key) {
        let max_body = self.settings.max_body_bytes;
        let Some(c) = self.client(key) else {
            return;
        };
        if !matches!(c.stage, Stage::Reading) || c.closing {
            return;
        }
        let probe = c.probe;
        let progress = if c.inbound.is_empty() && !c.framer.in_progress() {
            Progress::NeedMore
        } else {
            c.framer.advance(&mut c.inbound, max_body, probe)
        };
        match progress {
            Progress::NeedMore => {
                if c.framer.wants_continue {
                    c.framer.wants_continue = false;
                    c.outbound
                        .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    self.client_write(key);
                }
                let Some(c) = self.client(key) else {
                    return;
                };
                if c.read_closed {
                    // The client stopped sending with no whole request left: nothing to answer.
                    if c.unsent() == 0 {
                        self.close_client(key);
                    } else {
                        c.closing = true;
                    }
                    return;
                }
            }
            Progress::Complete(request) => {
                c.stage = Stage::Waiting(request);
                if probe {
                    self.probe_waiting.push_back(key);
                } else {
                    self.waiting.push_back(key);
                }
            }
            Progress::Refused(refusal) => {
                let error = match refusal {
                    Refusal::Malformed(why) => ApiError::invalid(why),
                    Refusal::HeadTooLarge => {
                        ApiError::head_too_large(http::MAX_HEAD_BYTES, http::MAX_HEADERS)
                    }
                    Refusal::BodyTooLarge => ApiError::too_large(max_body),
                };
                self.answer_and_close(key, &error);
            }
        }
        self.settle(key);
    }

    /// Answers the client's current request itself, then closes the connection (the rest of its bytes
    /// cannot be trusted to start a request).
    fn answer_and_close(&mut self, key: Key, error: &ApiError) {
        let Some(c) = self.client(key) else {
            return;
        };
        // In the shape of the API the request was for, as a worker would have written it.
        let shape = c
            .framer
            .current()
            .map_or(ErrorShape::OpenAi, |(method, target)| {
                routes::error_shape(method, target.split('?').next().unwrap_or(""))
            });
        let response = self.error_response(error, shape);
        self.metrics.record_error(error.status);
        let Some(c) = self.client(key) else {
            return;
        };
        // The same line a worker writes, for what the door answers itself.
        let (method, target) = c.framer.current().unwrap_or(("-", "-"));
        let elapsed = c
            .framer
            .head_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        eprintln!(
            "{} {} {} inputs=0 tokens=0 {:.1}ms",
            excerpt(method),
            excerpt(target),
            error.status,
            elapsed * 1000.0
        );
        c.inbound = Vec::new();
        c.framer = RequestFramer::default();
        c.stage = Stage::Reading;
        c.outbound.extend_from_slice(&response);
        c.closing = true;
        self.settle(key);
        self.client_write(key);
    }

    /// A complete response for one of the door's own answers.
    fn error_response(&self, error: &ApiError, shape: ErrorShape) -> Vec<u8> {
        let (status, body) = shape.render(error);
        let reason = tiny_http::StatusCode(status).default_reason_phrase();
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in &error.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(origin) = &self.settings.cors_allow_origin {
            head.push_str(&format!("Access-Control-Allow-Origin: {origin}\r\n"));
            if origin != "*" {
                head.push_str("Vary: Origin\r\n");
            }
        }
        head.push_str("\r\n");
        head.push_str(&body);
        head.into_bytes()
    }

    /// Sends what it can of the client's outbound bytes; closes a closing client once all are sent.
    fn client_write(&mut self, key: Key) {
        let Some(c) = self.client(key) else {
            return;
        };
        while c.written < c.outbound.len() {
            match c.stream.write(&c.outbound[c.written..]) {
                Ok(0) => return self.close_client(key),
                Ok(n) => {
                    c.written += n;
                    c.last_write = Instant::now();
                    c.last_activity = c.last_write;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close_client(key),
            }
        }
        if c.written == c.outbound.len() {
            c.written = 0;
            if c.outbound.capacity() > READ_AHEAD {
                c.outbound = Vec::new();
            } else {
                c.outbound.clear();
            }
            if c.closing && matches!(c.stage, Stage::Reading) {
                if c.read_closed {
                    return self.close_client(key);
                }
                let _ = c.stream.shutdown(Shutdown::Write);
                c.stage = Stage::Lingering(Instant::now() + LINGER);
                c.inbound = Vec::new();
                self.settle(key);
            }
        }
        let in_flight = match self.client(key).map(|c| &c.stage) {
            Some(Stage::InFlight(up)) => Some(*up),
            _ => None,
        };
        if let Some(up) = in_flight {
            // Room in the client's buffer again: resume reading its answer.
            self.update_upstream(up);
        }
    }

    fn close_client(&mut self, key: Key) {
        let Some(slot) = self.clients.get_mut(key.0) else {
            return;
        };
        if slot.as_ref().is_none_or(|c| c.generation != key.1) {
            return;
        }
        let Some(c) = slot.take() else {
            return;
        };
        let _ = self.epoll.remove(&c.stream);
        self.buffered -= c.counted;
        if let Stage::InFlight(up) = c.stage {
            if let UpState::Busy(exchange) = &mut self.upstreams[up].state {
                exchange.discard = true;
            }
            self.update_upstream(up);
        }
        self.free.push(key.0);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// Brings the door's byte total up to date with what this client holds.
    fn settle(&mut self, key: Key) {
        let Some(c) = self.client(key) else {
            return;
        };
        let held = c.held();
        let before = std::mem::replace(&mut c.counted, held);
        if c.inbound.is_empty() && c.inbound.capacity() > READ_AHEAD {
            c.inbound = Vec::new();
        }
        self.buffered = self.buffered + held - before;
    }

    fn update_client(&mut self, key: Key) {
        let Some(c) = self
            .clients
            .get_mut(key.0)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == key.1)
        else {
            return;
        };
        let mut want = 0;
        if c.wants_read() {
            want |= READ;
        }
        if c.unsent() > 0 {
            want |= WRITE;
        }
        if want != c.interest {
            let token = CLIENT | (u64::from(c.generation) << 32) | key.0 as u64;
            if self.epoll.modify(&c.stream, want, token).is_ok() {
                c.interest = want;
            }
        }
    }

    fn resume_paused(&mut self) {
        if self.paused.is_empty() || self.buffered >= self.settings.max_buffered_bytes {
            return;
        }
        for key in std::mem::take(&mut self.paused) {
            if let Some(c) = self.client(key) {
                c.paused = false;
            }
            self.update_client(key);
        }
    }

    // ---- internal connections --------------------------------------------------------------------------

    /// Hands waiting requests to idle internal connections: the probe's first (on its own connection, or
    /// any idle one), then clients' in arrival order.
    fn dispatch(&mut self) {
        while let Some(&key) = self.probe_waiting.front() {
            let idle = |u: &Upstream| matches!(u.state, UpState::Idle);
            let Some(up) = self.upstreams.iter().position(idle) else {
                break;
            };
            self.probe_waiting.pop_front();
            self.start_exchange(key, up);
        }
        while let Some(&key) = self.waiting.front() {
            let idle = |u: &Upstream| matches!(u.state, UpState::Idle);
            let Some(up) = self.upstreams.iter().skip(1).position(idle) else {
                break;
            };
            self.waiting.pop_front();
            self.start_exchange(key, up + 1);
        }
    }

    fn start_exchange(&mut self, key: Key, up: usize) {
        let Some(c) = self.client(key) else {
            return;
        };
        let Stage::Waiting(request) = std::mem::replace(&mut c.stage, Stage::InFlight(up)) else {
            return;
        };
        let exchange = Exchange {
            client: key,
            framer: ResponseFramer::new(request.head_only()),
            keep_alive: request.keep_alive,
            http10: request.http10,
            discard: false,
            closes: false,
        };
        self.settle(key);
        let upstream = &mut self.upstreams[up];
        self.buffered += request.bytes.len();
        upstream.out = request.bytes;
        upstream.written = 0;
        upstream.state = UpState::Busy(exchange);
        self.upstream_write(up);
        self.update_upstream(up);
    }

    /// Connects the next internal connection that is down, once no other is warming up. One at a time:
    /// tiny_http's task pool can leave a connection unserved for good when two arrive before a woken
    /// thread has taken the first, and every one of its threads is held by a persistent connection.
    fn connect_next(&mut self) {
        if self
            .upstreams
            .iter()
            .any(|u| matches!(u.state, UpState::WarmingUp(_)))
        {
            return;
        }
        let now = Instant::now();
        if let Some(up) = self
            .upstreams
            .iter()
            .position(|u| u.stream.is_none() && now >= u.retry_at)
        {
            self.connect_upstream(up);
        }
    }

    fn connect_upstream(&mut self, up: usize) {
        let stream = match self.internal.connect() {
            Ok(stream) => stream,
            Err(e) => {
                if !would_block(&e) {
                    eprintln!("warning: cannot connect to tiny_http's internal socket: {e}");
                }
                self.upstreams[up].retry_at = Instant::now() + Duration::from_millis(100);
                return;
            }
        };
        if self.epoll.add(&stream, READ, UPSTREAM + up as u64).is_err() {
            self.upstreams[up].retry_at = Instant::now() + Duration::from_millis(100);
            return;
        }
        let upstream = &mut self.upstreams[up];
        upstream.stream = Some(stream);
        upstream.interest = READ;
        upstream.out = WARM_UP.to_vec();
        upstream.written = 0;
        upstream.state = UpState::WarmingUp(ResponseFramer::new(false));
        self.upstream_write(up);
        self.update_upstream(up);
    }

    fn upstream_event(&mut self, up: usize, flags: u32) {
        if up >= self.upstreams.len() || self.upstreams[up].stream.is_none() {
            return;
        }
        if flags & WRITE != 0 {
            self.upstream_write(up);
        }
        if flags & (READ | HANG_UP) != 0 {
            self.upstream_read(up, flags & HANG_UP != 0);
        }
        self.update_upstream(up);
    }

    fn upstream_write(&mut self, up: usize) {
        let upstream = &mut self.upstreams[up];
        let Some(stream) = &upstream.stream else {
            return;
        };
        let counted = !matches!(upstream.state, UpState::WarmingUp(_));
        while upstream.written < upstream.out.len() {
            match (&*stream).write(&upstream.out[upstream.written..]) {
                Ok(n) => {
                    upstream.written += n;
                    if counted {
                        self.buffered -= n;
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.upstream_failed(up, &format!("writing: {e}")),
            }
        }
        upstream.out = Vec::new();
        upstream.written = 0;
    }

    /// Whether the client of upstream `up`'s answer has too much of it waiting already.
    fn client_is_full(&self, up: usize) -> bool {
        let UpState::Busy(exchange) = &self.upstreams[up].state else {
            return false;
        };
        if exchange.discard {
            return false;
        }
        self.clients
            .get(exchange.client.0)
            .and_then(Option::as_ref)
            .filter(|c| c.generation == exchange.client.1)
            .is_some_and(|c| c.unsent() >= OUT_HIGH_WATER)
    }

    fn upstream_read(&mut self, up: usize, hung_up: bool) {
        loop {
            if !hung_up && self.client_is_full(up) {
                return;
            }
            let Some(stream) = &self.upstreams[up].stream else {
                return;
            };
            let n = match (&*stream).read(&mut self.scratch) {
                Ok(0) => return self.upstream_failed(up, "tiny_http closed the connection"),
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.upstream_failed(up, &format!("reading: {e}")),
            };
            if let Err(why) = self.take_answer(up, n) {
                return self.upstream_failed(up, &why);
            }
        }
    }

    /// Passes `n` bytes of upstream `up`'s answer (in `scratch`) on to its client.
    fn take_answer(&mut self, up: usize, n: usize) -> Result<(), String> {
        let draining = self.shared.draining.load(Ordering::SeqCst);
        let upstream = &mut self.upstreams[up];
        match &mut upstream.state {
            UpState::WarmingUp(framer) => {
                let used =
                    framer.feed(&self.scratch[..n], &mut Vec::new(), ConnectionHeader::None)?;
                if used < n {
                    return Err("more bytes than one answer".into());
                }
                if framer.done() {
                    upstream.state = UpState::Idle;
                    upstream.down_since = None;
                    self.check_ready();
                    self.connect_next();
                }
                Ok(())
            }
            UpState::Busy(exchange) => {
                let key = exchange.client;
                let client = self
                    .clients
                    .get_mut(key.0)
                    .and_then(Option::as_mut)
                    .filter(|c| c.generation == key.1 && !exchange.discard);
                let connection = match &client {
                    _ if exchange.discard => ConnectionHeader::None,
                    Some(c)
                        if draining
                            || !exchange.keep_alive
                            || (c.read_closed && c.inbound.is_empty()) =>
                    {
                        ConnectionHeader::Close
                    }
                    Some(_) if exchange.http10 => ConnectionHeader::KeepAlive,
                    Some(_) => ConnectionHeader::None,
                    None => ConnectionHeader::None,
                };
                let had_head = exchange.framer.status.is_some();
                let mut dropped = Vec::new();
                let out = match client {
                    Some(c) => &mut c.outbound,
                    None => {
                        exchange.discard = true;
                        &mut dropped
                    }
                };
                let used = exchange.framer.feed(&self.scratch[..n], out, connection)?;
                if !had_head && exchange.framer.status.is_some() {
                    exchange.closes = connection == ConnectionHeader::Close;
                }
                if used < n {
                    return Err("more bytes than one answer".into());
                }
                let done = exchange.framer.done();
                if !exchange.discard {
                    self.client_write(key);
                }
                if done {
                    self.finish_exchange(up);
                }
                Ok(())
            }
            UpState::Idle | UpState::Down => Err("bytes when no answer was due".into()),
        }
    }

    /// The answer is complete: the internal connection is free, and the client reads on (or closes).
    fn finish_exchange(&mut self, up: usize) {
        let UpState::Busy(exchange) =
            std::mem::replace(&mut self.upstreams[up].state, UpState::Idle)
        else {
            return;
        };
        let key = exchange.client;
        if exchange.discard {
            return;
        }
        if let Some(c) = self.client(key) {
            c.stage = Stage::Reading;
            if exchange.closes {
                c.closing = true;
                c.inbound = Vec::new();
                self.settle(key);
            }
        }
        // The client's next request may be here already (pipelining).
        self.client_progress(key);
        self.client_write(key);
        self.update_client(key);
    }

    /// The internal connection broke: its client gets a 500 if nothing of its answer was sent (or loses
    /// the connection if part was), and the connection is re-established.
    fn upstream_failed(&mut self, up: usize, why: &str) {
        let upstream = &mut self.upstreams[up];
        if let Some(stream) = upstream.stream.take() {
            let _ = self.epoll.remove(&stream);
        }
        if !matches!(upstream.state, UpState::WarmingUp(_)) {
            self.buffered -= upstream.out.len() - upstream.written;
        }
        upstream.out = Vec::new();
        upstream.written = 0;
        upstream.interest = 0;
        // Reconnect at once after a healthy spell; while failing, ten times a second.
        let was_up = upstream.down_since.is_none();
        upstream.down_since.get_or_insert_with(Instant::now);
        upstream.retry_at = Instant::now();
        if !was_up {
            upstream.retry_at += Duration::from_millis(100);
        }
        let state = std::mem::replace(&mut upstream.state, UpState::Down);
        self.connect_next();
        let UpState::Busy(exchange) = state else {
            return;
        };
        let key = exchange.client;
        if exchange.discard {
            return;
        }
        if exchange.framer.until_close() {
            // An answer without a length ends with its connection: it is complete.
            if let Some(c) = self.client(key) {
                c.stage = Stage::Reading;
                c.closing = true;
            }
            self.client_write(key);
            return;
        }
        if exchange.framer.status.is_none() {
            eprintln!("error: an internal connection failed before its answer ({why})");
            if let Some(c) = self.client(key) {
                c.stage = Stage::Reading;
            }
            self.answer_and_close(key, &ApiError::internal());
        } else {
            eprintln!("error: an internal connection failed during an answer ({why})");
            self.close_client(key);
        }
    }

    fn update_upstream(&mut self, up: usize) {
        let full = self.client_is_full(up);
        let upstream = &mut self.upstreams[up];
        let Some(stream) = &upstream.stream else {
            return;
        };
        let mut want = 0;
        if !full {
            want |= READ;
        }
        if upstream.written < upstream.out.len() {
            want |= WRITE;
        }
        if want != upstream.interest
            && self
                .epoll
                .modify(stream, want, UPSTREAM + up as u64)
                .is_ok()
        {
            upstream.interest = want;
        }
    }

    fn check_ready(&mut self) {
        if self.ready.is_some()
            && self
                .upstreams
                .iter()
                .all(|u| matches!(u.state, UpState::Idle))
        {
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(Ok(()));
            }
        }
    }

    // ---- deadlines -------------------------------------------------------------------------------------

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
