//! Fast f32 CPU kernels shared by the encoder architectures: dense layers on packed token matrices (the
//! `gemm` crate, called directly so that bias and residual land in the output without extra tensors),
//! per-sequence multi-head attention without padding, and the row-wise operations (layer norm, softmax,
//! GELU in its erf and tanh forms) compiled for AVX-512 / AVX2 at run time, with a portable fallback.
//!
//! Everything works on plain row-major `f32` slices: a matrix of `rows × cols` is `rows` consecutive rows.

use gemm::Parallelism;

/// How a kernel may use the machine's cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// On the calling thread only (the caller runs several of these side by side).
    One,
    /// Split across this many threads of the global pool.
    Pool(usize),
}

impl Threads {
    fn gemm(self) -> Parallelism {
        match self {
            Threads::Pool(n) if n > 1 => Parallelism::Rayon(n),
            _ => Parallelism::None,
        }
    }
}

/// The activation of an MLP, as a model's config.json names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·Φ(x)` with the exact erf (transformers' "gelu").
    Gelu,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (transformers' "gelu_new" and "gelu_pytorch_tanh").
    GeluTanh,
}

/// A strided view of a matrix for the GEMM: element (i, j) is at `offset + i·row_stride + j·col_stride`.
#[derive(Debug, Clone, Copy)]
struct View {
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl View {
    fn row_major(offset: usize, rows: usize, cols: usize, row_stride: usize) -> View {
        View {
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    fn transposed(self) -> View {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside a buffer of `len` elements.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < len
    }
}

/// `dst = (accumulate ? dst : 0) + scale · lhs · rhs`, with bounds checked against the slices.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dst: &mut [f32],
    dst_view: View,
    accumulate: bool,
    lhs: &[f32],
    lhs_view: View,
    rhs: &[f32],
    rhs_view: View,
    scale: f32,
    threads: Threads,
) {
    let (m, k, n) = (lhs_view.rows, lhs_view.cols, rhs_view.cols);
    assert!(
        rhs_view.rows == k && dst_view.rows == m && dst_view.cols == n,
        "gemm shapes do not fit"
    );
    assert!(
        dst_view.fits(dst.len()) && lhs_view.fits(lhs.len()) && rhs_view.fits(rhs.len()),
        "gemm view outside its buffer"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[dst_view.offset + i * dst_view.row_stride + j * dst_view.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the views were checked to lie inside their slices, `dst` is borrowed mutably and so cannot
    // alias `lhs` or `rhs`, and the crate reads only the elements the views describe.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_view.offset),
            dst_view.col_stride as isize,
            dst_view.row_stride as isize,
            accumulate,
            lhs.as_ptr().add(lhs_view.offset),
            lhs_view.col_stride as isize,
            lhs_view.row_stride as isize,
            rhs.as_ptr().add(rhs_view.offset),
            rhs_view.col_stride as isize,
            rhs_view.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            threads.gemm(),
        )
    }
}

/// A dense layer `y = x · Wᵀ + b`, its weight laid out once at load as Wᵀ ([inputs, outputs], row-major),
/// the layout in which the GEMM streams the weight fastest for every row count the engines use.
pub struct Linear {
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Linear {
    /// `weight`: [outputs, inputs] row-major, as PyTorch stores it.
    pub fn new(weight: &[f32], bias: Vec<f32>, inputs: usize, outputs: usize) -> Linear {
        assert_eq!(weight.len(), inputs * outputs, "weight shape");
        assert_eq!(bias.len(), outputs, "bias shape");
        let mut weight_t = vec![0f32; inputs * outputs];
        for (o, row) in weight.chunks_exact(inputs).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                weight_t[i * outputs + o] = w;
            }
        }
        Linear {
            weight_t,
            bias,
            inputs,
            outputs,
        }
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `out = x · Wᵀ + b` for the `rows` rows of `x`.
    pub fn forward(&self, x: &[f32], out: &mut [f32], rows: usize, threads: Threads) {
        for row in out[..rows * self.outputs].chunks_exact_mut(self.outputs) {
            row.copy_from_slice(&self.bias);
        }
        self.accumulate(x, out, rows, threads);
    }

    /// `out = act(x · Wᵀ + b)`, the bias added in the activation's own pass over `out`.
    pub fn forward_activation(
        &self,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        activation: Activation,
        threads: Threads,
    ) {
        self.product(x, out, rows, false, threads);
        let out = &mut out[..rows * self.outputs];
        match activation {
            Activation::Gelu => bias_gelu_rows(out, &self.bias),
            Activation::GeluTanh => bias_gelu_tanh_rows(out, &self.bias),
        }
    }

    /// `out += x · Wᵀ + b`: the residual connection folded into the layer's output.
    pub fn forward_residual(&self, x: &[f32], out: &mut [f32], rows: usize, threads: Threads) {
        for row in out[..rows * self.outputs].chunks_exact_mut(self.outputs) {
            add_assign(row, &self.bias);
        }
        self.accumulate(x, out, rows, threads);
    }

    fn accumulate(&self, x: &[f32], out: &mut [f32], rows: usize, threads: Threads) {
        self.product(x, out, rows, true, threads);
    }

    /// `out = (accumulate ? out : 0) + x · Wᵀ`
    fn product(&self, x: &[f32], out: &mut [f32], rows: usize, accumulate: bool, threads: Threads) {
        gemm(
            out,
            View::row_major(0, rows, self.outputs, self.outputs),
            accumulate,
            x,
            View::row_major(0, rows, self.inputs, self.inputs),
            &self.weight_t,
            View::row_major(0, self.inputs, self.outputs, self.outputs),
            1.0,
            threads,
        );
    }
}

/// The shape of multi-head self-attention over rows laid out as `[q | k | v]`, each `hidden` wide with
/// the heads side by side (what a fused QKV projection produces).
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub hidden: usize,
    pub heads: usize,
}

/// The most attention scores one block of queries may hold (4 MiB): a long sequence is processed in
/// blocks of query rows, so that its memory grows linearly with its length, not quadratically.
pub const MAX_SCORES: usize = 1 << 20;

impl Attention {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The scratch `forward` needs for a sequence of `len` tokens.
    pub fn scores_len(len: usize) -> usize {
        Self::block_rows(len, MAX_SCORES) * len
    }

