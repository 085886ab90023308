//! The tokenizer endpoints against the shared reference: `/tokenize` gives every MiniLM case's
//! `input_ids` (untruncated, as text-embeddings-inference does), with byte offsets that slice the original
//! text back to each token; `/decode` turns the ids back into text that tokenises to the same ids; the token
//! counts agree with `usage`; and bad requests get clear 400s.

mod common;

use std::sync::OnceLock;

use common::{reference, Server};
use serde_json::{json, Value};

const MODEL: &str = "all-MiniLM-L6-v2";
const MAX_TOKENS: usize = 256;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&["--max-inputs", "100", "--max-request-tokens", "5000"]))
}

fn ok(path: &str, body: &Value) -> Value {
    let response = server().post(path, body);
    assert_eq!(response.status, 200, "{path} {body}: {}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    response.json()
}

fn bad(path: &str, body: &Value, param: &str, says: &str) {
    let response = server().post(path, body);
    assert_eq!(response.status, 400, "{path} {body}: {}", response.text());
    let error = &response.json()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"], param, "{body}: {error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(says), "{body}: {message:?} lacks {says:?}");
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn cases() -> Vec<Value> {
    reference()["cases"].as_array().unwrap().clone()
}

fn texts() -> Vec<String> {
    cases()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

/// `/tokenize` of every reference text in one request.
fn tokenized() -> &'static Vec<Value> {
    static TOKENS: OnceLock<Vec<Value>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let out = ok("/tokenize", &json!({"inputs": texts()}));
        out.as_array().unwrap().clone()
    })
}

#[test]
fn tokenize_gives_the_reference_ids_of_every_case() {
    let cases = cases();
    let tokenized = tokenized();
    assert_eq!(tokenized.len(), cases.len());
    for (case, tokens) in cases.iter().zip(tokenized) {
        let name = case["id"].as_str().unwrap();
        let tokens = tokens.as_array().unwrap();
        let got: Vec<u32> = tokens
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        let want = ids(&case["input_ids"]);
        // /tokenize does not truncate: its length is the untruncated count; cut as the model does, the ids
        // are exactly those the model sees.
        assert_eq!(
            got.len(),
            case["tokens_untruncated"].as_u64().unwrap() as usize,
            "{name}: token count"
        );
        if got.len() <= MAX_TOKENS {
            assert_eq!(got, want, "{name}: ids");
        } else {
            let mut cut = got[..MAX_TOKENS - 1].to_vec();
            cut.push(*got.last().unwrap());
            assert_eq!(cut, want, "{name}: ids cut at {MAX_TOKENS}");
        }
        assert_eq!(got.first(), Some(&101), "{name}: [CLS] first");
        assert_eq!(got.last(), Some(&102), "{name}: [SEP] last");
    }
}

#[test]
fn a_single_string_gives_one_list_like_a_list_of_one() {
    let single = ok("/tokenize", &json!({"inputs": "hello world"}));
    let listed = ok(
        "/tokenize",
        &json!({"inputs": ["hello world"], "model": MODEL}),
    );
    assert_eq!(single, listed);
    assert_eq!(
        single,
        json!([[
            {"id": 101, "text": "[CLS]", "special": true, "start": null, "stop": null},
            {"id": 7592, "text": "hello", "special": false, "start": 0, "stop": 5},
            {"id": 2088, "text": "world", "special": false, "start": 6, "stop": 11},
            {"id": 102, "text": "[SEP]", "special": true, "start": null, "stop": null}
        ]])
    );
}

