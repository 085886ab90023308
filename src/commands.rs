//! The subcommands besides `serve`: `models`, `export-models`, `embed` and `health`, and the model loading
//! they share with `serve`.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::cli::{self, ModelsConfig, Options};
use crate::models::kernels::pool;
use crate::models::{self, catalog, directory, Input, Model, Precision, Source, CATALOG};

/// Loads the models `--model` names, or every embedded model and every model of `--model-dir`. A name
/// with a directory in `--model-dir` is read from there (`models::directory`), any other must be embedded.
pub fn load_models(config: &ModelsConfig) -> Result<Vec<Model>, String> {
    let (dir, pooling, precision) = (&config.dir, config.pooling, config.precision);
    // The engine's pool is spawned once, before any model can use it.
    pool::start(config.engine_threads);
    let in_dir = match &dir {
        Some(dir) => directory::list(dir).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let embedded: Vec<&str> = CATALOG
        .iter()
        .filter(|s| s.embedded)
        .map(|s| s.name.as_str())
        .collect();
    let wanted: Vec<String> = match config.names.as_slice() {
        // The directory's first: the first model is the default, and the operator pointed at them.
        [] => in_dir
            .iter()
            .map(String::as_str)
            .chain(
                embedded
                    .iter()
                    .copied()
                    .filter(|e| !in_dir.iter().any(|d| d == e)),
            )
            .map(String::from)
            .collect(),
        names => names.to_vec(),
    };
    if wanted.is_empty() {
        return Err(
            "this binary embeds no model; serve one with --model-dir DIR --model NAME".into(),
        );
    }
    // Named models must load; of the ones found by looking through --model-dir, a directory that cannot be
    // served (another kind of model, or one that needs --pooling) is skipped with a warning saying why.
    let named = !config.names.is_empty();
    let mut models = Vec::new();
    for name in &wanted {
        let root = dir.as_deref().and_then(|d| directory::locate(d, name));
        let from_dir = root.is_some();
        let loaded = match root {
            Some(root) => directory::spec(&root, name, pooling)
                .and_then(|spec| load(&spec, &Source::Dir(root), precision)),
            None => match catalog::find(name).filter(|s| s.embedded) {
                Some(spec) => load(spec, &Source::Embedded, precision),
                None => {
                    let mut available: Vec<String> =
                        embedded.iter().map(|e| format!("{e} (embedded)")).collect();
                    if let Some(dir) = &dir {
                        available
                            .extend(in_dir.iter().map(|d| format!("{}", dir.join(d).display())));
                    }
                    let where_ = match &dir {
                        Some(dir) => {
                            format!("neither embedded nor a directory in {}", dir.display())
                        }
                        None => "not embedded; serve a model directory with --model-dir DIR".into(),
                    };
                    return Err(format!(
                        "unknown model {name:?}: {where_}; available here: {}",
                        if available.is_empty() {
                            "none".to_string()
                        } else {
                            available.join(", ")
                        }
                    ));
                }
            },
        };
        match loaded {
            Ok(model) => models.push(model),
            Err(e) if !named && from_dir => {
                eprintln!(
                    "warning: not serving {name}: {e} (name it with --model to make this an error)"
                )
            }
            Err(e) => return Err(format!("cannot load {name}: {e}")),
        }
    }
    if models.is_empty() {
        return Err("no model could be loaded; see the warnings above".into());
    }
    Ok(models)
}

/// Loads one model, logging where from, in which precision and how long it took.
fn load(
    spec: &models::ModelSpec,
    source: &Source,
    precision: Precision,
) -> Result<Model, models::ModelError> {
    let started = Instant::now();
    let model = Model::load_in(spec, source, precision)?;
    // Reduced precisions multiply some layers in bf16 (int8 its qkv projection there); say when that runs
    // on AMX tiles, since their speed depends on it.
    let amx = if precision != Precision::F32 && models::kernels::bf16_on_amx() {
        ", bf16 products on AMX"
    } else {
        ""
    };
    eprintln!(
        "loaded {} ({precision}{amx}) from {} in {:.0} ms",
        spec.name,
        match source {
            Source::Embedded => "this binary".to_string(),
            Source::Dir(_) => source.model_dir(spec).display().to_string(),
        },
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(model)
}

/// `embedding-server models`
pub fn list_models() {
    println!(
        "{:<24} {:>5} {:>10} {:>12}  {:<10} {:<20}  sha256 of model.safetensors",
        "MODEL", "DIMS", "MAX TOKENS", "EMBEDDED", "ARCH", "POOLING"
    );
    // A model with no public copy (a `local-only` test fixture) is listed only by a build that embeds it:
    // no other build can fetch it, so listing it would only offer a model nobody can get.
    for spec in CATALOG.iter().filter(|s| s.embedded || s.hub.is_some()) {
        let size = if spec.embedded {
            format!("{} B", models::embedded_size(spec))
        } else {
            "no".to_string()
        };
        let weights = spec.pin("model.safetensors");
        let pooling = format!(
            "{}{}",
            spec.pooling,
            if spec.normalize { ", normalized" } else { "" }
        );
        println!(
            "{:<24} {:>5} {:>10} {:>12}  {:<10} {:<20}  {}",
            spec.name,
            spec.dims,
            spec.max_tokens,
            size,
            spec.architecture.model_type(),
            pooling,
            if weights.is_empty() {
                "(not pinned)"
            } else {
                weights
            }
        );
    }
}

/// `embedding-server export-models DIR`
pub fn export_models(dir: &std::path::Path, options: &Options) -> Result<(), String> {
    let wanted = options.list("model");
    let mut exported = 0;
    for spec in CATALOG.iter().filter(|s| s.embedded) {
        if !wanted.is_empty() && !wanted.contains(&spec.name) {
            continue;
        }
        for path in models::export(spec, &Source::Embedded, dir).map_err(|e| e.to_string())? {
            println!("{}", path.display());
        }
        if directory::sentence_transformers_files(spec).is_none() {
            eprintln!(
                "note: {} is written without sentence-transformers files: its layer norm between pooling and \
                 normalisation has no sentence-transformers module; --model-dir applies the catalog's recipe",
                spec.name
            );
        }
        exported += 1;
    }
    if exported == 0 {
        return Err("no embedded model matches --model".into());
    }
    Ok(())
}

/// `embedding-server embed [TEXT]...`: JSON lines (or raw f32) on stdout, one per text.
pub fn embed(texts: Vec<String>, options: &Options) -> Result<(), String> {
    let format = options.text("format").unwrap_or("json");
    if format != "json" && format != "f32" {
        return Err(format!("--format must be json or f32, not {format:?}"));
    }
    let model = load_models(&cli::models_config(options)?)?
        .into_iter()
        .next()
        .ok_or("no model loaded")?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut emit = |batch: &[String]| -> Result<(), String> {
        let inputs: Vec<Input> = batch.iter().map(|t| Input::Text(t.clone())).collect();
        let vectors = model.embed(&inputs).map_err(|e| e.to_string())?;
        for vector in vectors {
            if format == "f32" {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.write_all(&bytes).map_err(|e| e.to_string())?;
            } else {
                let line = serde_json::json!({"model": model.spec.name, "dims": vector.len(), "embedding": vector});
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    };
    if !texts.is_empty() {
        emit(&texts)?;
    } else {
        let stdin = std::io::stdin();
        let progress = std::io::stderr().is_terminal();
        let mut batch = Vec::new();
        let mut done = 0usize;
        for line in stdin.lock().lines() {
            batch.push(line.map_err(|e| format!("cannot read stdin: {e}"))?);
            if batch.len() == 64 {
                emit(&batch)?;
                done += batch.len();
                batch.clear();
                if progress {
                    eprint!("\rembedded {done} lines");
                }
            }
        }
        emit(&batch)?;
        if progress && done > 0 {
            eprintln!("\rembedded {} lines", done + batch.len());
        }
    }
    out.flush().map_err(|e| e.to_string())
}

/// How long `health` waits to connect and for the answer; a container runtime's own timeout is the backstop.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// `embedding-server health`: GET /health from the server at --host/--port over a plain TCP connection, so
/// that a container without curl or a shell can check the server with the binary itself.
pub fn health(options: &Options) -> Result<(), String> {
    let port: u16 = options.number("port")?;
    // The same environment that makes the server listen on every interface makes this probe ask the
    // loopback one, which reaches it.
    let host = match options.text("host").unwrap_or("127.0.0.1") {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other.trim_start_matches('[').trim_end_matches(']'),
    };
    let address = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, HEALTH_TIMEOUT)
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    stream
        .set_read_timeout(Some(HEALTH_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HEALTH_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send to {address}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("no answer from {address}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or("");
    match status_line.split(' ').nth(1) {
        Some("200") => {
            println!("healthy: {address} answered {status_line}");
            Ok(())
        }
        _ if status_line.is_empty() => {
            Err(format!("{address} closed the connection without an answer"))
        }
        _ => Err(format!("unhealthy: {address} answered {status_line}")),
    }
}