    fn block_rows(len: usize, max_scores: usize) -> usize {
        (max_scores / len.max(1)).clamp(1, len.max(1))
    }

    /// Attention of one unpadded sequence: `qkv` holds its `len` rows of `3·hidden`; the per-head
    /// contexts go to `context` ([len, hidden]). `scores` is scratch of at least `scores_len(len)`.
    /// Rotary models rotate q and k inside `qkv` before calling.
    pub fn forward(
        &self,
        qkv: &[f32],
        len: usize,
        context: &mut [f32],
        scores: &mut [f32],
        threads: Threads,
    ) {
        self.forward_in_blocks(qkv, len, context, scores, threads, MAX_SCORES);
    }

    fn forward_in_blocks(
        &self,
        qkv: &[f32],
        len: usize,
        context: &mut [f32],
        scores: &mut [f32],
        threads: Threads,
        max_scores: usize,
    ) {
        let (hidden, head_dim) = (self.hidden, self.head_dim());
        let stride = 3 * hidden;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let block = Self::block_rows(len, max_scores);
        // Splitting a short sequence's small products across threads costs more than it saves.
        let threads = if len < 128 { Threads::One } else { threads };
        for head in 0..self.heads {
            let k = View::row_major(hidden + head * head_dim, len, head_dim, stride);
            let v = View::row_major(2 * hidden + head * head_dim, len, head_dim, stride);
            for first in (0..len).step_by(block) {
                let rows = block.min(len - first);
                let scores = &mut scores[..rows * len];
                let q = View::row_major(first * stride + head * head_dim, rows, head_dim, stride);
                gemm(
                    scores,
                    View::row_major(0, rows, len, len),
                    false,
                    qkv,
                    q,
                    qkv,
                    k.transposed(),
                    scale,
                    threads,
                );
                softmax_rows(scores, len);
                gemm(
                    context,
                    View::row_major(first * hidden + head * head_dim, rows, head_dim, hidden),
                    false,
                    scores,
                    View::row_major(0, rows, len, len),
                    qkv,
                    v,
                    1.0,
                    threads,
                );
            }
        }
    }
}

/// A layer norm's affine parameters.
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    /// Normalises every row of `xs` (rows as wide as the weight) in place.
    pub fn forward(&self, xs: &mut [f32]) {
        layer_norm_rows(xs, &self.weight, &self.bias, self.eps);
    }
}

