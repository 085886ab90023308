//! `--precision bf16|int8`: every reference case of all-MiniLM-L6-v2 (and of the nomic-tiny fixture) against
//! the same model in f32, case by case (bf16 cosine ≥ 0.9999, int8 ≥ 0.998); the model card and /metrics
//! name the precision; a precision this CPU cannot run, or an unknown one, stops the start with an error
//! that says what would work. (The speed of each precision is measured by `cargo bench --bench engine`.)

mod common;

use std::process::Command;

use common::{cosine, reference, Server, BINARY};
use embedding_server::models::{catalog, Model, Precision, Source};

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
