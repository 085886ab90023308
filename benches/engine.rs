//! `cargo bench --bench engine [-- --passes N]`: the in-process speed of the embedding engine on the shared
//! corpus, side by side with what bounds it and what it replaces, all measured in this one run:
//!
//! 1. the machine's f32 GEMM rate at the model's shapes, through the engine's own dense-layer path, and
//!    hence the ceiling in tokens/s (the model's dense FLOPs per token at that rate);
//! 2. the stock `candle_transformers::models::bert::BertModel` on the same weights and batches;
//! 3. this engine: tokens/s, sentences/s, share of the ceiling, ratio to the stock model; single-input
//!    latency;
//! 4. sentence-transformers (PyTorch) when `python3` can import it, else a line saying it was skipped.
//!
//! Batches are the corpus sorted by length, 32 at a time, truncated at 256 tokens (47,860 tokens a pass).
//! Other processes share the cores, so compare the ratios, not the absolute figures, and re-run when in
//! doubt. The HTTP figures come from `benches/http.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use embedding_server::models::kernels::{Linear, Threads};
use embedding_server::models::{catalog, Input, Model, Source, TruncationDirection};

const MODEL: &str = "all-MiniLM-L6-v2";
const BATCH: usize = 32;

fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

struct Options {
    passes: usize,
    /// Only this engine's passes (for profiling): no probe, no stock model, no latency, no Python.
    engine_only: bool,
}

fn options() -> Options {
    let mut passes = 2;
    let mut engine_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // `cargo bench` adds `--bench`; anything else unknown is ignored the same way.
        if arg == "--passes" {
            passes = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--passes takes a number");
        } else if arg == "--engine-only" {
            engine_only = true;
        }
    }
    Options {
        passes: passes.max(1),
        engine_only,
    }
}

/// Model shapes read from the config, for the FLOP count and the GEMM probe.
struct Shapes {
    hidden: usize,
    intermediate: usize,
    layers: usize,
}

impl Shapes {
    /// Multiply-adds ×2 of the dense layers per token: QKV, attention output, MLP in and out.
    fn flops_per_token(&self) -> f64 {
        let per_layer = self.hidden * (3 * self.hidden + self.hidden + 2 * self.intermediate);
        2.0 * (per_layer * self.layers) as f64
    }
}