/// Compiles `$body` three times: for AVX-512, for AVX2+FMA and portable; picks one at run time. The bodies
/// are written as plain loops over fixed-width lanes so that LLVM vectorises them for each target.
macro_rules! vectorised {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

const LANES: usize = 16;

/// The sum of `xs`, accumulated in independent lanes so that it vectorises.
#[inline(always)]
fn lane_sum(xs: &[f32], mut f: impl FnMut(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x);
        }
    }
    tail.iter().map(|&x| f(x)).sum::<f32>() + lanes.iter().sum::<f32>()
}

#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    tail.iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// e^x in f32 with a relative error of about 1e-7 over the whole range, branch-free so that it vectorises:
/// x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to degree 7, 2^n built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer kept in the low bits.
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact for |n| < 2^9
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let exponent = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    p * f32::from_bits(exponent << 23)
}

/// erf(x) in f32, absolute error about 2e-7, branch-free: the Maclaurin series to x¹³ below |x| = 0.5 (where
/// the formula below would lose digits to cancellation), Abramowitz & Stegun 7.1.26 (a rational term times
/// e^-x², error ≤ 1.5e-7) above.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    // 2/√π · (-1)ⁿ / (n! (2n+1))
    const S: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -8.548_327e-4,
        1.205_533_e-4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let far = (1.0 - poly * exp(-a * a)).copysign(x);
    let z = x * x;
    let near =
        x * (S[0] + z * (S[1] + z * (S[2] + z * (S[3] + z * (S[4] + z * (S[5] + z * S[6]))))));
    if a < 0.5 {
        near
    } else {
        far
    }
}

