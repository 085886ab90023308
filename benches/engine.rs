//! `cargo bench --bench engine [-- --passes N]`: the in-process speed and accuracy of the embedding engine on
//! the shared corpus, in every precision this CPU runs, side by side with what bounds it and what it
//! replaces, all measured in this one run:
//!
//! 1. the machine's GEMM rate at the model's shapes through the engine's own packed-weight products (per
//!    precision), and hence the f32 ceiling in tokens/s (the model's dense FLOPs per token at that rate);
//! 2. the stock `candle_transformers::models::bert::BertModel` on the same weights and batches (f32);
//! 3. this engine per precision: tokens/s on batches, share of the ceiling, ratio to the stock model;
//!    single-input latency (p50/p90; f32 also as a multiple of its FLOP ideal);
//! 4. per reduced precision: min and mean cosine to f32 over the shared reference cases and the corpus,
//!    and top-10 neighbour agreement with f32 (40 corpus lines as queries against 200 as documents);
//! 5. sentence-transformers (PyTorch) in-process when Python has it (`EMBEDDING_SERVER_ST_PYTHON`, else
//!    `python3`), else a line saying it was skipped;
//! 6. NomicBERT on random full-size weights (768 wide, 12 layers, generated here): 4 × 512 and 1 × 2,048
//!    tokens against candle-transformers' `nomic_bert`, its dense-layer FLOP rate against MiniLM's batch
//!    rate, and one 8,192-token input's time and peak RSS above idle (in a child process).
//!
//! Batches are the corpus sorted by length, 32 at a time, truncated at 256 tokens (47,860 tokens a pass).
//! Other processes share the cores, so compare the ratios, not the absolute figures, and re-run when in
//! doubt; each pass line shows the CPU share the run got. The HTTP figures come from `benches/http.sh`,
//! which calls this bench with `--http-baseline` for its in-process baselines.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use candle_transformers::models::nomic_bert;
use embedding_server::models::kernels::gemm::{self, Epilogue, Packed};
use embedding_server::models::kernels::{bf16_on_amx, pool, Precision};
use embedding_server::models::{catalog, Input, Model, ModelSpec, Source, TruncationDirection};

const MODEL: &str = "all-MiniLM-L6-v2";
const BATCH: usize = 32;

fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

struct Options {
    passes: usize,
    /// Only this engine's f32 passes and latency (for profiling): no stock model, no Python, no NomicBERT.
    engine_only: bool,
    skip_stock: bool,
    skip_python: bool,
    skip_nomic: bool,
    /// The in-process figures `benches/http.sh` compares its HTTP figures with, in this precision.
    http_baseline: Option<Precision>,
    /// Internal: the 8,192-token NomicBERT run, in a child process so that its RSS is its own.
    nomic_long: Option<PathBuf>,
    /// Only the single-thread product kernels per precision (for tuning them).
    kernels: bool,
}

fn options() -> Options {
    let mut options = Options {
        passes: 2,
        engine_only: false,
        skip_stock: false,
        skip_python: false,
        skip_nomic: false,
        http_baseline: None,
        nomic_long: None,
        kernels: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // `cargo bench` adds `--bench`; anything else unknown is ignored the same way.
        match arg.as_str() {
            "--passes" => {
                options.passes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--passes takes a number")
            }
            "--engine-only" => options.engine_only = true,
            "--skip-stock" => options.skip_stock = true,
            "--skip-python" => options.skip_python = true,
            "--skip-nomic" => options.skip_nomic = true,
            "--http-baseline" => {
                let name = args.next().unwrap_or_else(|| "f32".into());
                options.http_baseline = Some(Precision::parse(&name).expect("a precision"));
            }
            "--nomic-long" => options.nomic_long = args.next().map(PathBuf::from),
            "--kernels" => options.kernels = true,
            _ => {}
        }
    }
    options.passes = options.passes.max(1);
    options
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

/// The corpus as the benchmark uses it.
struct Corpus<'a> {
    lines: Vec<&'a str>,
    /// Token ids of each line, in corpus order.
    ids: Vec<Vec<u32>>,
    /// Batches of 32 of the length-sorted lines.
    batches: Vec<Vec<&'a [u32]>>,
    tokens: usize,
}

