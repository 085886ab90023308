//! Graceful shutdown: SIGTERM while requests are in flight answers every one of them, turns /health to 503
//! for connections still open, refuses new connections, and exits 0.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::json;

/// One whole response: headers and body may arrive in separate segments (the server sets TCP_NODELAY), so
/// reading once could leave the body behind for the next request to find.
fn get_on(stream: &mut TcpStream, path: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&response).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if response.len() >= end + 4 + length {
                return text;
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&response).to_string(),
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
    }
}

#[test]
fn sigterm_drains_every_accepted_request_and_exits_zero() {
    let mut server = Server::start(&["--max-batch-tokens", "512", "--shutdown-timeout", "30"]);
    let mut kept_open = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    kept_open
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(get_on(&mut kept_open, "/health").starts_with("HTTP/1.1 200"));

    let inputs: Vec<String> = (0..48)
        .map(|i| format!("{i} {}", "a fairly long sentence ".repeat(20)))
        .collect();
    let body = json!({"input": inputs}).to_string();
    let statuses = std::thread::scope(|scope| {
        let requests: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| server.request("POST", "/v1/embeddings", Some(&body)).status))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        server.signal("TERM");
        let signalled = Instant::now();

        // The drain starts within the signal watcher's 50 ms; idle connections are closed after 1 s.
        std::thread::sleep(Duration::from_millis(200));
        let health = get_on(&mut kept_open, "/health");
        assert!(
            health.starts_with("HTTP/1.1 503"),
            "/health while draining: {health}"
        );
        let refused = TcpStream::connect(("127.0.0.1", server.port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut b = [0u8; 64];
            s.read(&mut b)
        });
        assert!(
            matches!(refused, Err(_) | Ok(0)),
            "a new connection after SIGTERM is not served: {refused:?}"
        );

        let statuses: Vec<u16> = requests.into_iter().map(|r| r.join().unwrap()).collect();
        (statuses, signalled)
    });
    let (statuses, signalled) = statuses;
    assert_eq!(
        statuses,
        vec![200; 6],
        "every request accepted before SIGTERM is answered"
    );
    drop(kept_open);
    let code = server.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "exits 0 after draining");
    assert!(signalled.elapsed() < Duration::from_secs(30));
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.contains("drained: every accepted request was answered"),
        "{log}"
    );
}

/// Clients that arrive while the server starts (a load balancer's retries, a cold start timed by its first
/// answer) are served at once, and the start still completes: READY, `listening on`, the self-probe and a
/// later SIGTERM all happen as they would on a quiet start.
#[test]
fn clients_during_start_neither_wait_nor_stall_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::sync::atomic::AtomicBool::new(false);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let mut server = std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let body = r#"{"input": "hello"}"#;
                while !started.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let request = format!(
                        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let mut answer = String::new();
                    if stream.write_all(request.as_bytes()).is_ok()
                        && stream.read_to_string(&mut answer).is_ok()
                        && answer.starts_with("HTTP/1.1 200")
                    {
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
        let mut command = std::process::Command::new(common::BINARY);
        command.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()]);
        // Waits for `listening on` (or panics with the log when the server gives up); the clients stop
        // either way, so that the scope ends.
        let server = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Server::from_command(command)));
        started.store(true, std::sync::atomic::Ordering::SeqCst);
        server
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    eprintln!(
        "{} answers while the server started",
        answered.load(std::sync::atomic::Ordering::SeqCst)
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
}
