//! A catalog model other than MiniLM, compiled in: the shared fixtures bert-tiny-cls (an embedding model:
//! CLS pooling, Normalize, prompts, 128 tokens) and rerank-tiny (a cross-encoder) are entries of
//! `assets/models.json` embedded by the `fixture-models` feature. Served from the binary with no
//! `--model-dir`, each gives what sentence-transformers gives (`../shared/reference/<model>/expected.json`),
//! through the library and over HTTP, and its catalog entry says what the model's own
//! sentence-transformers files say.
//!
//! Only a build with the feature has these models, so only it has these tests:
//! `EMBEDDING_SERVER_MODELS_DIR=$PWD/../shared/reference cargo test --release --features fixture-models --test catalog_models`
//! (`.ci/run` runs it).
#![cfg(feature = "fixture-models")]

mod common;

use std::path::PathBuf;

use common::expected::{
    check_embedding_model, check_embeddings_http, check_rerank_http, check_reranker_model, expected,
};
use common::Server;
use embedding_server::models::{catalog, directory, Model, ModelSpec, Source, Task};
use serde_json::Value;

const EMBEDDER: &str = "bert-tiny-cls";
const RERANKER: &str = "rerank-tiny";

fn shared_reference() -> PathBuf {
    common::shared_dir().join("reference")
}

fn embedded(name: &str) -> &'static ModelSpec {
    let spec = catalog::find(name).unwrap_or_else(|| panic!("{name} is not in the catalog"));
    assert!(spec.embedded, "this build does not embed {name}");
    spec
}

/// What the server is told about a model, from the manifest or from the model's own files.
fn promises(spec: &ModelSpec) -> String {
    format!(
        "task {:?}, pooling {}, normalize {}, post-pooling layer norm {}, max_tokens {}, dims {}, \
         activation {:?}, prompts {:?}, default prompt {:?}",
        spec.task,
        spec.pooling,
        spec.normalize,
        spec.post_pooling_layer_norm,
        spec.max_tokens,
        spec.dims,
        spec.activation,
        spec.prompts,
        spec.default_prompt_name
    )
}

#[test]
fn the_catalog_entries_say_what_the_fixtures_sentence_transformers_files_say() {
    for name in [EMBEDDER, RERANKER] {
        let read = directory::spec(&shared_reference(), name, None)
            .unwrap_or_else(|e| panic!("cannot read {name}'s directory: {e}"));
        assert_eq!(
            promises(embedded(name)),
            promises(&read),
            "{name}: assets/models.json against its directory"
        );
    }
}

#[test]
fn the_compiled_in_models_are_exact_through_the_library() {
    let model = Model::load(embedded(EMBEDDER), &Source::Embedded)
        .unwrap_or_else(|e| panic!("cannot load the embedded {EMBEDDER}: {e}"));
    let checked = check_embedding_model(&model, &expected(&shared_reference(), EMBEDDER), EMBEDDER);
    assert!(checked >= 34, "checked {checked}");

    let model = Model::load(embedded(RERANKER), &Source::Embedded)
        .unwrap_or_else(|e| panic!("cannot load the embedded {RERANKER}: {e}"));
    let checked = check_reranker_model(&model, &expected(&shared_reference(), RERANKER), RERANKER);
    assert_eq!(checked, 28);
}

#[test]
fn the_binary_serves_them_without_a_model_dir() {
    // No --model-dir: every model the binary embeds is served, from the binary.
    let server = Server::start(&[]);
    let listed = server.request("GET", "/v1/models", None).json();
    for name in ["all-MiniLM-L6-v2", EMBEDDER, RERANKER] {
        assert!(
            listed["data"].as_array().unwrap().iter().any(|m| m == name),
            "{name} in {listed}"
        );
        let card = server
            .request("GET", &format!("/v1/models/{name}"), None)
            .json();
        assert_eq!(card["source"], "embedded", "{card}");
        assert_eq!(card["directory"], Value::Null, "{card}");
    }

    let card = server
        .request("GET", &format!("/v1/models/{EMBEDDER}"), None)
        .json();
    assert_eq!(card["task"], "embed", "{card}");
    assert_eq!(card["pooling"], "cls", "{card}");
    assert_eq!(card["normalized"], true, "{card}");
    assert_eq!(card["max_tokens"], 128, "{card}");
    assert_eq!(card["dims"], 48, "{card}");
    assert_eq!(
        card["prompts"]["query"], "Represent this sentence for searching relevant passages: ",
        "{card}"
    );
    // No hub copy: the card names no revision rather than inventing one.
    assert_eq!(card["revision"], Value::Null, "{card}");
    check_embeddings_http(&server, &expected(&shared_reference(), EMBEDDER), EMBEDDER);

    let card = server
        .request("GET", &format!("/v1/models/{RERANKER}"), None)
        .json();
    assert_eq!(card["task"], Task::Rerank.name(), "{card}");
    check_rerank_http(&server, &expected(&shared_reference(), RERANKER), RERANKER);
}
