//! `--cors-allow-origin`: no CORS headers by default; with it, every answer names the origin and OPTIONS
//! preflights get 204 with the methods and headers a browser may use.

mod common;

use common::Server;
use serde_json::json;

const ORIGIN: &str = "https://app.example";

#[test]
fn no_cors_headers_unless_asked() {
    let server = Server::start(&[]);
    let health = server.request("GET", "/health", None);
    assert_eq!(health.status, 200);
    assert_eq!(health.header("access-control-allow-origin"), None);
    let preflight = server.raw_request("OPTIONS", "/v1/embeddings", &[("Origin", ORIGIN)], b"");
    assert_eq!(preflight.status, 405, "{}", preflight.text());
}

#[test]
fn every_answer_names_the_allowed_origin() {
    let server = Server::start(&["--cors-allow-origin", ORIGIN]);
    let embedded = server.post("/v1/embeddings", &json!({"input": "hello"}));
    assert_eq!(embedded.status, 200, "{}", embedded.text());
    assert_eq!(embedded.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(embedded.header("vary"), Some("Origin"));
    // Errors too, or a browser hides the error body from the page.
    let missing = server.request("GET", "/nowhere", None);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("access-control-allow-origin"), Some(ORIGIN));
}

#[test]
fn preflight_gets_204_with_methods_and_headers() {
    let server = Server::start(&["--cors-allow-origin", ORIGIN]);
    let preflight = server.raw_request(
        "OPTIONS",
        "/v1/embeddings",
        &[
            ("Origin", ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        b"",
    );
    assert_eq!(preflight.status, 204, "{}", preflight.text());
    assert!(preflight.body.is_empty());
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some(ORIGIN)
    );
    let methods = preflight
        .header("access-control-allow-methods")
        .unwrap_or("");
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let headers = preflight
        .header("access-control-allow-headers")
        .unwrap_or("");
    assert!(
        headers.to_ascii_lowercase().contains("content-type"),
        "{headers}"
    );
}

#[test]
fn a_wildcard_origin_needs_no_vary() {
    let server = Server::start_with_env(&[], &[("EMBEDDING_SERVER_CORS_ALLOW_ORIGIN", "*")]);
    let health = server.request("GET", "/health", None);
    assert_eq!(health.header("access-control-allow-origin"), Some("*"));
    assert_eq!(health.header("vary"), None);
}

#[test]
fn preflights_need_no_api_key_and_refusals_carry_the_origin() {
    let server = Server::start(&["--cors-allow-origin", ORIGIN, "--api-key", "secret"]);
    // Browsers send preflights without credentials; refusing them would block every cross-origin call.
    let preflight = server.raw_request("OPTIONS", "/v1/embeddings", &[("Origin", ORIGIN)], b"");
    assert_eq!(preflight.status, 204, "{}", preflight.text());
    let refused = server.post("/v1/embeddings", &json!({"input": "hello"}));
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.header("access-control-allow-origin"), Some(ORIGIN));
    let allowed = server.raw_request(
        "POST",
        "/v1/embeddings",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer secret"),
        ],
        br#"{"input": "hello"}"#,
    );
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(allowed.header("access-control-allow-origin"), Some(ORIGIN));
}
