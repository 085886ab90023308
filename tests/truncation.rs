//! Truncation from either end against sentence-transformers: `tests/fixtures/left_truncation.json` (made by
//! `tests/fixtures/make_left_truncation.py` with `model.tokenizer.truncation_side = "left"`) holds the exact
//! ids and the embeddings of over-long inputs cut at the start; the engine and `/v1/embeddings` with
//! `truncation_direction` must give both, while the default stays the shared reference's right truncation;
//! and with a prompt (the shared bert-tiny-cls directory), the prompt in front of the text is what the cut
//! eats first, as in sentence-transformers.

mod common;

use std::sync::OnceLock;

use common::{cosine, floats, max_abs_diff, reference, Server};
use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};
use serde_json::{json, Value};

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/left_truncation.json"
        );
        let text = std::fs::read_to_string(path).expect("the left-truncation fixture is missing");
        let fixture: Value = serde_json::from_str(&text).expect("the fixture is not JSON");
        assert_eq!(fixture["truncation_side"], "left");
        fixture
    })
}

fn cases() -> &'static [Value] {
    let cases = fixture()["cases"].as_array().unwrap();
    let over_long = cases
        .iter()
        .filter(|c| c["tokens_untruncated"].as_u64().unwrap() > 256)
        .count();
    assert!(
        over_long >= 6,
        "the fixture should hold at least 6 over-long cases"
    );
    cases
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    let tolerance = &fixture()["tolerance"];
    let (cos, diff) = (cosine(got, want), max_abs_diff(got, want));
    assert!(
        cos >= tolerance["cosine_min"].as_f64().unwrap()
            && diff <= tolerance["max_abs"].as_f64().unwrap(),
        "{name}: cosine {cos}, max |Δ| {diff}"
    );
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&[]))
}

#[test]
fn the_engine_keeps_exactly_the_tokens_sentence_transformers_keeps_on_the_left() {
    let spec = catalog::find("all-MiniLM-L6-v2").unwrap();
    let model = Model::load(spec, &Source::Embedded).expect("the embedded model loads");
    for case in cases() {
        let name = case["id"].as_str().unwrap();
        let input = Input::Text(case["text"].as_str().unwrap().to_string());
        let tokens = model
            .tokenize(&input, "", TruncationDirection::Left)
            .unwrap();
        assert_eq!(tokens.ids, ids(&case["input_ids"]), "{name}: input_ids");
        assert_eq!(
            tokens.untruncated,
            case["tokens_untruncated"].as_u64().unwrap() as usize,
            "{name}: untruncated count"
        );
        let pooled = model.encode(&[&tokens.ids]).unwrap().remove(0);
        let embedding = model.finish(pooled, model.dims());
        assert_close(name, &embedding, &floats(&case["embedding"]));
    }
}

#[test]
fn embeddings_truncate_on_the_left_when_asked_in_either_spelling() {
    let texts: Vec<&str> = cases()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let want_tokens: u64 = cases()
        .iter()
        .map(|c| c["input_ids"].as_array().unwrap().len() as u64)
        .sum();
    for direction in ["left", "Left"] {
        let response = server().post(
            "/v1/embeddings",
            &json!({"input": texts, "truncation_direction": direction}),
        );
        assert_eq!(response.status, 200, "{}", response.text());
        let body = response.json();
        assert_eq!(body["usage"]["prompt_tokens"], want_tokens, "{direction}");
        for (case, item) in cases().iter().zip(body["data"].as_array().unwrap()) {
            let name = format!("{} ({direction})", case["id"].as_str().unwrap());
            assert_close(
                &name,
                &floats(&item["embedding"]),
                &floats(&case["embedding"]),
            );
        }
    }
}

#[test]
fn the_default_and_right_keep_the_start_as_before() {
    let reference = reference();
    let over_long: Vec<&Value> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["tokens_untruncated"].as_u64().unwrap() > 256)
        .collect();
    assert!(!over_long.is_empty());
    let texts: Vec<&str> = over_long
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    for body in [
        json!({"input": texts}),
        json!({"input": texts, "truncation_direction": "right"}),
        json!({"input": texts, "truncation_direction": "Right"}),
        json!({"input": texts, "truncation_direction": null}),
    ] {
        let response = server().post("/v1/embeddings", &body);
        assert_eq!(response.status, 200, "{}", response.text());
        for (case, item) in over_long
            .iter()
            .zip(response.json()["data"].as_array().unwrap())
        {
            let name = case["id"].as_str().unwrap();
            let (got, want) = (floats(&item["embedding"]), floats(&case["embedding"]));
            assert!(
                cosine(&got, &want) >= 0.99999 && max_abs_diff(&got, &want) <= 1e-4,
                "{name}: {body}"
            );
        }
    }
}

