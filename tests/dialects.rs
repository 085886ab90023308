//! The Ollama, Cohere and text-embeddings-inference dialects over HTTP, without their clients (those are
//! in tests/dialect_clients.rs): each answers the shared reference's vectors, exactly what
//! `/v1/embeddings` answers for the same request; each maps its fields (prompts, widths, truncation,
//! normalisation) onto the one pipeline; and each writes every error, before or inside its handler, in its
//! own shape with its own status.

mod common;

use std::sync::OnceLock;

use common::{cosine, floats, max_abs_diff, NomicModelDir, Response, Server};
use serde_json::{json, Value};

const MODEL: &str = "all-MiniLM-L6-v2";
const V1: &str = "nomic-embed-text-v1";
const V15: &str = "nomic-embed-text-v1.5";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&["--max-body-bytes", "65536"]))
}

/// nomic-embed-text-v1 and v1.5 from the nomic-tiny fixture: models with prompts and Matryoshka widths.
fn nomic() -> &'static (Server, NomicModelDir) {
    static SERVER: OnceLock<(Server, NomicModelDir)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = NomicModelDir::new();
        (Server::start(&["--model-dir", dir.path()]), dir)
    })
}

fn nomic_expected() -> Value {
    let path = common::nomic_fixture_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference cases every dialect must reproduce (the over-long one included: each cuts it the same).
fn cases() -> Vec<Value> {
    common::reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            ["sentence", "word", "boundary", "long"].contains(&c["category"].as_str().unwrap())
        })
        .cloned()
        .collect()
}

fn texts(cases: &[Value]) -> Vec<&str> {
    cases.iter().map(|c| c["text"].as_str().unwrap()).collect()
}

fn vectors(value: &Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("an array of vectors")
        .iter()
        .map(floats)
        .collect()
}

/// What `/v1/embeddings` answers for `body`.
fn openai(server: &Server, body: Value) -> Vec<Vec<f32>> {
    let response = server.post("/v1/embeddings", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect()
}

/// `got` equals `want` vector by vector: the same engine computed both.
fn assert_same(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what} {i}: width");
        assert!(
            max_abs_diff(g, w) <= 1e-6,
            "{what} {i}: {}",
            max_abs_diff(g, w)
        );
    }
}

/// `got` is sentence-transformers' reference vector of each case.
fn assert_reference(got: &[Vec<f32>], cases: &[Value], what: &str) {
    assert_eq!(got.len(), cases.len(), "{what}: count");
    for (g, case) in got.iter().zip(cases) {
        let want = floats(&case["embedding"]);
        assert!(
            cosine(g, &want) >= 0.99999 && max_abs_diff(g, &want) <= 1e-4,
            "{what} {}: cosine {}",
            case["id"],
            cosine(g, &want)
        );
    }
}

