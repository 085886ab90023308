//! The front door: owns the public TCP socket and every client connection, and relays their bytes to
//! tiny_http, which listens on a private abstract Unix socket.
//!
//! tiny_http accepts connections itself and sets no timeouts on them, so an idle or trickling client would
//! hold a thread forever and nothing would cap their number. Setting timeouts on the listening socket does
//! not work either: accept() then times out too, and tiny_http's accept loop stops for good. So the front
//! door does what tiny_http cannot: it caps connections, sets TCP_NODELAY, closes a connection that sends
//! nothing for the idle timeout, and closes one whose request head or body has not arrived within its
//! timeout (slowloris). The HTTP worker's `read_body` holds the same body deadline from its side.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::DoorConfig;

struct FrontDoorConfig {
    max_connections: usize,
    idle_timeout: Duration,
    header_timeout: Duration,
    body_timeout: Duration,
}

pub struct FrontDoor {
    listener: TcpListener,
    internal: SocketAddr,
    config: FrontDoorConfig,
    open: AtomicUsize,
    /// Set when the drain begins; relays read it to end keep-alive connections.
    closing: Arc<AtomicBool>,
}

/// The answer to a connection over the cap: a complete response, so clients see why.
const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
Connection: close\r\nContent-Length: 124\r\n\r\n\
{\"error\":{\"message\":\"Too many open connections; retry shortly.\",\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";

const RELAY_STACK: usize = 64 * 1024;

impl FrontDoor {
    /// Binds the public address and a private Unix socket for tiny_http; returns the front door and the
    /// listener to hand to tiny_http.
    pub fn bind(
        address: &str,
        config: &DoorConfig,
        max_connections: usize,
        body_timeout: Duration,
    ) -> Result<(Arc<FrontDoor>, UnixListener), String> {
        let config = FrontDoorConfig {
            max_connections,
            idle_timeout: config.idle_timeout,
            header_timeout: config.header_timeout,
            body_timeout,
        };
        let listener = TcpListener::bind(address).map_err(|e| {
            format!(
                "cannot listen on {address}: {e} (is the port taken? --port 0 picks a free one)"
            )
        })?;
        let name = format!(
            "embedding-server-{}-{}",
            std::process::id(),
            listener.local_addr().map_or(0, |a| a.port())
        );
        let internal = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| format!("cannot name the internal socket: {e}"))?;
        let inner = UnixListener::bind_addr(&internal)
            .map_err(|e| format!("cannot bind the internal socket: {e}"))?;
        let door = FrontDoor {
            listener,
            internal,
            config,
            open: AtomicUsize::new(0),
            closing: Arc::new(AtomicBool::new(false)),
        };
        Ok((Arc::new(door), inner))
    }

    pub fn local_addr(&self) -> String {
        self.listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string())
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Accepts until `close`; runs on its own thread.
    pub fn run(self: Arc<Self>) {
        for stream in self.listener.incoming() {
            if self.closing.load(Ordering::SeqCst) {
                break;
            }
            let Ok(client) = stream else {
                if self.closing.load(Ordering::SeqCst) {
                    break;
                }
                // EMFILE and friends: back off instead of spinning; the connections in hand go on.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            if self.open.load(Ordering::SeqCst) >= self.config.max_connections {
                let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = (&client).write_all(BUSY.as_bytes());
                continue;
            }
            self.open.fetch_add(1, Ordering::SeqCst);
            let door = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("relay-in".into())
                .stack_size(RELAY_STACK)
                .spawn(move || {
                    door.relay(client);
                    door.open.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Stops accepting: new connections are refused, those already open are served until they close.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // SAFETY: shutting down our own listening socket wakes the blocked accept() and stops the kernel from
        // completing new connections; the fd itself stays valid until the FrontDoor is dropped.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    /// Relays one connection: client → tiny_http here, tiny_http → client on a second thread.
    fn relay(&self, client: TcpStream) {
        let Ok(server) = UnixStream::connect_addr(&self.internal) else {
            return;
        };
        let _ = client.set_nodelay(true);
        let poll = Duration::from_millis(250);
        let _ = client.set_read_timeout(Some(poll.max(Duration::from_millis(50))));
        let _ =
            client.set_write_timeout(Some(self.config.idle_timeout.max(Duration::from_secs(1))));
        let (Ok(mut client_out), Ok(mut server_in)) = (client.try_clone(), server.try_clone())
        else {
            return;
        };
        let response_writes = Arc::new(AtomicUsize::new(0));
        let writes = Arc::clone(&response_writes);
        let closing = Arc::clone(&self.closing);
        let writer = std::thread::Builder::new()
            .name("relay-out".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                forward_responses(&mut server_in, &mut client_out, &closing, &writes);
                let _ = client_out.shutdown(Shutdown::Both);
            });
        if writer.is_err() {
            return;
        }
        self.pump_requests(&client, &server, &response_writes);
        let _ = server.shutdown(Shutdown::Write);
        let _ = client.shutdown(Shutdown::Read);
    }

    /// Copies request bytes to tiny_http, enforcing the idle, header and body timeouts. A connection
    /// waiting for its response is never idle: a long request may compute for longer than the idle timeout.
    fn pump_requests(
        &self,
        mut client: &TcpStream,
        mut server: &UnixStream,
        response_writes: &AtomicUsize,
    ) {
        let mut buffer = [0u8; 16 * 1024];
        let mut framer = Framer::default();
        let mut last_activity = Instant::now();
        let mut writes_seen = 0;
        loop {
            match client.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => {
                    last_activity = Instant::now();
                    framer.saw(&buffer[..n], response_writes.load(Ordering::SeqCst));
                    if server.write_all(&buffer[..n]).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
            let writes = response_writes.load(Ordering::SeqCst);
            if writes != writes_seen {
                writes_seen = writes;
                last_activity = Instant::now();
            }
            let c = &self.config;
            let too_slow = match framer.phase {
                Phase::Head { started: Some(t) } => t.elapsed() >= c.header_timeout,
                Phase::Body { since, .. } | Phase::Chunked { since } => {
                    since.elapsed() >= c.body_timeout
                }
                Phase::Head { started: None } | Phase::Answering { .. } => false,
            };
            let answering = matches!(framer.phase, Phase::Answering { mark } if mark == writes);
            let between_requests = !answering
                && !matches!(framer.phase, Phase::Head { started: Some(_) })
                && !matches!(framer.phase, Phase::Body { .. } | Phase::Chunked { .. });
            let idle = !answering && last_activity.elapsed() >= c.idle_timeout;
            // Draining: a kept-alive connection with nothing in progress is closed after a second of quiet,
            // rather than left for a request that would meet the process's exit.
            let drained = between_requests
                && self.closing.load(Ordering::SeqCst)
                && last_activity.elapsed() >= Duration::from_secs(1);
            if too_slow || idle || drained {
                // Closing our side of tiny_http's connection ends a half-read body with EOF, so the worker
                // answers (400) instead of waiting; the answer still reaches the client.
                return;
            }
        }
    }
}

/// Copies tiny_http's responses to the client one at a time. While draining, each response head gets
/// `Connection: close` and the connection ends after that response, so keep-alive clients open a new
/// connection (refused: the listener is closed) instead of sending a request into a closing socket.
/// tiny_http itself refuses to send that header, which is why this is done here.
fn forward_responses(
    from: &mut UnixStream,
    to: &mut TcpStream,
    closing: &AtomicBool,
    writes: &AtomicUsize,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let mut fill = |pending: &mut Vec<u8>| -> bool {
        match from.read(&mut buffer) {
            Ok(n) if n > 0 => {
                pending.extend_from_slice(&buffer[..n]);
                true
            }
            _ => false,
        }
    };
    loop {
        let head_end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(end + 4);
            }
            if pending.len() > MAX_HEAD || !fill(&mut pending) {
                break None;
            }
        };
        let Some(head_end) = head_end.filter(|_| pending.starts_with(b"HTTP/1.")) else {
            // Not a response head as expected: relay the rest untouched.
            let _ = to.write_all(&pending);
            pending.clear();
            while fill(&mut pending) {
                if to.write_all(&pending).is_err() {
                    return;
                }
                pending.clear();
            }
            return;
        };
        let mut head: Vec<u8> = pending.drain(..head_end).collect();
        let informational = head.get(9) == Some(&b'1');
        let close_after = !informational && closing.load(Ordering::SeqCst);
        if close_after {
            let at = head.len() - 2;
            head.splice(at..at, b"Connection: close\r\n".iter().copied());
        }
        if to.write_all(&head).is_err() {
            return;
        }
        writes.fetch_add(1, Ordering::SeqCst);
        match response_body(&head) {
            ResponseBody::Length(mut left) => {
                while left > 0 {
                    if pending.is_empty() && !fill(&mut pending) {
                        return;
                    }
                    let take = pending.len().min(left);
                    if to.write_all(&pending[..take]).is_err() {
                        return;
                    }
                    pending.drain(..take);
                    left -= take;
                    writes.fetch_add(1, Ordering::SeqCst);
                }
            }
            ResponseBody::Chunked => loop {
                if let Some(end) = pending.windows(5).position(|w| w == b"0\r\n\r\n") {
                    // A JSON or metrics body never holds a raw CRLF, so this is the last chunk.
                    let body: Vec<u8> = pending.drain(..end + 5).collect();
                    if to.write_all(&body).is_err() {
                        return;
                    }
                    break;
                }
                let keep = pending.len().saturating_sub(4);
                if to.write_all(&pending[..keep]).is_err() {
                    return;
                }
                pending.drain(..keep);
                writes.fetch_add(1, Ordering::SeqCst);
                if !fill(&mut pending) {
                    let _ = to.write_all(&pending);
                    return;
                }
            },
            ResponseBody::None => {}
        }
        if close_after {
            return;
        }
    }
}

enum ResponseBody {
    Length(usize),
    Chunked,
    None,
}

fn response_body(head: &[u8]) -> ResponseBody {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim() {
                "transfer-encoding" if value.contains("chunked") => return ResponseBody::Chunked,
                "content-length" => return ResponseBody::Length(value.trim().parse().unwrap_or(0)),
                _ => {}
            }
        }
    }
    ResponseBody::None
}

