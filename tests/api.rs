//! The HTTP contract: both APIs' shapes, the error bodies and statuses, /health and /metrics.

mod common;

use std::sync::OnceLock;

use common::{cosine, floats, Response, Server};
use serde_json::{json, Value};

/// One server for the whole file: starting one costs a model load.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&[]))
}

fn assert_error(response: &Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "OpenAI's four fields: {body}"
    );
    body
}

#[test]
fn models_list_has_exactly_the_original_shape() {
    let body = server().request("GET", "/v1/models", None).json();
    assert_eq!(
        body,
        json!({"object": "list", "data": ["all-MiniLM-L6-v2"]})
    );
}

#[test]
fn model_card_describes_the_model() {
    let card = server()
        .request("GET", "/v1/models/all-MiniLM-L6-v2", None)
        .json();
    assert_eq!(card["id"], "all-MiniLM-L6-v2");
    assert_eq!(card["object"], "model");
    assert_eq!(card["dims"], 384);
    assert_eq!(card["max_tokens"], 256);
    assert!(card["created"].as_u64().is_some() && card["owned_by"].is_string());
    let missing = server().request("GET", "/v1/models/nope", None);
    assert_error(&missing, 404, "invalid_request_error");
}

#[test]
fn encode_answers_get_with_a_body_and_post_in_the_original_shape() {
    let body = json!({"model": "all-MiniLM-L6-v2", "input": ["iPhone", "Samsung"]}).to_string();
    for method in ["GET", "POST"] {
        let response = server().request(method, "/v1/encode", Some(&body));
        assert_eq!(response.status, 200, "{}", response.text());
        let body = response.json();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "all-MiniLM-L6-v2");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            assert_eq!(item["dims"], 384);
            assert_eq!(item["embedding"].as_array().unwrap().len(), 384);
        }
    }
}

#[test]
fn openai_embeddings_take_every_input_shape_and_both_encodings() {
    let s = server();
    let single = s
        .post(
            "/v1/embeddings",
            &json!({"input": "iPhone", "user": "someone"}),
        )
        .json();
    assert_eq!(single["object"], "list");
    assert_eq!(
        single["model"], "all-MiniLM-L6-v2",
        "model defaults to the server's default"
    );
    assert_eq!(
        single["usage"]["prompt_tokens"],
        single["usage"]["total_tokens"]
    );
    let float = floats(&single["data"][0]["embedding"]);

    let encoded = s
        .post(
            "/v1/embeddings",
            &json!({"input": ["iPhone"], "encoding_format": "base64"}),
        )
        .json();
    let text = encoded["data"][0]["embedding"]
        .as_str()
        .expect("base64 is a string");
    let bytes = decode_base64(text);
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(
        decoded, float,
        "base64 decodes to the very floats of the float format"
    );

    for path in ["/embeddings", "/v1/embeddings/"] {
        let other = s
            .post(path, &json!({"input": "iPhone", "dimensions": 384}))
            .json();
        assert!(
            cosine(&floats(&other["data"][0]["embedding"]), &float) > 0.999999,
            "{path}"
        );
    }
    let empty = s.post("/v1/embeddings", &json!({"input": ["", "   "]}));
    assert_eq!(
        empty.status,
        200,
        "the empty string is a valid input: {}",
        empty.text()
    );
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let digits: Vec<u8> = chunk
            .iter()
            .filter(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect();
        let n =
            digits.iter().fold(0u32, |n, &d| (n << 6) | u32::from(d)) << (6 * (4 - digits.len()));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = server();
    let bad_bodies = [
        "{not json",
        "[]",
        r#"{"input": []}"#,
        r#"{"input": 5}"#,
        r#"{"input": ["a", 1]}"#,
        r#"{"input": [[]]}"#,
        r#"{"input": [-3]}"#,
        r#"{"model": 7, "input": "a"}"#,
        r#"{"input": "a", "encoding_format": "hex"}"#,
        r#"{"input": "a", "dimensions": 100}"#,
        r#"{"input": "a", "dimensions": -1}"#,
        r#"{"input": "a", "task": "search_query"}"#,
        r#"{"input": [999999]}"#,
        r#"{}"#,
        "",
    ];
    for body in bad_bodies {
        let response = s.request("POST", "/v1/embeddings", Some(body));
        assert_error(&response, 400, "invalid_request_error");
    }
    let unknown = s.post("/v1/embeddings", &json!({"model": "gpt-4", "input": "a"}));
    let body = assert_error(&unknown, 404, "invalid_request_error");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("all-MiniLM-L6-v2"),
        "names the models"
    );

    let wrong_method = s.request("DELETE", "/v1/embeddings", None);
    assert_error(&wrong_method, 405, "invalid_request_error");
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    assert_eq!(
        s.request("PUT", "/v1/encode", None).header("allow"),
        Some("GET, POST")
    );
    assert_error(
        &s.request("POST", "/health", None),
        405,
        "invalid_request_error",
    );
    assert_error(
        &s.request("GET", "/nowhere", None),
        404,
        "invalid_request_error",
    );

    // The server still answers after all of that.
    assert_eq!(
        s.post("/v1/embeddings", &json!({"input": "still here"}))
            .status,
        200
    );
}

