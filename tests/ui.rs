//! The page at `/`: served small, without a key, under a Content-Security-Policy that allows exactly its
//! inline code; `--no-ui` removes it; `/v1/info` gives the version and uptime it shows. And the page in a
//! real browser (headless Chromium driven by Selenium, `tests/ui_browser.py`): it lists the models, shows
//! the cosine `/v1/embeddings` gives and the ranking `/v1/rerank` gives (the shared rerank-tiny), works with
//! an API key, requests nothing from another origin and breaks no rule of its policy.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::Server;
use sha2::{Digest, Sha256};

const PAGE_LIMIT: usize = 40 * 1024;
const KEY: &str = "ui-test-key";

/// The contents of each `<tag>…</tag>` of `html`.
fn blocks(html: &str, tag: &str) -> Vec<String> {
    html.split(&format!("<{tag}>"))
        .skip(1)
        .map(|rest| rest.split(&format!("</{tag}>")).next().unwrap().to_string())
        .collect()
}

/// Standard base64 with padding, written out here so the test does not share the server's encoder.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn the_page_is_small_keyless_and_allows_only_its_own_inline_code() {
    let server = Server::start(&["--api-key", KEY]);
    let page = server.request("GET", "/", None);
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.body.len() <= PAGE_LIMIT,
        "the page is {} bytes; the limit is {PAGE_LIMIT}",
        page.body.len()
    );
    let file = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/ui/index.html")).unwrap();
    assert_eq!(page.body, file, "the served page is assets/ui/index.html");
    let html = page.text();

    let policy = page
        .header("content-security-policy")
        .expect("the page comes with a Content-Security-Policy");
    let directives: Vec<&str> = policy.split(';').map(str::trim).collect();
    for required in [
        "default-src 'none'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(directives.contains(&required), "{required} in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
        let code = blocks(&html, tag);
        assert_eq!(code.len(), 1, "one inline <{tag}>");
        let allowed: Vec<String> = code
            .iter()
            .map(|c| format!("'sha256-{}'", base64(&Sha256::digest(c.as_bytes()))))
            .collect();
        let expected = format!("{directive} {}", allowed.join(" "));
        assert!(
            directives.contains(&expected.as_str()),
            "{expected} in {policy}"
        );
    }
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));

    // The page holds no data; what it shows does need the key.
    for path in ["/v1/info", "/v1/models", "/openapi.json"] {
        assert_eq!(server.request("GET", path, None).status, 401, "{path}");
    }
    // POST / is text-embeddings-inference's embed, which needs the key like every other embedding route.
    assert_eq!(
        server
            .request("POST", "/", Some(r#"{"inputs": "a"}"#))
            .status,
        401
    );
}

#[test]
fn info_gives_the_version_and_the_uptime() {
    let server = Server::start(&[]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let info = server.request("GET", "/v1/info", None);
    assert_eq!(info.status, 200, "{}", info.text());
    let info = info.json();
    assert_eq!(info["name"], "embedding-server");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let started = info["started"].as_u64().unwrap();
    assert!(started.abs_diff(now) <= 120, "started {started}, now {now}");
    let uptime = info["uptime_seconds"].as_u64().unwrap();
    assert!(uptime <= 120, "{uptime}");
    let card = server
        .request("GET", "/v1/models/all-MiniLM-L6-v2", None)
        .json();
    assert_eq!(card["created"], info["started"], "one start time");
}

#[test]
fn no_ui_removes_the_page_and_nothing_else() {
    let by_flag = Server::start(&["--no-ui"]);
    let by_env = Server::start_with_env(&[], &[("EMBEDDING_SERVER_NO_UI", "1")]);
    let env_off = Server::start_with_env(&[], &[("EMBEDDING_SERVER_NO_UI", "0")]);
    for server in [&by_flag, &by_env] {
        let page = server.request("GET", "/", None);
        assert_eq!(page.status, 404, "{}", page.text());
        assert_eq!(page.json()["error"]["code"], "not_found");
        assert!(page.header("content-security-policy").is_none());
        let embedded = server.post("/v1/embeddings", &serde_json::json!({"input": "a"}));
        assert_eq!(embedded.status, 200, "{}", embedded.text());
        assert_eq!(server.request("GET", "/v1/info", None).status, 200);
    }
    assert_eq!(env_off.request("GET", "/", None).status, 200);
}

// ---- in a real browser ----------------------------------------------------------------------------------

/// Set (to anything but 0) where a browser test that cannot run must fail rather than say SKIPPED: CI.
const REQUIRE: &str = "EMBEDDING_SERVER_REQUIRE_BROWSER";

fn skipped(reason: &str) {
    if std::env::var(REQUIRE).is_ok_and(|v| v != "0" && !v.is_empty()) {
        panic!("the browser test cannot run and {REQUIRE} is set: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// A Python with selenium: EMBEDDING_SERVER_TEST_PYTHON if it has it, else `target/selenium-venv`,
/// created and filled with pip on first use. `Err` says why there is none.
fn python_with_selenium() -> Result<PathBuf, String> {
    common::python_with("selenium-venv", &["selenium"], &["selenium"])
}

#[test]
#[ignore = "needs Chromium, chromium-driver and Python's selenium (pip-installed into target/selenium-venv); \
            .ci/run runs it with EMBEDDING_SERVER_REQUIRE_BROWSER=1 so that it cannot be skipped there"]
fn the_page_works_in_a_real_browser() {
    let python = match python_with_selenium() {
        Ok(python) => python,
        Err(reason) => return skipped(&reason),
    };
    // The real reranker rerank-tiny beside the embedded model, so that the page's Rerank section is checked
    // against /v1/rerank itself (the stand-in in ui_browser.py covers the shapes no model here gives).
    let reference = common::shared_dir().join("reference");
    let open = Server::start(&[
        "--model-dir",
        reference.to_str().unwrap(),
        "--model",
        "all-MiniLM-L6-v2",
        "--model",
        "rerank-tiny",
    ]);
    // --no-truncate: an over-long text gets a 400, so the page's error display is seen too.
    let keyed = Server::start(&["--api-key", KEY, "--no-truncate"]);
    let screenshot =
        std::env::temp_dir().join(format!("embedding-server-ui-{}.png", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui_browser.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(open.url(""))
        .arg(keyed.url(""))
        .arg(KEY)
        .arg(&screenshot)
        .output()
        .expect("cannot run tests/ui_browser.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            println!("{stdout}");
            println!("screenshot: {}", screenshot.display());
        }
        // The script's code for "the browser cannot start here"; it printed why.
        Some(77) => skipped(stdout.trim().trim_start_matches("SKIPPED: ")),
        _ => panic!("the browser test failed:\n{stdout}\n{stderr}"),
    }
}
