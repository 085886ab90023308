//! The service manager's notify protocol, against a fake `$NOTIFY_SOCKET`: READY=1 only once the server
//! accepts connections, WATCHDOG=1 at half of `$WATCHDOG_USEC` and only while requests get through,
//! STOPPING=1 when SIGTERM starts the drain, abstract socket names, silence towards a watchdog meant for
//! another process, and exit status 1 when the serving path stays broken.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, BINARY};

/// A datagram socket standing in for systemd's, removed with its directory when dropped.
struct FakeManager {
    socket: UnixDatagram,
    dir: Option<PathBuf>,
    /// What `$NOTIFY_SOCKET` should say.
    address: String,
}

impl FakeManager {
    fn at_path(test: &str) -> FakeManager {
        let dir = std::env::temp_dir().join(format!("es-notify-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("cannot bind the fake notify socket");
        FakeManager {
            socket,
            dir: Some(dir),
            address: path.display().to_string(),
        }
    }

    fn abstract_name(test: &str) -> FakeManager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("es-notify-{test}-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket =
            UnixDatagram::bind_addr(&address).expect("cannot bind the abstract notify socket");
        FakeManager {
            socket,
            dir: None,
            address: format!("@{name}"),
        }
    }

    /// The next message, or None after `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_string())
    }

    /// Messages until one has a line equal to `line`, or panics after `wait`.
    fn expect_line(&self, line: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(message) if message.lines().any(|l| l == line) => return message,
                Some(message) => seen.push(message),
                None => break,
            }
        }
        panic!("no {line} within {wait:?}; got {seen:?}");
    }
}

impl Drop for FakeManager {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn ready_is_sent_once_the_server_accepts_connections() {
    let manager = FakeManager::at_path("ready");
    let port = free_port();
    let child = Command::new(BINARY)
        .args(["serve", "--port", &port.to_string()])
        .env("NOTIFY_SOCKET", &manager.address)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start the server");
    let _server = Killed(child);
    let ready = manager.expect_line("READY=1", Duration::from_secs(120));
    // Right after READY=1 the socket must already accept: that is what dependants rely on.
    TcpStream::connect(("127.0.0.1", port)).expect("READY=1 came before the server listened");
    assert!(
        ready.lines().any(|l| l.starts_with("MAINPID=")),
        "READY=1 should name the main pid: {ready:?}"
    );
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let manager = FakeManager::at_path("watchdog");
    let server = Server::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", &manager.address),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    manager.expect_line("READY=1", Duration::from_secs(30));
    // A 200 ms watchdog means pings every 100 ms; five within 10 s leaves room for a loaded machine.
    for _ in 0..5 {
        manager.expect_line("WATCHDOG=1", Duration::from_secs(2));
    }
    assert_eq!(server.request("GET", "/health", None).status, 200);
}

#[test]
fn abstract_socket_names_are_understood() {
    let manager = FakeManager::abstract_name("abstract");
    let _server = Server::start_with_env(&[], &[("NOTIFY_SOCKET", &manager.address)]);
    manager.expect_line("READY=1", Duration::from_secs(30));
}

#[test]
fn a_watchdog_meant_for_another_process_is_left_alone() {
    let manager = FakeManager::at_path("otherpid");
    let _server = Server::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", &manager.address),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    manager.expect_line("READY=1", Duration::from_secs(30));
    // Had it pinged, 20 pings would have arrived in this second.
    assert_eq!(manager.next(Duration::from_secs(1)), None);
}

#[test]
fn no_notify_socket_means_no_notification_and_no_complaint() {
    let server = Server::start_with_env(&[], &[("NOTIFY_SOCKET", "")]);
    assert_eq!(server.request("GET", "/health", None).status, 200);
    assert!(
        !server.stderr.lock().unwrap().contains("notify"),
        "{}",
        server.stderr.lock().unwrap()
    );
}

#[test]
fn stopping_is_sent_when_the_drain_begins() {
    let manager = FakeManager::at_path("stopping");
    let server = Server::start_with_env(&[], &[("NOTIFY_SOCKET", &manager.address)]);
    manager.expect_line("READY=1", Duration::from_secs(30));
    server.signal("TERM");
    manager.expect_line("STOPPING=1", Duration::from_secs(30));
}

#[test]
fn the_watchdog_stops_and_the_server_exits_1_when_requests_cannot_get_through() {
    let manager = FakeManager::at_path("broken");
    let mut server = Server::start_with_env(
        &["--unhealthy-exit", "2"],
        &[
            ("NOTIFY_SOCKET", &manager.address),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    manager.expect_line("READY=1", Duration::from_secs(30));
    manager.expect_line("WATCHDOG=1", Duration::from_secs(2));
    // Take away the server's last free file descriptor: no connection can be accepted any more, so no
    // request can get through, although every thread is alive.
    let pid = server.pid();
    let lowest_free = (0u64..)
        .find(|n| !std::path::Path::new(&format!("/proc/{pid}/fd/{n}")).exists())
        .unwrap();
    let limit = libc::rlimit {
        rlim_cur: lowest_free,
        rlim_max: lowest_free,
    };
    // SAFETY: prlimit with a valid pointer to a local struct; lowering needs no privilege.
    let lowered = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(lowered, 0, "{}", std::io::Error::last_os_error());
    let broken = Instant::now();
    // A probe already under way may still finish; after that, silence.
    while manager.next(Duration::from_millis(1500)).is_some() {
        assert!(
            broken.elapsed() < Duration::from_secs(3),
            "WATCHDOG=1 goes on although nothing can connect"
        );
    }
    let code = server.wait_exit(Duration::from_secs(15));
    assert_eq!(
        code,
        Some(1),
        "exits 1 once the path has been broken for 2 s"
    );
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.contains("fatal: no request has gone through"),
        "a clear last line: {log}"
    );
}
