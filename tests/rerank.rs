//! Cross-encoders (rerankers): the shared rerank-tiny (the layout sentence-transformers 6 writes) and this
//! project's own fixtures in the older layouts (tests/fixtures/rerank/, written by
//! tests/fixtures/generate_rerank_fixtures.py with sentence-transformers) give `CrossEncoder.predict`'s
//! scores and logits within the fixtures' tolerance, with the exact pair ids and token types, through the
//! library and over HTTP in both shapes (`/v1/rerank`, `/rerank`): sorted, `top_n`, `return_documents`,
//! `raw_scores` and `return_text` honoured; the endpoints refuse what they cannot serve with a 400 naming the
//! field or the endpoint that fits; and directories the server cannot serve as rerankers are refused naming
//! why.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::expected::{check_rerank_http, check_reranker_model, expected};
use common::{Scratch, Server};
use embedding_server::models::{directory, Model, ScoreActivation, Source, Task};
use serde_json::{json, Value};

fn shared_reference() -> PathBuf {
    common::shared_dir().join("reference")
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rerank")
}

/// The project's own fixtures, in the older layouts, and the activation each one's config means.
const OWN: [(&str, ScoreActivation); 3] = [
    ("sbert-ce-tanh", ScoreActivation::Tanh),
    ("v4-identity", ScoreActivation::Identity),
    ("default-sigmoid", ScoreActivation::Sigmoid),
];

fn load(dir: &Path, name: &str) -> Model {
    let spec = directory::spec(dir, name, None)
        .unwrap_or_else(|e| panic!("cannot read the directory {name}: {e}"));
    Model::load(&spec, &Source::Dir(dir.to_path_buf()))
        .unwrap_or_else(|e| panic!("cannot load {name}: {e}"))
}

/// Every case through the library, read from `DIR/<name>`. Returns the pairs checked.
fn check_library(dir: &Path, name: &str) -> usize {
    check_reranker_model(&load(dir, name), &expected(dir, name), name)
}

#[test]
fn rerank_tiny_gives_cross_encoder_predict_scores_ids_and_token_types() {
    let checked = check_library(&shared_reference(), "rerank-tiny");
    assert_eq!(checked, 28);
    let model = load(&shared_reference(), "rerank-tiny");
    // Read from its own files: its catalog entry (fixture-models) is a compiled-in copy, not a recipe.
    assert!(model.spec.files.is_empty(), "{:?}", model.spec.files);
    assert_eq!(model.spec.activation, ScoreActivation::Sigmoid);
}

#[test]
fn own_older_layout_fixtures_give_cross_encoder_predict_scores() {
    for (name, activation) in OWN {
        let expected = expected(&fixtures_dir(), name);
        assert_eq!(
            expected["activation"].as_str(),
            Some(activation.torch_class()),
            "{name}: the fixture's own record of its activation"
        );
        assert_eq!(
            load(&fixtures_dir(), name).spec.activation,
            activation,
            "{name}"
        );
        let checked = check_library(&fixtures_dir(), name);
        assert!(checked >= 15, "{name}: checked {checked}");
    }
}

/// A server with rerank-tiny beside the embedded model, and one with the project's fixtures (a
/// `--model-dir` holds one directory of models).
fn shared_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        Server::start(&[
            "--model-dir",
            shared_reference().to_str().unwrap(),
            "--model",
            "all-MiniLM-L6-v2",
            "--model",
            "rerank-tiny",
            "--max-documents",
            "20",
        ])
    })
}

fn own_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&["--model-dir", fixtures_dir().to_str().unwrap()]))
}

#[test]
fn http_reranks_in_both_shapes_as_cross_encoder_predict_does() {
    check_rerank_http(
        shared_server(),
        &expected(&shared_reference(), "rerank-tiny"),
        "rerank-tiny",
    );
    for (name, _) in OWN {
        check_rerank_http(own_server(), &expected(&fixtures_dir(), name), name);
    }
}

#[test]
fn a_reranker_gives_no_embeddings_and_an_embedding_model_no_scores() {
    let reranker = load(&shared_reference(), "rerank-tiny");
    let error = reranker
        .embed(&[embedding_server::models::Input::Text("a".into())])
        .unwrap_err();
    assert!(error.message.contains("reranker"), "{}", error.message);
    let st = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/st");
    let embedder = load(&st, "cls-newer");
    assert_eq!(embedder.spec.task, Task::Embed);
    let error = embedder.rerank("q", &["a"]).unwrap_err();
    assert!(
        error.message.contains("not a reranker"),
        "{}",
        error.message
    );
}