fn main() {
    let options = options();
    if let Some(dir) = &options.nomic_long {
        nomic_long_child(dir);
        return;
    }
    if options.kernels {
        kernels();
        return;
    }
    let cores = pool::global().threads();
    let spec = catalog::find(MODEL).expect("the catalog lists all-MiniLM-L6-v2");
    let started = Instant::now();
    let f32_model = Model::load(spec, &Source::Embedded).expect("the embedded model loads");
    println!(
        "embedding-server engine benchmark: {MODEL} (embedded), {cores} threads, loaded in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    if Precision::Bf16.check_cpu().is_ok() {
        let on = if bf16_on_amx() {
            "AMX tiles (tdpbf16ps), as does int8's qkv projection"
        } else {
            "AVX512_BF16 (vdpbf16ps); int8's qkv projection in f32"
        };
        println!("bf16 products run on {on}");
    }
    let mut precisions = vec![Precision::F32];
    for precision in [Precision::Bf16, Precision::Int8] {
        match precision.check_cpu() {
            Ok(()) if !options.engine_only => precisions.push(precision),
            Ok(()) => {}
            Err(e) => println!("{precision}: not measured: {e}"),
        }
    }
    if let Some(p) = options.http_baseline {
        precisions = vec![p];
    }
    let models: Vec<(Precision, Model)> = precisions
        .iter()
        .map(|&p| {
            let model = if p == Precision::F32 {
                Model::load(spec, &Source::Embedded)
            } else {
                Model::load_in(spec, &Source::Embedded, p)
            };
            (p, model.expect("the embedded model loads"))
        })
        .collect();

    let corpus_path = shared_dir().join("bench/corpus.txt");
    let text = std::fs::read_to_string(&corpus_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the shared bench kit must sit beside the repository",
            corpus_path.display()
        )
    });
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let ids: Vec<Vec<u32>> = lines
        .iter()
        .map(|line| {
            f32_model
                .tokenize(
                    &Input::Text(line.to_string()),
                    "",
                    TruncationDirection::Right,
                )
                .expect("corpus lines tokenise")
                .ids
        })
        .collect();
    let mut sorted: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    sorted.sort_by_key(|s| s.len());
    let corpus = Corpus {
        tokens: ids.iter().map(Vec::len).sum(),
        batches: sorted.chunks(BATCH).map(<[&[u32]]>::to_vec).collect(),
        lines,
        ids: ids.clone(),
    };
    println!(
        "corpus: {} lines, {} tokens after truncation at {} (batch {BATCH}, length-sorted, {} batches)",
        corpus.lines.len(),
        corpus.tokens,
        f32_model.max_tokens(),
        corpus.batches.len()
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

    if let Some(precision) = options.http_baseline {
        http_baseline(&models[0].1, precision, &corpus);
        return;
    }
    let batch_rates = batches(&options, spec, &models, &corpus, &shapes, cores);
    single_inputs(&models, &corpus, &shapes, &batch_rates);
    if options.engine_only {
        return;
    }
    accuracy(&models, &corpus);
    println!();
    if options.skip_python {
        println!("sentence-transformers: skipped (--skip-python)");
    } else {
        sentence_transformers(spec, &corpus, &batch_rates);
    }
    if options.skip_nomic {
        println!("NomicBERT: skipped (--skip-nomic)");
    } else {
        nomic(&options, &batch_rates, shapes.flops_per_token());
    }
}

/// The rates the batch passes measured, for the later sections' ratios.
struct BatchRates {
    /// f32 GEMM rate (FLOP/s) by wall clock and by CPU time.
    gemm_wall: f64,
    gemm_cpu: f64,
    /// tokens/s on batches per precision, by wall clock and by CPU time.
    engine: Vec<(Precision, f64, f64)>,
    stock_wall: Option<f64>,
    lines_per_token: f64,
}

