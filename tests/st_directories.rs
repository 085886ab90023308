//! Any BERT-family sentence-transformers directory through `--model-dir`: the shared bert-tiny-cls
//! reference and this project's own fixtures (tests/fixtures/st/, written by
//! tests/fixtures/generate_st_fixtures.py with sentence-transformers), every case exact (ids equal, max |Δ|
//! within the fixture's tolerance), with and without prompts, one at a time, batched and over HTTP; and
//! the directories the server must refuse, each refusal naming what it does not support.

mod common;

use std::path::{Path, PathBuf};

use common::expected::{check_embedding_model, check_embeddings_http, expected, within};
use common::{edit_json, floats, Scratch, Server};
use embedding_server::models::{directory, Model, Pooling, Source};
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/st")
}

fn shared_reference() -> PathBuf {
    common::shared_dir().join("reference")
}

fn load(dir: &Path, name: &str, pooling: Option<Pooling>) -> Model {
    let spec = directory::spec(dir, name, pooling)
        .unwrap_or_else(|e| panic!("cannot read the directory {name}: {e}"));
    Model::load(&spec, &Source::Dir(dir.to_path_buf()))
        .unwrap_or_else(|e| panic!("cannot load {name}: {e}"))
}

/// Every case through the library, read from `DIR/<name>`. Returns the vectors checked.
fn check_library(dir: &Path, name: &str, pooling: Option<Pooling>) -> usize {
    check_embedding_model(&load(dir, name, pooling), &expected(dir, name), name)
}

/// Every case over HTTP, from `DIR/<name>/expected.json`.
fn check_http(server: &Server, dir: &Path, name: &str) {
    check_embeddings_http(server, &expected(dir, name), name);
}

#[test]
fn bert_tiny_cls_is_exact_through_model_dir_with_and_without_its_prompt() {
    let dir = shared_reference();
    let checked = check_library(&dir, "bert-tiny-cls", None);
    assert!(checked >= 34, "checked {checked}");
    let model = load(&dir, "bert-tiny-cls", None);
    // Read from its own files: its catalog entry (fixture-models) is a compiled-in copy, not a recipe.
    assert!(model.spec.files.is_empty(), "{:?}", model.spec.files);
    assert_eq!(model.spec.pooling, Pooling::Cls);
    assert!(model.spec.normalize);
    assert_eq!(model.spec.default_prompt_name, None);

    let server = Server::start(&[
        "--model-dir",
        dir.to_str().unwrap(),
        "--model",
        "bert-tiny-cls",
        "--model",
        "all-MiniLM-L6-v2",
    ]);
    check_http(&server, &dir, "bert-tiny-cls");
    let card = server
        .request("GET", "/v1/models/bert-tiny-cls", None)
        .json();
    assert_eq!(card["pooling"], "cls", "{card}");
    assert_eq!(card["normalized"], true, "{card}");
    assert_eq!(card["max_tokens"], 128, "{card}");
    assert_eq!(card["dims"], 48, "{card}");
    assert_eq!(card["source"], "directory", "{card}");
    assert_eq!(
        card["directory"],
        dir.join("bert-tiny-cls").display().to_string(),
        "{card}"
    );
    assert_eq!(
        card["prompts"]["query"], "Represent this sentence for searching relevant passages: ",
        "{card}"
    );
    assert_eq!(card["default_prompt_name"], Value::Null, "{card}");
    // The embedded model is served beside it.
    let card = server
        .request("GET", "/v1/models/all-MiniLM-L6-v2", None)
        .json();
    assert_eq!(card["source"], "embedded", "{card}");
    assert_eq!(card["pooling"], "mean", "{card}");
}

#[test]
fn own_fixtures_are_exact_for_every_pooling_layout_dtype_and_activation() {
    let dir = fixtures_dir();
    for name in ["mean-classic", "max-newer", "sqrt-prefixed", "cls-newer"] {
        let checked = check_library(&dir, name, None);
        assert!(checked >= 10, "{name}: checked {checked}");
    }
    let checked = check_library(&dir, "plain-transformers", Some(Pooling::Cls));
    assert!(checked >= 10, "checked {checked}");
}

