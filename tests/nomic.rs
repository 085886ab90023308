//! NomicBERT (nomic-embed-text-v1 and v1.5) against the nomic-tiny fixture in ../shared/reference: the
//! engine directly and the HTTP API over `--model-dir`, every case of expected.json within its tolerance,
//! batches against single inputs, task prefixes, `dimensions`, and the errors. The real weights are tested
//! by an ignored test, run where this build embeds them or `EMBEDDING_SERVER_MODELS_DIR` holds them.

mod common;

use std::path::{Path, PathBuf};

use common::{
    floats, max_abs_diff, nomic_fixture_dir as fixture_dir, NomicModelDir as ModelDir, Server,
};
use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};
use serde_json::{json, Value};

const V1: &str = "nomic-embed-text-v1";
const V15: &str = "nomic-embed-text-v1.5";

fn expected() -> Value {
    let path = fixture_dir().join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("expected.json is not JSON")
}

/// The fixture's recommended absolute tolerance for `key` (pooled, v1 or v15).
fn tolerance(expected: &Value, key: &str) -> f64 {
    expected["tolerance"]["recommended_abs"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("expected.json has no tolerance for {key}"))
}

fn cases(expected: &Value) -> &[Value] {
    let cases = expected["cases"].as_array().expect("expected.json: cases");
    assert!(!cases.is_empty(), "expected.json has no cases");
    cases
}

fn load(name: &str, dir: &Path) -> Model {
    let spec = catalog::find(name).unwrap_or_else(|| panic!("{name} is not in the catalog"));
    Model::load(spec, &Source::Dir(dir.to_path_buf()))
        .unwrap_or_else(|e| panic!("cannot load {name} from the fixture: {e}"))
}

fn ids_of(case: &Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn v15_by_dims(case: &Value) -> Vec<(usize, Vec<f32>)> {
    case["v15"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(d, v)| (d.parse().unwrap(), floats(v)))
        .collect()
}

#[test]
fn engine_matches_every_fixture_case_single_and_batched() {
    let expected = expected();
    let dir = ModelDir::new();
    let v1 = load(V1, &dir.0);
    let v15 = load(V15, &dir.0);
    assert_eq!(v1.max_tokens(), 8192, "n_positions of the fixture is 8192");

    let mut tokenized = Vec::new();
    let (mut worst_pooled, mut worst_v1, mut worst_v15) = (0f64, 0f64, 0f64);
    for case in cases(&expected) {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let tokens = v1
            .tokenize(&Input::Text(text.into()), "", TruncationDirection::Right)
            .unwrap();
        assert_eq!(tokens.ids, ids_of(case), "{name}: input_ids");
        let pooled = v1.encode(&[&tokens.ids]).unwrap().remove(0);
        let d_pooled = max_abs_diff(&pooled, &floats(&case["pooled"]));
        assert!(
            d_pooled <= tolerance(&expected, "pooled"),
            "{name}: pooled differs by {d_pooled}"
        );
        let d_v1 = max_abs_diff(&v1.finish(pooled.clone(), v1.dims()), &floats(&case["v1"]));
        assert!(
            d_v1 <= tolerance(&expected, "v1"),
            "{name}: v1 differs by {d_v1}"
        );
        for (dims, want) in v15_by_dims(case) {
            let got = v15.finish(pooled.clone(), dims);
            assert_eq!(got.len(), dims, "{name}: v1.5 at {dims}");
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= tolerance(&expected, "v15"),
                "{name}: v1.5 at {dims} differs by {d}"
            );
            worst_v15 = worst_v15.max(d);
        }
        worst_pooled = worst_pooled.max(d_pooled);
        worst_v1 = worst_v1.max(d_v1);
        tokenized.push((name, tokens.ids, pooled));
    }
    println!(
        "single inputs, max |delta| against expected.json: pooled {worst_pooled:.3e}, v1 {worst_v1:.3e}, v15 {worst_v15:.3e}"
    );

    // All cases in one batch, lengths 2..1500 mixed, must give the single-input vectors.
    let batch: Vec<&[u32]> = tokenized.iter().map(|(_, ids, _)| ids.as_slice()).collect();
    let batched = v1.encode(&batch).unwrap();
    let mut worst_batch = 0f64;
    for ((name, _, single), pooled) in tokenized.iter().zip(&batched) {
        let d = max_abs_diff(single, pooled);
        assert!(
            d <= tolerance(&expected, "pooled"),
            "{name}: batched differs from single by {d}"
        );
        worst_batch = worst_batch.max(d);
    }
    println!("one batch of every case against single inputs: pooled max |delta| {worst_batch:.3e}");
}

