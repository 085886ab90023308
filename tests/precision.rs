//! `--precision bf16|int8`: every reference case of all-MiniLM-L6-v2 (and of the nomic-tiny fixture) against
//! the same model in f32, case by case (bf16 cosine ≥ 0.9999, int8 ≥ 0.998); the rerank-tiny cross-encoder's
//! scores and rankings against its own in f32; the model card and /metrics
//! name the precision; a precision this CPU cannot run, or an unknown one, stops the start with an error
//! that says what would work. (The speed of each precision is measured by `cargo bench --bench engine`.)

mod common;

use std::process::Command;

use common::{cosine, reference, Server, BINARY};
use embedding_server::models::{catalog, directory, Model, Precision, Source};

/// The least cosine to f32 each precision must keep on every case.
fn floor(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 0.99999,
        Precision::Bf16 => 0.9999,
        Precision::Int8 => 0.998,
    }
}

/// Each case's name (under `key`) and token ids, from a reference file's `cases`.
fn case_ids(cases: &serde_json::Value, key: &str) -> Vec<(String, Vec<u32>)> {
    cases
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let ids = case["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|v| v.as_u64().expect("an id") as u32)
                .collect();
            (case[key].as_str().expect("a case name").to_string(), ids)
        })
        .collect()
}

/// Each case's finished embedding, one batch of all of them.
fn embed(model: &Model, cases: &[(String, Vec<u32>)]) -> Vec<Vec<f32>> {
    let batch: Vec<&[u32]> = cases.iter().map(|(_, ids)| ids.as_slice()).collect();
    model
        .encode(&batch)
        .expect("encodes")
        .into_iter()
        .map(|pooled| model.finish(pooled, model.dims()))
        .collect()
}

/// Loads `spec` in every reduced precision; where this CPU lacks the instructions, checks that the load
/// fails naming them instead of computing something else.
fn compare_precisions(
    spec: &embedding_server::models::ModelSpec,
    source: &Source,
    cases: &[(String, Vec<u32>)],
) {
    let f32_model = Model::load(spec, source).expect("loads in f32");
    let exact = embed(&f32_model, cases);
    for precision in [Precision::Bf16, Precision::Int8] {
        let model = match Model::load_in(spec, source, precision) {
            Ok(model) => model,
            Err(error) => {
                let missing = precision
                    .check_cpu()
                    .expect_err("the load failed, so the CPU lacks it");
                assert_eq!(error.message, missing);
                assert!(
                    missing.contains("avx512") && missing.contains("f32"),
                    "{missing}"
                );
                continue;
            }
        };
        assert_eq!(model.precision(), precision);
        let got = embed(&model, cases);
        let mut worst = (1.0f64, "");
        let mut sum = 0.0;
        for ((id, _), (a, b)) in cases.iter().zip(got.iter().zip(&exact)) {
            let c = cosine(a, b);
            sum += c;
            if c < worst.0 {
                worst = (c, id);
            }
        }
        println!(
            "{} {precision}: min cosine to f32 {:.6} ({}), mean {:.6} over {} cases",
            spec.name,
            worst.0,
            worst.1,
            sum / cases.len() as f64,
            cases.len()
        );
        assert!(
            worst.0 >= floor(precision),
            "{} {precision}: case {} has cosine {} to f32 (floor {})",
            spec.name,
            worst.1,
            worst.0,
            floor(precision)
        );
    }
}

#[test]
fn every_reference_case_keeps_its_cosine_to_f32_in_each_precision() {
    let spec = catalog::find("all-MiniLM-L6-v2").expect("in the catalog");
    compare_precisions(
        spec,
        &Source::Embedded,
        &case_ids(&reference()["cases"], "id"),
    );
}

#[test]
fn nomic_bert_runs_every_precision_on_the_same_kernels() {
    let dir = common::shared_dir().join("reference").join("nomic-tiny");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("the nomic-tiny fixture"),
    )
    .expect("expected.json");
    let cases = case_ids(&expected["cases"], "name");
    let root =
        std::env::temp_dir().join(format!("embedding-server-precision-{}", std::process::id()));
    let model_dir = root.join("nomic-embed-text-v1");
    std::fs::create_dir_all(&model_dir).expect("temporary directory");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(dir.join(file), model_dir.join(file)).expect("symlink");
    }
    let spec = catalog::find("nomic-embed-text-v1").expect("in the catalog");
    compare_precisions(spec, &Source::Dir(root.clone()), &cases);
    let _ = std::fs::remove_dir_all(&root);
}

