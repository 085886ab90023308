//! `export-models DIR` writes real sentence-transformers directories: sentence-transformers itself loads
//! `DIR/<model>` and gives the server's token ids and vectors. Needs a Python with sentence-transformers,
//! so it is ignored by default; `.ci/run` installs one into `target/st-venv` and runs it explicitly:
//! `cargo test --release --test st_export -- --ignored`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};
use serde_json::json;

/// The Python with sentence-transformers: `$EMBEDDING_SERVER_ST_PYTHON`, else `target/st-venv/bin/python`
/// (what `.ci/run` creates).
fn st_python() -> PathBuf {
    match std::env::var_os("EMBEDDING_SERVER_ST_PYTHON") {
        Some(python) => PathBuf::from(python),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/st-venv/bin/python"),
    }
}

#[test]
#[ignore = "needs Python with sentence-transformers (.ci/run installs it into target/st-venv)"]
fn sentence_transformers_loads_exported_directories_and_gives_the_servers_vectors() {
    let python = st_python();
    let has = Command::new(&python)
        .args(["-c", "import sentence_transformers"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "{} cannot import sentence_transformers; set EMBEDDING_SERVER_ST_PYTHON",
        python.display()
    );
    let dir =
        std::env::temp_dir().join(format!("embedding-server-st-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(common::BINARY)
        .arg("export-models")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reference = common::reference();
    let texts: Vec<String> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let mut checked = 0;
    for spec in catalog::CATALOG.iter().filter(|s| s.embedded) {
        if !dir.join(&spec.name).join("modules.json").is_file() {
            continue;
        }
        let model = Model::load(spec, &Source::Embedded).unwrap();
        let mut cases = Vec::new();
        let mut prompts: Vec<Option<&str>> = vec![None];
        prompts.extend(spec.prompts.iter().map(|(task, _)| Some(task.as_str())));
        for prompt in prompts {
            let prefix = prompt.map_or(spec.default_prompt(), |p| spec.prompt(p).unwrap());
            for text in &texts {
                let tokens = model
                    .tokenize(
                        &Input::Text(text.clone()),
                        prefix,
                        TruncationDirection::Right,
                    )
                    .unwrap();
                let pooled = model.encode(&[&tokens.ids]).unwrap().remove(0);
                cases.push(json!({
                    "text": text,
                    "prompt_name": prompt,
                    "input_ids": tokens.ids,
                    "embedding": model.finish(pooled, model.dims()),
                }));
            }
        }
        let server_json = dir.join(format!("{}-server.json", spec.name));
        std::fs::write(
            &server_json,
            json!({"tolerance": 2e-5, "cases": cases}).to_string(),
        )
        .unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/st_export_check.py");
        let out = Command::new(&python)
            .arg(script)
            .arg(dir.join(&spec.name))
            .arg(&server_json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sentence-transformers disagrees on the exported {}:\n{}\n{}",
            spec.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        checked >= 1,
        "no exported model has sentence-transformers files"
    );
}
