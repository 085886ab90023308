//! `/metrics`: counters the server keeps and the Prometheus text format 0.0.4, written by hand. Keeps the
//! original's `encode_request_processing_seconds` summary and the `process_*` metrics of the Python client.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every metric family: name, type, help. Samples are written in this order.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "embedding_model_info",
        "gauge",
        "Always 1: each served model, labelled with the precision of its dense layers.",
    ),
    (
        "encode_request_processing_seconds",
        "summary",
        "Time spent processing embedding requests.",
    ),
    (
        "embedding_requests_total",
        "counter",
        "Embedding requests answered with 200, by model and API.",
    ),
    (
        "embedding_inputs_total",
        "counter",
        "Inputs embedded, by model.",
    ),
    (
        "embedding_tokens_total",
        "counter",
        "Tokens embedded after truncation, by model.",
    ),
    (
        "embedding_truncated_inputs_total",
        "counter",
        "Inputs cut to the model's maximum, by model.",
    ),
    (
        "embedding_rerank_requests_total",
        "counter",
        "Rerank requests answered with 200, by model and API.",
    ),
    (
        "embedding_rerank_pairs_total",
        "counter",
        "Query-document pairs scored, by model.",
    ),
    (
        "embedding_rerank_tokens_total",
        "counter",
        "Tokens of the pairs scored, after truncation, by model.",
    ),
    (
        "embedding_rerank_truncated_pairs_total",
        "counter",
        "Pairs cut to the model's maximum, by model.",
    ),
    (
        "embedding_tokenizer_requests_total",
        "counter",
        "Requests to /tokenize and /decode answered with 200, by model and endpoint.",
    ),
    (
        "embedding_tokenizer_tokens_total",
        "counter",
        "Tokens listed by /tokenize and ids decoded by /decode, by model and endpoint.",
    ),
    (
        "embedding_errors_total",
        "counter",
        "Requests answered with an error, by HTTP status.",
    ),
    (
        "embedding_panics_total",
        "counter",
        "Requests whose handling panicked (answered 500).",
    ),
    (
        "embedding_queue_depth",
        "gauge",
        "Inputs waiting for the engine, by model.",
    ),
    (
        "embedding_queue_seconds",
        "summary",
        "Time a request waited before its first input reached the engine.",
    ),
    (
        "embedding_batch_inputs",
        "summary",
        "Inputs per engine batch, by model.",
    ),
    (
        "embedding_batch_tokens",
        "summary",
        "Tokens per engine batch, by model.",
    ),
    (
        "embedding_open_connections",
        "gauge",
        "Client connections the front door holds open.",
    ),
    (
        "embedding_buffered_request_bytes",
        "gauge",
        "Request bytes the front door holds for clients (bounded by --max-buffered-bytes).",
    ),
    (
        "embedding_waiting_requests",
        "gauge",
        "Whole requests waiting in the front door for a free HTTP worker.",
    ),
    (
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    ),
    (
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    ),
    (
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    ),
    (
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ),
    (
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    ),
    (
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
    ),
];

/// The server's counters. Samples are keyed by (family, rendered labels).
pub struct Metrics {
    samples: Mutex<BTreeMap<(&'static str, String), f64>>,
    start_time: f64,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if inner.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", inner.join(","))
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let metrics = Metrics {
            samples: Mutex::new(BTreeMap::new()),
            start_time,
        };
        metrics.add("encode_request_processing_seconds_count", "", 0.0);
        metrics.add("encode_request_processing_seconds_sum", "", 0.0);
        metrics.add("embedding_panics_total", "", 0.0);
        metrics
    }

    fn add(&self, name: &'static str, labels: &str, value: f64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        *samples.entry((name, labels.to_string())).or_insert(0.0) += value;
    }

    fn set(&self, name: &'static str, labels: &str, value: f64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.insert((name, labels.to_string()), value);
    }

    /// A served model and the precision it was loaded with (`embedding_model_info`).
    pub fn record_model(&self, model: &str, precision: &str) {
        self.set(
            "embedding_model_info",
            &labels(&[("model", model), ("precision", precision)]),
            1.0,
        );
    }

    /// A successful embedding request.
    pub fn record_request(
        &self,
        model: &str,
        api: &str,
        inputs: usize,
        tokens: usize,
        truncated: usize,
    ) {
        self.add(
            "embedding_requests_total",
            &labels(&[("model", model), ("api", api)]),
            1.0,
        );
        let model = labels(&[("model", model)]);
        self.add("embedding_inputs_total", &model, inputs as f64);
        self.add("embedding_tokens_total", &model, tokens as f64);
        self.add("embedding_truncated_inputs_total", &model, truncated as f64);
    }