#[test]
fn token_ids_lose_their_first_ones_on_the_left_and_keep_their_framing() {
    // [CLS], 300 ids, [SEP]: the left cut keeps [CLS], the last 254 ids and [SEP], as for a text.
    let content: Vec<u32> = (0..300).map(|i| 1000 + i).collect();
    let framed = |ids: &[u32]| -> Vec<u32> {
        std::iter::once(101)
            .chain(ids.iter().copied())
            .chain(std::iter::once(102))
            .collect()
    };
    let left = server().post(
        "/v1/embeddings",
        &json!({"input": [framed(&content)], "truncation_direction": "left"}),
    );
    assert_eq!(left.status, 200, "{}", left.text());
    let kept = server().post(
        "/v1/embeddings",
        &json!({"input": [framed(&content[46..])]}),
    );
    assert_eq!(kept.status, 200);
    let (left, kept) = (left.json(), kept.json());
    assert_eq!(left["usage"]["prompt_tokens"], 256);
    assert_eq!(left["data"][0]["embedding"], kept["data"][0]["embedding"]);
}

#[test]
fn a_bad_direction_is_a_400_and_no_truncation_stays_no_truncation() {
    for direction in [json!("up"), json!("LEFT"), json!(1), json!(["left"])] {
        let response = server().post(
            "/v1/embeddings",
            &json!({"input": "a", "truncation_direction": direction}),
        );
        assert_eq!(response.status, 400, "{direction}: {}", response.text());
        assert_eq!(response.json()["error"]["param"], "truncation_direction");
    }
    let long = cases()[0]["text"].as_str().unwrap();
    let response = server().post(
        "/v1/embeddings",
        &json!({"input": long, "truncate": false, "truncation_direction": "left"}),
    );
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(response.text().contains("tokens"), "{}", response.text());
}

/// A `--model-dir` holding the shared bert-tiny-cls directory (a symlink); removed on drop.
struct TinyDir(std::path::PathBuf);

impl TinyDir {
    fn new() -> TinyDir {
        let root = std::env::temp_dir().join(format!(
            "embedding-server-truncation-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let link = root.join("bert-tiny-cls");
        let _ = std::fs::remove_file(&link);
        let target = common::shared_dir().join("reference").join("bert-tiny-cls");
        std::os::unix::fs::symlink(target, &link).unwrap();
        TinyDir(root)
    }
}

impl Drop for TinyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_prompt_in_front_of_the_text_is_cut_first_as_in_sentence_transformers() {
    let prompted = &fixture()["prompted"];
    let name = prompted["model_dir"].as_str().unwrap();
    let max = prompted["max_seq_length"].as_u64().unwrap();
    let tolerance = {
        let path = common::shared_dir()
            .join("reference")
            .join(name)
            .join("expected.json");
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        expected["tolerance"].as_f64().unwrap()
    };
    let dir = TinyDir::new();
    let server = Server::start(&["--model-dir", dir.0.to_str().unwrap(), "--model", name]);
    let cases = prompted["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let body = json!({
            "model": name,
            "input": case["text"],
            "prompt_name": case["prompt_name"],
            "truncation_direction": "left",
        });
        let response = server.post("/v1/embeddings", &body);
        assert_eq!(response.status, 200, "{id}: {}", response.text());
        let response = response.json();
        assert_eq!(response["usage"]["prompt_tokens"], max, "{id}");
        let (got, want) = (
            floats(&response["data"][0]["embedding"]),
            floats(&case["embedding"]),
        );
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= tolerance, "{id}: max |Δ| {diff} > {tolerance}");

        // /tokenize lists the prompted text whole, offsets counted from the start of the prompt; cut on the
        // left as the model is, its ids are the fixture's.
        let tokens = server.post(
            "/tokenize",
            &json!({"model": name, "inputs": case["text"], "prompt_name": case["prompt_name"]}),
        );
        assert_eq!(tokens.status, 200, "{}", tokens.text());
        let tokens = tokens.json()[0].as_array().unwrap().clone();
        assert_eq!(
            tokens.len() as u64,
            case["tokens_untruncated"].as_u64().unwrap(),
            "{id}"
        );
        let all: Vec<u32> = tokens
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        let want = ids(&case["input_ids"]);
        let kept: Vec<u32> = std::iter::once(all[0])
            .chain(all[all.len() - (want.len() - 1)..].iter().copied())
            .collect();
        assert_eq!(kept, want, "{id}: the ids kept on the left");
        assert_eq!(tokens[1]["start"], 0, "{id}: offsets start at the prompt");
        assert_eq!(
            tokens[1]["text"], "Represent",
            "{id}: the prompt's first word"
        );
    }
}