#[test]
fn the_directory_says_how_the_model_pools_normalises_cuts_and_prompts() {
    let dir = fixtures_dir();
    let read = |name: &str| directory::spec(&dir, name, None).unwrap();
    let spec = read("mean-classic");
    assert_eq!(
        (spec.pooling, spec.normalize, spec.max_tokens),
        (Pooling::Mean, false, 24)
    );
    assert_eq!(spec.default_prompt(), "query: ");
    let spec = read("max-newer");
    assert_eq!(
        (spec.pooling, spec.normalize, spec.max_tokens),
        (Pooling::Max, true, 40)
    );
    assert!(spec.default_prompt_name.is_none() && spec.default_prompt().is_empty());
    let spec = read("sqrt-prefixed");
    assert_eq!(
        (spec.pooling, spec.normalize, spec.max_tokens),
        (Pooling::MeanSqrtLen, true, 32)
    );
    assert_eq!(spec.default_prompt(), "");
    let spec = read("cls-newer");
    assert_eq!(
        (spec.pooling, spec.normalize, spec.max_tokens),
        (Pooling::Cls, false, 48)
    );
    assert_eq!(spec.default_prompt(), "classify this: ");
}

#[test]
fn http_serves_every_directory_beside_the_embedded_model() {
    let dir = fixtures_dir();
    // No --model: every model of the directory (the plain one pooled as --pooling says) and the embedded one.
    let server = Server::start(&["--model-dir", dir.to_str().unwrap(), "--pooling", "cls"]);
    let listed = server.request("GET", "/v1/models", None).json();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for name in [
        "cls-newer",
        "max-newer",
        "mean-classic",
        "plain-transformers",
        "sqrt-prefixed",
        "all-MiniLM-L6-v2",
    ] {
        assert!(names.contains(&name), "{name} is not served: {listed}");
    }
    for name in [
        "cls-newer",
        "max-newer",
        "mean-classic",
        "plain-transformers",
        "sqrt-prefixed",
    ] {
        check_http(&server, &dir, name);
    }
    // A model whose directory sets a default prompt: a request without one gets it; naming another
    // prompt replaces it.
    let card = server
        .request("GET", "/v1/models/mean-classic", None)
        .json();
    assert_eq!(card["default_prompt_name"], "query", "{card}");
    assert_eq!(card["pooling"], "mean", "{card}");
    assert_eq!(card["normalized"], false, "{card}");
    assert_eq!(card["max_tokens"], 24, "{card}");
    let card = server
        .request("GET", "/v1/models/plain-transformers", None)
        .json();
    assert_eq!(card["pooling"], "cls", "{card}");
    assert_eq!(card["max_tokens"], 20, "{card}");
    // The embedded model is still the one it was.
    let reference = common::reference();
    let case = &reference["cases"][0];
    let body = server
        .post(
            "/v1/embeddings",
            &json!({"model": "all-MiniLM-L6-v2", "input": case["text"]}),
        )
        .json();
    within(
        &floats(&body["data"][0]["embedding"]),
        &floats(&case["embedding"]),
        1e-4,
        "all-MiniLM-L6-v2 beside directories",
    );
}

/// A scratch copy of a fixture, with some files changed.
fn scratch(fixture: &str, edit: impl FnOnce(&Path)) -> Scratch {
    Scratch::new(&fixtures_dir().join(fixture), edit)
}

/// Why the scratch directory cannot be served.
fn refusal(scratch: &Scratch, pooling: Option<Pooling>) -> String {
    let dir = scratch.root().to_path_buf();
    let loaded =
        directory::spec(&dir, "m", pooling).and_then(|spec| Model::load(&spec, &Source::Dir(dir)));
    match loaded {
        Ok(_) => panic!("the directory was accepted"),
        Err(e) => e.message,
    }
}

/// A change to a scratch copy of a fixture.
type Edit = Box<dyn FnOnce(&Path)>;

/// Sets `key` of the JSON file `file` to `value`.
fn set(file: &'static str, key: &'static str, value: Value) -> Edit {
    Box::new(move |m| edit_json(&m.join(file), |c| c[key] = value))
}