/// Sections 1–3: GEMM probes, the stock model and the engine on the corpus batches, passes interleaved
/// so that all see the same machine; the best pass of each, by wall clock and by CPU time.
fn batches(
    options: &Options,
    spec: &ModelSpec,
    models: &[(Precision, Model)],
    corpus: &Corpus,
    shapes: &Shapes,
    cores: usize,
) -> BatchRates {
    let stock_model = (!options.skip_stock && !options.engine_only).then(|| {
        let weights = Source::Embedded
            .read(spec, "model.safetensors")
            .expect("weights");
        let config_json = Source::Embedded
            .read(spec, "config.json")
            .expect("config.json");
        let stock_config: BertConfig = serde_json::from_slice(&config_json).expect("BERT config");
        let vb =
            VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).expect("vb");
        BertModel::load(vb, &stock_config).expect("stock BERT loads")
    });
    let rows = corpus.tokens / corpus.batches.len();
    // Warm up (thread pools, page faults, allocator) on one batch of each length class.
    for batch in [
        &corpus.batches[0],
        &corpus.batches[corpus.batches.len() / 2],
        &corpus.batches[corpus.batches.len() - 1],
    ] {
        if let Some(stock) = &stock_model {
            stock_encode(stock, batch);
        }
        for (_, model) in models {
            model.encode(batch).expect("engine");
        }
    }
    println!();
    let mut gemm: Vec<Rates> = models.iter().map(|_| Rates::default()).collect();
    let mut engine: Vec<Rates> = models.iter().map(|_| Rates::default()).collect();
    let mut stock = Rates::default();
    let mut worst_difference = 0f32;
    for pass in 1..=options.passes {
        let mut line = format!("  pass {pass}:");
        for (i, (precision, _)) in models.iter().enumerate() {
            let probe = probe_gemm(shapes, rows, *precision);
            gemm[i].add(probe, cores);
            line += &format!(
                " GEMM {precision} {:.0} GFLOPS (CPU share {:.2});",
                probe.work / probe.wall / 1e9,
                probe.share(cores)
            );
        }
        let mut stock_vectors = Vec::new();
        if let Some(stock_model) = &stock_model {
            let (vectors, t) = timed(|| {
                corpus
                    .batches
                    .iter()
                    .flat_map(|b| stock_encode(stock_model, b))
                    .collect::<Vec<_>>()
            });
            stock.add(t.with_work(corpus.tokens as f64), cores);
            stock_vectors = vectors;
            line += &format!(" stock {:.2} s ({:.2});", t.wall, t.share(cores));
        }
        for (i, (precision, model)) in models.iter().enumerate() {
            let (vectors, t) = timed(|| {
                corpus
                    .batches
                    .iter()
                    .flat_map(|b| model.encode(b).expect("engine"))
                    .collect::<Vec<_>>()
            });
            engine[i].add(t.with_work(corpus.tokens as f64), cores);
            line += &format!(" {precision} {:.2} s ({:.2});", t.wall, t.share(cores));
            if *precision == Precision::F32 {
                for (a, b) in stock_vectors.iter().zip(&vectors) {
                    let (a, b) = (normalised(a), normalised(b));
                    for (x, y) in a.iter().zip(&b) {
                        worst_difference = worst_difference.max((x - y).abs());
                    }
                }
            }
        }
        println!("{line}");
    }
    let flops_per_token = shapes.flops_per_token();
    let lines_per_token = corpus.lines.len() as f64 / corpus.tokens as f64;
    for (title, pick) in [
        ("by wall clock (best pass)", Rates::wall as fn(&Rates) -> f64),
        (
            "by CPU time (best pass; work / CPU seconds × threads: what the cores would give if the run had them to itself)",
            Rates::cpu,
        ),
    ] {
        let ceiling = pick(&gemm[0]) / flops_per_token;
        println!();
        println!("{title}:");
        for (i, (precision, _)) in models.iter().enumerate() {
            println!(
                "{:<46} {:>9.1} GFLOPS{}",
                format!("{precision} GEMM rate (model shapes, packed weights)"),
                pick(&gemm[i]) / 1e9,
                if i == 0 {
                    format!(
                        "  ({:.2} MFLOP/token of dense layers → f32 ceiling {:.0} tokens/s)",
                        flops_per_token / 1e6,
                        ceiling
                    )
                } else {
                    format!("  ({:.2}× f32)", pick(&gemm[i]) / pick(&gemm[0]))
                }
            );
        }
        let stock_rate = pick(&stock);
        if stock_model.is_some() {
            println!(
                "{:<46} {:>9.0} tokens/s  {:>7.1} sentences/s  {:>5.2} of ceiling",
                "stock candle-transformers BertModel (f32)",
                stock_rate,
                stock_rate * lines_per_token,
                stock_rate / ceiling
            );
        }
        for (i, (precision, _)) in models.iter().enumerate() {
            let rate = pick(&engine[i]);
            let mut line = format!(
                "{:<46} {:>9.0} tokens/s  {:>7.1} sentences/s  {:>5.2} of ceiling",
                format!("this engine, {precision} (Model::encode)"),
                rate,
                rate * lines_per_token,
                rate / ceiling
            );
            if stock_model.is_some() {
                line += &format!("  {:.2}× stock", rate / stock_rate);
            }
            if i > 0 {
                line += &format!("  {:.2}× f32", rate / pick(&engine[0]));
            }
            println!("{line}");
        }
    }
    if stock_model.is_some() {
        println!(
            "  ({} passes; f32 engine vs stock, normalised embeddings: max |Δ| {:.1e})",
            options.passes, worst_difference
        );
    }
    BatchRates {
        gemm_wall: gemm[0].wall,
        gemm_cpu: gemm[0].cpu,
        engine: models
            .iter()
            .zip(&engine)
            .map(|((p, _), r)| (*p, r.wall, r.cpu))
            .collect(),
        stock_wall: stock_model.is_some().then_some(stock.wall),
        lines_per_token,
    }
}

