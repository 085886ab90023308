//! The engine through the library, without HTTP: every reference case of all-MiniLM-L6-v2 tokenises to the
//! exact ids and embeds within tolerance, one at a time and all together in one mixed-length batch (the
//! packed, unpadded path, split across the cores).

mod common;

use common::{cosine, floats, max_abs_diff, reference};
use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};

const MIN_COSINE: f64 = 0.99999;
const MAX_DIFF: f64 = 1e-4;

struct Case {
    id: String,
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let reference = reference();
    let cases = reference["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 78, "the reference file should hold 78 cases");
    cases
        .iter()
        .map(|case| Case {
            id: case["id"].as_str().expect("id").to_string(),
            text: case["text"].as_str().expect("text").to_string(),
            ids: case["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|v| v.as_u64().expect("an id") as u32)
                .collect(),
            embedding: floats(&case["embedding"]),
        })
        .collect()
}

fn load() -> Model {
    let spec = catalog::find("all-MiniLM-L6-v2").expect("in the catalog");
    Model::load(spec, &Source::Embedded).expect("the embedded model loads")
}

/// Compares finished embeddings with the reference; returns one line per failing case.
fn check(model: &Model, cases: &[Case], pooled: Vec<Vec<f32>>) -> Vec<String> {
    assert_eq!(pooled.len(), cases.len());
    let mut failures = Vec::new();
    for (case, pooled) in cases.iter().zip(pooled) {
        let embedding = model.finish(pooled, model.spec.dims);
        let (cos, diff) = (
            cosine(&embedding, &case.embedding),
            max_abs_diff(&embedding, &case.embedding),
        );
        if embedding.len() != case.embedding.len() || cos < MIN_COSINE || diff > MAX_DIFF {
            failures.push(format!("{}: cosine {cos:.8}, max |Δ| {diff:.2e}", case.id));
        }
    }
    failures
}

#[test]
fn every_reference_case_one_at_a_time_and_in_one_mixed_batch() {
    let model = load();
    let cases = cases();
    for case in &cases {
        let tokens = model
            .tokenize(
                &Input::Text(case.text.clone()),
                "",
                TruncationDirection::Right,
            )
            .expect("tokenises");
        assert_eq!(tokens.ids, case.ids, "input_ids of {}", case.id);
    }

    let one_by_one: Vec<Vec<f32>> = cases
        .iter()
        .map(|case| {
            model
                .encode(&[case.ids.as_slice()])
                .expect("encodes")
                .remove(0)
        })
        .collect();
    let failures = check(&model, &cases, one_by_one);
    assert!(
        failures.is_empty(),
        "one at a time:\n{}",
        failures.join("\n")
    );

    let batch: Vec<&[u32]> = cases.iter().map(|case| case.ids.as_slice()).collect();
    let together = model.encode(&batch).expect("encodes");
    let failures = check(&model, &cases, together);
    assert!(
        failures.is_empty(),
        "in one batch:\n{}",
        failures.join("\n")
    );
}

#[test]
fn batches_from_concurrent_callers_give_the_vectors_of_single_inputs() {
    // Two callers at once (two models' engine threads): one gets the engine's thread pool, the other runs
    // its batch alone; both must embed every input, as one at a time does.
    let model = load();
    let cases = cases();
    let batch: Vec<&[u32]> = cases.iter().map(|case| case.ids.as_slice()).collect();
    let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| model.encode(&batch).expect("encodes")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    for pooled in results {
        let failures = check(&model, &cases, pooled);
        assert!(
            failures.is_empty(),
            "concurrent batch:\n{}",
            failures.join("\n")
        );
    }
}

#[test]
fn out_of_vocabulary_ids_are_refused_not_a_panic() {
    let model = load();
    let error = model
        .encode(&[&[101, 1_000_000, 102]])
        .expect_err("an id outside the vocabulary");
    assert_eq!(
        error.kind,
        embedding_server::models::ErrorKind::InvalidInput
    );
}