/// An error body with exactly these keys, its message a non-empty string.
fn assert_error_shape(response: &Response, keys: &[&str], what: &str) -> Value {
    let body = response.json();
    let mut found: Vec<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    found.sort_unstable();
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    assert_eq!(found, keys, "{what}: {body}");
    let message = body.get("error").or(body.get("message")).unwrap();
    assert!(
        message.as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    body
}

fn over_long() -> String {
    "word ".repeat(400)
}

// ---- Ollama --------------------------------------------------------------------------------------------

#[test]
fn ollama_embed_gives_the_reference_vectors_and_ollamas_fields() {
    let s = server();
    let cases = cases();
    let texts = texts(&cases);
    let response = s.post("/api/embed", &json!({"model": MODEL, "input": texts}));
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let got = vectors(&body["embeddings"]);
    assert_reference(&got, &cases, "/api/embed");
    assert_same(
        &got,
        &openai(s, json!({"input": texts})),
        "/api/embed vs /v1/embeddings",
    );
    assert_eq!(body["model"], MODEL);
    let tokens: u64 = cases.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(body["prompt_eval_count"], tokens);
    assert!(
        body["total_duration"].as_u64().is_some_and(|d| d > 0),
        "{}",
        body["total_duration"]
    );
    assert_eq!(body["load_duration"], 0);

    // One string, the `:latest` tag echoed, no Content-Type (as Ollama's curl examples send), a width.
    let tagged = format!("{MODEL}:latest");
    let response = s.raw_request(
        "POST",
        "/api/embed",
        &[],
        json!({"model": tagged, "input": texts[0], "dimensions": 384, "keep_alive": "5m", "options": {"num_ctx": 512}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["model"], tagged.as_str());
    assert_reference(&vectors(&body["embeddings"]), &cases[..1], "one string");

    // No input loads the model and embeds nothing, as in Ollama.
    for empty in [json!(""), json!([]), Value::Null] {
        let response = s.post("/api/embed", &json!({"model": MODEL, "input": empty}));
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["embeddings"], json!([]));
    }
}

#[test]
fn ollama_embeddings_tags_and_version() {
    let s = server();
    let cases = cases();
    let response = s.post(
        "/api/embeddings",
        &json!({"model": MODEL, "prompt": cases[0]["text"]}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_reference(
        &[floats(&body["embedding"])],
        &cases[..1],
        "/api/embeddings",
    );
    let response = s.post("/api/embeddings", &json!({"model": MODEL}));
    assert_eq!(response.json(), json!({"embedding": []}));

    let tags = s.request("GET", "/api/tags", None).json();
    let models = tags["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{tags}");
    let model = &models[0];
    assert_eq!(model["name"], format!("{MODEL}:latest"));
    assert_eq!(model["model"], model["name"]);
    assert_eq!(model["details"]["embedding_length"], 384);
    assert_eq!(model["details"]["context_length"], 256);
    assert_eq!(model["details"]["family"], "bert");
    assert_eq!(model["capabilities"], json!(["embedding"]));
    assert!(
        model["size"].as_u64().is_some_and(|s| s > 80_000_000),
        "{model}"
    );
    assert_eq!(model["digest"].as_str().unwrap().len(), 64);
    let modified = model["modified_at"].as_str().unwrap();
    assert!(
        modified.len() == 20 && modified.ends_with('Z'),
        "{modified}"
    );

    let version = s.request("GET", "/api/version", None).json();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn ollama_errors_are_one_string_with_the_right_status() {
    let s = server();
    let cases = [
        (json!({"model": "nomic-embed-text", "input": "a"}), 404),
        (
            json!({"model": MODEL, "input": over_long(), "truncate": false}),
            400,
        ),
        (json!({"model": MODEL, "input": [1, 2]}), 400),
        (
            json!({"model": MODEL, "input": "a", "dimensions": 100}),
            400,
        ),
        (json!({"model": MODEL, "input": "a", "options": 3}), 400),
        (json!({"model": MODEL, "input": "a", "truncate": "no"}), 400),
    ];
    for (body, status) in cases {
        let response = s.post("/api/embed", &body);
        assert_eq!(response.status, status, "{body}: {}", response.text());
        assert_error_shape(&response, &["error"], &body.to_string());
    }
    let response = s.post(
        "/api/embed",
        &json!({"model": MODEL, "input": over_long(), "truncate": false}),
    );
    let message = response.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("truncate"), "{message}");
    // Over-long inputs are cut by default.
    let response = s.post("/api/embed", &json!({"model": MODEL, "input": over_long()}));
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["prompt_eval_count"], 256);
    let response = s.raw_request("POST", "/api/embed", &[], b"{not json");
    assert_eq!(response.status, 400);
    assert_error_shape(&response, &["error"], "bad JSON");
    let response = s.request("DELETE", "/api/tags", None);
    assert_eq!(response.status, 405);
    assert_error_shape(&response, &["error"], "405");
}

// ---- Cohere --------------------------------------------------------------------------------------------

#[test]
fn cohere_embed_gives_the_reference_vectors_in_every_float_type() {
    let s = server();
    let cases = cases();
    let texts = texts(&cases);
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": texts, "input_type": "search_document",
                "embedding_types": ["float", "base64"], "truncate": "END", "priority": 0}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let floats_ = vectors(&body["embeddings"]["float"]);
    assert_reference(&floats_, &cases, "float");
    assert_same(
        &floats_,
        &openai(s, json!({"input": texts})),
        "/v2/embed vs /v1/embeddings",
    );
    let base64: Vec<Vec<f32>> = body["embeddings"]["base64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| decode_base64_floats(b.as_str().unwrap()))
        .collect();
    assert_same(&base64, &floats_, "base64");
    assert_eq!(body["texts"], json!(texts));
    assert_eq!(body["response_type"], "embeddings_by_type");
    let tokens: u64 = cases.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(body["meta"]["billed_units"]["input_tokens"], tokens);
    assert_eq!(body["id"].as_str().unwrap().len(), 36);

    // The same texts as `inputs` with one text part each; no embedding_types means float.
    let inputs: Vec<Value> = texts
        .iter()
        .map(|t| json!({"content": [{"type": "text", "text": t}]}))
        .collect();
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "inputs": inputs, "input_type": "clustering"}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_same(&vectors(&body["embeddings"]["float"]), &floats_, "inputs");
    assert_eq!(body["embeddings"].as_object().unwrap().len(), 1);
}

fn decode_base64_floats(text: &str) -> Vec<f32> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut bytes = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
        }
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn cohere_compact_types_are_encoding_formats_of_the_same_vectors() {
    let s = server();
    let cases = cases();
    let texts = texts(&cases);
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": texts, "input_type": "search_document",
                "embedding_types": ["ubinary", "int8", "float", "binary", "uint8"]}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let embeddings = &response.json()["embeddings"];
    let floats_ = vectors(&embeddings["float"]);
    for format in ["int8", "uint8", "binary", "ubinary"] {
        let want = s.post(
            "/v1/embeddings",
            &json!({"model": MODEL, "input": texts, "encoding_format": format}),
        );
        let want: Vec<Value> = want.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["embedding"].clone())
            .collect();
        assert_eq!(embeddings[format], json!(want), "{format}");
    }
    // ubinary: one bit per dimension, 1 where the float is positive, most significant bit first.
    for (bytes, vector) in embeddings["ubinary"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&floats_)
    {
        let bits: Vec<u64> = vector
            .chunks(8)
            .map(|c| {
                c.iter()
                    .fold(0, |byte, &x| (byte << 1) | u64::from(x > 0.0))
            })
            .collect();
        assert_eq!(bytes, &json!(bits));
    }
}

