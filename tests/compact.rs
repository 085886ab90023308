//! Compact vectors (`encoding_format` int8, uint8, binary, ubinary) over HTTP: the bits are the signs of the
//! float vector, packed most significant first; the buckets follow the ranges published at
//! `/v1/models/{id}/quantization`, which are computed once (also when first asked for twice at once) and are
//! the same after a restart; Matryoshka truncation comes first; widths binary cannot pack get a 400.
//! Against sentence-transformers itself: `equals_sentence_transformers` (needs Python, ignored by default).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{floats, shared_dir, Server};
use serde_json::{json, Value};

const MODEL: &str = "all-MiniLM-L6-v2";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&[]))
}

fn texts() -> Vec<String> {
    common::reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

fn embed(server: &Server, body: Value) -> Value {
    let response = server.post("/v1/embeddings", &body);
    assert_eq!(response.status, 200, "{body}: {}", response.text());
    response.json()
}

fn vectors(response: &Value) -> Vec<Vec<i64>> {
    response["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            item["embedding"]
                .as_array()
                .unwrap_or_else(|| panic!("not an array: {item}"))
                .iter()
                .map(|v| v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}")))
                .collect()
        })
        .collect()
}

fn ranges(server: &Server, model: &str, dims: usize) -> (Vec<f32>, Vec<f32>) {
    let response = server.request("GET", &format!("/v1/models/{model}/quantization"), None);
    assert_eq!(response.status, 200, "{}", response.text());
    let card = response.json();
    let entry = card["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dimensions"] == dims)
        .unwrap_or_else(|| panic!("no ranges for {dims}: {card}"));
    (floats(&entry["min"]), floats(&entry["max"]))
}

/// The bytes of `x > 0`, most significant bit first.
fn sign_bytes(embedding: &[f32]) -> Vec<i64> {
    embedding
        .chunks(8)
        .map(|eight| {
            eight
                .iter()
                .fold(0i64, |b, &x| (b << 1) | i64::from(x > 0.0))
        })
        .collect()
}

/// sentence-transformers' bucket, computed here in f32 as numpy does.
fn bucket(x: f32, min: f32, max: f32) -> i64 {
    let step = (max - min) / 255.0;
    let step = if step == 0.0 { 1.0 } else { step };
    ((x - min) / step).floor().clamp(0.0, 255.0) as i64
}