fn main() {
    let options = options();
    let cores = candle_core::utils::get_num_threads().max(1);
    let spec = catalog::find(MODEL).expect("the catalog lists all-MiniLM-L6-v2");
    let started = Instant::now();
    let model = Model::load(spec, &Source::Embedded).expect("the embedded model loads");
    println!(
        "embedding-server engine benchmark: {MODEL} (embedded), {cores} threads, loaded in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let corpus_path = shared_dir().join("bench/corpus.txt");
    let corpus = std::fs::read_to_string(&corpus_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the shared bench kit must sit beside the repository",
            corpus_path.display()
        )
    });
    let lines: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut sequences: Vec<Vec<u32>> = lines
        .iter()
        .map(|line| {
            model
                .tokenize(
                    &Input::Text(line.to_string()),
                    "",
                    TruncationDirection::Right,
                )
                .expect("corpus lines tokenise")
                .ids
        })
        .collect();
    sequences.sort_by_key(Vec::len);
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let batches: Vec<Vec<&[u32]>> = sequences
        .chunks(BATCH)
        .map(|chunk| chunk.iter().map(Vec::as_slice).collect())
        .collect();
    println!(
        "corpus: {} lines, {tokens} tokens after truncation at {} (batch {BATCH}, length-sorted, {} batches)",
        sequences.len(),
        model.max_tokens(),
        batches.len()
    );

    let config_json = Source::Embedded
        .read(spec, "config.json")
        .expect("config.json");
    let config: serde_json::Value = serde_json::from_slice(&config_json).expect("config JSON");
    let int = |key: &str| config[key].as_u64().expect("config integer") as usize;
    let shapes = Shapes {
        hidden: int("hidden_size"),
        intermediate: int("intermediate_size"),
        layers: int("num_hidden_layers"),
    };
    let flops_per_token = shapes.flops_per_token();

    if options.engine_only {
        for pass in 1..=options.passes {
            let ((), t) = timed(|| {
                for batch in &batches {
                    model.encode(batch).expect("engine");
                }
            });
            println!(
                "  pass {pass}: engine {:.2} s, {:.0} tokens/s by wall clock, {:.0} by CPU time (CPU share {:.2})",
                t.wall,
                tokens as f64 / t.wall,
                tokens as f64 / t.cpu * cores as f64,
                t.share(cores)
            );
        }
        return;
    }

    // 2 and 3: stock candle BERT and this engine, passes interleaved so that both see the same noise.
    let weights = Source::Embedded
        .read(spec, "model.safetensors")
        .expect("weights");
    let stock_config: BertConfig = serde_json::from_slice(&config_json).expect("BERT config");
    let vb = VarBuilder::from_slice_safetensors(&weights, DType::F32, &Device::Cpu).expect("vb");
    let stock_model = BertModel::load(vb, &stock_config).expect("stock BERT loads");

    // Warm both up (thread pools, page faults, allocator) on one batch of each length class.
    for batch in [
        &batches[0],
        &batches[batches.len() / 2],
        &batches[batches.len() - 1],
    ] {
        stock_encode(&stock_model, batch);
        model.encode(batch).expect("engine");
    }
    // Each pass probes the GEMM (1), then times the stock model (2) and this engine (3), so that all three
    // see the same machine; the best of each over the passes is reported, by wall clock and by CPU time.
    let rows = tokens / batches.len();
    println!();
    let mut gemm = Rates::default();
    let mut stock = Rates::default();
    let mut engine = Rates::default();
    let mut worst_difference = 0f32;
    for pass in 1..=options.passes {
        let probe = probe_gemm(&shapes, rows);
        gemm.add(probe, cores);
        let (stock_vectors, stock_pass) = timed(|| {
            batches
                .iter()
                .flat_map(|b| stock_encode(&stock_model, b))
                .collect::<Vec<_>>()
        });
        stock.add(stock_pass.with_work(tokens as f64), cores);
        let (engine_vectors, engine_pass) = timed(|| {
            batches
                .iter()
                .flat_map(|b| model.encode(b).expect("engine"))
                .collect::<Vec<_>>()
        });
        engine.add(engine_pass.with_work(tokens as f64), cores);
        println!(
            "  pass {pass}: GEMM {:.1} GFLOPS (CPU share {:.2}); stock candle {:.2} s (CPU share {:.2}); \
             engine {:.2} s (CPU share {:.2})",
            probe.work / probe.wall / 1e9,
            probe.share(cores),
            stock_pass.wall,
            stock_pass.share(cores),
            engine_pass.wall,
            engine_pass.share(cores),
        );
        for (a, b) in stock_vectors.iter().zip(&engine_vectors) {
            let (a, b) = (normalised(a), normalised(b));
            for (x, y) in a.iter().zip(&b) {
                worst_difference = worst_difference.max((x - y).abs());
            }
        }
    }
    let lines_per_token = sequences.len() as f64 / tokens as f64;
    for (title, pick) in [
        ("by wall clock (best pass)", Rates::wall as fn(&Rates) -> f64),
        (
            "by CPU time (best pass; work / CPU seconds × cores: the figure an idle machine would give)",
            Rates::cpu,
        ),
    ] {
        let ceiling = pick(&gemm) / flops_per_token;
        let (stock_rate, engine_rate) = (pick(&stock), pick(&engine));
        println!();
        println!("{title}:");
        println!(
            "{:<44} {:>9.1} GFLOPS  ({:.2} MFLOP/token of dense layers → ceiling {:.0} tokens/s)",
            "f32 GEMM rate (model shapes, engine path)",
            pick(&gemm) / 1e9,
            flops_per_token / 1e6,
            ceiling
        );
        println!(
            "{:<44} {:>9.0} tokens/s  {:>7.1} sentences/s  {:>5.2} of ceiling",
            "stock candle-transformers BertModel",
            stock_rate,
            stock_rate * lines_per_token,
            stock_rate / ceiling
        );
        println!(
            "{:<44} {:>9.0} tokens/s  {:>7.1} sentences/s  {:>5.2} of ceiling  {:.2}× stock",
            "this engine (in-process, Model::encode)",
            engine_rate,
            engine_rate * lines_per_token,
            engine_rate / ceiling,
            engine_rate / stock_rate
        );
    }
    println!(
        "  ({} passes; engine vs stock, normalised embeddings: max |Δ| {:.1e})",
        options.passes, worst_difference
    );
    let (stock_rate, engine_rate) = (stock.wall(), engine.wall());

    // Single-input latency, engine only: the median-length corpus line, and a full 256-token one.
    println!();
    let median = sequences[sequences.len() / 2].as_slice();
    let longest = sequences[sequences.len() - 1].as_slice();
    for (label, ids) in [("median", median), ("longest", longest)] {
        let (p50, p90) = latency(|| {
            model.encode(&[ids]).expect("engine");
        });
        println!(
            "{:<44} p50 {:>6.2} ms  p90 {:>6.2} ms",
            format!("single input, {label} ({} tokens), encode only", ids.len()),
            p50,
            p90
        );
    }
    let median_line = lines
        .iter()
        .find(|l| {
            model
                .tokenize(&Input::Text(l.to_string()), "", TruncationDirection::Right)
                .is_ok_and(|t| t.ids.len() == median.len())
        })
        .expect("a line of median length");
    let (p50, p90) = latency(|| {
        model
            .tokenize(
                &Input::Text(median_line.to_string()),
                "",
                TruncationDirection::Right,
            )
            .expect("tokenize");
    });
    println!(
        "{:<44} p50 {:>6.2} ms  p90 {:>6.2} ms",
        "single input, median, tokenise only", p50, p90
    );
    let (p50, p90) = latency(|| {
        model
            .embed(&[Input::Text(median_line.to_string())])
            .expect("embed");
    });
    println!(
        "{:<44} p50 {:>6.2} ms  p90 {:>6.2} ms",
        "single input, median, tokenise+encode+normalise", p50, p90
    );

    // 4. sentence-transformers, when present.
    println!();
    sentence_transformers(spec, tokens, &lines, stock_rate, engine_rate);
}

