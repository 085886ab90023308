//! The command line: `embed`, `models`, `export-models` and its round trip through `--model-dir`,
//! `--help` and `--version`.

mod common;

use std::process::{Command, Stdio};

use common::{cosine, floats, reference, Server, BINARY};
use serde_json::{json, Value};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BINARY)
        .args(args)
        .output()
        .expect("cannot run the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn reference_case(id: &str) -> Value {
    reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap()
}

fn first_sentence() -> Value {
    reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "sentence")
        .cloned()
        .unwrap()
}

#[test]
fn embed_prints_one_json_line_per_argument() {
    let case = first_sentence();
    let (ok, stdout, stderr) = run(&["embed", case["text"].as_str().unwrap(), "second"]);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["dims"], 384);
    assert!(cosine(&floats(&lines[0]["embedding"]), &floats(&case["embedding"])) >= 0.99999);
}

#[test]
fn embed_reads_stdin_lines_and_writes_raw_floats() {
    let mut child = Command::new(BINARY)
        .args(["embed", "--format", "f32"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 3 * 384 * 4);
}

#[test]
fn export_models_round_trips_through_model_dir() {
    let dir = std::env::temp_dir().join(format!("embedding-server-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, stdout, stderr) = run(&["export-models", dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(stdout.contains(file), "{stdout}");
        assert!(dir.join("all-MiniLM-L6-v2").join(file).is_file());
    }
    let server = Server::start(&["--model-dir", dir.to_str().unwrap()]);
    let case = reference_case("boundary-257");
    let body = server
        .post("/v1/embeddings", &json!({"input": case["text"]}))
        .json();
    assert!(
        cosine(
            &floats(&body["data"][0]["embedding"]),
            &floats(&case["embedding"])
        ) >= 0.99999
    );
    assert_eq!(body["usage"]["prompt_tokens"], 256);
    drop(server);

    // A file that is not the pinned one is refused with a message saying so.
    std::fs::write(dir.join("all-MiniLM-L6-v2").join("config.json"), b"{}").unwrap();
    let (ok, _, stderr) = run(&["embed", "--model-dir", dir.to_str().unwrap(), "x"]);
    assert!(!ok && stderr.contains("sha256"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_version_and_models_describe_the_binary() {
    let (ok, help, _) = run(&["--help"]);
    assert!(ok);
    for flag in [
        "--host",
        "--port",
        "--threads",
        "--model",
        "--model-dir",
        "EMBEDDING_SERVER_PORT",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let (ok, version, _) = run(&["--version"]);
    assert!(
        ok && version.contains("e4ce9877abf3edfe10b0d82785e83bdcb973e22e"),
        "{version}"
    );
    let (ok, models, _) = run(&["models"]);
    assert!(
        ok && models.contains("all-MiniLM-L6-v2") && models.contains("53aa5117"),
        "{models}"
    );
    let (ok, _, stderr) = run(&["--bogus"]);
    assert!(!ok && stderr.contains("--bogus"), "{stderr}");
}

#[test]
fn flags_fall_back_to_environment_variables_and_the_flag_wins() {
    let server = Server::start_with_env(&[], &[("EMBEDDING_SERVER_MAX_INPUTS", "2")]);
    let three = server.post("/v1/embeddings", &json!({"input": ["a", "b", "c"]}));
    assert_eq!(three.status, 400, "{}", three.text());
    drop(server);
    let server = Server::start_with_env(
        &["--max-inputs", "3"],
        &[("EMBEDDING_SERVER_MAX_INPUTS", "2")],
    );
    assert_eq!(
        server
            .post("/v1/embeddings", &json!({"input": ["a", "b", "c"]}))
            .status,
        200
    );
}