/// Section 3: single-input latency per precision: the median-length line (32 tokens) and the longest
/// (256), encode only; f32's median also against its FLOP ideal at the measured GEMM rate.
fn single_inputs(
    models: &[(Precision, Model)],
    corpus: &Corpus,
    shapes: &Shapes,
    rates: &BatchRates,
) {
    let mut by_length: Vec<&[u32]> = corpus.ids.iter().map(Vec::as_slice).collect();
    by_length.sort_by_key(|s| s.len());
    let median = by_length[by_length.len() / 2];
    let longest = by_length[by_length.len() - 1];
    println!();
    let mut f32_p50 = 0.0;
    for (precision, model) in models {
        for (label, ids) in [("median", median), ("longest", longest)] {
            let (p50, p90) = latency(|| {
                model.encode(&[ids]).expect("engine");
            });
            let mut line = format!(
                "{:<46} p50 {:>7.2} ms  p90 {:>7.2} ms",
                format!("single input, {label} ({} tokens), {precision}", ids.len()),
                p50,
                p90
            );
            if label == "median" {
                if *precision == Precision::F32 {
                    f32_p50 = p50;
                    let flops = ids.len() as f64 * shapes.flops_per_token();
                    line += &format!(
                        "  FLOP ideal {:.2} ms (wall GEMM rate) → {:.2}×; {:.2} ms (CPU-time rate) → {:.2}×",
                        flops / rates.gemm_wall * 1e3,
                        p50 / (flops / rates.gemm_wall * 1e3),
                        flops / rates.gemm_cpu * 1e3,
                        p50 / (flops / rates.gemm_cpu * 1e3),
                    );
                } else {
                    line += &format!("  {:.2}× f32's p50", p50 / f32_p50);
                }
            }
            println!("{line}");
        }
    }
}

