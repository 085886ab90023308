//! The command line: `embed`, `models`, `export-models` and its round trip through `--model-dir`,
//! `health`, `--help` and `--version`.

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

/// The exported sentence-transformers files, read back under a name the catalog does not know (so that
/// nothing but those files says how the model pools), give the catalog's recipe and its vectors.
#[test]
fn exported_sentence_transformers_files_read_back_as_the_catalogs_recipe() {
    use embedding_server::models::{catalog, directory, Input, Model, Pooling, Source};
    let dir =
        std::env::temp_dir().join(format!("embedding-server-st-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, stdout, stderr) = run(&["export-models", dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for file in [
        "modules.json",
        "1_Pooling/config.json",
        "2_Normalize/config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    ] {
        assert!(stdout.contains(file), "{file} is not written: {stdout}");
    }
    std::fs::rename(dir.join("all-MiniLM-L6-v2"), dir.join("minilm-copy")).unwrap();
    let spec = directory::spec(&dir, "minilm-copy", None).unwrap();
    let catalog = catalog::find("all-MiniLM-L6-v2").unwrap();
    assert_eq!(spec.pooling, Pooling::Mean);
    assert_eq!(
        (
            spec.normalize,
            spec.max_tokens,
            spec.dims,
            spec.architecture
        ),
        (
            catalog.normalize,
            catalog.max_tokens,
            catalog.dims,
            catalog.architecture
        )
    );
    assert_eq!(spec.prompts, catalog.prompts);
    let model = Model::load(&spec, &Source::Dir(dir.clone())).unwrap();
    let case = reference_case("boundary-257");
    let got = model
        .embed(&[Input::Text(case["text"].as_str().unwrap().into())])
        .unwrap();
    assert!(cosine(&got[0], &floats(&case["embedding"])) >= 0.99999);
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
    // The test fixtures in the catalog have no public copy: only a build that embeds them lists them.
    assert_eq!(
        models.contains("bert-tiny-cls"),
        cfg!(feature = "fixture-models"),
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

/// Runs the binary with `stdin` fed to it; returns its status code, stdout and stderr.
fn run_with_stdin(args: &[&str], stdin: &str) -> (Option<i32>, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the binary");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.as_bytes()).unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn embed_f32_writes_384_little_endian_floats_per_line_matching_the_reference() {
    let case = reference_case("word-hello");
    // More lines than one internal batch of 64, the last batch partial, the reference case in the second.
    let mut lines: Vec<String> = (0..70).map(|i| format!("line number {i}")).collect();
    lines[65] = case["text"].as_str().unwrap().to_string();
    let (code, stdout, stderr) =
        run_with_stdin(&["embed", "--format", "f32"], &(lines.join("\n") + "\n"));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.len(), lines.len() * 384 * 4);
    let floats_of = |line: usize| -> Vec<f32> {
        stdout[line * 384 * 4..(line + 1) * 384 * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert!(cosine(&floats_of(65), &floats(&case["embedding"])) >= 0.99999);
    // stderr is a pipe here, not a terminal: no progress line in it.
    assert!(!stderr.contains("embedded"), "{stderr}");
}

#[test]
fn embed_rejects_an_unknown_format() {
    let (ok, _, stderr) = run(&["embed", "--format", "f16", "hello"]);
    assert!(!ok && stderr.contains("--format"), "{stderr}");
}

#[test]
fn health_exits_0_for_a_live_server() {
    let server = Server::start(&[]);
    let port = server.port.to_string();
    let (code, _, stderr) = run_with_stdin(&["health", "--port", &port], "");
    assert_eq!(code, Some(0), "{stderr}");
    // The address a server listening everywhere is configured with reaches it through loopback.
    let (code, _, stderr) = run_with_stdin(&["health", "--host", "0.0.0.0", "--port", &port], "");
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn health_exits_1_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, _, stderr) = run_with_stdin(&["health", "--port", &port.to_string()], "");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn engine_threads_takes_a_number_or_auto() {
    let case = first_sentence();
    let text = case["text"].as_str().unwrap();
    for threads in ["1", "3", "auto"] {
        let (ok, stdout, stderr) = run(&["embed", "--engine-threads", threads, text]);
        assert!(ok, "--engine-threads {threads}: {stderr}");
        let line: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(cosine(&floats(&line["embedding"]), &floats(&case["embedding"])) >= 0.99999);
    }
    let (ok, _, stderr) = run(&["embed", "--engine-threads", "many", text]);
    assert!(!ok);
    assert!(
        stderr.contains("EMBEDDING_SERVER_ENGINE_THREADS"),
        "{stderr}"
    );
}