/// Where the client is in its current request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Reading a head; `started` when its first byte came.
    Head { started: Option<Instant> },
    /// Reading a body of known length.
    Body { remaining: u64, since: Instant },
    /// Reading a chunked body, until its last chunk.
    Chunked { since: Instant },
    /// The request is complete; `mark` counts the response writes seen when it completed.
    Answering { mark: usize },
}

/// Just enough HTTP framing to know which phase a connection is in: the head's end, Content-Length and
/// chunked bodies. tiny_http does the real parsing; a mistake here only makes the timeouts more lenient.
#[derive(Debug)]
struct Framer {
    phase: Phase,
    /// The head so far (capped), or the last bytes of a chunked body.
    pending: Vec<u8>,
}

impl Default for Framer {
    fn default() -> Framer {
        Framer {
            phase: Phase::Head { started: None },
            pending: Vec::new(),
        }
    }
}

const MAX_HEAD: usize = 64 * 1024;

impl Framer {
    fn saw(&mut self, mut bytes: &[u8], response_writes: usize) {
        while !bytes.is_empty() {
            match self.phase {
                Phase::Answering { mark } if response_writes == mark => {
                    // Pipelined: the next head is here before the answer; its clock starts now.
                    self.phase = Phase::Head {
                        started: Some(Instant::now()),
                    };
                }
                Phase::Answering { .. } => self.phase = Phase::Head { started: None },
                Phase::Head { started } => {
                    self.phase = Phase::Head {
                        started: started.or_else(|| Some(Instant::now())),
                    };
                    let before = self.pending.len();
                    self.pending
                        .extend_from_slice(&bytes[..bytes.len().min(MAX_HEAD)]);
                    match self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        Some(end) => {
                            let consumed = end + 4 - before;
                            self.phase = body_phase(&self.pending[..end], response_writes);
                            self.pending.clear();
                            bytes = &bytes[consumed..];
                        }
                        None => {
                            if self.pending.len() >= MAX_HEAD {
                                // tiny_http refuses a head this large; stop watching rather than buffer more.
                                self.pending.clear();
                                self.phase = Phase::Answering {
                                    mark: response_writes,
                                };
                            }
                            return;
                        }
                    }
                }
                Phase::Body { remaining, since } => {
                    let taken = (bytes.len() as u64).min(remaining);
                    bytes = &bytes[taken as usize..];
                    self.phase = if taken == remaining {
                        Phase::Answering {
                            mark: response_writes,
                        }
                    } else {
                        Phase::Body {
                            remaining: remaining - taken,
                            since,
                        }
                    };
                }
                Phase::Chunked { .. } => {
                    self.pending.extend_from_slice(bytes);
                    if let Some(end) = self.pending.windows(5).position(|w| w == b"0\r\n\r\n") {
                        let consumed = (end + 5).saturating_sub(self.pending.len() - bytes.len());
                        bytes = &bytes[consumed.min(bytes.len())..];
                        self.pending.clear();
                        self.phase = Phase::Answering {
                            mark: response_writes,
                        };
                    } else {
                        let keep = self.pending.len().saturating_sub(4);
                        self.pending.drain(..keep);
                        return;
                    }
                }
            }
        }
    }
}

