//! The engine every architecture runs on: dense layers on weights packed once at load for f32, bf16 or
//! int8 micro-kernels ([`gemm`]), attention on the same kernels ([`attention`]), the post-norm transformer
//! layers and how a batch is shared by a persistent team of threads ([`layers`], [`pool`]), and here the
//! row-wise operations (layer norm, softmax, GELU in its erf and tanh forms), compiled for AVX-512 / AVX2
//! at run time with a portable fallback.
//!
//! Everything works on plain row-major `f32` slices: a matrix of `rows × cols` is `rows` consecutive rows.

pub mod attention;
pub mod gemm;
pub mod layers;
pub mod pool;

pub use gemm::{bf16_on_amx, Precision};

/// The activation of an MLP, as a model's config.json names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·Φ(x)` with the exact erf (transformers' "gelu").
    Gelu,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (transformers' "gelu_new" and "gelu_pytorch_tanh").
    GeluTanh,
}

impl Activation {
    /// The activation of `x`; inlined into the dense layers' epilogue.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => gelu(x),
            Activation::GeluTanh => gelu_tanh(x),
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

/// erf(x) in f32, absolute error under 4e-7, branch-free: the Maclaurin series to x¹³ below |x| = 0.5 (where
/// the formula below would lose digits to cancellation), Abramowitz & Stegun 7.1.26 (a rational term times
/// e^-x², error ≤ 1.5e-7) above. Its `1 / (1 + p·|x|)` takes a quadratic first guess and two Newton steps
/// (six multiply-adds, relative error ~1e-7) instead of a division, which costs a vector unit 10–16
/// cycles; past |x| = 4, where erf is 1 in f32, the guess stays at |x| = 4.
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
    let d = 1.0 + P * a.min(4.0);
    // Minimax quadratic for 1/d on [1, 1 + 4p] (relative error 0.018), then Newton: e → e².
    let mut t = 1.973_306_3 + d * (-1.240_777_6 + d * 0.249_877_03);
    t += t * (1.0 - d * t);
    t += t * (1.0 - d * t);
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

/// The exact (erf) GELU of BERT-family MLPs, `x·Φ(x)`; inlined into the dense layers' epilogue.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// tanh(x) in f32 from [`exp`], branch-free: 1 − 2/(e^{2x} + 1), absolute error about 1e-7 (the form
/// saturates cleanly to ±1 where e^{2x} overflows or vanishes).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// The tanh approximation of GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
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

vectorised! {
    /// `x = LN(x + Σ partials + bias)` for every row of `xs` (rows as wide as the norm), in place: the
    /// residual connection, the partial sums of an output projection shared by a team, its bias and the
    /// layer norm in one pass. The sums run in the same order on every member, so all get the same rows.
    pub fn add_layer_norm_rows(xs: &mut [f32], partials: &[&[f32]], bias: Option<&[f32]>, norm: &LayerNorm) {
        let width = norm.weight.len();
        if width == 0 {
            return;
        }
        for (r, row) in xs.chunks_exact_mut(width).enumerate() {
            for partial in partials {
                for (x, p) in row.iter_mut().zip(&partial[r * width..(r + 1) * width]) {
                    *x += *p;
                }
            }
            if let Some(bias) = bias {
                for (x, b) in row.iter_mut().zip(bias) {
                    *x += *b;
                }
            }
            let mean = lane_sum(row, |x| x) / width as f32;
            let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / width as f32;
            let inverse = 1.0 / (variance + norm.eps).sqrt();
            for ((x, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
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
        // A&S's own 1.5e-7, plus the rounding of the Newton reciprocal near |x| = 0.5 (3.3e-7 measured):
        // three f32 ulps of erf there, far below what the model's outputs can show.
        assert!(worst < 4e-7, "worst absolute erf error {worst}");
        let gelus: Vec<f32> = xs.iter().map(|&x| gelu(x)).collect();
        for (&x, &g) in xs.iter().zip(&gelus) {
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
        for i in 0..24_000 {
            let x = -12.0 + i as f32 * 0.001;
            let g = Activation::GeluTanh.apply(x);
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
