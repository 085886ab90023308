//! The self-probe: proof that the serving path works, end to end, rather than that some thread is alive.
//!
//! Every interval the server connects to its own public socket and sends `GET /health`. The request goes
//! through the listener, the front door (which recognises the probe's address, exempts it from the
//! connection cap and the buffer bound, and gives it an internal connection and a worker of its own, so
//! that a full queue does not delay it), tiny_http and a worker, like any other request. After each
//! success the server sends `WATCHDOG=1` when the service manager wants it, and `/health` answers 200 only
//! while the last success is recent. When no probe has succeeded for `--unhealthy-exit`, the process
//! exits 1 with a log line saying so, so that systemd or Kubernetes restarts it instead of leaving a
//! process that cannot serve.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::front_door::FrontDoor;
use super::{lifecycle, notify};

/// When the probe last went through, and how old that may be for `/health` to say 200.
pub struct Health {
    last_success: Mutex<Instant>,
    fresh_for: Duration,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.since_success() <= self.fresh_for
    }

    pub fn since_success(&self) -> Duration {
        self.last_success
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn succeeded(&self) {
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// How the probe runs.
pub struct Prober {
    target: SocketAddr,
    interval: Duration,
    timeout: Duration,
    unhealthy_exit: Duration,
    watchdog: bool,
}

impl Prober {
    /// A probe of the server listening at `listening`, every `interval` (or half of the service manager's
    /// watchdog interval, if that is shorter).
    pub fn new(listening: SocketAddr, interval: Duration, unhealthy_exit: Duration) -> Prober {
        let watchdog = notify::watchdog_period();
        let interval = match watchdog {
            Some(period) => interval.min(period),
            None => interval,
        }
        .max(Duration::from_millis(10));
        // One probe may take as long as the interval, and never less than a second: on a loaded machine
        // a connection and a small request can take that long without anything being wrong.
        let timeout = interval.max(Duration::from_secs(1));
        // A wildcard address is reached through loopback.
        let ip = match listening.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Prober {
            target: SocketAddr::new(ip, listening.port()),
            interval,
            timeout,
            unhealthy_exit,
            watchdog: watchdog.is_some(),
        }
    }

    /// The health record the probe keeps, fresh from now.
    pub fn health(&self) -> Health {
        Health {
            last_success: Mutex::new(Instant::now()),
            fresh_for: self.interval * 2 + self.timeout,
        }
    }

    /// One probe; `Err` says what failed. `announce` is told the address the probe connects from
    /// before it connects (the front door's `expect_probe_from`).
    pub fn probe(&self, announce: &dyn Fn(SocketAddr)) -> Result<(), String> {
        let stream = connect_from_known_address(self.target, self.timeout, announce)
            .map_err(|e| format!("cannot connect to {}: {e}", self.target))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| e.to_string())?;
        (&stream)
            .write_all(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut answer = Vec::new();
        (&stream)
            .take(64 * 1024)
            .read_to_end(&mut answer)
            .map_err(|e| format!("no answer within {:?}: {e}", self.timeout))?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(_)) if response.code == Some(200) => Ok(()),
            Ok(httparse::Status::Complete(_)) => {
                Err(format!("answered {}", response.code.unwrap_or_default()))
            }
            _ => Err("no complete answer".into()),
        }
    }

    /// Probes until the drain begins; exits the process when probes have failed for too long.
    pub fn run(&self, door: &FrontDoor, health: &Health, draining: &dyn Fn() -> bool) {
        let mut failing = false;
        loop {
            let started = Instant::now();
            if draining() {
                return;
            }
            match self.probe(&|peer| door.expect_probe_from(peer)) {
                Ok(()) => {
                    health.succeeded();
                    if self.watchdog {
                        notify::watchdog();
                    }
                    if failing {
                        eprintln!("the self-probe succeeds again");
                        failing = false;
                    }
                }
                Err(_) if draining() => return,
                Err(why) => {
                    let since = health.since_success();
                    if !failing {
                        eprintln!("warning: the self-probe failed: {why}");
                        failing = true;
                    }
                    if !self.unhealthy_exit.is_zero() && since >= self.unhealthy_exit {
                        lifecycle::fatal(&format!(
                            "no request has gone through the socket, the front door, tiny_http and a \
                             worker for {:.0} s (last failure: {why})",
                            since.as_secs_f64()
                        ));
                    }
                }
            }
            std::thread::sleep(self.interval.saturating_sub(started.elapsed()));
        }
    }
}

/// A connection to `target` from an address `announce` is told of before the connection is made.
fn connect_from_known_address(
    target: SocketAddr,
    timeout: Duration,
    announce: &dyn Fn(SocketAddr),
) -> std::io::Result<TcpStream> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket() takes no pointers; the fd is owned by the TcpStream right below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (address, length) = socket_address(SocketAddr::new(target.ip(), 0));
    // SAFETY: `address` is a valid socket address of `length` bytes.
    if unsafe {
        libc::bind(
            fd,
            (&address as *const libc::sockaddr_storage).cast(),
            length,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    announce(stream.local_addr()?);
    // SO_SNDTIMEO bounds a blocking connect too.
    stream.set_write_timeout(Some(timeout))?;
    let (address, length) = socket_address(target);
    // SAFETY: `address` is a valid socket address of `length` bytes.
    let connected = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&address as *const libc::sockaddr_storage).cast(),
            length,
        )
    };
    if connected < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn socket_address(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid, and large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stand-in server that answers each connection with `answer` (or nothing, when `None`).
    fn stand_in(answer: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for mut stream in listener.incoming().flatten() {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                if let Some(answer) = answer {
                    let _ = stream.write_all(answer);
                } else {
                    held.push(stream);
                }
            }
        });
        address
    }

    #[test]
    fn only_a_200_counts_and_the_probe_announces_where_it_comes_from() {
        let announced = AtomicUsize::new(0);
        let announce = |peer: SocketAddr| {
            assert!(peer.ip().is_loopback() && peer.port() != 0);
            announced.fetch_add(1, Ordering::SeqCst);
        };
        let ok = stand_in(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
        let fast = |target| Prober::new(target, Duration::from_millis(200), Duration::ZERO);
        assert_eq!(fast(ok).probe(&announce), Ok(()));
        let unavailable = stand_in(Some(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"));
        assert_eq!(
            fast(unavailable).probe(&announce),
            Err("answered 503".into())
        );
        let silent = stand_in(None);
        let started = Instant::now();
        assert!(fast(silent).probe(&announce).is_err());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the timeout"
        );
        assert_eq!(announced.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_wildcard_address_is_probed_through_loopback() {
        let prober = Prober::new(
            "0.0.0.0:5000".parse().unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert_eq!(prober.target, "127.0.0.1:5000".parse().unwrap());
        let v6 = Prober::new(
            "[::]:5000".parse().unwrap(),
            Duration::from_secs(5),
            Duration::ZERO,
        );
        assert_eq!(v6.target, "[::1]:5000".parse().unwrap());
        // Fresh for two intervals and one timeout.
        assert_eq!(prober.health().fresh_for, Duration::from_secs(15));
    }
}
