//! A client nobody here wrote: the official `openai` Python package against the server. The package is
//! installed into `target/openai-venv` on first use (or give a Python that has it in
//! EMBEDDING_SERVER_TEST_PYTHON).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{shared_dir, Server};

fn python_with_openai() -> PathBuf {
    common::python_with("openai-venv", &["openai"], &["openai"])
        .unwrap_or_else(|e| panic!("no Python with the openai package: {e}"))
}

#[test]
fn the_official_openai_client_gets_reference_embeddings() {
    let python = python_with_openai();
    let server = Server::start(&[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_client.py");
    let reference = shared_dir().join("reference").join("all-MiniLM-L6-v2.json");
    let out = Command::new(&python)
        .arg(script)
        .arg(server.url("/v1"))
        .arg(reference)
        .output()
        .expect("cannot run the openai client script");
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
