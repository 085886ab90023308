//! Exactness against sentence-transformers: every case of ../shared/reference/all-MiniLM-L6-v2.json, through
//! the library (token ids, one at a time and in one padded batch) and over HTTP.

mod common;

use common::{cosine, floats, max_abs_diff, reference, Server};
use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};
use serde_json::{json, Value};

const MIN_COSINE: f64 = 0.99999;
const MAX_ABS: f64 = 1e-4;

fn cases() -> Vec<Value> {
    let reference = reference();
    assert_eq!(reference["model"], "all-MiniLM-L6-v2");
    let cases = reference["cases"].as_array().expect("cases").clone();
    assert!(cases.len() >= 78, "the reference has {} cases", cases.len());
    cases
}

fn check(case: &Value, got: &[f32], how: &str) {
    let want = floats(&case["embedding"]);
    assert_eq!(got.len(), 384, "{how} {}: dims", case["id"]);
    let (cos, diff) = (cosine(got, &want), max_abs_diff(got, &want));
    assert!(
        cos >= MIN_COSINE && diff <= MAX_ABS,
        "{how} {}: cosine {cos}, max |Δ| {diff}",
        case["id"]
    );
}

fn embedded_model() -> Model {
    let spec = catalog::find("all-MiniLM-L6-v2").expect("the catalog lists all-MiniLM-L6-v2");
    Model::load(spec, &Source::Embedded).expect("the embedded model loads")
}

#[test]
fn token_ids_equal_sentence_transformers_including_truncation() {
    let model = embedded_model();
    for case in cases() {
        let tokens = model
            .tokenize(
                &Input::Text(case["text"].as_str().unwrap().into()),
                "",
                TruncationDirection::Right,
            )
            .unwrap();
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokens.ids, want, "input_ids of {}", case["id"]);
        assert_eq!(
            tokens.untruncated as u64,
            case["tokens_untruncated"].as_u64().unwrap(),
            "{}",
            case["id"]
        );
    }
}

#[test]
fn embeddings_match_one_at_a_time_and_in_one_padded_batch() {
    let model = embedded_model();
    let cases = cases();
    for case in &cases {
        let got = model
            .embed(&[Input::Text(case["text"].as_str().unwrap().into())])
            .unwrap();
        check(case, &got[0], "alone");
    }
    let inputs: Vec<Input> = cases
        .iter()
        .map(|c| Input::Text(c["text"].as_str().unwrap().into()))
        .collect();
    for (case, got) in cases.iter().zip(model.embed(&inputs).unwrap()) {
        check(case, &got, "batched");
    }
}

#[test]
fn http_embeddings_match_the_reference_and_count_tokens_after_truncation() {
    let server = Server::start(&[]);
    let cases = cases();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let response = server.post(
        "/v1/embeddings",
        &json!({"input": texts, "model": "all-MiniLM-L6-v2"}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let total: u64 = cases.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(body["usage"]["prompt_tokens"], total);
    for (i, (case, item)) in cases
        .iter()
        .zip(body["data"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(item["index"], i);
        check(case, &floats(&item["embedding"]), "http batch");
    }
    // Single requests on the original's API.
    for case in cases
        .iter()
        .filter(|c| c["category"] == "boundary" || c["category"] == "empty")
    {
        let response = server.request(
            "GET",
            "/v1/encode",
            Some(&json!({"model": "all-MiniLM-L6-v2", "input": [case["text"]]}).to_string()),
        );
        assert_eq!(response.status, 200, "{}", response.text());
        check(
            case,
            &floats(&response.json()["data"][0]["embedding"]),
            "http single",
        );
    }
}

#[test]
fn token_id_inputs_embed_like_the_text_they_came_from() {
    let server = Server::start(&[]);
    let case = cases()
        .into_iter()
        .find(|c| c["category"] == "sentence")
        .expect("a sentence case");
    let ids = case["input_ids"].clone();
    let body = server.post("/v1/embeddings", &json!({"input": ids})).json();
    check(&case, &floats(&body["data"][0]["embedding"]), "int[]");
    let body = server
        .post("/v1/embeddings", &json!({"input": [ids, ids]}))
        .json();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    check(&case, &floats(&body["data"][1]["embedding"]), "int[][]");
}