/// The most a reranker's score (after its activation) may move from f32's. Loose, because rerank-tiny's
/// random weights (initialised with a spread of 0.3) amplify rounding far more than a trained model's; what
/// a user sees is the ranking, held to f32's below wherever f32's scores are further apart than twice this.
const RERANK_SCORE_TOLERANCE: f32 = 0.05;

#[test]
fn a_reranker_keeps_its_scores_and_ranking_in_each_precision() {
    let dir = common::shared_dir().join("reference");
    let spec = directory::spec(&dir, "rerank-tiny", None).expect("the rerank-tiny directory");
    let source = Source::Dir(dir.clone());
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("rerank-tiny/expected.json")).expect("expected.json"),
    )
    .expect("expected.json parses");
    let cases: Vec<(String, Vec<String>)> = expected["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let documents = case["documents"].as_array().expect("documents");
            let documents = documents.iter().map(|d| d.as_str().expect("a document"));
            let query = case["query"].as_str().expect("a query").to_string();
            (query, documents.map(str::to_string).collect())
        })
        .collect();
    let scores = |model: &Model| -> Vec<Vec<f32>> {
        cases
            .iter()
            .map(|(query, documents)| {
                let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
                let scored = model.rerank(query, &documents).expect("reranks");
                scored.into_iter().map(|(score, _)| score).collect()
            })
            .collect()
    };
    let exact = scores(&Model::load(&spec, &source).expect("loads in f32"));
    for precision in [Precision::Bf16, Precision::Int8] {
        let Ok(model) = Model::load_in(&spec, &source, precision) else {
            // The refusal itself is checked by the embedding tests above.
            assert!(precision.check_cpu().is_err(), "{precision} failed to load");
            continue;
        };
        let got = scores(&model);
        let mut worst = 0.0f32;
        for (((query, _), a), b) in cases.iter().zip(&got).zip(&exact) {
            for i in 0..b.len() {
                worst = worst.max((a[i] - b[i]).abs());
                for j in 0..b.len() {
                    if b[i] > b[j] + 2.0 * RERANK_SCORE_TOLERANCE {
                        assert!(
                            a[i] > a[j],
                            "{precision}: for {query:?} document {i} ranks below {j} ({} ≤ {}), above it \
                             in f32 ({} > {})",
                            a[i],
                            a[j],
                            b[i],
                            b[j]
                        );
                    }
                }
            }
        }
        println!("rerank-tiny {precision}: largest score difference to f32 {worst:.5}");
        assert!(
            worst <= RERANK_SCORE_TOLERANCE,
            "rerank-tiny {precision}: a score moved {worst} from f32's (at most {RERANK_SCORE_TOLERANCE})"
        );
    }
}

#[test]
fn the_card_and_metrics_name_the_precision() {
    let precision = [Precision::Int8, Precision::Bf16]
        .into_iter()
        .find(|p| p.check_cpu().is_ok())
        .unwrap_or(Precision::F32);
    let server = Server::start(&["--precision", precision.name()]);
    let card = server
        .request("GET", "/v1/models/all-MiniLM-L6-v2", None)
        .json();
    assert_eq!(card["precision"], precision.name(), "{card}");
    let metrics = server.request("GET", "/metrics", None).text();
    let info = format!(
        "embedding_model_info{{model=\"all-MiniLM-L6-v2\",precision=\"{}\"}} 1",
        precision.name()
    );
    assert!(metrics.contains(&info), "{info} missing from:\n{metrics}");
}

#[test]
fn a_precision_that_cannot_run_stops_the_start_saying_what_would() {
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut command = Command::new(BINARY);
        command.args(args);
        if let Some((key, value)) = env {
            command.env(key, value);
        }
        let out = command.output().expect("runs the binary");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["embed", "--precision", "fp8", "x"], None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("f32, bf16 and int8"), "{stderr}");
    let (code, stderr) = run(
        &["embed", "x"],
        Some(("EMBEDDING_SERVER_PRECISION", "int4")),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("EMBEDDING_SERVER_PRECISION"), "{stderr}");
    for precision in [Precision::Bf16, Precision::Int8] {
        let (code, stderr) = run(&["embed", "--precision", precision.name(), "x"], None);
        match precision.check_cpu() {
            Ok(()) => assert_eq!(code, Some(0), "{stderr}"),
            Err(missing) => {
                assert_eq!(code, Some(2), "{stderr}");
                assert!(stderr.contains(&missing), "{stderr}");
            }
        }
    }
}
