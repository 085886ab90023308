//! The command line: subcommands and flags, each flag documented once in [`FLAGS`], readable from its
//! environment variable, and shown by `--help`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::models::kernels::pool;
use crate::models::{Pooling, Precision};
use crate::server::{AuthConfig, DoorConfig, Limits, ProbeConfig, ServeConfig};

/// One flag: its name, the environment variable that stands in for it, its default and its help line.
pub struct Flag {
    pub name: &'static str,
    /// `None` for a switch that takes no value.
    pub value: Option<&'static str>,
    pub default: &'static str,
    pub help: &'static str,
    /// Whether it may be given more than once.
    pub repeats: bool,
}

impl Flag {
    pub fn env(&self) -> String {
        format!(
            "EMBEDDING_SERVER_{}",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }
}

const fn flag(
    name: &'static str,
    value: &'static str,
    default: &'static str,
    help: &'static str,
) -> Flag {
    Flag {
        name,
        value: Some(value),
        default,
        help,
        repeats: false,
    }
}

/// A flag that may be given more than once; its environment variable takes a comma-separated list.
const fn repeated(name: &'static str, value: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(value),
        default: "",
        help,
        repeats: true,
    }
}

/// A flag that takes no value.
const fn switch(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: None,
        default: "",
        help,
        repeats: false,
    }
}

/// Every flag of every subcommand.
pub const FLAGS: &[Flag] = &[
    flag("host", "ADDR", "127.0.0.1", "address to listen on (0.0.0.0 for every interface)"),
    flag("port", "PORT", "5000", "port to listen on; 0 picks a free one (the address is printed)"),
    flag("threads", "N", "16", "HTTP worker threads (requests handled at once; they wait on the batching queue); one more answers the self-probe"),
    repeated("model", "NAME", "serve this model (repeatable; env: comma-separated): DIR/NAME of --model-dir if there is one, else the embedded NAME; default: every model of --model-dir and every embedded one"),
    flag("model-dir", "DIR", "", "also serve the models in DIR/<model>/: sentence-transformers or transformers directories of BERT-family models, or what export-models writes"),
    flag("pooling", "MODE", "", "how a --model-dir model without modules.json (a plain transformers directory) pools: cls, mean, max or mean_sqrt_len_tokens"),
    flag("engine-threads", "N", "auto", "threads the engine computes on, spawned once at start (auto: the CPUs this process may use, from its affinity and cgroup quota); fewer are used if the system refuses some"),
    flag("precision", "P", "f32", "arithmetic of every model's dense layers: f32 (exact), bf16 (AVX512_BF16, on AMX tiles where present; cosine to f32 >= 0.9999) or int8 (AVX512_VNNI; cosine >= 0.998); whether they are faster depends on the CPU (README: Precision); start fails if the CPU lacks the instructions"),
    flag("max-body-bytes", "BYTES", "2097152", "largest request body; larger gets 413"),
    flag("max-inputs", "N", "2048", "most inputs in one request; more gets 400"),
    flag("max-documents", "N", "1000", "most documents in one rerank request (/v1/rerank, /rerank); more gets 400"),
    flag("max-request-tokens", "N", "300000", "most tokens in one request, summed after truncation (a rerank request: over its query-document pairs); more gets 400"),
    flag("max-batch-tokens", "N", "16384", "token budget of one batch the engine runs (the sum of its inputs' tokens; nothing is padded)"),
    flag("queue-capacity", "N", "16384", "most inputs waiting for the engine; a request that would exceed it gets 429"),
    flag("request-timeout", "SECONDS", "60", "a request still waiting for the engine after this long gets 503"),
    flag("body-timeout", "SECONDS", "10", "a request body still arriving after this long gets 408 (slow clients)"),
    flag("idle-timeout", "SECONDS", "15", "close a connection that sends nothing for this long (not while it waits for its answer)"),
    flag("header-timeout", "SECONDS", "10", "close a connection whose request head takes longer than this (slowloris)"),
    flag("max-connections", "N", "auto", "most open client connections; more get 503 and are closed (auto: the open-file limit, raised to its hard limit at start, less 64 + 2 x (threads + 1) for the server itself, at most 65536; printed at start)"),
    flag("max-buffered-bytes", "BYTES", "67108864", "most request bytes the front door holds for all clients together; past it, it stops reading from clients until requests move on (at least --max-body-bytes + 64 KiB)"),
    flag("probe-interval", "SECONDS", "5", "the server sends itself GET /health through its own socket this often (at least twice per systemd watchdog interval); WATCHDOG=1 follows each success"),
    flag("unhealthy-exit", "SECONDS", "30", "exit 1 when no self-probe has succeeded for this long, so that a supervisor restarts the server (0: never)"),
    flag("shutdown-timeout", "SECONDS", "30", "on SIGTERM/SIGINT, finish accepted requests for at most this long, then exit"),
    repeated("api-key", "KEY", "require Authorization: Bearer KEY on every route but /health (repeatable; env: comma-separated)"),
    repeated("api-key-file", "FILE", "read API keys from FILE, one per line (repeatable)"),
    switch("metrics-auth", "require the API key on /metrics too"),
    switch("no-truncate", "refuse (400) inputs longer than the model's maximum instead of truncating them"),
    flag("cors-allow-origin", "ORIGIN", "", "answer browsers from ORIGIN (e.g. https://app.example, or *): send Access-Control-Allow-Origin and answer OPTIONS preflights; off by default"),
    switch("no-ui", "do not serve the page at / (it then answers 404); the API is the same either way"),
    flag("format", "FORMAT", "json", "embed: output format, json (JSON lines) or f32 (raw little-endian floats)"),
];

