//! Connections cost no threads, and the server never outlives its ability to serve: thousands of idle
//! connections, the connection cap, slow heads and silent connections, the bound on buffered request
//! bytes, HTTP/1.0 and `100 Continue` through the front door, and tiny_http out of other processes' reach.
//! Two tests need root and are run by CI explicitly (`-- --ignored`): the server in a pids cgroup far
//! below the connection cap, and another user trying to reach tiny_http around the door.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Response, Server, BINARY};
use serde_json::json;

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's /proc entry")
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Raises this process's own open-file limit to at least `wanted`, or fails saying why.
fn raise_own_fd_limit(wanted: u64) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur >= wanted {
            return;
        }
        assert!(
            limit.rlim_max >= wanted,
            "this test needs {wanted} open files; the hard limit is {} (raise it: ulimit -Hn)",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// The value of an unlabelled sample in `/metrics`.
fn metric(server: &Server, name: &str) -> f64 {
    let text = server.request("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn good(server: &Server) -> u16 {
    server
        .post("/v1/embeddings", &json!({"input": "a good request"}))
        .status
}

/// Reads until the server closes the connection (or `limit` passes); what came, and when it closed.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buffer) {
            Ok(0) => return (got, Some(started.elapsed())),
            Ok(n) => got.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, Some(started.elapsed())),
        }
    }
    (got, None)
}

#[test]
fn five_thousand_idle_connections_cost_no_threads() {
    raise_own_fd_limit(5_500);
    // Opening 5,000 connections can take longer than the default idle timeout on a loaded machine.
    let server = Server::start(&["--idle-timeout", "600"]);
    let pid = server.pid();
    assert_eq!(good(&server), 200);
    std::thread::sleep(Duration::from_millis(500));
    let idle = threads(pid);

    let connections: Vec<TcpStream> = (0..5_000)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", server.port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // The door has accepted them all (the metrics request is one more).
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = loop {
        let open = metric(&server, "embedding_open_connections");
        if open >= 5_000.0 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(open >= 5_000.0, "only {open} connections are open");
    let loaded = threads(pid);
    assert!(
        loaded.abs_diff(idle) <= 4,
        "{idle} threads idle, {loaded} with 5,000 idle connections"
    );
    assert_eq!(
        good(&server),
        200,
        "a new request with 5,000 idle connections"
    );
    drop(connections);
}

#[test]
fn the_connection_cap_answers_a_json_503_and_frees_up() {
    let server = Server::start(&["--max-connections", "20"]);
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let mut extra = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(5));
        if !answer.is_empty() {
            assert!(closed.is_some(), "closed after the 503");
            break Response::parse(&answer);
        }
        assert!(Instant::now() < deadline, "no 503 at the cap");
    };
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "too_many_connections");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("content-type"), Some("application/json"));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10));
        if Response::parse(&answer).status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the cap never freed up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn slow_heads_and_silent_connections_are_closed_while_others_are_served() {
    let server = Server::start(&["--header-timeout", "1", "--idle-timeout", "2"]);
    let mut slow = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let mut silent = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    slow.write_all(b"POST /v1/embeddings HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        // One byte every 200 ms, until the server closes the connection.
        let mut sent = 0;
        while slow.write_all(b"a").is_ok() && sent < 50 {
            sent += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        started.elapsed()
    });
    assert_eq!(good(&server), 200);
    let (answer, closed) = read_until_closed(&mut silent, Duration::from_secs(10));
    let closed = closed.expect("a silent connection is closed");
    assert!(answer.is_empty(), "closed without an answer");
    assert!(
        closed >= Duration::from_millis(1800),
        "not before the idle timeout: {closed:?}"
    );
    let slow_for = trickle.join().unwrap();
    assert!(
        slow_for < Duration::from_secs(8),
        "a head trickling in is cut off after the header timeout: {slow_for:?}"
    );
    assert_eq!(good(&server), 200);
}

