//! The checks against a fixture's `expected.json` (bert-tiny-cls, rerank-tiny and the project's own
//! fixtures under tests/fixtures/) that more than one test makes: the same model read from a directory
//! (tests/st_directories.rs, tests/rerank.rs) or compiled in (tests/catalog_models.rs) must pass the same
//! checks, through the library and over HTTP.

use std::path::Path;

use embedding_server::models::{Input, Model, Task, TruncationDirection};
use serde_json::{json, Value};

use super::{floats, max_abs_diff, Server};

/// `DIR/<name>/expected.json`.
pub fn expected(dir: &Path, name: &str) -> Value {
    let path = dir.join(name).join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("expected.json is not JSON")
}

pub fn uints(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of integers")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

pub fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .expect("an array of strings")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The prompts of an embedding case: (prompt name, its input_ids if recorded, its embedding).
pub fn prompted(case: &Value) -> Vec<(String, Option<Vec<u32>>, Vec<f32>)> {
    let Some(prompted) = case["prompted"].as_object() else {
        return Vec::new();
    };
    prompted
        .iter()
        .map(|(name, v)| match v {
            Value::Array(_) => (name.clone(), None, floats(v)),
            _ => (
                name.clone(),
                Some(uints(&v["input_ids"])),
                floats(&v["embedding"]),
            ),
        })
        .collect()
}

pub fn within(got: &[f32], want: &[f32], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: dims");
    let d = max_abs_diff(got, want);
    assert!(d <= tolerance, "{what}: max |Δ| {d} > {tolerance}");
}

pub fn close(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: {got} is not within {tolerance} of {want}"
    );
}