pub const USAGE: &str = "\
embedding-server: sentence embeddings over HTTP, models compiled in

USAGE:
    embedding-server [serve] [FLAGS]            serve the HTTP API (the default)
    embedding-server models                     list the models of the catalog
    embedding-server export-models DIR [--model NAME]...
                                                write the embedded models to DIR/<model>/ as sentence-transformers
                                                directories, the model files verified
    embedding-server embed [--model NAME] [--model-dir DIR] [TEXT]...
                                                print the embeddings of TEXTs (or of stdin lines) as JSON lines
    embedding-server health [--host H] [--port P]
                                                GET /health of a running server; exit 0 if it answers 200, else 1
    embedding-server --help | --version
";

pub fn help() -> String {
    let mut text = format!(
        "{USAGE}\nFLAGS (each also read from the environment variable shown; the flag wins):\n"
    );
    for flag in FLAGS {
        let name = match flag.value {
            Some(value) => format!("--{} {value}", flag.name),
            None => format!("--{}", flag.name),
        };
        let default = if flag.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", flag.default)
        };
        text.push_str(&format!(
            "    {name:<28} {}{default}\n    {:<28} env: {}\n",
            flag.help,
            "",
            flag.env()
        ));
    }
    text.push_str(&format!("    {:<28} print this help\n    {:<28} print the version and the embedded model revisions\n", "-h, --help", "-V, --version"));
    text
}

/// What the command line asks for.
pub enum Command {
    Serve(Options),
    Models,
    Export {
        dir: PathBuf,
        options: Options,
    },
    Embed {
        texts: Vec<String>,
        options: Options,
    },
    Health(Options),
    Help,
    Version,
}

/// The flags given, with the environment and the defaults filled in.
pub struct Options {
    values: HashMap<&'static str, Vec<String>>,
}