#[test]
fn cards_say_rerank_and_the_activation() {
    let server = shared_server();
    let card = server.request("GET", "/v1/models/rerank-tiny", None).json();
    assert_eq!(card["task"], "rerank", "{card}");
    assert_eq!(card["activation"], "Sigmoid", "{card}");
    assert_eq!(card["max_tokens"], 128, "{card}");
    assert_eq!(card["source"], "directory", "{card}");
    assert!(card.get("pooling").is_none(), "no embedding fields: {card}");
    let embedder = server
        .request("GET", "/v1/models/all-MiniLM-L6-v2", None)
        .json();
    assert_eq!(embedder["task"], "embed", "{embedder}");
    for (name, activation) in OWN {
        let card = own_server()
            .request("GET", &format!("/v1/models/{name}"), None)
            .json();
        assert_eq!(card["task"], "rerank", "{card}");
        assert_eq!(card["activation"], activation.torch_class(), "{card}");
    }
}

/// The message and the field named by a refusal: OpenAI's body and 400 on `/v1/rerank`,
/// text-embeddings-inference's on `/rerank` (422, or 400 for no texts), whose body names no field.
fn error_of(server: &Server, path: &str, body: &Value) -> (String, Option<String>) {
    let response = server.post(path, body);
    let json = response.json();
    if path == "/rerank" {
        let empty = json["error_type"] == "Empty";
        let status = if empty { 400 } else { 422 };
        assert_eq!(response.status, status, "{path} {body}: {json}");
        return (json["error"].as_str().unwrap().to_string(), None);
    }
    assert_eq!(response.status, 400, "{path} {body}: {}", response.text());
    let error = json["error"].clone();
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    (
        error["message"].as_str().unwrap().to_string(),
        error["param"].as_str().map(String::from),
    )
}

#[test]
fn each_endpoint_sends_the_other_kind_of_model_to_the_endpoint_that_fits() {
    let server = shared_server();
    let (message, param) = error_of(
        server,
        "/v1/embeddings",
        &json!({"model": "rerank-tiny", "input": "a"}),
    );
    assert!(
        message.contains("/v1/rerank") && message.contains("reranker"),
        "{message}"
    );
    assert_eq!(param.as_deref(), Some("model"));
    for path in ["/v1/rerank", "/rerank"] {
        let (message, param) = error_of(
            server,
            path,
            &json!({"model": "all-MiniLM-L6-v2", "query": "q", "documents": ["a"], "texts": ["a"]}),
        );
        assert!(
            message.contains("/v1/embeddings") && message.contains("rerank-tiny"),
            "{message}"
        );
        if path == "/v1/rerank" {
            assert_eq!(param.as_deref(), Some("model"));
        }
    }
    // Without a model, each endpoint takes the first model of its kind.
    let embedded = server.post("/v1/embeddings", &json!({"input": "a"})).json();
    assert_eq!(embedded["model"], "all-MiniLM-L6-v2");
    let ranked = server
        .post("/v1/rerank", &json!({"query": "q", "documents": ["a"]}))
        .json();
    assert_eq!(ranked["model"], "rerank-tiny");
    // A server of rerankers only has nothing for /v1/embeddings without a model, and says so.
    let only_rerankers = Server::start(&[
        "--model-dir",
        shared_reference().to_str().unwrap(),
        "--model",
        "rerank-tiny",
    ]);
    let (message, _) = error_of(&only_rerankers, "/v1/embeddings", &json!({"input": "a"}));
    assert!(message.contains("/v1/rerank"), "{message}");
}