#[test]
fn cohere_start_and_tei_left_cut_the_start_as_v1_embeddings_left_does() {
    let s = server();
    let long = &cases()
        .into_iter()
        .find(|c| c["category"] == "long")
        .unwrap();
    let text = long["text"].as_str().unwrap();
    let left = openai(s, json!({"input": [text], "truncation_direction": "left"}));
    let right = openai(s, json!({"input": [text]}));
    assert!(
        cosine(&left[0], &right[0]) < 0.99,
        "the two ends of the text differ"
    );
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": [text], "input_type": "search_document", "truncate": "START"}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_same(
        &vectors(&body["embeddings"]["float"]),
        &left,
        "Cohere START",
    );
    assert_eq!(body["meta"]["billed_units"]["input_tokens"], 256);
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": [text], "truncate": "END"}),
    );
    assert_same(
        &vectors(&response.json()["embeddings"]["float"]),
        &right,
        "Cohere END",
    );
    for (direction, want) in [("Left", &left), ("left", &left), ("Right", &right)] {
        let response = s.post(
            "/embed",
            &json!({"inputs": [text], "truncate": true, "truncation_direction": direction}),
        );
        assert_same(&vectors(&response.json()), want, direction);
    }
    // sentence-transformers with `truncation_side = "left"` gives the same (tests/truncation.rs checks
    // every case; this one ties the dialects to it).
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/left_truncation.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"] == text)
        .expect("the fixture has the reference's long case");
    assert_reference(
        &left,
        &[json!({"id": "left", "embedding": case["embedding"]})],
        "left",
    );
}