#[test]
fn buffered_request_bytes_stay_under_the_bound() {
    // Room for one whole request of the largest size, and no more.
    let bound = 2 * 1024 * 1024 + 64 * 1024;
    let server = Server::start(&[
        "--max-buffered-bytes",
        &bound.to_string(),
        "--body-timeout",
        "2",
    ]);
    let pid = server.pid();
    assert_eq!(good(&server), 200);
    std::thread::sleep(Duration::from_secs(3));
    let before = rss_kib(pid);
    // Twelve clients each send 1.5 MB of a 2 MB body and stall: 18 MB if the door kept it all.
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let port = server.port;
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                stream
                    .set_write_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n";
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&vec![b' '; 1_500_000]);
                let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(90));
                answer
            })
        })
        .collect();
    let mut peak = before;
    while clients.iter().any(|c| !c.is_finished()) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    for client in clients {
        let answer = client.join().unwrap();
        if !answer.is_empty() {
            assert_eq!(Response::parse(&answer).status, 408);
        }
    }
    let growth_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    assert!(
        growth_mib < 10.0,
        "RSS grew by {growth_mib:.1} MiB while clients offered 18 MB against a bound of {bound} bytes"
    );
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.contains("--max-buffered-bytes"),
        "the log says when the bound holds reading back:\n{log}"
    );
    assert_eq!(good(&server), 200);
}

#[test]
fn http_1_0_head_and_100_continue_pass_through_the_door() {
    let server = Server::start(&[]);
    let connect = || {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    };
    // HTTP/1.0 without keep-alive: one answer, then the connection closes.
    let mut stream = connect();
    stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(closed.is_some());
    let response = Response::parse(&answer);
    assert_eq!(response.status, 200);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.0 200"));

    // HTTP/1.0 with keep-alive: the answer says so, and a second request follows on the connection.
    let mut stream = connect();
    stream
        .write_all(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).unwrap();
    let first = String::from_utf8_lossy(&first[..n]).to_ascii_lowercase();
    assert!(first.contains("connection: keep-alive"), "{first}");
    stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert_eq!(Response::parse(&answer).status, 200);

    // HEAD: an answer without a body, after which the connection goes on.
    let mut stream = connect();
    stream
        .write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.ends_with("{\"status\":\"ok\"}"), "{text}");

    // Expect: 100-continue: the door says go on before the body comes.
    let mut stream = connect();
    let body = json!({"input": "after a 100 Continue"}).to_string();
    write!(stream, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let mut interim = [0u8; 64];
    let n = stream.read(&mut interim).unwrap();
    assert_eq!(&interim[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(30));
    assert_eq!(Response::parse(&answer).status, 200);
}

/// The Unix sockets a process holds, from `/proc/net/unix`: (inode, bound path or `@name`).
fn unix_sockets_of(pid: u32) -> Vec<(u64, String)> {
    let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(6)?.parse().ok()?;
            let path = fields.get(7).map_or(String::new(), |p| p.to_string());
            inodes.contains(&inode).then_some((inode, path))
        })
        .collect()
}

#[test]
fn the_internal_socket_has_no_name_anyone_can_use() {
    let server = Server::start(&[]);
    let sockets = unix_sockets_of(server.pid());
    assert!(
        !sockets.is_empty(),
        "the internal connections are Unix sockets"
    );
    for (inode, path) in &sockets {
        assert!(
            !path.starts_with('@'),
            "socket {inode} has an abstract name anyone can connect to: {path}"
        );
        if !path.is_empty() {
            assert!(
                !Path::new(path).exists(),
                "the socket file {path} is still there"
            );
            assert!(
                std::os::unix::net::UnixStream::connect(path).is_err(),
                "{path} can be connected to"
            );
        }
    }
    assert_eq!(good(&server), 200);
}