/// The phase after a head: its body, if it announces one.
fn body_phase(head: &[u8], response_writes: usize) -> Phase {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut length = 0u64;
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim() {
                "transfer-encoding" if value.contains("chunked") => {
                    return Phase::Chunked {
                        since: Instant::now(),
                    }
                }
                "content-length" => length = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    if length > 0 {
        Phase::Body {
            remaining: length,
            since: Instant::now(),
        }
    } else {
        Phase::Answering {
            mark: response_writes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_follows_heads_bodies_and_pipelined_requests() {
        let mut framer = Framer::default();
        framer.saw(b"POST / HTTP/1.1\r\nContent-Length: 5\r", 0);
        assert!(matches!(framer.phase, Phase::Head { started: Some(_) }));
        framer.saw(b"\n\r\nab", 0);
        assert!(
            matches!(framer.phase, Phase::Body { remaining: 3, .. }),
            "{:?}",
            framer.phase
        );
        framer.saw(b"cde", 0);
        assert_eq!(framer.phase, Phase::Answering { mark: 0 });
        framer.saw(b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n", 1);
        assert!(
            matches!(framer.phase, Phase::Head { started: Some(_) }),
            "{:?}",
            framer.phase
        );
    }

    #[test]
    fn framer_finds_the_end_of_a_chunked_body() {
        let mut framer = Framer::default();
        framer.saw(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            0,
        );
        assert!(matches!(framer.phase, Phase::Chunked { .. }));
        framer.saw(b"0\r\n\r", 0);
        framer.saw(b"\n", 0);
        assert_eq!(framer.phase, Phase::Answering { mark: 0 });
    }
}