#[test]
fn token_ids_and_text_inputs_agree_and_bad_ids_are_refused() {
    let expected = expected();
    let dir = ModelDir::new();
    let model = load(V1, &dir.0);
    let case = &cases(&expected)[0];
    let from_ids = model.embed(&[Input::Ids(ids_of(case))]).unwrap();
    let d = max_abs_diff(&from_ids[0], &floats(&case["v1"]));
    assert!(d <= tolerance(&expected, "v1"), "ids input differs by {d}");
    let error = model
        .tokenize(
            &Input::Ids(vec![101, 30528, 102]),
            "",
            TruncationDirection::Right,
        )
        .unwrap_err();
    assert!(error.message.contains("30528"), "{}", error.message);
}

fn embeddings(response: &common::Response) -> Vec<Vec<f32>> {
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| floats(&item["embedding"]))
        .collect()
}

#[test]
fn http_serves_v1_and_v15_from_model_dir() {
    let expected = expected();
    let dir = ModelDir::new();
    let server = Server::start(&["--model-dir", dir.path()]);
    let cases = cases(&expected);
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();

    let got = embeddings(&server.post("/v1/embeddings", &json!({"model": V1, "input": texts})));
    assert_eq!(got.len(), cases.len());
    for (case, vector) in cases.iter().zip(&got) {
        let d = max_abs_diff(vector, &floats(&case["v1"]));
        assert!(
            d <= tolerance(&expected, "v1"),
            "{}: v1 over HTTP differs by {d}",
            case["name"]
        );
    }

    // The fixture is 64 wide, so of v1.5's Matryoshka sizes only 64 exists; it is also the default.
    for dimensions in [json!(64), Value::Null] {
        let got = embeddings(&server.post(
            "/v1/embeddings",
            &json!({"model": V15, "input": texts, "dimensions": dimensions}),
        ));
        for (case, vector) in cases.iter().zip(&got) {
            let d = max_abs_diff(vector, &floats(&case["v15"]["64"]));
            assert!(
                d <= tolerance(&expected, "v15"),
                "{}: v1.5 differs by {d}",
                case["name"]
            );
        }
    }
    for refused in [32, 128, 768, 100] {
        let response = server.post(
            "/v1/embeddings",
            &json!({"model": V15, "input": "x", "dimensions": refused}),
        );
        assert_eq!(
            response.status,
            400,
            "dimensions {refused}: {}",
            response.text()
        );
        let error = &response.json()["error"];
        assert_eq!(error["param"], "dimensions");
        assert!(
            error["message"].as_str().unwrap().contains("allowed: 64"),
            "{error}"
        );
    }

    let card = server
        .request("GET", &format!("/v1/models/{V15}"), None)
        .json();
    assert_eq!(card["dims"], 64, "{card}");
    assert_eq!(card["dimensions"], json!([64]), "{card}");
    assert_eq!(card["max_tokens"], 8192, "{card}");
    assert_eq!(card["matryoshka"], true, "{card}");
    assert_eq!(
        card["tasks"],
        json!([
            "classification",
            "clustering",
            "search_document",
            "search_query"
        ]),
        "{card}"
    );
    let card = server
        .request("GET", &format!("/v1/models/{V1}"), None)
        .json();
    assert_eq!(card["dimensions"], json!([64]), "{card}");
    assert_eq!(card["matryoshka"], false, "{card}");
}