#[test]
fn offsets_slice_the_original_text_back_to_each_token() {
    let cases = cases();
    let vocabulary = vocabulary_strings(tokenized());
    let mut checked = 0;
    for (case, tokens) in cases.iter().zip(tokenized()) {
        let name = case["id"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let mut last_start = 0;
        for token in tokens.as_array().unwrap() {
            if token["special"] == true {
                assert!(
                    token["start"].is_null() && token["stop"].is_null(),
                    "{name}: {token}"
                );
                assert!(
                    matches!(token["text"].as_str(), Some("[CLS]" | "[SEP]")),
                    "{name}: {token}"
                );
                continue;
            }
            let (start, stop) = (
                token["start"].as_u64().unwrap() as usize,
                token["stop"].as_u64().unwrap() as usize,
            );
            assert!(
                start < stop && stop <= text.len(),
                "{name}: {token} outside the text"
            );
            // Several tokens may share one character (Hangul decomposes into jamo), but never go backwards.
            assert!(
                start >= last_start,
                "{name}: {token} starts before the token before"
            );
            last_start = start;
            let slice = text
                .get(start..stop)
                .unwrap_or_else(|| panic!("{name}: {token} does not fall on character boundaries"));
            assert_eq!(
                token["text"], slice,
                "{name}: the token's text is its slice"
            );
            // Where the tokenizer maps text one to one (ASCII, which it only lowercases), the slice is the
            // vocabulary's token itself.
            let id = token["id"].as_u64().unwrap();
            if slice.is_ascii() && id != 100 {
                assert_eq!(
                    slice.to_ascii_lowercase(),
                    vocabulary[&id].trim_start_matches("##"),
                    "{name}: {token}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 500,
        "only {checked} tokens compared with the vocabulary"
    );
}

/// The vocabulary string of every id in `tokenized`, from `/decode` of each id alone (the WordPiece
/// decoder leaves a lone `##` piece as it is), in requests of at most the server's 100 inputs.
fn vocabulary_strings(tokenized: &[Value]) -> std::collections::HashMap<u64, String> {
    let ids: std::collections::BTreeSet<u64> = tokenized
        .iter()
        .flat_map(|t| t.as_array().unwrap())
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let ids: Vec<u64> = ids.into_iter().collect();
    let mut strings = std::collections::HashMap::new();
    for chunk in ids.chunks(100) {
        let lists: Vec<[u64; 1]> = chunk.iter().map(|&id| [id]).collect();
        let texts = ok(
            "/decode",
            &json!({"ids": lists, "skip_special_tokens": false}),
        );
        for (&id, text) in chunk.iter().zip(texts.as_array().unwrap()) {
            strings.insert(id, text.as_str().unwrap().to_string());
        }
    }
    strings
}

#[test]
fn decode_round_trips_every_case() {
    let cases = cases();
    let all: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    // Keeping the special tokens, the text tokenises back to exactly the ids (the [UNK]s and the framing
    // are recognised as the special tokens they are).
    let kept = ok(
        "/decode",
        &json!({"ids": all, "skip_special_tokens": false}),
    );
    let kept: Vec<String> = kept
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept.len(), all.len());
    let again = ok(
        "/tokenize",
        &json!({"inputs": kept, "add_special_tokens": false}),
    );
    for ((case, want), tokens) in cases.iter().zip(&all).zip(again.as_array().unwrap()) {
        let got: Vec<u32> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&got, want, "{}: decode then tokenize", case["id"]);
    }
    // Skipping them (the default), the text of every case without [UNK] tokenises back to the same ids.
    let skipped = ok("/decode", &json!({"ids": all}));
    let mut compared = 0;
    for ((case, want), text) in cases.iter().zip(&all).zip(skipped.as_array().unwrap()) {
        if want.contains(&100) {
            continue;
        }
        let tokens = ok("/tokenize", &json!({"inputs": text}));
        assert_eq!(ids_of(&tokens[0]), *want, "{}: {text}", case["id"]);
        compared += 1;
    }
    assert!(compared > 60, "{compared}");
    assert_eq!(
        ok("/decode", &json!({"ids": [101, 7592, 2088, 102]})),
        json!(["hello world"])
    );
}

fn ids_of(tokens: &Value) -> Vec<u32> {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn token_counts_agree_with_usage() {
    let cases = cases();
    let texts = texts();
    let embedded = ok("/v1/embeddings", &json!({"input": texts}));
    let usage = embedded["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let listed: usize = tokenized()
        .iter()
        .map(|t| t.as_array().unwrap().len().min(MAX_TOKENS))
        .sum();
    assert_eq!(listed, usage, "/tokenize (cut at {MAX_TOKENS}) and usage");
    let from_reference: usize = cases
        .iter()
        .map(|c| c["tokens"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(usage, from_reference);
    // Without special tokens, two fewer per input.
    let plain = ok(
        "/tokenize",
        &json!({"inputs": "hello world", "add_special_tokens": false}),
    );
    assert_eq!(ids_of(&plain[0]), [7592, 2088]);
}

#[test]
fn tokenizer_requests_are_counted() {
    ok("/tokenize", &json!({"inputs": ["a b", "c"]}));
    ok("/decode", &json!({"ids": [[101, 102], [7592]]}));
    let metrics = server().request("GET", "/metrics", None).text();
    for endpoint in ["tokenize", "decode"] {
        let line = format!(
            "embedding_tokenizer_requests_total{{model=\"{MODEL}\",endpoint=\"{endpoint}\"}}"
        );
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(
        metrics.contains("embedding_tokenizer_tokens_total{"),
        "{metrics}"
    );
}

#[test]
fn bad_tokenizer_requests_get_clear_400s() {
    bad("/tokenize", &json!({}), "inputs", "lacks \"inputs\"");
    bad("/tokenize", &json!({"inputs": []}), "inputs", "empty");
    bad("/tokenize", &json!({"inputs": 5}), "inputs", "string");
    bad(
        "/tokenize",
        &json!({"inputs": ["a", 1]}),
        "inputs",
        "string",
    );
    bad(
        "/tokenize",
        &json!({"inputs": "a", "add_special_tokens": "yes"}),
        "add_special_tokens",
        "true or false",
    );
    bad(
        "/tokenize",
        &json!({"inputs": "a", "prompt_name": "query"}),
        "prompt_name",
        "no task prompts",
    );
    bad(
        "/tokenize",
        &json!({"inputs": "a", "model": 3}),
        "model",
        "string",
    );
    bad(
        "/tokenize",
        &json!({"inputs": vec!["a"; 101]}),
        "inputs",
        "limit of 100",
    );
    bad(
        "/tokenize",
        &json!({"inputs": "word ".repeat(5000)}),
        "inputs",
        "more than 5000 tokens",
    );

    bad("/decode", &json!({}), "ids", "lacks \"ids\"");
    bad("/decode", &json!({"ids": []}), "ids", "empty");
    bad(
        "/decode",
        &json!({"ids": [[101], []]}),
        "ids",
        "ids 1 is empty",
    );
    bad("/decode", &json!({"ids": [-1]}), "ids", "non-negative");
    bad("/decode", &json!({"ids": [1.5]}), "ids", "non-negative");
    bad("/decode", &json!({"ids": ["101"]}), "ids", "non-negative");
    bad(
        "/decode",
        &json!({"ids": [[101], 102]}),
        "ids",
        "arrays of token ids",
    );
    bad(
        "/decode",
        &json!({"ids": "101"}),
        "ids",
        "array of token ids",
    );
    bad(
        "/decode",
        &json!({"ids": [101, 30522]}),
        "ids",
        "30522 is not in the vocabulary (0..30522)",
    );
    bad(
        "/decode",
        &json!({"ids": [[101], [4294967295u64]]}),
        "ids",
        "ids 1: token id 4294967295",
    );
    bad(
        "/decode",
        &json!({"ids": [101], "skip_special_tokens": 1}),
        "skip_special_tokens",
        "true or false",
    );
    bad(
        "/decode",
        &json!({"ids": vec![vec![101]; 101]}),
        "ids",
        "limit of 100",
    );
    bad(
        "/decode",
        &json!({"ids": vec![101; 5001]}),
        "ids",
        "5001 ids",
    );

    let unknown = server().post("/tokenize", &json!({"inputs": "a", "model": "gpt-4"}));
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    for path in ["/tokenize", "/decode"] {
        let response = server().raw_request("POST", path, &[("Content-Type", "text/plain")], b"{}");
        assert_eq!(response.status, 415, "{path}");
        let response = server().request("GET", path, None);
        assert_eq!(response.status, 405, "{path}");
        assert_eq!(response.header("allow"), Some("POST"));
        let response = server().raw_request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            b"{nope",
        );
        assert_eq!(response.status, 400, "{path}");
    }
}