#[test]
fn unsupported_directories_are_refused_naming_what_is_unsupported() {
    const POOLING: &str = "1_Pooling/config.json";
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "cls-newer",
            set("config.json", "model_type", "roberta".into()),
            "RoBERTa",
        ),
        (
            "cls-newer",
            set("config.json", "model_type", "xlm-roberta".into()),
            "XLM-RoBERTa",
        ),
        (
            "cls-newer",
            set("config.json", "model_type", "mpnet".into()),
            "MPNet",
        ),
        (
            "cls-newer",
            set("config.json", "hidden_act", "relu".into()),
            "relu",
        ),
        (
            "cls-newer",
            set(POOLING, "pooling_mode", "weightedmean".into()),
            "weightedmean",
        ),
        (
            "cls-newer",
            set(POOLING, "pooling_mode", json!(["cls", "mean"])),
            "cls + mean",
        ),
        (
            "mean-classic",
            set(POOLING, "include_prompt", false.into()),
            "include_prompt",
        ),
        (
            "mean-classic",
            set(POOLING, "pooling_mode_max_tokens", true.into()),
            "max + mean",
        ),
        (
            "mean-classic",
            Box::new(|m| {
                edit_json(&m.join(POOLING), |c| {
                    c["pooling_mode_lasttoken"] = true.into();
                    c["pooling_mode_mean_tokens"] = false.into();
                })
            }),
            "lasttoken",
        ),
        (
            "cls-newer",
            set(
                "config_sentence_transformers.json",
                "default_prompt_name",
                "missing".into(),
            ),
            "missing",
        ),
        (
            "max-newer",
            Box::new(|m| {
                edit_json(&m.join("modules.json"), |c| {
                    c.as_array_mut().unwrap().insert(
                        2,
                        json!({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}),
                    )
                })
            }),
            "sentence_transformers.models.Dense",
        ),
        (
            "cls-newer",
            Box::new(|m| {
                edit_json(&m.join("tokenizer.json"), |t| {
                    let next = t["model"]["vocab"].as_object().unwrap().len();
                    t["model"]["vocab"]["zzzz"] = next.into();
                })
            }),
            "do not belong together",
        ),
        (
            "cls-newer",
            Box::new(|m| std::fs::remove_file(m.join("tokenizer.json")).unwrap()),
            "lacks tokenizer.json",
        ),
        (
            "cls-newer",
            Box::new(|m| {
                std::fs::rename(m.join("model.safetensors"), m.join("pytorch_model.bin")).unwrap()
            }),
            "pytorch_model.bin",
        ),
    ];
    for (fixture, edit, says) in cases {
        let error = refusal(&scratch(fixture, edit), None);
        assert!(error.contains(says), "expected {says:?} in: {error}");
    }
    // A plain transformers directory needs --pooling.
    let error = refusal(&scratch("plain-transformers", |_| {}), None);
    assert!(
        error.contains("--pooling") && error.contains("modules.json"),
        "{error}"
    );
}

#[test]
fn the_server_refuses_to_start_on_a_bad_directory_and_says_why() {
    let scratch = scratch("plain-transformers", |_| {});
    let out = std::process::Command::new(common::BINARY)
        .args(["serve", "--port", "0", "--model-dir"])
        .arg(scratch.root())
        .args(["--model", "m"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--pooling"), "{stderr}");
    let out = std::process::Command::new(common::BINARY)
        .args(["serve", "--port", "0", "--model-dir"])
        .arg(scratch.root())
        .args(["--model", "nothing-here"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("nothing-here")
            && stderr.contains("all-MiniLM-L6-v2"),
        "{stderr}"
    );
    let out = std::process::Command::new(common::BINARY)
        .args(["serve", "--port", "0", "--pooling", "weighted"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("EMBEDDING_SERVER_POOLING"),
        "{stderr}"
    );
}

#[test]
fn without_model_directories_that_cannot_be_served_are_skipped_with_the_reason() {
    let dir = shared_reference();
    // nomic-tiny is a plain transformers directory: without --pooling it cannot be served.
    let server = Server::start(&["--model-dir", dir.to_str().unwrap()]);
    let listed = server.request("GET", "/v1/models", None).json();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"bert-tiny-cls") && names.contains(&"all-MiniLM-L6-v2"),
        "{listed}"
    );
    assert!(!names.contains(&"nomic-tiny"), "{listed}");
    let log = server.stderr.lock().unwrap().clone();
    assert!(
        log.contains("not serving nomic-tiny") && log.contains("--pooling"),
        "{log}"
    );
}

#[test]
fn model_dir_may_name_one_model_directory_itself() {
    let dir = fixtures_dir();
    let own = dir.join("max-newer");
    for args in [vec![], vec!["--model", "max-newer"]] {
        let mut all = vec!["--model-dir", own.to_str().unwrap()];
        all.extend(args);
        let server = Server::start(&all);
        check_http(&server, &dir, "max-newer");
        let card = server.request("GET", "/v1/models/max-newer", None).json();
        assert_eq!(card["pooling"], "max", "{card}");
    }
}