#[test]
fn http_task_prefixes_match_the_prefixed_text() {
    let expected = expected();
    let dir = ModelDir::new();
    let server = Server::start(&["--model-dir", dir.path(), "--model", V1]);
    let mut checked = 0;
    for case in cases(&expected) {
        let text = case["text"].as_str().unwrap();
        let Some((task, rest)) = text.split_once(": ") else {
            continue;
        };
        if ![
            "search_query",
            "search_document",
            "clustering",
            "classification",
        ]
        .contains(&task)
        {
            continue;
        }
        // `task` and its alias `prompt_name` both put "<task>: " in front.
        for field in ["task", "prompt_name"] {
            let got =
                embeddings(&server.post("/v1/embeddings", &json!({"input": [rest], field: task})));
            let d = max_abs_diff(&got[0], &floats(&case["v1"]));
            assert!(
                d <= tolerance(&expected, "v1"),
                "{}: {field} {task} differs from the prefixed text by {d}",
                case["name"]
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "the fixture should have a case per task prefix"
    );

    let response = server.post(
        "/v1/embeddings",
        &json!({"input": "x", "task": "summarize"}),
    );
    assert_eq!(response.status, 400, "{}", response.text());
    let error = &response.json()["error"];
    assert_eq!(error["param"], "task");
    assert!(
        error["message"].as_str().unwrap().contains("search_query"),
        "{error}"
    );
}

#[test]
fn http_task_on_a_model_without_prompts_is_refused() {
    let server = Server::start(&["--model", "all-MiniLM-L6-v2"]);
    let response = server.post(
        "/v1/embeddings",
        &json!({"input": "x", "task": "search_query"}),
    );
    assert_eq!(response.status, 400, "{}", response.text());
    let error = &response.json()["error"];
    assert_eq!(error["param"], "task");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no task prompts"),
        "{error}"
    );
}

#[test]
fn http_long_input_is_cut_at_8192_tokens() {
    let dir = ModelDir::new();
    let server = Server::start(&["--model-dir", dir.path(), "--model", V15]);
    // "word " is one token; 9000 of them plus [CLS] and [SEP] exceed n_positions.
    let text = "word ".repeat(9000);
    let response = server.post("/v1/embeddings", &json!({"input": text}));
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["usage"]["prompt_tokens"], 8192, "{}", body["usage"]);
    let vector = floats(&body["data"][0]["embedding"]);
    let norm = vector
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");

    let refused = server.post("/v1/embeddings", &json!({"input": text, "truncate": false}));
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("8192"), "{}", refused.text());
}

/// The released weights: from this binary (built with `--features nomic-v1,nomic-v1-5`) or from
/// `EMBEDDING_SERVER_MODELS_DIR`. Run it where they are: `cargo test --release --test nomic -- --ignored`.
#[test]
#[ignore = "needs the released nomic weights: a build with --features nomic-v1,nomic-v1-5, or EMBEDDING_SERVER_MODELS_DIR=DIR holding DIR/<model>/"]
fn real_weights_when_present() {
    for name in [V1, V15] {
        let spec = catalog::find(name).unwrap();
        let source = if spec.embedded {
            Source::Embedded
        } else {
            let dir = std::env::var_os("EMBEDDING_SERVER_MODELS_DIR").map(PathBuf::from);
            match dir {
                Some(dir) if Source::Dir(dir.clone()).has(spec) => Source::Dir(dir),
                _ => panic!(
                    "{name}: not embedded in this build and not in $EMBEDDING_SERVER_MODELS_DIR/{name}/"
                ),
            }
        };
        let model = Model::load(spec, &source).unwrap();
        assert_eq!(model.dims(), 768);
        let query = "search_query: What is TSNE?";
        let related = "search_document: t-distributed stochastic neighbor embedding (t-SNE) is a statistical method for visualizing high-dimensional data.";
        let unrelated =
            "search_document: Sourdough bread is made by fermenting dough with wild yeast.";
        let vectors = model
            .embed(&[query, related, unrelated].map(|t| Input::Text(t.into())))
            .unwrap();
        for vector in &vectors {
            assert_eq!(vector.len(), 768);
            let norm = vector
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{name}: norm {norm}");
        }
        let near = common::cosine(&vectors[0], &vectors[1]);
        let far = common::cosine(&vectors[0], &vectors[2]);
        println!(
            "{name} real weights: cos(query, related) {near:.3}, cos(query, unrelated) {far:.3}"
        );
        assert!(near > far, "{name}: the related document should be nearer");
    }
}