#[test]
#[ignore = "needs root (to become another user); .ci/run runs it"]
fn another_user_cannot_reach_tiny_http_around_the_door() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run this test as root");
    let server = Server::start(&[]);
    let pid = server.pid();
    // Every descriptor of the server as a path, including the one the door connects through.
    let paths: Vec<std::ffi::CString> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            std::ffi::CString::new(path.to_str()?).ok()
        })
        .collect();
    assert!(paths.len() > 10);
    // As root, the descriptors are reachable (so the check below can tell a refusal from a typo)...
    assert!(
        paths.iter().any(|p| connect_unix(p)),
        "root reaches the internal socket through /proc/{pid}/fd"
    );
    // ...but not as nobody.
    // SAFETY: the child makes only async-signal-safe calls (setgid, setuid, socket, connect, _exit).
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let reached = paths.iter().any(|p| connect_unix(p));
            libc::_exit(i32::from(reached));
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "another user connected to one of the server's sockets (2: could not become nobody)"
    );
    assert_eq!(good(&server), 200);
}

/// Whether a Unix stream connection to `path` succeeds; async-signal-safe (no allocation).
fn connect_unix(path: &std::ffi::CStr) -> bool {
    // SAFETY: plain system calls on a local sockaddr_un; the path is copied within its bounds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return false;
        }
        let mut address: libc::sockaddr_un = std::mem::zeroed();
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.to_bytes_with_nul();
        if bytes.len() > address.sun_path.len() {
            libc::close(fd);
            return false;
        }
        for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
            *slot = *byte as libc::c_char;
        }
        let connected = libc::connect(
            fd,
            (&address as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ) == 0;
        libc::close(fd);
        connected
    }
}

/// A pids cgroup of its own (cgroup v1's pids controller, or v2 with pids enabled), removed when dropped.
struct PidsCgroup {
    dir: PathBuf,
}

impl PidsCgroup {
    fn create(max: usize) -> PidsCgroup {
        let name = format!("embedding-server-test-{}-{max}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let parent = if v1.join("cgroup.procs").exists() {
            v1
        } else {
            let controllers =
                std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
            assert!(
                controllers.split_whitespace().any(|c| c == "pids"),
                "no pids cgroup controller: neither /sys/fs/cgroup/pids (v1) nor pids in \
                 /sys/fs/cgroup/cgroup.subtree_control (v2)"
            );
            v2
        };
        let dir = parent.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create the cgroup {}: {e}", dir.display()));
        std::fs::write(dir.join("pids.max"), max.to_string()).unwrap();
        PidsCgroup { dir }
    }

    /// A command that moves itself into the cgroup, then runs the server with `args`.
    fn server_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(BINARY)
            .args(["serve", "--port", "0"])
            .args(args);
        command
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The cgroup can go once its processes have exited.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
#[ignore = "needs root (a pids cgroup); .ci/run runs it"]
fn in_a_pids_cgroup_far_below_the_connection_cap_the_server_keeps_serving() {
    raise_own_fd_limit(2_500);
    let cgroup = PidsCgroup::create(64);
    let server = Server::from_command(cgroup.server_command(&["--max-connections", "1000"]));
    let pid = server.pid();
    assert!(threads(pid) < 64);
    assert_eq!(good(&server), 200);

    // 2,000 idle connections: the first 1,000 are held, the rest refused with a JSON 503.
    let mut held = Vec::new();
    for _ in 0..2_000 {
        held.push(TcpStream::connect(("127.0.0.1", server.port)).unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..20 {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let body = json!({"input": "while the cap is full"}).to_string();
        let _ = write!(stream, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(30));
        let response = Response::parse(&answer);
        assert!(
            response.status == 200
                || (response.status == 503
                    && response.json()["error"]["code"] == "too_many_connections"),
            "{}: {}",
            response.status,
            response.text()
        );
    }
    assert!(threads(pid) < 64, "{} threads", threads(pid));
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..20 {
        assert_eq!(
            good(&server),
            200,
            "request {i} after the connections closed"
        );
    }
    drop(server);

    // Where the server cannot have the threads it needs, it says so and exits non-zero.
    let tiny = PidsCgroup::create(8);
    let output = tiny
        .server_command(&[])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the server");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit status 0 with 8 tasks: {log}"
    );
    assert!(
        log.contains("task limit"),
        "the log names the task limit: {log}"
    );
}
