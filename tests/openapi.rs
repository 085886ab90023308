//! Keeps `GET /openapi.json` true: every documented path and method answers and every other method gets
//! 405 naming exactly the documented ones; the router's table (`ROUTES`) and the document list the same
//! paths with the same methods; and real responses
//! (successes and each error the server can be made to give) match the document's schemas, checked by a
//! small validator for the subset of JSON Schema the document uses (it refuses any other keyword, so the
//! document cannot say what is not checked).

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Response, Server};
use embedding_server::server::{ErrorShape, ROUTES};
use serde_json::{json, Value};

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
const MODEL: &str = "all-MiniLM-L6-v2";
const RERANKER: &str = "rerank-tiny";
/// Small enough that a test can send a larger body cheaply.
const MAX_BODY_BYTES: usize = 65_536;

/// The embedded model and a reranker (the shared rerank-tiny), so that every documented operation has a
/// model to answer it.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let reference = common::shared_dir().join("reference");
        Server::start(&[
            "--max-body-bytes",
            &MAX_BODY_BYTES.to_string(),
            "--model-dir",
            reference.to_str().unwrap(),
            "--model",
            MODEL,
            "--model",
            RERANKER,
        ])
    })
}

/// The document as the server serves it, checked against the file it is built from.
fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let served = server().request("GET", "/openapi.json", None);
        assert_eq!(served.status, 200, "{}", served.text());
        assert_eq!(served.header("content-type"), Some("application/json"));
        let served = served.json();
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/openapi.json");
        let text = std::fs::read_to_string(file).expect("assets/openapi.json is missing");
        let written: Value = serde_json::from_str(&text).expect("assets/openapi.json is not JSON");
        assert_eq!(served, written, "the served document differs from the file");
        assert!(
            served["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1.")),
            "an OpenAPI 3.1 document"
        );
        served
    })
}

// ---- the document -------------------------------------------------------------------------------------

/// Follows a local `$ref` ("#/a/b") inside the document.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    let mut node = node;
    while let Some(reference) = node.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: {reference}"));
        node = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling reference {reference}"));
    }
    node
}

/// Every documented path with its methods (upper case) and their operations.
fn operations(doc: &Value) -> Vec<(String, Vec<(String, &Value)>)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .map(|(path, item)| {
            let item = resolve(doc, item);
            let methods = item
                .as_object()
                .unwrap()
                .iter()
                .filter(|(key, _)| {
                    [
                        "get", "put", "post", "delete", "options", "head", "patch", "trace",
                    ]
                    .contains(&key.as_str())
                })
                .map(|(key, op)| (key.to_ascii_uppercase(), op))
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

fn operation<'a>(doc: &'a Value, path: &str, method: &str) -> &'a Value {
    let item = resolve(doc, &doc["paths"][path]);
    let op = &item[method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    op
}

/// Whether a concrete path matches a documented template (a `{param}` is one non-empty segment).
fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

/// Checks a response against the documented response for its status: the status is documented, the
/// content type is one of those documented, the documented headers are there, and the body fits the schema.
fn check_response(doc: &Value, documented: &Value, response: &Response, what: &str) {
    let documented = resolve(doc, documented);
    let media = response
        .header("content-type")
        .unwrap_or_else(|| panic!("{what}: no Content-Type"))
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let content = documented["content"]
        .get(&media)
        .unwrap_or_else(|| panic!("{what}: {media} is not a documented content type"));
    if let Some(headers) = documented.get("headers").and_then(Value::as_object) {
        for name in headers.keys() {
            assert!(
                response.header(name).is_some(),
                "{what}: the documented header {name} is missing"
            );
        }
    }
    let body = if media == "application/json" {
        response.json()
    } else {
        Value::String(response.text())
    };
    if let Err(error) = validate(doc, &content["schema"], &body, "$") {
        panic!("{what}: the body does not fit the document: {error}\nbody: {body}");
    }
}

/// Checks a response to a documented operation.
fn check_operation_response(doc: &Value, path: &str, method: &str, response: &Response) {
    let status = response.status.to_string();
    let documented = operation(doc, path, method)["responses"]
        .get(&status)
        .unwrap_or_else(|| {
            panic!(
                "{method} {path} answered {status}, which is not documented: {}",
                response.text()
            )
        });
    check_response(
        doc,
        documented,
        response,
        &format!("{method} {path} {status}"),
    );
}

fn request_schema<'a>(doc: &'a Value, path: &str, method: &str) -> &'a Value {
    let body = resolve(doc, &operation(doc, path, method)["requestBody"]);
    &body["content"]["application/json"]["schema"]
}