    /// A successful rerank request.
    pub fn record_rerank(
        &self,
        model: &str,
        api: &str,
        pairs: usize,
        tokens: usize,
        truncated: usize,
    ) {
        self.add(
            "embedding_rerank_requests_total",
            &labels(&[("model", model), ("api", api)]),
            1.0,
        );
        let model = labels(&[("model", model)]);
        self.add("embedding_rerank_pairs_total", &model, pairs as f64);
        self.add("embedding_rerank_tokens_total", &model, tokens as f64);
        self.add(
            "embedding_rerank_truncated_pairs_total",
            &model,
            truncated as f64,
        );
    }

    /// A successful `/tokenize` or `/decode` request.
    pub fn record_tokenizer(&self, model: &str, endpoint: &str, tokens: usize) {
        let labels = labels(&[("model", model), ("endpoint", endpoint)]);
        self.add("embedding_tokenizer_requests_total", &labels, 1.0);
        self.add("embedding_tokenizer_tokens_total", &labels, tokens as f64);
    }

    /// The time an embedding request took, whatever its outcome.
    pub fn record_processing(&self, elapsed: Duration) {
        self.add("encode_request_processing_seconds_count", "", 1.0);
        self.add(
            "encode_request_processing_seconds_sum",
            "",
            elapsed.as_secs_f64(),
        );
    }

    pub fn record_error(&self, status: u16) {
        self.add(
            "embedding_errors_total",
            &labels(&[("status", &status.to_string())]),
            1.0,
        );
    }

    pub fn record_panic(&self) {
        self.add("embedding_panics_total", "", 1.0);
    }

    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.set(
            "embedding_queue_depth",
            &labels(&[("model", model)]),
            depth as f64,
        );
    }

    pub fn record_queue_time(&self, model: &str, waited: Duration) {
        let model = labels(&[("model", model)]);
        self.add("embedding_queue_seconds_count", &model, 1.0);
        self.add("embedding_queue_seconds_sum", &model, waited.as_secs_f64());
    }

    pub fn record_batch(&self, model: &str, inputs: usize, tokens: usize) {
        let model = labels(&[("model", model)]);
        self.add("embedding_batch_inputs_count", &model, 1.0);
        self.add("embedding_batch_inputs_sum", &model, inputs as f64);
        self.add("embedding_batch_tokens_count", &model, 1.0);
        self.add("embedding_batch_tokens_sum", &model, tokens as f64);
    }

    /// The front door's state, refreshed by it several times a second.
    pub fn record_door(&self, open: usize, buffered: usize, waiting: usize) {
        self.set("embedding_open_connections", "", open as f64);
        self.set("embedding_buffered_request_bytes", "", buffered as f64);
        self.set("embedding_waiting_requests", "", waiting as f64);
    }

    /// The Prometheus text exposition of every sample, process metrics read fresh.
    pub fn render(&self) -> String {
        let process = process_samples(self.start_time);
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        for (family, kind, help) in FAMILIES {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            for ((name, labels), value) in &samples {
                let belongs = *name == *family
                    || name
                        .strip_prefix(family)
                        .is_some_and(|rest| rest == "_count" || rest == "_sum");
                if belongs {
                    let _ = writeln!(out, "{name}{labels} {}", number(*value));
                }
            }
            for (name, value) in &process {
                if name == family {
                    let _ = writeln!(out, "{name} {}", number(*value));
                }
            }
        }
        out
    }
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// The `process_*` samples, from /proc (Linux); absent elsewhere.
fn process_samples(start_time: f64) -> Vec<(&'static str, f64)> {
    let mut out = vec![("process_start_time_seconds", start_time)];
    // Both vary by platform (64 KiB pages on some arm64 kernels); the kernel says which applies, and a
    // sample is left out rather than guessed should it not.
    // SAFETY: sysconf only reads configuration values.
    let (page_size, ticks_per_second) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may contain spaces.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // utime and stime are fields 14 and 15 of stat(5): indices 11 and 12 here.
            if ticks_per_second > 0 {
                out.push((
                    "process_cpu_seconds_total",
                    (field(11) + field(12)) / ticks_per_second as f64,
                ));
            }
            out.push(("process_virtual_memory_bytes", field(20)));
            if page_size > 0 {
                out.push((
                    "process_resident_memory_bytes",
                    field(21) * page_size as f64,
                ));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.push(("process_open_fds", dir.count() as f64));
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
            if let Some(soft) = line
                .split_whitespace()
                .nth(3)
                .and_then(|v| v.parse::<f64>().ok())
            {
                out.push(("process_max_fds", soft));
            }
        }
    }
    out
}