#[test]
fn health_and_metrics_answer_and_counters_move() {
    let s = server();
    let health = s.request("GET", "/health", None);
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );

    let read = |name: &str| -> f64 {
        let text = s.request("GET", "/metrics", None).text();
        parse_prometheus(&text)
            .into_iter()
            .filter(|(n, _)| n.starts_with(name))
            .map(|(_, v)| v)
            .sum()
    };
    let before = (
        read("encode_request_processing_seconds_count"),
        read("embedding_inputs_total"),
        read("embedding_errors_total"),
    );
    assert_eq!(
        s.post("/v1/embeddings", &json!({"input": ["a", "b", "c"]}))
            .status,
        200
    );
    assert_eq!(s.request("POST", "/v1/embeddings", Some("{")).status, 400);
    let after = (
        read("encode_request_processing_seconds_count"),
        read("embedding_inputs_total"),
        read("embedding_errors_total"),
    );
    assert!(
        after.0 >= before.0 + 2.0,
        "request summary: {before:?} → {after:?}"
    );
    assert!(
        after.1 >= before.1 + 3.0,
        "inputs counter: {before:?} → {after:?}"
    );
    assert!(
        after.2 >= before.2 + 1.0,
        "error counter: {before:?} → {after:?}"
    );

    let text = s.request("GET", "/metrics/", None).text();
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
        "encode_request_processing_seconds_sum",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(family)),
            "{family} missing from /metrics"
        );
    }
}

/// Checks the text format 0.0.4 line by line and returns (name with labels, value) samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().unwrap().to_string());
            assert!(
                matches!(
                    parts.next(),
                    Some("counter" | "gauge" | "summary" | "histogram" | "untyped")
                ),
                "{line}"
            );
        } else if line.starts_with("# HELP ") || line.is_empty() {
        } else {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let family = name.split('{').next().unwrap();
            let base = family
                .strip_suffix("_count")
                .or_else(|| family.strip_suffix("_sum"))
                .unwrap_or(family);
            assert!(
                typed.contains(family) || typed.contains(base),
                "sample before its TYPE: {line}"
            );
            samples.push((name.to_string(), value));
        }
    }
    samples
}

#[test]
fn token_ids_without_the_models_framing_are_refused_naming_the_fix() {
    let s = server();
    // What LangChain's OpenAIEmbeddings sends by default: tiktoken's ids ("hello world"), all inside this
    // vocabulary, so only their missing [CLS] … [SEP] gives them away.
    for input in [
        json!([15339, 1917]),
        json!([[101, 15339, 1917]]),
        json!([[15339, 1917, 102]]),
    ] {
        let response = s.post("/v1/embeddings", &json!({ "input": input }));
        let body = assert_error(&response, 400, "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("[CLS] (101)")
                && message.contains("[SEP] (102)")
                && message.contains("check_embedding_ctx_length=False"),
            "{message}"
        );
        assert_eq!(body["error"]["param"], "input");
    }
    // Framed ids that are too many are cut like a text: the end goes, [SEP] stays.
    let long: Vec<u32> = std::iter::once(101)
        .chain(std::iter::repeat_n(2023, 300))
        .chain(std::iter::once(102))
        .collect();
    let cut: Vec<u32> = std::iter::once(101)
        .chain(std::iter::repeat_n(2023, 254))
        .chain(std::iter::once(102))
        .collect();
    let long = s.post("/v1/embeddings", &json!({ "input": long })).json();
    let cut = s.post("/v1/embeddings", &json!({ "input": cut })).json();
    assert_eq!(long["usage"]["prompt_tokens"], 256);
    assert_eq!(long["data"][0]["embedding"], cut["data"][0]["embedding"]);
}