/// Section 4: per reduced precision, cosine to f32 over the shared reference cases and the corpus, and
/// top-10 neighbour agreement with f32 (40 corpus lines as queries, the next 200 as documents).
fn accuracy(models: &[(Precision, Model)], corpus: &Corpus) {
    if models.len() < 2 {
        return;
    }
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared_dir().join("reference/all-MiniLM-L6-v2.json"))
            .expect("the shared reference"),
    )
    .expect("reference JSON");
    let reference_ids: Vec<Vec<u32>> = reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            c["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|v| v.as_u64().expect("an id") as u32)
                .collect()
        })
        .collect();
    let embed = |model: &Model, ids: &[Vec<u32>]| -> Vec<Vec<f32>> {
        ids.chunks(BATCH)
            .flat_map(|chunk| {
                let batch: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                model.encode(&batch).expect("engine")
            })
            .map(|pooled| model.finish(pooled, model.dims()))
            .collect()
    };
    let exact_reference = embed(&models[0].1, &reference_ids);
    let exact_corpus = embed(&models[0].1, &corpus.ids);
    println!();
    println!(
        "accuracy against f32 ({} reference cases, {} corpus lines; top-10 of 200 documents for 40 queries):",
        reference_ids.len(),
        corpus.ids.len()
    );
    for (precision, model) in &models[1..] {
        let on_reference = embed(model, &reference_ids);
        let on_corpus = embed(model, &corpus.ids);
        let stats = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            let cosines: Vec<f64> = a.iter().zip(b).map(|(x, y)| cosine(x, y)).collect();
            let min = cosines.iter().cloned().fold(1.0, f64::min);
            (min, cosines.iter().sum::<f64>() / cosines.len() as f64)
        };
        let (ref_min, ref_mean) = stats(&on_reference, &exact_reference);
        let (corpus_min, corpus_mean) = stats(&on_corpus, &exact_corpus);
        let agreement = top10_agreement(&exact_corpus, &on_corpus);
        println!(
            "{:<8} cosine to f32: reference min {ref_min:.6} mean {ref_mean:.6}; corpus min {corpus_min:.6} mean {corpus_mean:.6}; top-10 agreement {agreement:.3}",
            precision.name()
        );
    }
}

