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

pub struct FrontDoorConfig {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

pub struct FrontDoor {
    listener: TcpListener,
    internal: SocketAddr,
    config: FrontDoorConfig,
    open: AtomicUsize,
    closing: AtomicBool,
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
        config: FrontDoorConfig,
    ) -> Result<(Arc<FrontDoor>, UnixListener), String> {
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
            closing: AtomicBool::new(false),
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
        let writer = std::thread::Builder::new()
            .name("relay-out".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                let mut buffer = [0u8; 16 * 1024];
                while let Ok(n) = server_in.read(&mut buffer) {
                    if n == 0 || client_out.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                    writes.fetch_add(1, Ordering::SeqCst);
                }
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
            let idle = !answering && last_activity.elapsed() >= c.idle_timeout;
            if too_slow || idle {
                // Closing our side of tiny_http's connection ends a half-read body with EOF, so the worker
                // answers (400) instead of waiting; the answer still reaches the client.
                return;
            }
        }
    }
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