// ---- a validator for the subset of JSON Schema the document uses ----------------------------------------

/// Keywords that only annotate.
const ANNOTATIONS: [&str; 5] = [
    "description",
    "title",
    "examples",
    "default",
    "contentEncoding",
];

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        // JSON Schema: 3.0 is an integer too.
        "integer" => {
            value.is_u64() || value.is_i64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("unknown type {other:?} in the document"),
    }
}

/// Validates `value` against `schema`; `Err` names the first place that does not fit.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = schema
        .as_object()
        .unwrap_or_else(|| panic!("a schema must be an object, at {at}"));
    let fail = |why: String| Err(format!("{at}: {why}"));
    for (keyword, rule) in schema {
        match keyword.as_str() {
            "$ref" => validate(doc, resolve(doc, &json!({"$ref": rule})), value, at)?,
            "type" => {
                let names: Vec<&str> = match rule {
                    Value::String(name) => vec![name],
                    Value::Array(names) => names.iter().map(|n| n.as_str().unwrap()).collect(),
                    _ => panic!("bad type at {at}"),
                };
                if !names.iter().any(|name| type_matches(name, value)) {
                    return fail(format!("{value} is not of type {rule}"));
                }
            }
            "const" => {
                if value != rule {
                    return fail(format!("{value} is not {rule}"));
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(value) {
                    return fail(format!("{value} is not one of {rule}"));
                }
            }
            "properties" => {
                if let Some(fields) = value.as_object() {
                    for (name, property) in rule.as_object().unwrap() {
                        if let Some(field) = fields.get(name) {
                            validate(doc, property, field, &format!("{at}.{name}"))?;
                        }
                    }
                }
            }
            "required" => {
                if let Some(fields) = value.as_object() {
                    for name in rule.as_array().unwrap() {
                        if !fields.contains_key(name.as_str().unwrap()) {
                            return fail(format!("lacks the required {name}"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(fields) = value.as_object() {
                    let known = schema.get("properties").and_then(Value::as_object);
                    for (name, field) in fields {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(true) => {}
                            Value::Bool(false) => {
                                return fail(format!("has the undocumented field {name:?}"))
                            }
                            extra => validate(doc, extra, field, &format!("{at}.{name}"))?,
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (i, item) in items.iter().enumerate() {
                        validate(doc, rule, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            "minItems" | "maxItems" => {
                if let Some(items) = value.as_array() {
                    let bound = rule.as_u64().unwrap() as usize;
                    let fits = if keyword == "minItems" {
                        items.len() >= bound
                    } else {
                        items.len() <= bound
                    };
                    if !fits {
                        return fail(format!("{} items breaks {keyword} {bound}", items.len()));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let Some(text) = value.as_str() {
                    let bound = rule.as_u64().unwrap() as usize;
                    let length = text.chars().count();
                    let fits = if keyword == "minLength" {
                        length >= bound
                    } else {
                        length <= bound
                    };
                    if !fits {
                        return fail(format!("length {length} breaks {keyword} {bound}"));
                    }
                }
            }
            "minimum" | "maximum" => {
                if let Some(number) = value.as_f64() {
                    let bound = rule.as_f64().unwrap();
                    let fits = if keyword == "minimum" {
                        number >= bound
                    } else {
                        number <= bound
                    };
                    if !fits {
                        return fail(format!("{value} breaks {keyword} {rule}"));
                    }
                }
            }
            "oneOf" | "anyOf" => {
                let branches = rule.as_array().unwrap();
                let fitting = branches
                    .iter()
                    .enumerate()
                    .filter(|(i, branch)| {
                        validate(doc, branch, value, &format!("{at}/{keyword}[{i}]")).is_ok()
                    })
                    .count();
                let fits = if keyword == "oneOf" {
                    fitting == 1
                } else {
                    fitting >= 1
                };
                if !fits {
                    return fail(format!("{value} fits {fitting} branches of {keyword}"));
                }
            }
            other if ANNOTATIONS.contains(&other) => {}
            other => {
                panic!("the document uses {other:?} at {at}, which this validator does not check")
            }
        }
    }
    Ok(())
}

// ---- the tests ---------------------------------------------------------------------------------------

/// A request that a documented operation should answer with 200.
fn successful_request(doc: &Value, path: &str, method: &str) -> Vec<(String, Option<String>)> {
    let concrete = path.replace("{id}", MODEL);
    let op = operation(doc, path, method);
    match op.get("requestBody") {
        None => vec![(concrete, None)],
        Some(body) => {
            let body = resolve(doc, body);
            let examples = body["content"]["application/json"]["examples"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}: its body has no examples"));
            examples
                .values()
                .map(|example| (concrete.clone(), Some(example["value"].to_string())))
                .collect()
        }
    }
}

#[test]
fn every_documented_operation_answers_and_fits_the_document() {
    let doc = document();
    let mut probed = 0;
    for (path, methods) in operations(doc) {
        assert!(!methods.is_empty(), "{path} documents no method");
        for (method, op) in &methods {
            if let Some(body) = op.get("requestBody") {
                let schema = request_schema(doc, &path, method);
                for (name, example) in resolve(doc, body)["content"]["application/json"]["examples"]
                    .as_object()
                    .unwrap()
                {
                    if let Err(error) = validate(doc, schema, &example["value"], "$") {
                        panic!("{method} {path}: the example {name} does not fit the request schema: {error}");
                    }
                }
            }
            for (concrete, body) in successful_request(doc, &path, method) {
                let response = server().request(method, &concrete, body.as_deref());
                assert_eq!(
                    response.status,
                    200,
                    "{method} {concrete} {body:?}: {}",
                    response.text()
                );
                check_operation_response(doc, &path, method, &response);
                probed += 1;
            }
        }
    }
    assert!(probed >= 15, "only {probed} operations probed");
}

/// The documented 405 of `path`: in the error shape of the API the path belongs to.
fn method_not_allowed<'a>(doc: &'a Value, path: &str) -> &'a Value {
    let shape = ROUTES
        .iter()
        .find(|route| route.path == path)
        .map_or(ErrorShape::OpenAi, |route| route.errors);
    let prefix = match shape {
        ErrorShape::OpenAi => "",
        ErrorShape::Ollama => "Ollama",
        ErrorShape::Cohere => "Cohere",
        ErrorShape::Tei => "Tei",
    };
    &doc["components"]["responses"][format!("{prefix}MethodNotAllowed")]
}

#[test]
fn every_other_method_gets_405_naming_exactly_the_documented_methods() {
    let doc = document();
    for (path, methods) in operations(doc) {
        let not_allowed = method_not_allowed(doc, &path);
        let documented: BTreeSet<String> = methods.iter().map(|(m, _)| m.clone()).collect();
        let concrete = path.replace("{id}", MODEL);
        for method in METHODS.iter().filter(|m| !documented.contains(**m)) {
            let response = server().request(method, &concrete, None);
            assert_eq!(response.status, 405, "{method} {path}: {}", response.text());
            let allowed: BTreeSet<String> = response
                .header("allow")
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"))
                .split(',')
                .map(|m| m.trim().to_string())
                .collect();
            assert_eq!(allowed, documented, "{method} {path}: Allow");
            check_response(doc, not_allowed, &response, &format!("{method} {path} 405"));
        }
    }
}

#[test]
fn the_route_table_and_the_document_list_the_same_paths_and_methods() {
    let doc = document();
    let documented: Vec<(String, BTreeSet<String>)> = operations(doc)
        .into_iter()
        .map(|(path, methods)| (path, methods.into_iter().map(|(m, _)| m).collect()))
        .collect();
    for route in ROUTES {
        // A path may take a row per method (`GET /` and `POST /`): together they answer its methods.
        let methods: BTreeSet<String> = ROUTES
            .iter()
            .filter(|other| other.path == route.path)
            .flat_map(|other| other.methods.iter().map(|m| m.to_string()))
            .collect();
        let entry = documented.iter().find(|(path, _)| path == route.path);
        let Some((_, documented_methods)) = entry else {
            panic!(
                "the router answers {}, which /openapi.json does not document",
                route.path
            );
        };
        assert_eq!(
            &methods, documented_methods,
            "{}: the router's methods and the document's",
            route.path
        );
    }
    for (path, _) in &documented {
        assert!(
            ROUTES.iter().any(|route| route.path == path),
            "/openapi.json documents {path}, which the router does not answer"
        );
    }
}

#[test]
fn paths_the_document_does_not_list_get_404() {
    let doc = document();
    let documented: Vec<String> = operations(doc).into_iter().map(|(p, _)| p).collect();
    let is_documented = |path: &str| documented.iter().any(|t| matches_template(t, path));
    let mut near_misses: Vec<String> = [
        "/",
        "/v1",
        "/v1/",
        "/v2/embeddings",
        "/docs",
        "/openapi.yaml",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    for path in &documented {
        let concrete = path.replace("{id}", MODEL);
        near_misses.push(match concrete.strip_suffix('/') {
            Some(bare) => format!("{bare}//"),
            None => format!("{concrete}/"),
        });
        near_misses.push(concrete.to_ascii_uppercase());
        near_misses.push(format!("{concrete}x"));
        near_misses.push(format!("/api{concrete}"));
    }
    let not_found = &doc["components"]["responses"]["NotFound"];
    let mut probed = 0;
    for path in near_misses.iter().filter(|p| !is_documented(p)) {
        for method in ["GET", "POST"] {
            let response = server().request(method, path, None);
            assert_eq!(response.status, 404, "{method} {path}: {}", response.text());
            check_response(doc, not_found, &response, &format!("{method} {path}"));
            probed += 1;
        }
    }
    assert!(probed >= 40, "only {probed} near misses probed");
}

#[test]
fn request_schema_accepts_what_the_server_takes_and_refuses_what_it_refuses() {
    let doc = document();
    let path = "/v1/embeddings";
    let schema = request_schema(doc, path, "POST");
    let taken = [
        json!({"input": ""}),
        json!({"input": ["a", ""], "model": MODEL, "user": "someone", "encoding_format": "float"}),
        json!({"input": [101, 102], "dimensions": 384, "truncate": false}),
        json!({"input": [[101, 102], [101, 2023, 102]], "encoding_format": "base64"}),
        json!({"input": "a", "model": null, "encoding_format": null, "dimensions": null,
               "task": null, "prompt_name": null, "truncate": null, "user": null}),
        json!({"input": [101.0, 102.0], "dimensions": 384.0}),
        json!({"input": "unknown fields are ignored", "extra": {"anything": [1]}}),
        json!({"input": "a", "encoding_format": "int8", "truncation_direction": "Left"}),
        json!({"input": ["a", "b"], "encoding_format": "ubinary", "truncation_direction": "right"}),
        json!({"input": [101, 102], "encoding_format": "uint8", "truncation_direction": null}),
    ];
    for body in taken {
        assert!(
            validate(doc, schema, &body, "$").is_ok(),
            "the schema refuses {body}"
        );
        let response = server().post(path, &body);
        assert_eq!(response.status, 200, "{body}: {}", response.text());
        check_operation_response(doc, path, "POST", &response);
    }
    let refused = [
        json!([]),
        json!("input"),
        json!({}),
        json!({"input": null}),
        json!({"input": []}),
        json!({"input": 5}),
        json!({"input": ["a", 1]}),
        json!({"input": [1, "a"]}),
        json!({"input": [[1], "a"]}),
        json!({"input": [[]]}),
        json!({"input": [-3]}),
        json!({"input": [1.5]}),
        json!({"input": [4_294_967_296u64]}),
        json!({"input": {"text": "a"}}),
        json!({"input": "a", "model": 7}),
        json!({"input": "a", "encoding_format": "hex"}),
        json!({"input": "a", "encoding_format": "int4"}),
        json!({"input": "a", "truncation_direction": "up"}),
        json!({"input": "a", "truncation_direction": 1}),
        json!({"input": "a", "dimensions": 0}),
        json!({"input": "a", "dimensions": -1}),
        json!({"input": "a", "dimensions": 1.5}),
        json!({"input": "a", "dimensions": "384"}),
        json!({"input": "a", "task": 1}),
        json!({"input": "a", "prompt_name": ["x"]}),
        json!({"input": "a", "truncate": "yes"}),
        json!({"input": "a", "user": 5}),
    ];
    for body in refused {
        assert!(
            validate(doc, schema, &body, "$").is_err(),
            "the schema takes {body}"
        );
        let response = server().post(path, &body);
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        check_operation_response(doc, path, "POST", &response);
    }
}

#[test]
fn rerank_request_schemas_accept_what_the_server_takes_and_refuse_what_it_refuses() {
    let doc = document();
    let cases: [(&str, Vec<Value>, Vec<Value>); 2] = [
        (
            "/v1/rerank",
            vec![
                json!({"query": "", "documents": [""]}),
                json!({"query": "q", "documents": ["a", {"text": "b"}], "model": RERANKER,
                       "top_n": 1, "return_documents": true, "truncate": true}),
                json!({"query": "q", "documents": ["a"], "model": null, "top_n": null,
                       "return_documents": null, "truncate": null}),
                json!({"query": "q", "documents": ["a"], "top_n": 2.0, "rank_fields": ["text"]}),
            ],
            vec![
                json!({}),
                json!({"documents": ["a"]}),
                json!({"query": ["q"], "documents": ["a"]}),
                json!({"query": "q"}),
                json!({"query": "q", "documents": []}),
                json!({"query": "q", "documents": "a"}),
                json!({"query": "q", "documents": [1]}),
                json!({"query": "q", "documents": [{"title": "a"}]}),
                json!({"query": "q", "documents": ["a"], "top_n": 0}),
                json!({"query": "q", "documents": ["a"], "top_n": 1.5}),
                json!({"query": "q", "documents": ["a"], "return_documents": "yes"}),
                json!({"query": "q", "documents": ["a"], "model": 1}),
            ],
        ),
        (
            "/rerank",
            vec![
                json!({"query": "q", "texts": ["a"]}),
                json!({"query": "q", "texts": ["a", ""], "raw_scores": true, "return_text": false,
                       "truncate": false, "truncation_direction": "Right", "model": RERANKER}),
            ],
            vec![
                json!({"query": "q"}),
                json!({"query": "q", "texts": []}),
                json!({"query": "q", "texts": [{"text": "a"}]}),
                json!({"query": "q", "texts": ["a"], "raw_scores": "no"}),
                json!({"query": "q", "texts": ["a"], "truncation_direction": "Left"}),
            ],
        ),
    ];
    for (path, taken, refused) in cases {
        let schema = request_schema(doc, path, "POST");
        for body in taken {
            assert!(
                validate(doc, schema, &body, "$").is_ok(),
                "{path}: the schema refuses {body}"
            );
            let response = server().post(path, &body);
            assert_eq!(response.status, 200, "{path} {body}: {}", response.text());
            check_operation_response(doc, path, "POST", &response);
        }
        for body in refused {
            assert!(
                validate(doc, schema, &body, "$").is_err(),
                "{path}: the schema takes {body}"
            );
            let response = server().post(path, &body);
            // text-embeddings-inference's statuses on /rerank: 422, or 400 for no texts.
            let expected: &[u16] = if path == "/rerank" {
                &[400, 422]
            } else {
                &[400]
            };
            assert!(
                expected.contains(&response.status),
                "{path} {body}: {} {}",
                response.status,
                response.text()
            );
            check_operation_response(doc, path, "POST", &response);
        }
    }
    // Impossible although the schema takes it: a model of the other kind, each way.
    for (path, body) in [
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "model": MODEL}),
        ),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a"], "model": MODEL}),
        ),
        ("/v1/embeddings", json!({"input": "a", "model": RERANKER})),
    ] {
        let response = server().post(path, &body);
        let expected = if path == "/rerank" { 422 } else { 400 };
        assert_eq!(
            response.status,
            expected,
            "{path} {body}: {}",
            response.text()
        );
        check_operation_response(doc, path, "POST", &response);
    }
    let card = server()
        .request("GET", &format!("/v1/models/{RERANKER}"), None)
        .json();
    let schema = json!({"$ref": "#/components/schemas/ModelCard"});
    validate(doc, &schema, &card, "$").expect("a reranker's card fits");
    let mut mixed = card.clone();
    mixed["task"] = json!("embed");
    assert!(
        validate(doc, &schema, &mixed, "$").is_err(),
        "an embedding card without dims passed"
    );
}

#[test]
fn every_error_the_server_can_be_made_to_give_fits_the_document() {
    let doc = document();
    let s = server();
    let json_type = [("Content-Type", "application/json")];

    // 400: not JSON at all, and impossible for the model although the schema takes it.
    for body in [
        "{not json",
        r#"{"input": "a", "dimensions": 100}"#,
        r#"{"input": "a", "task": "search_query"}"#,
        r#"{"input": [999999]}"#,
    ] {
        let response = s.raw_request("POST", "/v1/embeddings", &json_type, body.as_bytes());
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        check_operation_response(doc, "/v1/embeddings", "POST", &response);
    }
    // 404: unknown model, by body and by path.
    for (path, body) in [
        ("/v1/embeddings", json!({"input": "a", "model": "gpt-4"})),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "model": "gpt-4"}),
        ),
        (
            "/v2/rerank",
            json!({"query": "q", "documents": ["a"], "model": "gpt-4"}),
        ),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a"], "model": "gpt-4"}),
        ),
    ] {
        let response = s.post(path, &body);
        assert_eq!(response.status, 404, "{path}");
        // Each in its API's body: OpenAI's names the code, Cohere's and text-embeddings-inference's the model.
        let body = response.json();
        let message = body["error"]["message"]
            .as_str()
            .or(body["message"].as_str())
            .or(body["error"].as_str())
            .unwrap_or_else(|| panic!("{path}: {body}"));
        assert!(message.contains("gpt-4"), "{path}: {body}");
        check_operation_response(doc, path, "POST", &response);
    }
    let response = s.request("GET", "/v1/models/gpt-4", None);
    assert_eq!(response.status, 404);
    check_operation_response(doc, "/v1/models/{id}", "GET", &response);
    let response = s.request("GET", "/v1/models/gpt-4/quantization", None);
    assert_eq!(response.status, 404);
    check_operation_response(doc, "/v1/models/{id}/quantization", "GET", &response);
    // The tokenizer endpoints: an id outside the vocabulary, an empty list, an unknown model.
    for (path, body, status) in [
        ("/decode", json!({"ids": [999_999]}), 400),
        ("/decode", json!({"ids": []}), 400),
        ("/tokenize", json!({"inputs": []}), 400),
        ("/tokenize", json!({"inputs": "a", "model": "gpt-4"}), 404),
    ] {
        let response = s.post(path, &body);
        assert_eq!(
            response.status,
            status,
            "{path} {body}: {}",
            response.text()
        );
        check_operation_response(doc, path, "POST", &response);
    }
    // 413, on an embedding route and on one that takes no body.
    let large = format!(r#"{{"input": "{}"}}"#, "a".repeat(MAX_BODY_BYTES));
    for (method, path) in [("POST", "/v1/embeddings"), ("GET", "/health")] {
        let response = s.raw_request(method, path, &json_type, large.as_bytes());
        assert_eq!(response.status, 413, "{method} {path}: {}", response.text());
        check_operation_response(doc, path, method, &response);
    }
    // 415.
    for (method, path) in [
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/encode"),
        ("POST", "/v1/rerank"),
        ("POST", "/rerank"),
    ] {
        let response = s.raw_request(
            method,
            path,
            &[("Content-Type", "text/plain")],
            b"{\"input\": \"a\"}",
        );
        assert_eq!(response.status, 415, "{method} {path}: {}", response.text());
        check_operation_response(doc, path, method, &response);
    }
}

#[test]
fn every_error_a_dialect_can_be_made_to_give_fits_the_document() {
    let doc = document();
    let s = server();
    let long = "word ".repeat(400);
    let cases = [
        ("/api/embed", "{not json".to_string(), 400),
        (
            "/api/embed",
            json!({"input": "a", "model": "x"}).to_string(),
            404,
        ),
        (
            "/api/embed",
            json!({"input": long, "truncate": false}).to_string(),
            400,
        ),
        (
            "/api/embeddings",
            json!({"prompt": "a", "model": "x"}).to_string(),
            404,
        ),
        (
            "/v2/embed",
            json!({"texts": ["a"], "model": "x"}).to_string(),
            404,
        ),
        (
            "/v2/embed",
            json!({"texts": [long], "truncate": "NONE"}).to_string(),
            400,
        ),
        ("/v2/embed", json!({"images": ["data:,"]}).to_string(), 400),
        ("/embed", json!({"inputs": []}).to_string(), 400),
        (
            "/embed",
            json!({"inputs": long, "truncate": false}).to_string(),
            422,
        ),
        ("/", json!({"inputs": "a", "model": "x"}).to_string(), 404),
        ("/", "[]".to_string(), 422),
    ];
    let json_type = [("Content-Type", "application/json")];
    for (path, body, status) in cases {
        let response = s.raw_request("POST", path, &json_type, body.as_bytes());
        assert_eq!(
            response.status,
            status,
            "{path} {body}: {}",
            response.text()
        );
        check_operation_response(doc, path, "POST", &response);
    }
    let large = format!(r#"{{"inputs": "{}"}}"#, "a".repeat(MAX_BODY_BYTES));
    for (method, path) in [
        ("POST", "/api/embed"),
        ("GET", "/api/tags"),
        ("POST", "/v2/embed"),
        ("POST", "/"),
        ("GET", "/info"),
    ] {
        let response = s.raw_request(method, path, &json_type, large.as_bytes());
        assert_eq!(response.status, 413, "{method} {path}: {}", response.text());
        check_operation_response(doc, path, method, &response);
    }
    for path in ["/v2/embed", "/embed"] {
        let response = s.raw_request("POST", path, &[("Content-Type", "text/plain")], b"{}");
        assert_eq!(response.status, 415, "{path}: {}", response.text());
        check_operation_response(doc, path, "POST", &response);
    }
}

#[test]
fn a_timed_out_request_gets_the_documented_503() {
    let doc = document();
    // No engine embeds 64 long inputs within a microsecond, however descheduled the waiting worker is.
    let s = Server::start(&["--request-timeout", "0.000001"]);
    let inputs: Vec<String> = (0..64)
        .map(|i| format!("{i} {}", "long text ".repeat(100)))
        .collect();
    let response = s.post("/v1/embeddings", &json!({ "input": inputs }));
    assert_eq!(response.status, 503, "{}", response.text());
    check_operation_response(doc, "/v1/embeddings", "POST", &response);
}

#[test]
fn a_full_queue_gets_the_documented_429() {
    let doc = document();
    // Small batches, so that most of the heavy request waits in the queue while we knock.
    let s = Server::start(&[
        "--queue-capacity",
        "1",
        "--max-batch-tokens",
        "512",
        "--request-timeout",
        "600",
    ]);
    let long: Vec<u32> = std::iter::once(101)
        .chain(std::iter::repeat_n(2023, 126))
        .chain(std::iter::once(102))
        .collect();
    let heavy = json!({"input": vec![long; 32]});
    let mut full = None;
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| s.post("/v1/embeddings", &heavy));
        // A knock that arrives before the heavy request makes the heavy one the refused one: fine too.
        std::thread::sleep(Duration::from_millis(50));
        while !worker.is_finished() {
            let response = s.post("/v1/encode", &json!({"input": "knock"}));
            if response.status == 429 {
                full = Some(("POST /v1/encode", response));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let heavy = worker.join().unwrap();
        assert!(
            matches!(heavy.status, 200 | 429),
            "{}: {}",
            heavy.status,
            heavy.text()
        );
        if heavy.status == 429 && full.is_none() {
            full = Some(("POST /v1/embeddings", heavy));
        }
    });
    let (what, response) = full.expect("no 429 while the queue was full");
    assert_eq!(response.header("retry-after"), Some("1"), "{what}");
    let (method, path) = what.split_once(' ').unwrap();
    check_operation_response(doc, path, method, &response);
}

#[test]
fn the_validator_refuses_bodies_that_do_not_fit() {
    let doc = document();
    let ok = server()
        .post("/v1/embeddings", &json!({"input": ["a", "b"]}))
        .json();
    let schema = json!({"$ref": "#/components/schemas/EmbeddingList"});
    validate(doc, &schema, &ok, "$").expect("a real response fits");
    type Mutation = (&'static str, fn(&mut Value));
    let mutations: [Mutation; 7] = [
        ("no usage", |v| {
            v.as_object_mut().unwrap().remove("usage");
        }),
        ("an extra field", |v| v["extra"] = json!(1)),
        ("a number for an embedding", |v| {
            v["data"][0]["embedding"] = json!(1.0)
        }),
        ("a string in the floats", |v| {
            v["data"][1]["embedding"][3] = json!("x")
        }),
        ("a wrong object", |v| v["object"] = json!("embedding")),
        ("a negative index", |v| v["data"][0]["index"] = json!(-1)),
        ("no data", |v| v["data"] = json!([])),
    ];
    for (what, mutate) in mutations {
        let mut bad = ok.clone();
        mutate(&mut bad);
        assert!(validate(doc, &schema, &bad, "$").is_err(), "{what} passed");
    }
    let error = json!({"$ref": "#/components/schemas/Error"});
    let real = server().request("GET", "/nowhere", None).json();
    validate(doc, &error, &real, "$").expect("a real error fits");
    for bad in [
        json!({"error": {"message": "m", "type": "invalid_request_error", "param": null}}),
        json!({"error": {"message": "m", "type": "oops", "param": null, "code": null}}),
        json!({"error": {"message": "", "type": "server_error", "param": null, "code": null}}),
        json!({"message": "m"}),
    ] {
        assert!(validate(doc, &error, &bad, "$").is_err(), "{bad} passed");
    }
}

#[test]
fn a_missing_key_gets_the_documented_401() {
    let s = Server::start(&["--api-key", "secret"]);
    let response = s.post("/v1/embeddings", &json!({"input": "a"}));
    assert_eq!(response.status, 401, "{}", response.text());
    check_operation_response(document(), "/v1/embeddings", "POST", &response);
}