/// The mean share of f32's top-10 documents that `other`'s top 10 also holds, lines 0..40 as queries and
/// 40..240 as documents (normalised vectors: the dot product is the cosine).
fn top10_agreement(exact: &[Vec<f32>], other: &[Vec<f32>]) -> f64 {
    let top10 = |vectors: &[Vec<f32>], q: usize| -> HashSet<usize> {
        let mut scored: Vec<(f32, usize)> = (40..240)
            .map(|d| {
                let dot = vectors[q].iter().zip(&vectors[d]).map(|(a, b)| a * b).sum();
                (dot, d)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.iter().take(10).map(|&(_, d)| d).collect()
    };
    let total: usize = (0..40)
        .map(|q| top10(exact, q).intersection(&top10(other, q)).count())
        .sum();
    total as f64 / 400.0
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// `--http-baseline P`: the in-process figures `benches/http.sh` sets its HTTP figures against: single
/// inputs one at a time in corpus order, every line once per pass (what load.py sends at concurrency 1
/// with `--max-requests` set to the corpus' length, from whatever line its warm-up stopped at), whole
/// passes for at least 5 s; and batches of 32.
fn http_baseline(model: &Model, precision: Precision, corpus: &Corpus) {
    for ids in corpus.ids.iter().take(50) {
        model.encode(&[ids]).expect("engine");
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.is_empty() || started.elapsed() < Duration::from_secs(5) {
        for ids in &corpus.ids {
            let t = Instant::now();
            model.encode(&[ids]).expect("engine");
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let mut best = f64::MAX;
    for _ in 0..2 {
        let started = Instant::now();
        for chunk in corpus.ids.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            model.encode(&batch).expect("engine");
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!("in-process {precision} single input p50 ms: {p50:.3}");
    println!(
        "in-process {precision} batch 32 inputs/s: {:.1}",
        corpus.ids.len() as f64 / best
    );
}

/// Runs the dense layers of one transformer layer at the model's shapes on random weights the way the
/// engine runs a batch of many inputs (each thread of the engine's pool its share of the rows through
/// the packed-weight products of `precision`), for about a second; returns the FLOPs done and the time.
fn probe_gemm(shapes: &Shapes, rows: usize, precision: Precision) -> Timing {
    let (h, i) = (shapes.hidden, shapes.intermediate);
    let layers = [
        Packed::new(&random(3 * h * h, 1), h, 3 * h, precision),
        Packed::new(&random(h * h, 3), h, h, precision),
        Packed::new(&random(i * h, 5), h, i, precision),
        Packed::new(&random(h * i, 7), i, h, precision),
    ];
    let pool = pool::global();
    let threads = pool.threads();
    let share = rows.div_ceil(threads);
    let input = random(share * i, 9);
    let buffers: Vec<Mutex<(Vec<f32>, gemm::Scratch)>> = (0..threads)
        .map(|_| Mutex::new((vec![0f32; share * i.max(3 * h)], gemm::Scratch::default())))
        .collect();
    let flops = 2.0 * (share * threads * h * (4 * h + 2 * i)) as f64;
    let run = || {
        pool.run(threads, |team| {
            let mut guard = buffers[team.index()].lock().expect("probe buffers");
            let (output, scratch) = &mut *guard;
            for layer in &layers {
                let k = layer.inputs();
                let n = layer.outputs();
                let a = layer.prepare(&input, share, k, 0..k, scratch);
                layer.product(&a, 0..n, output, n, 0, Epilogue::Scale(1.0));
            }
        });
        flops
    };
    run();
    let mut work = 0.0;
    let (_, mut timing) = timed(|| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            work += run();
        }
    });
    timing.work = work;
    timing
}

/// `--kernels`: each precision's product on one thread at MiniLM's MLP shape (rows × 384 → 1536), the
/// activations' preparation timed apart, by this thread's CPU time (other processes do not count).
fn kernels() {
    let (k, n) = (384, 1536);
    let weight = random(n * k, 1);
    for rows in [32, 750] {
        let input = random(rows * k, 2);
        let mut out = vec![0f32; rows * n];
        for precision in Precision::ALL {
            if precision.check_cpu().is_err() {
                continue;
            }
            let packed = Packed::new(&weight, k, n, precision);
            let mut scratch = gemm::Scratch::default();
            let flops = 2.0 * (rows * k * n) as f64;
            let mut best_prepare = f64::MAX;
            let mut best_product = f64::MAX;
            for _ in 0..20 {
                let t = thread_cpu_seconds();
                let a = packed.prepare(&input, rows, k, 0..k, &mut scratch);
                let prepared = thread_cpu_seconds();
                packed.product(&a, 0..n, &mut out, n, 0, Epilogue::Scale(1.0));
                let done = thread_cpu_seconds();
                best_prepare = best_prepare.min(prepared - t);
                best_product = best_product.min(done - prepared);
            }
            println!(
                "{rows:>4} × {k} → {n}, {precision:<4}: product {:>6.1} GFLOPS, preparing the activations {:>5.1} % of it",
                flops / best_product / 1e9,
                best_prepare / best_product * 100.0
            );
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
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

/// The Python that has sentence-transformers: `EMBEDDING_SERVER_ST_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("EMBEDDING_SERVER_ST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Section 5: sentence-transformers on the same lines at batch 32 in a child Python, if it imports.
fn sentence_transformers(spec: &ModelSpec, corpus: &Corpus, rates: &BatchRates) {
    let label = "sentence-transformers (PyTorch, batch 32)";
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import sentence_transformers, torch"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!(
            "{label:<46} skipped: {python} cannot import sentence_transformers and torch \
             (set EMBEDDING_SERVER_ST_PYTHON to a Python that can)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("embedding-server-bench-{}", std::process::id()));
    if let Err(e) = embedding_server::models::export(spec, &Source::Embedded, &dir) {
        println!("{label:<46} skipped: cannot export the model files: {e}");
        return;
    }
    let corpus_file = dir.join("corpus.txt");
    std::fs::write(&corpus_file, corpus.lines.join("\n")).expect("write the corpus copy");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/st_baseline.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir.join(&spec.name))
        .arg(&corpus_file)
        .arg(spec.max_tokens.to_string())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let seconds = match &output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<f64>()
            .ok(),
        _ => None,
    };
    let Some(seconds) = seconds else {
        let stderr = output
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        println!("{label:<46} failed: {script:?} did not print a time: {stderr}");
        return;
    };
    let rate = corpus.tokens as f64 / seconds;
    let mut line = format!(
        "{label:<46} {:>9.0} tokens/s  {:>7.1} sentences/s (by wall clock)",
        rate,
        rate * rates.lines_per_token
    );
    for (precision, wall, _) in &rates.engine {
        line += &format!("; engine {precision} {:.2}×", wall / rate);
    }
    if let Some(stock) = rates.stock_wall {
        line += &format!("; stock candle {:.2}×", stock / rate);
    }
    println!("{line}");
}

/// nomic-embed-text-v1's shapes, for the random full-size weights.
const NOMIC_HIDDEN: usize = 768;
const NOMIC_LAYERS: usize = 12;
const NOMIC_INNER: usize = 3072;
const NOMIC_VOCAB: usize = 30528;

/// Writes a NomicBERT directory with random full-size weights (the fixture's config and tokenizer, the
/// real model's sizes) under the temporary directory; returns the `--model-dir` root.
fn write_random_nomic() -> PathBuf {
    let fixture = shared_dir().join("reference/nomic-tiny");
    let root = std::env::temp_dir().join(format!("embedding-server-nomic-{}", std::process::id()));
    let dir = root.join("nomic-embed-text-v1");
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("config.json")).expect("the nomic-tiny fixture"),
    )
    .expect("config JSON");
    config["n_embd"] = NOMIC_HIDDEN.into();
    config["n_head"] = 12.into();
    config["n_layer"] = NOMIC_LAYERS.into();
    config["n_inner"] = NOMIC_INNER.into();
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    std::fs::copy(fixture.join("tokenizer.json"), dir.join("tokenizer.json")).expect("tokenizer");
    let (h, i) = (NOMIC_HIDDEN, NOMIC_INNER);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![NOMIC_VOCAB, h],
            random(NOMIC_VOCAB * h, 11),
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, h],
            random(2 * h, 12),
        ),
        ("emb_ln.weight".into(), vec![h], vec![1.0; h]),
        ("emb_ln.bias".into(), vec![h], vec![0.0; h]),
    ];
    for l in 0..NOMIC_LAYERS {
        let p = format!("encoder.layers.{l}");
        let seed = 100 + 10 * l as u64;
        tensors.extend([
            (
                format!("{p}.attn.Wqkv.weight"),
                vec![3 * h, h],
                random(3 * h * h, seed),
            ),
            (
                format!("{p}.attn.out_proj.weight"),
                vec![h, h],
                random(h * h, seed + 1),
            ),
            (
                format!("{p}.mlp.fc11.weight"),
                vec![i, h],
                random(i * h, seed + 2),
            ),
            (
                format!("{p}.mlp.fc12.weight"),
                vec![i, h],
                random(i * h, seed + 3),
            ),
            (
                format!("{p}.mlp.fc2.weight"),
                vec![h, i],
                random(h * i, seed + 4),
            ),
            (format!("{p}.norm1.weight"), vec![h], vec![1.0; h]),
            (format!("{p}.norm1.bias"), vec![h], vec![0.0; h]),
            (format!("{p}.norm2.weight"), vec![h], vec![1.0; h]),
            (format!("{p}.norm2.bias"), vec![h], vec![0.0; h]),
        ]);
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, data)| {
            (
                name,
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("tensor view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("weights");
    root
}

fn nomic_model(root: &Path) -> Model {
    let spec = catalog::find("nomic-embed-text-v1").expect("the catalog lists nomic-embed-text-v1");
    Model::load(spec, &Source::Dir(root.to_path_buf())).expect("the random NomicBERT loads")
}

/// Dense FLOPs of NomicBERT per token: fused qkv, output projection, fc11 and fc12, fc2.
fn nomic_flops_per_token() -> f64 {
    let (h, i) = (NOMIC_HIDDEN, NOMIC_INNER);
    2.0 * (NOMIC_LAYERS * (4 * h * h + 3 * h * i)) as f64
}

/// Section 6: NomicBERT on random full-size weights against candle-transformers' `nomic_bert`.
fn nomic(options: &Options, rates: &BatchRates, minilm_flops_per_token: f64) {
    println!();
    let started = Instant::now();
    let root = write_random_nomic();
    let model = nomic_model(&root);
    let weights =
        std::fs::read(root.join("nomic-embed-text-v1/model.safetensors")).expect("weights");
    let config: nomic_bert::Config = serde_json::from_str(
        &std::fs::read_to_string(root.join("nomic-embed-text-v1/config.json")).expect("config"),
    )
    .expect("candle's nomic_bert reads the config");
    let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).expect("vb");
    let candle = nomic_bert::NomicBertModel::load(vb, &config).expect("candle's nomic_bert loads");
    println!(
        "NomicBERT, random full-size weights ({NOMIC_HIDDEN} wide, {NOMIC_LAYERS} layers, {:.1} GFLOP of dense layers per 1,000 tokens), generated and loaded in {:.1} s:",
        nomic_flops_per_token() * 1000.0 / 1e9,
        started.elapsed().as_secs_f64()
    );
    let (_, f32_wall, f32_cpu) = rates.engine[0];
    let minilm_wall = f32_wall * minilm_flops_per_token;
    let minilm_cpu = f32_cpu * minilm_flops_per_token;
    println!(
        "  MiniLM on batches of 32 (above, f32): {:.1} GFLOP/s of dense layers by wall clock, {:.1} by CPU time",
        minilm_wall / 1e9,
        minilm_cpu / 1e9
    );
    let cores = pool::global().threads();
    for (count, len) in [(4usize, 512usize), (1, 2048)] {
        let inputs: Vec<Vec<u32>> = (0..count)
            .map(|s| {
                let mut state = 7 + s as u64;
                (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (1000 + (state >> 33) % 29000) as u32
                    })
                    .collect()
            })
            .collect();
        let batch: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        model.encode(&batch).expect("engine");
        let run_candle = || {
            let ids: Vec<u32> = inputs.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(ids, (count, len), &Device::Cpu).expect("ids");
            let states = candle.forward(&ids, None, None).expect("candle nomic_bert");
            states
                .mean(1)
                .expect("pool")
                .to_vec2::<f32>()
                .expect("vectors")
        };
        let mut engine = Rates::default();
        let mut stock = Rates::default();
        let flops = nomic_flops_per_token() * (count * len) as f64;
        for _ in 0..options.passes {
            let (_, t) = timed(|| model.encode(&batch).expect("engine"));
            engine.add(t.with_work(flops), cores);
            let (_, t) = timed(run_candle);
            stock.add(t.with_work(flops), cores);
        }
        println!(
            "  {count} × {len} tokens: engine {:.1} GFLOP/s dense by wall clock ({:.2} of MiniLM's), {:.1} by CPU time ({:.2}); candle nomic_bert {:.1} GFLOP/s by wall clock → engine {:.2}× ({:.2}× by CPU time)",
            engine.wall / 1e9,
            engine.wall / minilm_wall,
            engine.cpu / 1e9,
            engine.cpu / minilm_cpu,
            stock.wall / 1e9,
            engine.wall / stock.wall,
            engine.cpu / stock.cpu,
        );
    }
    drop(model);
    drop(candle);
    let exe = std::env::current_exe().expect("this benchmark's path");
    let output = Command::new(exe).arg("--nomic-long").arg(&root).output();
    match output {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => println!(
            "  8,192 tokens: the child run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("  8,192 tokens: cannot start the child run: {e}"),
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0)
}

/// `--nomic-long DIR` (child): loads the random NomicBERT, then times one 8,192-token input and reports
/// the peak RSS it reached above the loaded model's idle RSS (the peak is reset after the load).
fn nomic_long_child(root: &Path) {
    let model = nomic_model(root);
    let ids: Vec<u32> = (0..8192u32).map(|i| 1000 + (i * 7919) % 29000).collect();
    // Back to the model's own footprint: the load's transient buffers returned, then the peak reset.
    // SAFETY: malloc_trim only returns free heap memory to the system.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let idle = status_bytes("VmRSS");
    let started = Instant::now();
    let (_, t) = timed(|| model.encode(&[&ids]).expect("engine"));
    let wall = started.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM");
    println!(
        "  1 × 8,192 tokens: {:.1} s ({:.1} GFLOP/s of dense layers; CPU share {:.2}); idle RSS {:.0} MiB, peak {:.0} MiB: {:.0} MiB above idle",
        wall,
        nomic_flops_per_token() * 8192.0 / wall / 1e9,
        t.share(pool::global().threads()),
        idle / 1048576.0,
        peak / 1048576.0,
        (peak - idle) / 1048576.0
    );
}
