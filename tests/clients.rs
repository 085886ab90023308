//! Clients nobody here wrote, as users call them: LangChain and LlamaIndex (their OpenAI embedding classes
//! and their rerankers: LangChain's `CohereRerank`, LlamaIndex's `JinaRerank` and `TEIRerank`) checked
//! against sentence-transformers' vectors and scores by `tests/clients.py`; and every Python snippet of the
//! README's "Use it from" section, run as written against a live server (its `localhost:5000` pointed at
//! the test's server, its reranker name at the shared rerank-tiny).
//!
//! The packages are installed with pip into `target/clients-venv` on first use (or give a Python that has
//! them in `EMBEDDING_SERVER_TEST_PYTHON`). That takes minutes, so the test is ignored by plain
//! `cargo test`; `.ci/run` runs it with `--ignored`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{shared_dir, Server};

/// What the snippets and tests/clients.py import, by their pip names.
const PACKAGES: [&str; 7] = [
    "openai",
    "langchain-openai",
    "langchain-cohere",
    "llama-index-core",
    "llama-index-embeddings-openai",
    "llama-index-postprocessor-jinaai-rerank",
    "llama-index-postprocessor-tei-rerank",
];

/// The modules the packages above provide.
const MODULES: [&str; 7] = [
    "openai",
    "langchain_openai",
    "langchain_cohere",
    "llama_index.core",
    "llama_index.embeddings.openai",
    "llama_index.postprocessor.jinaai_rerank",
    "llama_index.postprocessor.tei_rerank",
];

fn python_with_clients() -> PathBuf {
    common::python_with("clients-venv", &MODULES, &PACKAGES)
        .unwrap_or_else(|e| panic!("no Python with LangChain and LlamaIndex: {e}"))
}

/// The server the clients call: the embedded model and the shared rerank-tiny.
fn server() -> Server {
    let reference = shared_dir().join("reference");
    Server::start(&[
        "--model-dir",
        reference.to_str().unwrap(),
        "--model",
        "all-MiniLM-L6-v2",
        "--model",
        "rerank-tiny",
    ])
}

fn run(python: &PathBuf, args: &[&str], what: &str) -> String {
    let out = Command::new(python)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
#[ignore = "installs LangChain and LlamaIndex with pip (minutes); .ci/run runs it"]
fn langchain_and_llamaindex_embed_and_rerank_as_sentence_transformers_does() {
    let python = python_with_clients();
    let server = server();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients.py");
    let reference = shared_dir().join("reference");
    let out = run(
        &python,
        &[
            script.to_str().unwrap(),
            &server.url(""),
            reference.join("all-MiniLM-L6-v2.json").to_str().unwrap(),
            reference
                .join("rerank-tiny/expected.json")
                .to_str()
                .unwrap(),
            "rerank-tiny",
        ],
        "tests/clients.py",
    );
    eprintln!("{out}");
}

/// The Python code blocks of the README's "Use it from" section.
fn readme_snippets() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Use it from")
        .nth(1)
        .expect("the README has a \"Use it from\" section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .split("```python\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
#[ignore = "installs LangChain and LlamaIndex with pip (minutes); .ci/run runs it"]
fn every_python_snippet_of_the_readme_runs_as_written() {
    let snippets = readme_snippets();
    assert!(snippets.len() >= 5, "only {} snippets", snippets.len());
    let python = python_with_clients();
    let server = server();
    for snippet in snippets {
        let code = snippet
            .replace("http://localhost:5000", &server.url(""))
            .replace("ms-marco-MiniLM-L-6-v2", "rerank-tiny");
        let out = run(&python, &["-c", &code], &format!("the snippet\n{snippet}"));
        assert!(
            !out.trim().is_empty(),
            "the snippet printed nothing:\n{snippet}"
        );
        eprintln!("{out}");
    }
}