/// Every case of an embedding fixture through the library: ids exact, the plain vector (the default prompt
/// applied, as sentence-transformers' encode does) one at a time and in one batch, and every named prompt.
/// Returns the vectors checked.
pub fn check_embedding_model(model: &Model, expected: &Value, name: &str) -> usize {
    let tolerance = expected["tolerance"].as_f64().unwrap();
    assert_eq!(
        model.max_tokens() as u64,
        expected["max_seq_length"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        model.dims() as u64,
        expected["dims"].as_u64().unwrap(),
        "{name}"
    );
    let cases = expected["cases"].as_array().unwrap();
    let default = model.spec.default_prompt().to_string();
    let texts: Vec<Input> = cases
        .iter()
        .map(|c| Input::Text(c["text"].as_str().unwrap().into()))
        .collect();
    let batched = model.embed(&texts).unwrap();
    let mut checked = 0;
    for (case, (input, in_batch)) in cases.iter().zip(texts.iter().zip(&batched)) {
        let what = format!("{name} case {}", case["id"]);
        let tokens = model
            .tokenize(input, &default, TruncationDirection::Right)
            .unwrap();
        assert_eq!(tokens.ids, uints(&case["input_ids"]), "{what}: input_ids");
        let want = floats(&case["embedding"]);
        within(
            &model.embed(std::slice::from_ref(input)).unwrap()[0],
            &want,
            tolerance,
            &what,
        );
        within(in_batch, &want, tolerance, &format!("{what} in a batch"));
        for (prompt, prompt_ids, want) in prompted(case) {
            let prefix = model
                .spec
                .prompt(&prompt)
                .expect("the prompt is read")
                .to_string();
            let tokens = model
                .tokenize(input, &prefix, TruncationDirection::Right)
                .unwrap();
            if let Some(prompt_ids) = prompt_ids {
                assert_eq!(tokens.ids, prompt_ids, "{what} prompt {prompt}: input_ids");
            }
            let pooled = model.encode(&[&tokens.ids]).unwrap().remove(0);
            let got = model.finish(pooled, model.dims());
            within(&got, &want, tolerance, &format!("{what} prompt {prompt}"));
            checked += 1;
        }
        checked += 1;
    }
    checked
}

/// Every case of an embedding fixture over HTTP in one request, without a prompt and with each
/// `prompt_name`.
pub fn check_embeddings_http(server: &Server, expected: &Value, name: &str) {
    let tolerance = expected["tolerance"].as_f64().unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let mut requests = vec![(json!({"model": name, "input": texts}), None)];
    for (prompt, _, _) in prompted(&cases[0]) {
        requests.push((
            json!({"model": name, "input": texts, "prompt_name": prompt}),
            Some(prompt),
        ));
    }
    for (body, prompt) in requests {
        let response = server.post("/v1/embeddings", &body);
        assert_eq!(response.status, 200, "{name}: {}", response.text());
        let data = response.json()["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), cases.len(), "{name}: one vector per input");
        for (case, item) in cases.iter().zip(&data) {
            let want = match &prompt {
                None => floats(&case["embedding"]),
                Some(p) => {
                    prompted(case)
                        .into_iter()
                        .find(|(n, _, _)| n == p)
                        .unwrap()
                        .2
                }
            };
            within(
                &floats(&item["embedding"]),
                &want,
                tolerance,
                &format!("{name} over HTTP, case {}, prompt {prompt:?}", case["id"]),
            );
        }
    }
}

/// Every case of a reranker fixture through the library: pair ids and token types exact, scores and
/// logits within the tolerance, all documents of a case in one batch and each alone. Returns the pairs
/// checked.
pub fn check_reranker_model(model: &Model, expected: &Value, name: &str) -> usize {
    let tolerance = expected["tolerance"].as_f64().unwrap();
    assert_eq!(model.spec.task, Task::Rerank, "{name}");
    assert_eq!(
        model.max_tokens() as u64,
        expected["max_length"].as_u64().unwrap(),
        "{name}: max length"
    );
    let mut checked = 0;
    for (c, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let query = case["query"].as_str().unwrap();
        let documents = strings(&case["documents"]);
        let pairs = model.tokenize_pairs(query, &documents).unwrap();
        let together = model.rerank(query, &documents).unwrap();
        for (d, (pair, (score, raw))) in pairs.iter().zip(&together).enumerate() {
            let what = format!("{name} case {c} document {d}");
            assert_eq!(pair.ids, uints(&case["input_ids"][d]), "{what}: input_ids");
            assert_eq!(
                pair.token_types.as_deref().unwrap(),
                uints(&case["token_type_ids"][d]),
                "{what}: token_type_ids"
            );
            let want_score = case["scores"][d].as_f64().unwrap();
            let want_raw = case["raw_scores"][d].as_f64().unwrap();
            close(f64::from(*score), want_score, tolerance, &what);
            close(
                f64::from(*raw),
                want_raw,
                tolerance,
                &format!("{what} (raw)"),
            );
            let (alone, alone_raw) = model.rerank(query, &documents[d..=d]).unwrap()[0];
            close(
                f64::from(alone),
                want_score,
                tolerance,
                &format!("{what} alone"),
            );
            close(
                f64::from(alone_raw),
                want_raw,
                tolerance,
                &format!("{what} alone (raw)"),
            );
            checked += 1;
        }
    }
    checked
}

/// Every case of a reranker fixture over HTTP, in both shapes: every score and logit, the order, `top_n`, and the documents
/// returned when asked for.
pub fn check_rerank_http(server: &Server, expected: &Value, name: &str) {
    let tolerance = expected["tolerance"].as_f64().unwrap();
    for (c, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("{name} case {c}");
        let documents = strings(&case["documents"]);
        let scores = floats(&case["scores"]);
        let raw = floats(&case["raw_scores"]);
        let tokens: usize = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ids| ids.as_array().unwrap().len())
            .sum();
        // Highest first; the fixtures hold no two equal scores.
        let mut order: Vec<usize> = (0..documents.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));

        let response = server.post(
            "/v1/rerank",
            &json!({"model": name, "query": case["query"], "documents": documents}),
        );
        assert_eq!(response.status, 200, "{what}: {}", response.text());
        let body = response.json();
        assert_eq!(body["model"], name, "{what}");
        assert_eq!(body["usage"]["total_tokens"], tokens, "{what}: usage");
        let results = body["results"].as_array().unwrap();
        let indices: Vec<usize> = results
            .iter()
            .map(|r| r["index"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(indices, order, "{what}: sorted by score, highest first");
        for result in results {
            let i = result["index"].as_u64().unwrap() as usize;
            close(
                result["relevance_score"].as_f64().unwrap(),
                f64::from(scores[i]),
                tolerance,
                &format!("{what} document {i}"),
            );
            assert!(result.get("document").is_none(), "{what}: not asked for");
        }

        let top = server
            .post(
                "/v1/rerank",
                &json!({"model": name, "query": case["query"], "top_n": 2,
                        "return_documents": true,
                        "documents": documents.iter().map(|d| json!({"text": d})).collect::<Vec<_>>()}),
            )
            .json();
        let results = top["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{what}: top_n");
        for (result, &i) in results.iter().zip(&order) {
            assert_eq!(result["index"], i, "{what}: top_n keeps the best");
            assert_eq!(result["document"]["text"], documents[i], "{what}: document");
        }

        // text-embeddings-inference's shape, with the logits.
        let tei = server
            .post(
                "/rerank",
                &json!({"model": name, "query": case["query"], "texts": documents,
                        "raw_scores": true, "return_text": true}),
            )
            .json();
        let tei = tei.as_array().unwrap_or_else(|| panic!("{what}: {tei}"));
        assert_eq!(tei.len(), documents.len(), "{what}: every text");
        for (k, result) in tei.iter().enumerate() {
            let i = result["index"].as_u64().unwrap() as usize;
            close(
                result["score"].as_f64().unwrap(),
                f64::from(raw[i]),
                tolerance,
                &format!("{what} /rerank raw document {i}"),
            );
            assert_eq!(result["text"], documents[i], "{what}: return_text");
            if k > 0 {
                assert!(
                    tei[k - 1]["score"].as_f64() >= result["score"].as_f64(),
                    "{what}: /rerank sorted"
                );
            }
        }
        let tei = server
            .post(
                "/rerank",
                &json!({"model": name, "query": case["query"], "texts": documents}),
            )
            .json();
        for result in tei.as_array().unwrap() {
            let i = result["index"].as_u64().unwrap() as usize;
            close(
                result["score"].as_f64().unwrap(),
                f64::from(scores[i]),
                tolerance,
                &format!("{what} /rerank document {i}"),
            );
            assert!(result.get("text").is_none(), "{what}: not asked for");
        }
    }
}
