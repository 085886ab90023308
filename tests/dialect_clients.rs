//! Clients nobody here wrote: the official `ollama`, `cohere` and `huggingface_hub` Python packages,
//! unmodified, against a server with an API key (`tests/dialect_clients.py` says what it checks). The
//! packages are installed into `target/dialect-clients-venv` on first use (or give a Python that has them
//! in EMBEDDING_SERVER_TEST_PYTHON).

mod common;

use std::process::Command;

use common::{shared_dir, Server};

const KEY: &str = "dialect-test-key";

#[test]
fn the_official_ollama_cohere_and_huggingface_hub_clients_get_reference_embeddings() {
    let python = common::python_with(
        "dialect-clients-venv",
        &["ollama", "cohere", "huggingface_hub", "numpy"],
        &["ollama", "cohere", "huggingface-hub", "numpy"],
    )
    .unwrap_or_else(|e| panic!("no Python with the client packages: {e}"));
    let server = Server::start(&["--api-key", KEY]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dialect_clients.py");
    let reference = shared_dir().join("reference").join("all-MiniLM-L6-v2.json");
    let out = Command::new(&python)
        .arg(script)
        .arg(server.url(""))
        .arg(KEY)
        .arg(reference)
        // The clients must reach this server directly, whatever proxy the environment names.
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("cannot run tests/dialect_clients.py");
    assert!(
        out.status.success(),
        "a client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