#[test]
fn cohere_max_tokens_cuts_each_input_there_from_either_end() {
    let s = server();
    let case = cases()
        .into_iter()
        .find(|c| c["category"] == "long")
        .unwrap();
    let ids: Vec<u64> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // [CLS], the text's first 9 tokens and [SEP]: what cutting the end at 11 tokens keeps.
    let head: Vec<u64> = ids[..10]
        .iter()
        .chain(&ids[ids.len() - 1..])
        .copied()
        .collect();
    let text = case["text"].as_str().unwrap();
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": [text], "max_tokens": 11, "truncate": "END"}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["meta"]["billed_units"]["input_tokens"], 11);
    assert_same(
        &vectors(&body["embeddings"]["float"]),
        &openai(s, json!({"input": [head]})),
        "max_tokens END",
    );
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": [text], "max_tokens": 11, "truncate": "START"}),
    );
    assert_eq!(response.json()["meta"]["billed_units"]["input_tokens"], 11);
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": ["one two three four five"], "max_tokens": 4, "truncate": "NONE"}),
    );
    assert_eq!(response.status, 400);
    let message = assert_error_shape(&response, &["message"], "max_tokens NONE")["message"].clone();
    assert!(message.as_str().unwrap().contains("at most 4"), "{message}");
    // A bound above the model's maximum changes nothing.
    let response = s.post(
        "/v2/embed",
        &json!({"model": MODEL, "texts": [text], "max_tokens": 100000}),
    );
    assert_eq!(response.json()["meta"]["billed_units"]["input_tokens"], 256);
}

#[test]
fn cohere_input_type_picks_the_prompt_of_the_same_meaning() {
    let (s, _) = nomic();
    let expected = nomic_expected();
    let tolerance = expected["tolerance"]["recommended_abs"]["v1"]
        .as_f64()
        .unwrap();
    let mut checked = 0;
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let Some((input_type, rest)) = [
            "search_query",
            "search_document",
            "clustering",
            "classification",
        ]
        .iter()
        .find_map(|t| text.strip_prefix(&format!("{t}: ")).map(|rest| (*t, rest))) else {
            continue;
        };
        let response = s.post(
            "/v2/embed",
            &json!({"model": V1, "texts": [rest], "input_type": input_type}),
        );
        assert_eq!(response.status, 200, "{}", response.text());
        let got = floats(&response.json()["embeddings"]["float"][0]);
        let want = floats(&case["v1"]);
        assert!(
            max_abs_diff(&got, &want) <= tolerance,
            "{}: {}",
            case["name"],
            max_abs_diff(&got, &want)
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} prefixed cases");

    // A model without prompts takes every input_type and embeds the text as it is.
    let text = cases()[0]["text"].clone();
    let plain = openai(server(), json!({"input": [text]}));
    for input_type in [
        "search_query",
        "search_document",
        "classification",
        "clustering",
    ] {
        let response = server().post(
            "/v2/embed",
            &json!({"model": MODEL, "texts": [text], "input_type": input_type}),
        );
        assert_same(
            &vectors(&response.json()["embeddings"]["float"]),
            &plain,
            input_type,
        );
    }
}