/// Runs the dense layers of one transformer layer at the model's shapes on random weights, the way the
/// engine does for a batch (each core its half of the rows, or every GEMM split across the cores; the
/// better of the two counts), for about two seconds; returns the FLOPs done and the time they took.
fn probe_gemm(shapes: &Shapes, rows: usize) -> Timing {
    let (h, i) = (shapes.hidden, shapes.intermediate);
    let random = |n: usize, seed: u64| -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let layers = [
        Linear::new(&random(3 * h * h, 1), random(3 * h, 2), h, 3 * h),
        Linear::new(&random(h * h, 3), random(h, 4), h, h),
        Linear::new(&random(i * h, 5), random(i, 6), h, i),
        Linear::new(&random(h * i, 7), random(h, 8), i, h),
    ];
    let cores = candle_core::utils::get_num_threads().max(1);
    let input = random(rows * i, 9);
    let widest = i.max(3 * h);
    let run = |rows: usize, output: &mut [f32], threads: Threads| {
        for layer in &layers {
            layer.forward(&input, output, rows, threads);
        }
    };
    let flops = |rows: usize| 2.0 * (rows * h * (4 * h + 2 * i)) as f64;
    let measure = |f: &mut dyn FnMut() -> f64| {
        f();
        let mut work = 0.0;
        let (_, mut timing) = timed(|| {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(1) {
                work += f();
            }
        });
        timing.work = work;
        timing
    };
    let share = rows.div_ceil(cores);
    let mut outputs = vec![vec![0f32; share * widest]; cores];
    let split_rows = measure(&mut || {
        std::thread::scope(|scope| {
            let (first, rest) = outputs.split_first_mut().expect("one core at least");
            for output in rest {
                scope.spawn(|| run(share, output, Threads::One));
            }
            run(share, first, Threads::One);
        });
        flops(share) * cores as f64
    });
    let mut output = vec![0f32; rows * widest];
    let split_gemm = measure(&mut || {
        run(rows, &mut output, Threads::Pool(cores));
        flops(rows)
    });
    if split_rows.work / split_rows.wall >= split_gemm.work / split_gemm.wall {
        split_rows
    } else {
        split_gemm
    }
}