vectorised! {
    /// The exact (erf) GELU of BERT-family MLPs, `y·Φ(y)` with `y = x + bias`, for every row of `xs` (rows as wide as `bias`), in place.
    pub fn bias_gelu_rows(xs: &mut [f32], bias: &[f32]) {
        if bias.is_empty() {
            return;
        }
        for row in xs.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                let y = *x + *b;
                *x = 0.5 * y * (1.0 + erf(y * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

/// tanh(x) in f32 from [`exp`], branch-free: 1 − 2/(e^{2x} + 1), absolute error about 1e-7 (the form
/// saturates cleanly to ±1 where e^{2x} overflows or vanishes).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

vectorised! {
    /// The tanh approximation of GELU, `0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))` with `y = x + bias`,
    /// for every row of `xs` (rows as wide as `bias`), in place.
    pub fn bias_gelu_tanh_rows(xs: &mut [f32], bias: &[f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        if bias.is_empty() {
            return;
        }
        for row in xs.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                let y = *x + *b;
                *x = 0.5 * y * (1.0 + tanh(SQRT_2_OVER_PI * (y + 0.044_715 * y * y * y)));
            }
        }
    }
}

vectorised! {
    /// `xs += ys`, element by element.
    pub fn add_assign(xs: &mut [f32], ys: &[f32]) {
        for (x, y) in xs.iter_mut().zip(ys) {
            *x += *y;
        }
    }
}

vectorised! {
    /// Softmax of every row (`width` wide) of `xs`, in place.
    pub fn softmax_rows(xs: &mut [f32], width: usize) {
        if width == 0 {
            return;
        }
        for row in xs.chunks_exact_mut(width) {
            let max = lane_max(row);
            for x in row.iter_mut() {
                *x = exp(*x - max);
            }
            let inverse = 1.0 / lane_sum(row, |x| x);
            for x in row.iter_mut() {
                *x *= inverse;
            }
        }
    }
}

vectorised! {
    /// Layer norm of every row of `xs` (rows as wide as `weight`), in place, as PyTorch computes it: the
    /// biased variance, `eps` inside the square root.
    pub fn layer_norm_rows(xs: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        let width = weight.len();
        if width == 0 {
            return;
        }
        for row in xs.chunks_exact_mut(width) {
            let mean = lane_sum(row, |x| x) / width as f32;
            let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / width as f32;
            let inverse = 1.0 / (variance + eps).sqrt();
            for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
                *x = (*x - mean) * inverse * *w + *b;
            }
        }
    }
}

/// Splits work items of the given costs into at most `parts` groups of similar total cost (largest first,
/// each to the lightest group), keeping the items of a group in their original order.
pub fn balance(costs: &[f64], parts: usize) -> Vec<Vec<usize>> {
    let parts = parts.clamp(1, costs.len().max(1));
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]));
    let mut groups = vec![(0f64, Vec::new()); parts];
    for i in order {
        let lightest = groups
            .iter_mut()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .expect("at least one group");
        lightest.0 += costs[i];
        lightest.1.push(i);
    }
    groups
        .into_iter()
        .map(|(_, mut items)| {
            items.sort_unstable();
            items
        })
        .filter(|items| !items.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64: exact to ~1e-10 for |x| ≤ 4, where f32 erf is not yet ±1.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_and_gelu_use() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let exact = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - exact) / exact).abs());
            x += 0.00731;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0).min(1e-30), exp(-1000.0));
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut worst = 0f64;
        let mut xs = Vec::new();
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max((f64::from(erf(x)) - erf_reference(f64::from(x))).abs());
            xs.push(x);
            x += 0.000_93;
        }
        assert!(worst < 3e-7, "worst absolute erf error {worst}");
        let mut gelu = xs.clone();
        bias_gelu_rows(&mut gelu, &[0.0]);
        for (&x, &g) in xs.iter().zip(&gelu) {
            let x = f64::from(x);
            let exact = 0.5 * x * (1.0 + erf_reference(x / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(g) - exact).abs() <= 2e-7 * x.abs().max(1.0),
                "gelu({x})"
            );
        }
    }

    #[test]
    fn tanh_gelu_matches_its_formula_in_f64() {
        let xs: Vec<f32> = (0..24_000).map(|i| -12.0 + i as f32 * 0.001).collect();
        let mut gelu = xs.clone();
        bias_gelu_tanh_rows(&mut gelu, &[0.0]);
        for (&x, &g) in xs.iter().zip(&gelu) {
            let x = f64::from(x);
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            let exact = 0.5 * x * (1.0 + inner.tanh());
            assert!(
                (f64::from(g) - exact).abs() <= 3e-7 * x.abs().max(1.0),
                "gelu_tanh({x}): {g} vs {exact}"
            );
        }
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
    }

    #[test]
    fn softmax_and_layer_norm_match_plain_f64() {
        let width = 37;
        let xs: Vec<f32> = (0..width * 3)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 9.0)
            .collect();
        let mut soft = xs.clone();
        softmax_rows(&mut soft, width);
        let weight: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 40.0).collect();
        let bias: Vec<f32> = (0..width).map(|i| i as f32 / 100.0 - 0.2).collect();
        let mut norm = xs.clone();
        layer_norm_rows(&mut norm, &weight, &bias, 1e-12);
        for r in 0..3 {
            let row: Vec<f64> = xs[r * width..(r + 1) * width]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = row.iter().map(|x| (x - max).exp()).sum();
            let mean = row.iter().sum::<f64>() / width as f64;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / width as f64;
            for c in 0..width {
                let expected = (row[c] - max).exp() / total;
                assert!((f64::from(soft[r * width + c]) - expected).abs() < 1e-7);
                let expected = (row[c] - mean) / (var + 1e-12).sqrt() * f64::from(weight[c])
                    + f64::from(bias[c]);
                assert!((f64::from(norm[r * width + c]) - expected).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn linear_and_attention_match_naive_loops() {
        let (rows, inputs, outputs) = (5, 7, 6);
        let weight: Vec<f32> = (0..inputs * outputs)
            .map(|i| (i % 11) as f32 / 11.0 - 0.4)
            .collect();
        let bias: Vec<f32> = (0..outputs).map(|i| i as f32 / 10.0).collect();
        let x: Vec<f32> = (0..rows * inputs)
            .map(|i| (i % 5) as f32 / 3.0 - 0.6)
            .collect();
        let linear = Linear::new(&weight, bias.clone(), inputs, outputs);
        let mut y = vec![1.0f32; rows * outputs];
        linear.forward_residual(&x, &mut y, rows, Threads::One);
        for r in 0..rows {
            for o in 0..outputs {
                let dot: f32 = (0..inputs)
                    .map(|i| x[r * inputs + i] * weight[o * inputs + i])
                    .sum();
                assert!((y[r * outputs + o] - (1.0 + dot + bias[o])).abs() < 1e-5);
            }
        }

        let attention = Attention {
            hidden: 4,
            heads: 2,
        };
        let len = 3;
        let qkv: Vec<f32> = (0..len * 12)
            .map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mut context = vec![0f32; len * 4];
        let mut scores = vec![0f32; len * len];
        attention.forward(&qkv, len, &mut context, &mut scores, Threads::One);
        for head in 0..2 {
            for i in 0..len {
                let logits: Vec<f32> = (0..len)
                    .map(|j| {
                        (0..2)
                            .map(|d| qkv[i * 12 + head * 2 + d] * qkv[j * 12 + 4 + head * 2 + d])
                            .sum::<f32>()
                            / 2f32.sqrt()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f32::MIN, f32::max);
                let weights: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f32 = weights.iter().sum();
                for d in 0..2 {
                    let expected: f32 = (0..len)
                        .map(|j| weights[j] / total * qkv[j * 12 + 8 + head * 2 + d])
                        .sum();
                    assert!((context[i * 4 + head * 2 + d] - expected).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn attention_in_query_blocks_equals_attention_in_one() {
        let attention = Attention {
            hidden: 8,
            heads: 2,
        };
        let len = 7;
        let qkv: Vec<f32> = (0..len * 24)
            .map(|i| ((i * 53) % 29) as f32 / 14.0 - 1.0)
            .collect();
        let mut whole = vec![0f32; len * 8];
        let mut scores = vec![0f32; len * len];
        attention.forward(&qkv, len, &mut whole, &mut scores, Threads::One);
        // Blocks of 2 query rows (the last one a single row).
        let mut blocked = vec![0f32; len * 8];
        attention.forward_in_blocks(&qkv, len, &mut blocked, &mut scores, Threads::One, 2 * len);
        assert_eq!(Attention::block_rows(len, 2 * len), 2);
        for (a, b) in whole.iter().zip(&blocked) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn balance_splits_evenly_and_keeps_order() {
        let groups = balance(&[5.0, 1.0, 4.0, 2.0, 3.0], 2);
        let totals: Vec<f64> = groups
            .iter()
            .map(|g| g.iter().map(|&i| [5.0, 1.0, 4.0, 2.0, 3.0][i]).sum())
            .collect();
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 5);
        assert!((totals[0] - totals[1]).abs() <= 1.0);
        assert!(groups.iter().all(|g| g.windows(2).all(|w| w[0] < w[1])));
        assert_eq!(balance(&[3.0], 4), vec![vec![0]]);
    }
}