#[test]
fn malformed_rerank_requests_are_400s_naming_the_field() {
    let server = shared_server();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/rerank", json!({"documents": ["a"]}), "query"),
        (
            "/v1/rerank",
            json!({"query": [], "documents": ["a"]}),
            "query",
        ),
        (
            "/v1/rerank",
            json!({"query": 5, "documents": ["a"]}),
            "query",
        ),
        ("/v1/rerank", json!({"query": "q"}), "documents"),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": []}),
            "documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": "a"}),
            "documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a", 7]}),
            "documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": [{"title": "a"}]}),
            "documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "top_n": 0}),
            "top_n",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "top_n": -1}),
            "top_n",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "top_n": "2"}),
            "top_n",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "return_documents": "yes"}),
            "return_documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "model": 3}),
            "model",
        ),
        ("/rerank", json!({"query": "q", "texts": []}), "texts"),
        ("/rerank", json!({"query": "q", "texts": [null]}), "texts"),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a"], "raw_scores": 1}),
            "raw_scores",
        ),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a"], "truncation_direction": "Left"}),
            "truncation_direction",
        ),
    ];
    for (path, body, field) in cases {
        let (message, param) = error_of(server, path, &body);
        match param {
            Some(param) => assert_eq!(param, field, "{path} {body}: {message}"),
            None => assert!(message.contains(field), "{path} {body}: {message}"),
        }
    }
    for body in [
        "",
        "[]",
        "{",
        "{\"query\": \"q\", \"documents\": [\"a\"]} x",
    ] {
        let response = server.request("POST", "/v1/rerank", Some(body));
        assert_eq!(response.status, 400, "{body:?}: {}", response.text());
    }
    let response = server.raw_request(
        "POST",
        "/v1/rerank",
        &[("Content-Type", "text/plain")],
        br#"{"query": "q", "documents": ["a"]}"#,
    );
    assert_eq!(response.status, 415, "{}", response.text());
    let unknown = server.post(
        "/v1/rerank",
        &json!({"model": "no-such", "query": "q", "documents": ["a"]}),
    );
    assert_eq!(unknown.status, 404, "{}", unknown.text());
}

#[test]
fn limits_on_documents_tokens_and_length_are_400s_that_name_them() {
    let server = shared_server();
    // --max-documents 20 on this server.
    let many = vec!["doc"; 21];
    let (message, param) = error_of(
        server,
        "/v1/rerank",
        &json!({"query": "q", "documents": many}),
    );
    assert!(message.contains("20"), "{message}");
    assert_eq!(param.as_deref(), Some("documents"));
    let twenty = vec!["doc"; 20];
    assert_eq!(
        server
            .post("/v1/rerank", &json!({"query": "q", "documents": twenty}))
            .status,
        200
    );
    // An over-long pair is cut unless the request says not to.
    let long = "word ".repeat(300);
    let cut = server.post("/v1/rerank", &json!({"query": "q", "documents": [long]}));
    assert_eq!(cut.status, 200, "{}", cut.text());
    assert_eq!(cut.json()["usage"]["total_tokens"], 128);
    for (path, body) in [
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a", long], "truncate": false}),
        ),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a", long], "truncate": false}),
        ),
    ] {
        let (message, _) = error_of(server, path, &body);
        assert!(
            message.contains("128") && message.contains("[1]"),
            "{message}"
        );
    }
    // Each limit from its environment variable as well.
    let tight = Server::start_with_env(
        &[
            "--model-dir",
            shared_reference().to_str().unwrap(),
            "--model",
            "rerank-tiny",
        ],
        &[
            ("EMBEDDING_SERVER_MAX_REQUEST_TOKENS", "100"),
            ("EMBEDDING_SERVER_MAX_DOCUMENTS", "2"),
        ],
    );
    let (message, _) = error_of(
        &tight,
        "/v1/rerank",
        &json!({"query": "q", "documents": [long.clone(), long]}),
    );
    assert!(message.contains("100"), "{message}");
    let (message, _) = error_of(
        &tight,
        "/rerank",
        &json!({"query": "q", "texts": ["a", "b", "c"]}),
    );
    assert!(message.contains("limit of 2"), "{message}");
}