/// The stock model on one batch: padded to its longest sequence, masked, mean-pooled over the mask.
fn stock_encode(model: &BertModel, batch: &[&[u32]]) -> Vec<Vec<f32>> {
    let seq = batch.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * seq);
    let mut mask = Vec::with_capacity(batch.len() * seq);
    for sequence in batch {
        ids.extend_from_slice(sequence);
        ids.resize(ids.len() + seq - sequence.len(), 0);
        mask.extend(std::iter::repeat_n(1u32, sequence.len()));
        mask.resize(mask.len() + seq - sequence.len(), 0);
    }
    let run = || -> candle_core::Result<Vec<Vec<f32>>> {
        let device = Device::Cpu;
        let ids = Tensor::from_vec(ids, (batch.len(), seq), &device)?;
        let mask = Tensor::from_vec(mask, (batch.len(), seq), &device)?;
        let states = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = states.broadcast_mul(&weights)?.sum(1)?;
        summed.broadcast_div(&weights.sum(1)?)?.to_vec2::<f32>()
    };
    run().expect("stock BERT forward")
}

/// Work done in a stretch of time, by the clock on the wall and by the CPU time this process got.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    work: f64,
    wall: f64,
    cpu: f64,
}

impl Timing {
    fn with_work(self, work: f64) -> Timing {
        Timing { work, ..self }
    }

    /// The part of the cores this process had; below 1.0 other processes took the rest.
    fn share(&self, cores: usize) -> f64 {
        self.cpu / (self.wall * cores as f64)
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Timing) {
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let result = f();
    let timing = Timing {
        work: 0.0,
        wall: started.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu,
    };
    (result, timing)
}

/// The best rates seen over the passes: work per wall second, and work per CPU second times the cores.
#[derive(Debug, Default)]
struct Rates {
    wall: f64,
    cpu: f64,
}

impl Rates {
    fn add(&mut self, t: Timing, cores: usize) {
        self.wall = self.wall.max(t.work / t.wall);
        if t.cpu > 0.0 {
            self.cpu = self.cpu.max(t.work / t.cpu * cores as f64);
        }
    }

    fn wall(&self) -> f64 {
        self.wall
    }

    fn cpu(&self) -> f64 {
        self.cpu
    }
}

/// CPU time of this process so far (all threads), from /proc; 0 where there is no /proc.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is the 3rd field, utime and stime the 14th/15th.
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ, the unit of these fields, is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// p50 and p90 in milliseconds of `f`, run for about a second after a short warm-up.
fn latency(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..5 {
        f();
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) || samples.len() < 20 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// Times sentence-transformers on the same lines at batch 32 in a child Python, if it can be imported.
fn sentence_transformers(
    spec: &'static embedding_server::models::ModelSpec,
    tokens: usize,
    lines: &[&str],
    stock_rate: f64,
    engine_rate: f64,
) {
    let label = "sentence-transformers (PyTorch, batch 32)";
    let probe = Command::new("python3")
        .args(["-c", "import sentence_transformers, torch"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("{label:<44} skipped: python3 cannot import sentence_transformers and torch");
        return;
    }
    let dir = std::env::temp_dir().join(format!("embedding-server-bench-{}", std::process::id()));
    if let Err(e) = embedding_server::models::export(spec, &Source::Embedded, &dir) {
        println!("{label:<44} skipped: cannot export the model files: {e}");
        return;
    }
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, lines.join("\n")).expect("write the corpus copy");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/sentence_transformers.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir.join(&spec.name))
        .arg(&corpus)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let seconds = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<f64>()
            .ok(),
        _ => None,
    };
    match seconds {
        Some(seconds) => {
            let rate = tokens as f64 / seconds;
            println!(
                "{label:<44} {:>9.0} tokens/s  {:>7.1} sentences/s  engine is {:.2}× this, stock candle {:.2}×",
                rate,
                lines.len() as f64 / seconds,
                engine_rate / rate,
                stock_rate / rate
            );
        }
        None => println!("{label:<44} failed: {script:?} did not print a time"),
    }
}
