//! The bad-input battery: every malformed, hostile or over-limit request gets a 4xx (or 429/503) with a JSON
//! error, and the server answers a good request right after each one.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Response, Server};
use serde_json::json;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        Server::start(&[
            "--max-body-bytes",
            "65536",
            "--max-inputs",
            "8",
            "--max-request-tokens",
            "600",
            "--body-timeout",
            "2",
        ])
    })
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// Asserts a JSON error with `status` and `kind`, then that a good request still works.
fn expect(server: &Server, response: Response, status: u16, kind: &str, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    let body = response.json();
    assert_eq!(body["error"]["type"], kind, "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty() && message.len() < 400,
        "{what}: a short message: {message}"
    );
    let good = server.post("/v1/embeddings", &json!({"input": "a good request"}));
    assert_eq!(good.status, 200, "after {what}: {}", good.text());
}

fn post_raw(server: &Server, headers: &[(&str, &str)], body: &[u8]) -> Response {
    server.raw_request("POST", "/v1/embeddings", headers, body)
}

#[test]
fn malformed_bodies_are_400() {
    let s = server();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid UTF-8", b"{\"input\": \"\xff\xfe\"}".to_vec()),
        ("a raw NUL byte", b"{\"input\": \"a\0b\"}".to_vec()),
        (
            "JSON nested 10,000 deep",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            "an object nested 10,000 deep",
            format!(
                "{{\"input\":{}{}}}",
                "{\"a\":".repeat(10_000),
                "}".repeat(10_000)
            )
            .into_bytes(),
        ),
        (
            "a number where a string belongs",
            br#"{"input": ["a", 3.5]}"#.to_vec(),
        ),
        ("a float token id", br#"{"input": [1.5]}"#.to_vec()),
        (
            "a token id past u32",
            br#"{"input": [4294967296]}"#.to_vec(),
        ),
        (
            "a token id outside the vocabulary",
            br#"{"input": [101, 30522, 102]}"#.to_vec(),
        ),
        ("an object input", br#"{"input": {"text": "a"}}"#.to_vec()),
        ("null input", br#"{"input": null}"#.to_vec()),
        ("truncated JSON", br#"{"input": ["a""#.to_vec()),
        ("trailing garbage", br#"{"input": "a"} x"#.to_vec()),
        ("a string body", br#""just a string""#.to_vec()),
    ];
    for (what, body) in cases {
        let response = post_raw(s, &[JSON], &body);
        expect(s, response, 400, "invalid_request_error", what);
    }
    // NUL as a JSON escape is text like any other: the model's normaliser drops it.
    assert_eq!(
        post_raw(s, &[JSON], br#"{"input": "a\u0000b"}"#).status,
        200
    );
}

#[test]
fn content_types_other_than_json_are_415() {
    let s = server();
    let body = br#"{"input": "a"}"#;
    expect(
        s,
        post_raw(s, &[("Content-Type", "text/plain")], body),
        415,
        "invalid_request_error",
        "text/plain",
    );
    expect(
        s,
        post_raw(
            s,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body,
        ),
        415,
        "invalid_request_error",
        "a form",
    );
    expect(
        s,
        post_raw(s, &[], body),
        415,
        "invalid_request_error",
        "no Content-Type",
    );
    assert_eq!(
        post_raw(
            s,
            &[("Content-Type", "application/json; charset=utf-8")],
            body
        )
        .status,
        200
    );
}

#[test]
fn limits_have_clear_errors() {
    let s = server();
    let big = format!("{{\"input\": \"{}\"}}", "a ".repeat(40_000));
    expect(
        s,
        post_raw(s, &[JSON], big.as_bytes()),
        413,
        "invalid_request_error",
        "a body over the limit",
    );

    let nine: Vec<String> = (0..9).map(|i| format!("input {i}")).collect();
    let response = s.post("/v1/embeddings", &json!({"input": nine}));
    assert!(
        response.text().contains('8'),
        "names the limit: {}",
        response.text()
    );
    expect(s, response, 400, "invalid_request_error", "too many inputs");

    let long: Vec<String> = (0..3).map(|_| "word ".repeat(300)).collect();
    let response = s.post("/v1/embeddings", &json!({"input": long}));
    assert!(
        response.text().contains("600"),
        "names the limit: {}",
        response.text()
    );
    expect(s, response, 400, "invalid_request_error", "too many tokens");

    let response = s.post(
        "/v1/embeddings",
        &json!({"input": "word ".repeat(300), "truncate": false}),
    );
    let text = response.text();
    assert!(
        text.contains("302") && text.contains("256"),
        "says how long and the maximum: {text}"
    );
    expect(
        s,
        response,
        400,
        "invalid_request_error",
        "an over-long input with truncate=false",
    );
    let truncated = s
        .post("/v1/embeddings", &json!({"input": "word ".repeat(300)}))
        .json();
    assert_eq!(
        truncated["usage"]["prompt_tokens"], 256,
        "truncated by default"
    );
}

#[test]
fn no_truncate_flag_refuses_long_inputs() {
    let s = Server::start(&["--no-truncate"]);
    let response = s.post("/v1/embeddings", &json!({"input": "word ".repeat(300)}));
    expect(&s, response, 400, "invalid_request_error", "--no-truncate");
    assert_eq!(
        s.post(
            "/v1/embeddings",
            &json!({"input": "word ".repeat(300), "truncate": true})
        )
        .status,
        200
    );
}

#[test]
fn lying_content_lengths_and_chunked_bodies() {
    let s = server();
    // Shorter than declared: the body never completes, so the body deadline (2 s here) answers the
    // documented 408 with a JSON error, and the connection closes.
    let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n";
    let sent = std::time::Instant::now();
    stream
        .write_all(format!("{head}{{\"input\": \"a\"}}").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the connection closes after the answer");
    let waited = sent.elapsed();
    let response = Response::parse(&answer);
    assert_eq!(response.status, 408, "a short body: {}", response.text());
    assert_eq!(response.json()["error"]["code"], "request_timeout");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(15),
        "answered after the 2 s body deadline, not before: {waited:?}"
    );
    assert_eq!(
        s.post("/v1/embeddings", &json!({"input": "still fine"}))
            .status,
        200
    );

    // Longer than declared: the rest is read as the next request, which is malformed.
    let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let body = r#"{"input": "a"}"#;
    let head = format!("POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len() - 2);
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "the cut body is invalid JSON: {text}"
    );
    assert_eq!(
        s.post("/v1/embeddings", &json!({"input": "still fine"}))
            .status,
        200
    );

    // Chunked bodies are read like any other, and held to the same size limit.
    let chunked = |payload: &str| {
        let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut request = String::from("POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        for piece in payload.as_bytes().chunks(1000) {
            request.push_str(&format!(
                "{:x}\r\n{}\r\n",
                piece.len(),
                std::str::from_utf8(piece).unwrap()
            ));
        }
        request.push_str("0\r\n\r\n");
        let _ = stream.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer)
            .split("\r\n")
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(chunked(r#"{"input": "chunked"}"#), "HTTP/1.1 200 OK");
    assert!(
        chunked(&format!("{{\"input\": \"{}\"}}", "a ".repeat(40_000))).starts_with("HTTP/1.1 413")
    );
}

#[test]
fn a_full_queue_is_429_and_a_missed_deadline_503_both_with_retry_after() {
    let s = Server::start(&[
        "--queue-capacity",
        "1",
        "--max-batch-tokens",
        "64",
        "--threads",
        "32",
    ]);
    let inputs: Vec<String> = (0..8)
        .map(|i| format!("{i} {}", "long text ".repeat(100)))
        .collect();
    let body = json!({"input": inputs}).to_string();
    let statuses: Vec<Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|_| scope.spawn(|| s.request("POST", "/v1/embeddings", Some(&body))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let full: Vec<&Response> = statuses.iter().filter(|r| r.status == 429).collect();
    assert!(
        !full.is_empty(),
        "some of 12 concurrent requests meet a full queue: {:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(statuses.iter().all(|r| r.status == 200 || r.status == 429));
    assert!(full[0].header("retry-after").is_some());
    assert_eq!(full[0].json()["error"]["type"], "rate_limit_error");
    drop(s);

    let s = Server::start(&["--request-timeout", "0.05", "--max-batch-tokens", "256"]);
    let many: Vec<String> = (0..64)
        .map(|i| format!("{i} {}", "long text ".repeat(120)))
        .collect();
    let response = s.post("/v1/embeddings", &json!({"input": many}));
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    let metrics = s.request("GET", "/metrics", None).text();
    assert!(
        metrics.contains("embedding_errors_total{status=\"503\"} 1"),
        "{metrics}"
    );
}

#[test]
fn api_keys_guard_every_route_but_health() {
    let dir = std::env::temp_dir().join(format!("embedding-server-keys-{}", std::process::id()));
    std::fs::write(&dir, "# keys\nfile-key\n").unwrap();
    let s = Server::start(&[
        "--api-key",
        "flag-key",
        "--api-key-file",
        dir.to_str().unwrap(),
    ]);
    let body = br#"{"input": "a"}"#;
    let denied = post_raw(&s, &[JSON], body);
    assert_eq!(denied.status, 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    assert_eq!(denied.json()["error"]["type"], "authentication_error");
    assert_eq!(
        post_raw(&s, &[JSON, ("Authorization", "Bearer wrong")], body).status,
        401
    );
    assert_eq!(
        post_raw(&s, &[JSON, ("Authorization", "Bearer flag-key")], body).status,
        200
    );
    assert_eq!(
        post_raw(&s, &[JSON, ("Authorization", "Bearer file-key")], body).status,
        200
    );
    assert_eq!(s.request("GET", "/v1/models", None).status, 401);
    assert_eq!(s.request("GET", "/health", None).status, 200);
    assert_eq!(s.request("GET", "/metrics", None).status, 200);
    let log = s.stderr.lock().unwrap().clone();
    assert!(
        !log.contains("flag-key") && !log.contains("file-key"),
        "keys never reach the log"
    );
    drop(s);
    let s = Server::start(&["--api-key", "k", "--metrics-auth"]);
    assert_eq!(s.request("GET", "/metrics", None).status, 401);
    let _ = std::fs::remove_file(dir);
}

#[test]
fn error_messages_do_not_echo_whole_inputs() {
    let s = server();
    let secret = "secret-".repeat(500);
    for body in [
        json!({"input": "a", "model": secret}),
        json!({"input": "a", "task": secret}),
        json!({"input": [secret, 5]}),
    ] {
        let text = s.post("/v1/embeddings", &body).text();
        assert!(
            !text.contains(&secret),
            "the error echoes the whole input: {}",
            &text[..text.len().min(300)]
        );
    }
    let log = s.stderr.lock().unwrap().clone();
    assert!(
        !log.contains("secret-secret"),
        "no request content in the log"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_and_a_vanishing_client_harms_nobody() {
    let s = server();
    let mut stream = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let request = |text: &str| {
        let body = json!({"input": text}).to_string();
        format!("POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    let pipelined = format!(
        "{}GET /v1/models/nope HTTP/1.1\r\nHost: x\r\n\r\n{}GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        request("first"),
        request("second")
    );
    stream.write_all(pipelined.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(
        statuses,
        ["200", "404", "200", "200"],
        "in order: {}",
        &text[..text.len().min(400)]
    );

    // Clients that send a large request and vanish before the answer.
    for _ in 0..5 {
        let mut gone = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let inputs: Vec<String> = (0..64)
            .map(|i| format!("{i} {}", "text ".repeat(50)))
            .collect();
        let body = json!({"input": inputs}).to_string();
        let head = format!("POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        gone.write_all(head.as_bytes()).unwrap();
        gone.write_all(body.as_bytes()).unwrap();
        drop(gone);
    }
    assert_eq!(
        s.post(
            "/v1/embeddings",
            &json!({"input": "after the vanished clients"})
        )
        .status,
        200
    );
}