impl Options {
    fn resolve(given: HashMap<&'static str, Vec<String>>) -> Options {
        let mut values = HashMap::new();
        for flag in FLAGS {
            let value = match given.get(flag.name) {
                Some(v) => v.clone(),
                None => match std::env::var(flag.env()) {
                    Ok(env) if flag.repeats => env
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                    Ok(env) => vec![env],
                    Err(_) if flag.default.is_empty() => vec![],
                    Err(_) => vec![flag.default.to_string()],
                },
            };
            values.insert(flag.name, value);
        }
        Options { values }
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn list(&self, name: &str) -> &[String] {
        self.values.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn switch(&self, name: &str) -> bool {
        matches!(self.text(name), Some(v) if v != "0" && v != "false")
    }

    /// A numeric flag; the error names the flag and its environment variable.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        let raw = self.text(name).unwrap_or("");
        raw.parse().map_err(|_| {
            let env = FLAGS
                .iter()
                .find(|f| f.name == name)
                .map(Flag::env)
                .unwrap_or_default();
            format!("--{name} (or {env}) must be a number, not {raw:?}")
        })
    }

    /// A flag that is a number of seconds (fractions allowed).
    pub fn seconds(&self, name: &str) -> Result<Duration, String> {
        let value: f64 = self.number(name)?;
        Duration::try_from_secs_f64(value)
            .map_err(|_| format!("--{name} must be a non-negative number of seconds, not {value}"))
    }
}

/// Which models to load, from the flags shared by `serve` and `embed`.
pub struct ModelsConfig {
    /// `--model`: empty means every model of `dir` and every embedded one.
    pub names: Vec<String>,
    /// `--model-dir`.
    pub dir: Option<PathBuf>,
    /// `--pooling`: how a plain transformers directory pools.
    pub pooling: Option<Pooling>,
    /// `--precision`: the arithmetic of every model's dense layers, checked against this CPU.
    pub precision: Precision,
    /// `--engine-threads`: the engine pool's size (`auto` resolved to what the host grants).
    pub engine_threads: usize,
}

/// The typed `--model`, `--model-dir`, `--pooling`, `--precision` and `--engine-threads`.
pub fn models_config(options: &Options) -> Result<ModelsConfig, String> {
    let name = options.text("precision").unwrap_or("f32");
    let precision = Precision::parse(name)
        .map_err(|e| format!("--precision (or EMBEDDING_SERVER_PRECISION): {e}"))?;
    // Checked here, before any model is read: no silent fallback to another precision.
    precision
        .check_cpu()
        .map_err(|e| format!("--precision {name}: {e}"))?;
    let engine_threads = match options.text("engine-threads") {
        None | Some("auto") => pool::default_threads(),
        Some(_) => options.number::<usize>("engine-threads")?.max(1),
    };
    let pooling = options
        .text("pooling")
        .map(|mode| {
            Pooling::from_name(mode).ok_or_else(|| {
                format!(
                    "--pooling (or EMBEDDING_SERVER_POOLING) must be one of {}, not {mode:?}",
                    Pooling::ALL.map(Pooling::name).join(", ")
                )
            })
        })
        .transpose()?;
    Ok(ModelsConfig {
        names: options.list("model").to_vec(),
        dir: options.text("model-dir").map(PathBuf::from),
        pooling,
        precision,
        engine_threads,
    })
}

/// The typed configuration of `serve`, from the flags.
pub fn serve_config(options: &Options) -> Result<ServeConfig, String> {
    let max_connections = match options.text("max-connections") {
        None | Some("auto") => None,
        Some(_) => Some(options.number::<usize>("max-connections")?.max(1)),
    };
    Ok(ServeConfig {
        host: options.text("host").unwrap_or("127.0.0.1").to_string(),
        port: options.number("port")?,
        threads: options.number::<usize>("threads")?.max(1),
        limits: Limits {
            max_body_bytes: options.number("max-body-bytes")?,
            max_inputs: options.number("max-inputs")?,
            max_documents: options.number("max-documents")?,
            max_request_tokens: options.number("max-request-tokens")?,
            truncate: !options.switch("no-truncate"),
            request_timeout: options.seconds("request-timeout")?,
        },
        door: DoorConfig {
            max_connections,
            idle_timeout: options.seconds("idle-timeout")?,
            header_timeout: options.seconds("header-timeout")?,
            body_timeout: options.seconds("body-timeout")?,
            max_buffered_bytes: options.number("max-buffered-bytes")?,
        },
        max_batch_tokens: options.number("max-batch-tokens")?,
        queue_capacity: options.number("queue-capacity")?,
        shutdown_timeout: options.seconds("shutdown-timeout")?,
        auth: AuthConfig {
            keys: options.list("api-key").to_vec(),
            key_files: options.list("api-key-file").to_vec(),
            protect_metrics: options.switch("metrics-auth"),
        },
        cors_allow_origin: options.text("cors-allow-origin").map(String::from),
        probe: ProbeConfig {
            interval: options.seconds("probe-interval")?,
            unhealthy_exit: options.seconds("unhealthy-exit")?,
        },
        ui: !options.switch("no-ui"),
    })
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut subcommand: Option<String> = None;
    let mut positional: Vec<String> = Vec::new();
    let mut given: HashMap<&'static str, Vec<String>> = HashMap::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long(name) => {
                let flag = FLAGS
                    .iter()
                    .find(|f| f.name == name)
                    .ok_or_else(|| format!("unknown flag --{name}; see embedding-server --help"))?;
                let value = match flag.value {
                    Some(_) => parser
                        .value()
                        .map_err(|e| e.to_string())?
                        .string()
                        .map_err(|e| e.to_string())?,
                    None => "1".to_string(),
                };
                given.entry(flag.name).or_default().push(value);
            }
            Value(value) => {
                let value = value.string().map_err(|e| e.to_string())?;
                if subcommand.is_none() && positional.is_empty() {
                    subcommand = Some(value);
                } else {
                    positional.push(value);
                }
            }
            other => {
                return Err(format!(
                    "{}; see embedding-server --help",
                    other.unexpected()
                ))
            }
        }
    }
    let options = Options::resolve(given);
    match subcommand.as_deref() {
        None | Some("serve") if positional.is_empty() => Ok(Command::Serve(options)),
        Some("models") if positional.is_empty() => Ok(Command::Models),
        Some("export-models") => match positional.as_slice() {
            [dir] => Ok(Command::Export { dir: PathBuf::from(dir), options }),
            _ => Err("export-models takes one directory: embedding-server export-models DIR".into()),
        },
        Some("embed") => Ok(Command::Embed { texts: positional, options }),
        Some("health") if positional.is_empty() => Ok(Command::Health(options)),
        Some(other) if positional.is_empty() => {
            Err(format!("unknown subcommand {other:?}; the subcommands are serve, models, export-models, embed and health"))
        }
        _ => Err(format!("unexpected argument {:?}; see embedding-server --help", positional[0])),
    }
}