#[test]
fn cohere_output_dimension_gives_matryoshka_widths() {
    let (s, _) = nomic();
    let expected = nomic_expected();
    let case = &expected["cases"][0];
    let text = case["text"]
        .as_str()
        .unwrap()
        .strip_prefix("search_query: ")
        .unwrap();
    // The fixture is 64 wide, so of v1.5's Matryoshka widths only 64 exists.
    let response = s.post(
        "/v2/embed",
        &json!({"model": V15, "texts": [text], "input_type": "search_query", "output_dimension": 64}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let got = floats(&response.json()["embeddings"]["float"][0]);
    let want = floats(&case["v15"]["64"]);
    assert!(
        max_abs_diff(&got, &want) <= 2e-5,
        "{}",
        max_abs_diff(&got, &want)
    );
    for model in [V15, V1] {
        let response = s.post(
            "/v2/embed",
            &json!({"model": model, "texts": ["a"], "input_type": "search_query", "output_dimension": 32}),
        );
        assert_eq!(response.status, 400, "{model}");
        let body = assert_error_shape(&response, &["message"], "output_dimension 32");
        assert!(
            body["message"].as_str().unwrap().contains("allowed: 64"),
            "{body}"
        );
    }
}

#[test]
fn cohere_errors_are_a_message_with_the_right_status() {
    let s = server();
    let cases = [
        (
            json!({"model": "embed-v4.0", "texts": ["a"], "input_type": "search_query"}),
            404,
        ),
        (
            json!({"model": MODEL, "texts": [over_long()], "input_type": "search_query", "truncate": "NONE"}),
            400,
        ),
        (
            json!({"model": MODEL, "texts": ["a"], "input_type": "image"}),
            400,
        ),
        (
            json!({"model": MODEL, "texts": ["a"], "input_type": "search"}),
            400,
        ),
        (
            json!({"model": MODEL, "images": ["data:image/png;base64,AA=="], "input_type": "image"}),
            400,
        ),
        (
            json!({"model": MODEL, "texts": ["a"], "embedding_types": ["hex"]}),
            400,
        ),
        (
            json!({"model": MODEL, "texts": ["a"], "truncate": "MIDDLE"}),
            400,
        ),
        (json!({"model": MODEL, "texts": []}), 400),
        (json!({"model": MODEL}), 400),
    ];
    for (body, status) in cases {
        let response = s.post("/v2/embed", &body);
        assert_eq!(response.status, status, "{body}: {}", response.text());
        assert_error_shape(&response, &["message"], &body.to_string());
    }
    let response = s.raw_request(
        "POST",
        "/v2/embed",
        &[("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(response.status, 415);
    assert_error_shape(&response, &["message"], "415");
    let large = json!({"texts": ["a".repeat(70_000)]});
    let response = s.post("/v2/embed", &large);
    assert_eq!(response.status, 413);
    assert_error_shape(&response, &["message"], "413");
}

// ---- text-embeddings-inference ---------------------------------------------------------------------------

#[test]
fn tei_embed_and_root_give_the_reference_vectors() {
    let s = server();
    let cases = cases();
    let texts = texts(&cases);
    let want = openai(s, json!({"input": texts}));
    for path in ["/embed", "/"] {
        let response = s.post(
            path,
            &json!({"inputs": texts, "truncate": true, "truncation_direction": "Right"}),
        );
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        let got = vectors(&response.json());
        assert_reference(&got, &cases, path);
        assert_same(&got, &want, path);
    }
    // One string, token ids, huggingface_hub's spelling of the fields.
    let response = s.post(
        "/embed",
        &json!({"inputs": texts[0], "truncation_direction": "right", "encoding_format": "float"}),
    );
    assert_same(&vectors(&response.json()), &want[..1], "one string");
    let ids: Vec<u64> = cases[0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let response = s.post("/embed", &json!({"inputs": [ids]}));
    assert_same(&vectors(&response.json()), &want[..1], "ids");
}

#[test]
fn tei_normalize_false_gives_the_pooled_vector() {
    let (s, _) = nomic();
    let expected = nomic_expected();
    let tolerance = expected["tolerance"]["recommended_abs"]["pooled"]
        .as_f64()
        .unwrap();
    let cases: Vec<&Value> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .take(8)
        .collect();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let response = s.post(
        "/embed",
        &json!({"model": V1, "inputs": texts, "normalize": false}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let got = vectors(&response.json());
    for (g, case) in got.iter().zip(&cases) {
        let want = floats(&case["pooled"]);
        assert!(
            max_abs_diff(g, &want) <= tolerance,
            "{}: {}",
            case["name"],
            max_abs_diff(g, &want)
        );
    }
    // prompt_name puts the prompt in front, as `task` does on /v1/embeddings.
    let case = &expected["cases"][0];
    let rest = case["text"]
        .as_str()
        .unwrap()
        .strip_prefix("search_query: ")
        .unwrap();
    let response = s.post(
        "/embed",
        &json!({"model": V1, "inputs": rest, "prompt_name": "search_query"}),
    );
    let got = &vectors(&response.json())[0];
    assert!(max_abs_diff(got, &floats(&case["v1"])) <= 2e-5);
}

#[test]
fn tei_errors_carry_an_error_type_and_tei_statuses() {
    let s = server();
    let cases = [
        (json!({"inputs": []}), 400, "Empty"),
        (
            json!({"inputs": over_long(), "truncate": false}),
            422,
            "Validation",
        ),
        (
            json!({"inputs": "a", "prompt_name": "query"}),
            422,
            "Validation",
        ),
        (
            json!({"inputs": "a", "truncation_direction": "Middle"}),
            422,
            "Validation",
        ),
        (
            json!({"inputs": "a", "encoding_format": "base64"}),
            422,
            "Validation",
        ),
        (
            json!({"inputs": "a", "normalize": "yes"}),
            422,
            "Validation",
        ),
        (json!({"inputs": {"text": "a"}}), 422, "Validation"),
        (json!({"inputs": "a", "model": "bge"}), 404, "Validation"),
    ];
    for (body, status, kind) in cases {
        for path in ["/embed", "/"] {
            let response = s.post(path, &body);
            assert_eq!(
                response.status,
                status,
                "{path} {body}: {}",
                response.text()
            );
            let error = assert_error_shape(&response, &["error", "error_type"], &body.to_string());
            assert_eq!(error["error_type"], kind, "{body}");
        }
    }
    let response = s.post("/embed", &json!({"inputs": over_long(), "truncate": false}));
    assert!(response.json()["error"].as_str().unwrap().contains("256"));
    let response = s.request("GET", "/embed", None);
    assert_eq!(response.status, 405);
    assert_error_shape(&response, &["error", "error_type"], "405");
}

#[test]
fn tei_info_describes_the_default_model() {
    let info = server().request("GET", "/info", None).json();
    assert_eq!(info["model_id"], "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(info["served_model_name"], MODEL);
    assert_eq!(
        info["model_type"],
        json!({"embedding": {"pooling": "mean"}})
    );
    assert_eq!(info["max_input_length"], 256);
    assert_eq!(info["auto_truncate"], true);
    assert_eq!(info["max_client_batch_size"], 2048);
    assert!(info["model_sha"].as_str().is_some_and(|s| s.len() == 40));
}

// ---- every dialect ---------------------------------------------------------------------------------------

#[test]
fn api_keys_guard_every_dialect_and_refusals_come_in_its_shape() {
    let s = Server::start(&["--api-key", "sesame"]);
    let routes: [(&str, &str, &[&str], &str); 5] = [
        ("POST", "/api/embed", &["error"], r#"{"input": "a"}"#),
        ("GET", "/api/tags", &["error"], ""),
        ("POST", "/v2/embed", &["message"], r#"{"texts": ["a"]}"#),
        (
            "POST",
            "/embed",
            &["error", "error_type"],
            r#"{"inputs": "a"}"#,
        ),
        ("POST", "/", &["error", "error_type"], r#"{"inputs": "a"}"#),
    ];
    for (method, path, keys, body) in routes {
        let response = s.request(method, path, Some("{}"));
        assert_eq!(response.status, 401, "{method} {path}: {}", response.text());
        assert_error_shape(&response, keys, path);
        let response = s.raw_request(
            method,
            path,
            &[
                ("Authorization", "Bearer sesame"),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        );
        assert_eq!(response.status, 200, "{method} {path}: {}", response.text());
    }
}

#[test]
fn metrics_count_each_dialect_under_its_own_label() {
    let value = |line: &str| -> f64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    let s = Server::start(&[]);
    assert_eq!(
        s.post("/api/embed", &json!({"model": MODEL, "input": ["a", "b"]}))
            .status,
        200
    );
    assert_eq!(
        s.post(
            "/v2/embed",
            &json!({"texts": ["a"], "input_type": "search_query"})
        )
        .status,
        200
    );
    assert_eq!(s.post("/", &json!({"inputs": "a"})).status, 200);
    let metrics = s.request("GET", "/metrics", None).text();
    for api in ["ollama", "cohere", "tei"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("embedding_requests_total") && l.contains(&format!("api=\"{api}\""))
            })
            .unwrap_or_else(|| panic!("no request counter for {api}:\n{metrics}"));
        assert_eq!(value(line), 1.0, "{line}");
    }
    let inputs = metrics
        .lines()
        .find(|l| l.starts_with("embedding_inputs_total"))
        .unwrap();
    assert_eq!(value(inputs), 4.0, "{inputs}");
}