#[test]
fn metrics_count_rerank_requests_pairs_and_tokens_through_the_batching_queue() {
    let server = Server::start(&[
        "--model-dir",
        shared_reference().to_str().unwrap(),
        "--model",
        "rerank-tiny",
    ]);
    let first = server
        .post(
            "/v1/rerank",
            &json!({"query": "q", "documents": ["a", "b c"]}),
        )
        .json();
    let second = server.post("/rerank", &json!({"query": "q", "texts": ["a"]}));
    assert_eq!(second.status, 200);
    let tokens = first["usage"]["total_tokens"].as_u64().unwrap() + 5;
    let metrics = server.request("GET", "/metrics", None).text();
    for line in [
        "embedding_rerank_requests_total{model=\"rerank-tiny\",api=\"v1_rerank\"} 1.0".to_string(),
        "embedding_rerank_requests_total{model=\"rerank-tiny\",api=\"rerank\"} 1.0".to_string(),
        "embedding_rerank_pairs_total{model=\"rerank-tiny\"} 3.0".to_string(),
        format!("embedding_rerank_tokens_total{{model=\"rerank-tiny\"}} {tokens}.0"),
        "embedding_batch_inputs_sum{model=\"rerank-tiny\"} 3.0".to_string(),
    ] {
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
}

// ---- directories that are not one-label BERT cross-encoders ------------------------------------------

/// Loads the scratch copy's model.
fn load_scratch(scratch: &Scratch) -> Result<Model, String> {
    let dir = scratch.root().to_path_buf();
    directory::spec(&dir, "m", None)
        .and_then(|spec| Model::load(&spec, &Source::Dir(dir)))
        .map_err(|e| e.message)
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    common::edit_json(&model.join("config.json"), |v| {
        edit(v.as_object_mut().unwrap())
    });
}

#[test]
fn directories_that_cannot_rerank_are_refused_naming_why() {
    let fixture = fixtures_dir().join("sbert-ce-tanh");
    let three_labels = Scratch::new(&fixture, |m| {
        edit_config(m, |c| {
            c.insert(
                "id2label".into(),
                json!({"0": "contradiction", "1": "entailment", "2": "neutral"}),
            );
        })
    });
    let error = load_scratch(&three_labels).err().unwrap();
    assert!(
        error.contains("3 labels") && error.contains("entailment") && error.contains("one-label"),
        "{error}"
    );
    let unknown = Scratch::new(&fixture, |m| {
        edit_config(m, |c| {
            c.insert(
                "sbert_ce_default_activation_function".into(),
                json!("torch.nn.modules.activation.Hardswish"),
            );
        })
    });
    let error = load_scratch(&unknown).err().unwrap();
    assert!(
        error.contains("Hardswish") && error.contains("Sigmoid"),
        "{error}"
    );
    let lone_transformer = Scratch::new(&fixtures_dir().join("default-sigmoid"), |m| {
        edit_config(m, |c| {
            c.insert("architectures".into(), json!(["BertModel"]));
        });
        std::fs::write(
            m.join("modules.json"),
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]"#,
        )
        .unwrap();
    });
    let error = load_scratch(&lone_transformer).err().unwrap();
    assert!(
        error.contains("Pooling") && error.contains("ForSequenceClassification"),
        "{error}"
    );
}

#[test]
fn the_sentence_transformers_files_written_for_a_reranker_read_back_the_same() {
    let name = "sbert-ce-tanh";
    let original = load(&fixtures_dir(), name);
    let files = directory::sentence_transformers_files(&original.spec).unwrap();
    // The activation only in the written files, and a longer length in the tokenizer's config.
    let written = Scratch::new(&fixtures_dir().join(name), |m| {
        edit_config(m, |c| {
            c.remove("sbert_ce_default_activation_function");
        });
        let tokenizer_config = m.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&tokenizer_config).unwrap();
        std::fs::write(&tokenizer_config, text.replace("33", "64")).unwrap();
        for (file, text) in &files {
            std::fs::write(m.join(file), text).unwrap();
        }
    });
    let read = load_scratch(&written).unwrap();
    assert_eq!(read.spec.task, Task::Rerank);
    assert_eq!(read.spec.activation, ScoreActivation::Tanh);
    assert_eq!(read.max_tokens(), original.max_tokens());
    let documents = ["hello world", "the quick brown fox"];
    assert_eq!(
        read.rerank("data base", &documents).unwrap(),
        original.rerank("data base", &documents).unwrap()
    );
}

#[test]
fn activations_are_found_where_cross_encoder_looks_in_its_order() {
    let fixture = fixtures_dir().join("sbert-ce-tanh");
    let activation = |edit: Box<dyn FnOnce(&Path)>| {
        load_scratch(&Scratch::new(&fixture, edit))
            .unwrap_or_else(|e| panic!("{e}"))
            .spec
            .activation
    };
    // config_sentence_transformers.json wins over config.json.
    assert_eq!(
        activation(Box::new(|m| std::fs::write(
            m.join("config_sentence_transformers.json"),
            r#"{"activation_fn": "torch.nn.modules.activation.ReLU"}"#
        )
        .unwrap())),
        ScoreActivation::ReLu
    );
    // sentence-transformers 4-5's `sentence_transformers` entry wins over the older key.
    assert_eq!(
        activation(Box::new(|m| edit_config(m, |c| {
            c.insert(
                "sentence_transformers".into(),
                json!({"activation_fn": "torch.nn.Identity"}),
            );
        }))),
        ScoreActivation::Identity
    );
    // A path outside torch is not imported (sentence-transformers needs trust_remote_code for it): the
    // default for one label, Sigmoid.
    assert_eq!(
        activation(Box::new(|m| edit_config(m, |c| {
            c.insert(
                "sbert_ce_default_activation_function".into(),
                json!("my_package.MyActivation"),
            );
        }))),
        ScoreActivation::Sigmoid
    );
}