#[test]
fn binary_formats_are_the_packed_sign_bits_of_the_float_vector() {
    let texts = texts();
    let float = embed(server(), json!({"input": texts}));
    let ubinary = embed(
        server(),
        json!({"input": texts, "encoding_format": "ubinary"}),
    );
    let binary = embed(
        server(),
        json!({"input": texts, "encoding_format": "binary"}),
    );
    let float: Vec<Vec<f32>> = float["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect();
    for ((f, u), b) in float.iter().zip(vectors(&ubinary)).zip(vectors(&binary)) {
        assert_eq!(u.len(), 384 / 8);
        assert_eq!(u, sign_bytes(f));
        assert!(u.iter().all(|v| (0..=255).contains(v)));
        let shifted: Vec<i64> = u.iter().map(|v| v - 128).collect();
        assert_eq!(b, shifted, "binary is ubinary − 128");
    }
    assert_eq!(
        ubinary["data"][0]["dims"], 384,
        "dims stays the vector's width"
    );
    assert_eq!(
        ubinary["usage"],
        embed(server(), json!({"input": texts}))["usage"]
    );
}

#[test]
fn scalar_formats_bucket_each_dimension_by_the_published_ranges() {
    let texts = texts();
    let (min, max) = ranges(server(), MODEL, 384);
    assert_eq!((min.len(), max.len()), (384, 384));
    assert!(
        min.iter().zip(&max).all(|(lo, hi)| lo < hi),
        "each range is non-empty"
    );
    let float = embed(server(), json!({"input": texts}));
    let uint8 = vectors(&embed(
        server(),
        json!({"input": texts, "encoding_format": "uint8"}),
    ));
    let int8 = vectors(&embed(
        server(),
        json!({"input": texts, "encoding_format": "int8"}),
    ));
    let mut clipped = 0;
    for (i, item) in float["data"].as_array().unwrap().iter().enumerate() {
        let f = floats(&item["embedding"]);
        let want: Vec<i64> = f
            .iter()
            .enumerate()
            .map(|(d, &x)| bucket(x, min[d], max[d]))
            .collect();
        assert_eq!(uint8[i], want, "uint8 of text {i}");
        let shifted: Vec<i64> = want.iter().map(|q| q - 128).collect();
        assert_eq!(int8[i], shifted, "int8 of text {i}");
        clipped += want.iter().filter(|&&q| q == 0 || q == 255).count();
    }
    // The reference texts are not the calibration set, but the ranges should fit them nearly everywhere.
    let total = uint8.len() * 384;
    assert!(
        clipped * 50 < total,
        "{clipped} of {total} values at the ends of their range"
    );
}

#[test]
fn the_published_ranges_describe_the_calibration_set() {
    let response = server().request("GET", &format!("/v1/models/{MODEL}/quantization"), None);
    let card = response.json();
    assert_eq!(card["object"], "quantization");
    assert_eq!(card["model"], MODEL);
    let file = include_str!("../assets/calibration.txt");
    let sentences = file.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(card["calibration"]["sentences"], sentences);
    assert_eq!(card["calibration"]["sha256"].as_str().unwrap().len(), 64);
    // The ranges are those of the calibration sentences' own vectors, as the server embeds them.
    let lines: Vec<&str> = file.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut min = vec![f32::INFINITY; 384];
    let mut max = vec![f32::NEG_INFINITY; 384];
    for chunk in lines.chunks(64) {
        for item in embed(server(), json!({ "input": chunk }))["data"]
            .as_array()
            .unwrap()
        {
            for (d, x) in floats(&item["embedding"]).into_iter().enumerate() {
                min[d] = min[d].min(x);
                max[d] = max[d].max(x);
            }
        }
    }
    let (published_min, published_max) = ranges(server(), MODEL, 384);
    let off = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    // Batched differently from the calibration's fixed batches, so equal within the engine's noise.
    assert!(off(&min, &published_min) < 1e-5 && off(&max, &published_max) < 1e-5);
}

#[test]
fn ranges_are_computed_once_under_concurrent_first_use_and_survive_a_restart() {
    let first = Server::start(&[]);
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let first = &first;
                scope.spawn(move || {
                    if i % 2 == 0 {
                        let r =
                            first.request("GET", &format!("/v1/models/{MODEL}/quantization"), None);
                        assert_eq!(r.status, 200, "{}", r.text());
                        r.text()
                    } else {
                        let body = json!({"input": "first use", "encoding_format": "int8"});
                        let r = first.post("/v1/embeddings", &body);
                        assert_eq!(r.status, 200, "{}", r.text());
                        first
                            .request("GET", &format!("/v1/models/{MODEL}/quantization"), None)
                            .text()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|a| a == &answers[0]));
    let calibrations = first
        .stderr
        .lock()
        .unwrap()
        .matches("calibrated the int8/uint8 ranges of")
        .count();
    assert_eq!(calibrations, 1, "{}", first.stderr.lock().unwrap());

    let int8 = |server: &Server| {
        server
            .post(
                "/v1/embeddings",
                &json!({"input": texts(), "encoding_format": "int8"}),
            )
            .text()
    };
    let before = int8(&first);
    drop(first);
    let second = Server::start(&[]);
    let after = second
        .request("GET", &format!("/v1/models/{MODEL}/quantization"), None)
        .text();
    assert_eq!(after, answers[0], "the ranges changed across a restart");
    assert_eq!(int8(&second), before);
}

#[test]
fn bad_formats_get_clear_400s() {
    for format in [
        json!("int4"),
        json!("INT8"),
        json!("bits"),
        json!(8),
        json!(["int8"]),
    ] {
        let response = server().post(
            "/v1/embeddings",
            &json!({"input": "a", "encoding_format": format}),
        );
        assert_eq!(response.status, 400, "{format}: {}", response.text());
        let error = &response.json()["error"];
        assert_eq!(error["param"], "encoding_format", "{format}");
        if format.is_string() {
            let message = error["message"].as_str().unwrap();
            assert!(
                message.contains("ubinary") && message.contains("int8"),
                "{message}"
            );
        }
    }
    // The original's API takes the same formats.
    let response = server().post(
        "/v1/encode",
        &json!({"input": "a", "encoding_format": "ubinary"}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(vectors(&response.json())[0].len(), 48);
    let card = server()
        .request("GET", &format!("/v1/models/{MODEL}"), None)
        .json();
    assert_eq!(
        card["encoding_formats"],
        json!(["float", "base64", "int8", "uint8", "binary", "ubinary"])
    );
    for path in ["/v1/models/gpt-4/quantization", "/v1/models//quantization"] {
        assert_eq!(server().request("GET", path, None).status, 404, "{path}");
    }
    let response = server().request("POST", &format!("/v1/models/{MODEL}/quantization"), None);
    assert_eq!(response.status, 405);
}

// ---- a NomicBERT of an odd width: Matryoshka truncation, and widths binary cannot pack ----------------

/// A random NomicBERT, 132 wide (not a multiple of 8), in `dir/nomic-embed-text-v1.5/`, with nomic-tiny's
/// tokenizer: served as v1.5, it gives 132 dimensions by default and 64 or 128 on request.
struct OddNomic(PathBuf);

impl OddNomic {
    const WIDTH: usize = 132;

    fn new() -> OddNomic {
        let root =
            std::env::temp_dir().join(format!("embedding-server-odd-nomic-{}", std::process::id()));
        let dir = root.join("nomic-embed-text-v1.5");
        std::fs::create_dir_all(&dir).unwrap();
        let tiny = shared_dir().join("reference").join("nomic-tiny");
        std::fs::copy(tiny.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap())
                .unwrap();
        config["n_embd"] = Self::WIDTH.into();
        config["n_head"] = 2.into();
        config["n_inner"] = 256.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        write_random_weights(&dir.join("model.safetensors"), Self::WIDTH, 256, 30528, 2);
        OddNomic(root)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for OddNomic {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// NomicBERT's tensors at these sizes, filled from a fixed pseudo-random sequence.
fn write_random_weights(path: &Path, hidden: usize, inner: usize, vocab: usize, layers: usize) {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("emb_ln.bias".into(), vec![hidden]),
        ("emb_ln.weight".into(), vec![hidden]),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, hidden],
        ),
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab, hidden],
        ),
    ];
    for l in 0..layers {
        let p = format!("encoder.layers.{l}");
        shapes.extend([
            (format!("{p}.attn.Wqkv.weight"), vec![3 * hidden, hidden]),
            (format!("{p}.attn.out_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.mlp.fc11.weight"), vec![inner, hidden]),
            (format!("{p}.mlp.fc12.weight"), vec![inner, hidden]),
            (format!("{p}.mlp.fc2.weight"), vec![hidden, inner]),
            (format!("{p}.norm1.bias"), vec![hidden]),
            (format!("{p}.norm1.weight"), vec![hidden]),
            (format!("{p}.norm2.bias"), vec![hidden]),
            (format!("{p}.norm2.weight"), vec![hidden]),
        ]);
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let scale_one = name.ends_with("norm1.weight")
                || name.ends_with("norm2.weight")
                || name == "emb_ln.weight";
            let bytes = (0..count)
                .flat_map(|_| {
                    let x = next();
                    (if scale_one { 1.0 + x } else { x }).to_le_bytes()
                })
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn compact_vectors_come_after_matryoshka_truncation_and_binary_needs_whole_bytes() {
    let dir = OddNomic::new();
    let name = "nomic-embed-text-v1.5";
    let server = Server::start(&["--model-dir", dir.path(), "--model", name]);
    let card = server
        .request("GET", &format!("/v1/models/{name}"), None)
        .json();
    assert_eq!(card["dims"], OddNomic::WIDTH, "{card}");
    assert_eq!(card["dimensions"], json!([64, 128]), "{card}");

    // 132 dimensions cannot be packed into bytes.
    for format in ["binary", "ubinary"] {
        let response = server.post(
            "/v1/embeddings",
            &json!({"input": "a", "encoding_format": format}),
        );
        assert_eq!(response.status, 400, "{}", response.text());
        let error = &response.json()["error"];
        assert_eq!(error["param"], "encoding_format");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("multiple of 8") && message.contains("132"),
            "{message}"
        );
    }

    let texts = [
        "search_query: odd widths",
        "a second, longer text about something else",
        "",
    ];
    let published: HashMap<usize, (Vec<f32>, Vec<f32>)> = [64, 128, OddNomic::WIDTH]
        .into_iter()
        .map(|d| (d, ranges(&server, name, d)))
        .collect();
    for dims in [64usize, 128] {
        let float = embed(&server, json!({"input": texts, "dimensions": dims}));
        let ubinary = embed(
            &server,
            json!({"input": texts, "dimensions": dims, "encoding_format": "ubinary"}),
        );
        let uint8 = embed(
            &server,
            json!({"input": texts, "dimensions": dims, "encoding_format": "uint8"}),
        );
        let (min, max) = &published[&dims];
        for (i, item) in float["data"].as_array().unwrap().iter().enumerate() {
            // The truncated, renormalised vector is what gets quantised.
            let f = floats(&item["embedding"]);
            assert_eq!(f.len(), dims);
            assert_eq!(vectors(&ubinary)[i], sign_bytes(&f), "ubinary at {dims}");
            let want: Vec<i64> = f
                .iter()
                .enumerate()
                .map(|(d, &x)| bucket(x, min[d], max[d]))
                .collect();
            assert_eq!(vectors(&uint8)[i], want, "uint8 at {dims}");
        }
    }
    // Each width has its own ranges: renormalising after truncation changes every value.
    assert_ne!(published[&64].1[..], published[&128].1[..64]);
    let int8 = embed(&server, json!({"input": texts, "encoding_format": "int8"}));
    assert_eq!(vectors(&int8)[0].len(), OddNomic::WIDTH);
}

// ---- against sentence-transformers ------------------------------------------------------------------

/// A Python with sentence-transformers (and torch): `EMBEDDING_SERVER_ST_PYTHON`, as `.ci/run` sets it.
fn python_with_sentence_transformers() -> PathBuf {
    let python = std::env::var_os("EMBEDDING_SERVER_ST_PYTHON").map(PathBuf::from).expect(
        "set EMBEDDING_SERVER_ST_PYTHON to a python that has sentence-transformers (.ci/run creates one)",
    );
    let found = Command::new(&python)
        .args(["-c", "import sentence_transformers"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{} cannot import sentence_transformers",
        python.display()
    );
    python
}

#[test]
#[ignore = "needs Python with sentence-transformers (EMBEDDING_SERVER_ST_PYTHON); .ci/run runs it"]
fn equals_sentence_transformers() {
    let python = python_with_sentence_transformers();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compact_vectors.py");
    let reference = shared_dir().join("reference").join("all-MiniLM-L6-v2.json");
    let out = Command::new(python)
        .arg(script)
        .arg(server().url(""))
        .arg(reference)
        .output()
        .expect("cannot run tests/compact_vectors.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("OK"),
        "compact vectors differ from sentence-transformers:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
