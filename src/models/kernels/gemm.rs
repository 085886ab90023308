//! Dense products on weights packed once at load, for the three precisions.
//!
//! A weight `W` (`[outputs, inputs]` as PyTorch stores it) is kept as `Wᵀ` cut into *strips* of 16 output
//! columns, each strip its `inputs` rows of 16 values back to back, so that a micro-kernel streams a strip
//! with one aligned 64-byte load per input and never repacks on a call (the `gemm` crate packs the weight
//! again on every product, which dominates when a batch has few rows). A micro-kernel keeps a tile of up to
//! 12 rows × 2 strips (24 vector accumulators) in registers over the whole input dimension; the driver runs
//! the tiles of any row count and any range of output columns (a team member's share), and applies the
//! layer's epilogue (bias, GELU, SwiGLU, scale, accumulate) to each tile while it is still in L1.
//!
//! - **f32**: `vfmadd231ps` (AVX-512, else AVX2+FMA, else portable code), exact like PyTorch up to the
//!   order of the sums.
//! - **bf16**: weights rounded to bfloat16, activations rounded to bfloat16 per product, `vdpbf16ps` (two
//!   products per lane per instruction) accumulating in f32. Where the CPU has AMX (Sapphire Rapids and
//!   later) and the kernel grants it, the same packed weights feed `tdpbf16ps` instead: a strip's 16 pairs
//!   of inputs are exactly one 16 × 64-byte B tile, so AMX needs no other layout; it multiplies 16 rows ×
//!   32 inputs × 16 columns per instruction, where `vdpbf16ps` issues at a fraction of the FMA rate.
//! - **int8**: weights and activations int8 *in groups of 32 inputs*, one scale per group (per output
//!   column for the weights, per token for the activations, quantised at run time), and `vpdpbusd` sums
//!   each group in i32 before it is scaled into an f32 accumulator. One scale per whole token is not enough:
//!   the layer norms feeding the projections have a few outlier channels (|x| up to ~10× the rest), and a
//!   per-token scale sized for them leaves the other channels a handful of levels (worst-case cosine to f32
//!   0.985 on all-MiniLM-L6-v2, as simulated in PyTorch; 0.993 with SmoothQuant), while a group confines
//!   each outlier's coarse scale to 31 neighbours. Grouping the activations alone (one scale per weight
//!   column) measured 0.9945 on the reference's worst case (a lone "."): the weights need groups too. See
//!   README "Precision" for what this engine measures. `vpdpbusd` takes unsigned activations: they are
//!   stored as `q + 128`, and the weight groups' sums times 128 are subtracted by starting each group's
//!   accumulator from them.

use std::ops::Range;

use super::pool::share;
use super::{exp, Activation};

/// Output columns per strip: one AVX-512 register of f32.
pub const LANES: usize = 16;
/// Inputs per int8 quantisation group (and the alignment of a split of the inputs for int8).
pub const GROUP: usize = 32;
/// Most rows of an f32/bf16 tile (12 rows × 2 strips = 24 accumulators of the 32 vector registers).
const MR: usize = 12;
/// Most rows of an int8 tile: each tile element needs an i32 group accumulator besides its f32 one.
const MR_INT8: usize = 6;
/// The bytes of weight strips the driver keeps hot in L2 while it runs every row block over them.
const CHUNK_BYTES: usize = 256 << 10;

/// Rows of an AMX tile (and so the most rows a tile buffer holds).
const TILE_ROWS: usize = 16;

type Tile = [[f32; 2 * LANES]; TILE_ROWS];

/// The arithmetic of the dense layers, chosen at load for the whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights and products: the reference results (the default).
    #[default]
    F32,
    /// bfloat16 weights and products with f32 accumulation (AVX512_BF16).
    Bf16,
    /// int8 weights and activations with i32 accumulation per group (AVX512_VNNI).
    Int8,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    pub fn parse(text: &str) -> Result<Precision, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| {
                format!("unknown precision {text:?}; the precisions are f32, bf16 and int8")
            })
    }

    /// The CPU features this precision's products need.
    fn features(self) -> &'static [&'static str] {
        match self {
            Precision::F32 => &[],
            Precision::Bf16 => &["avx512f", "avx512bw", "avx512bf16"],
            Precision::Int8 => &["avx512f", "avx512bw", "avx512vnni"],
        }
    }

    /// Whether this CPU runs the precision; if not, an error naming the missing feature and the
    /// precisions that would work here. There is no silent fallback to another precision.
    pub fn check_cpu(self) -> Result<(), String> {
        let missing: Vec<&str> = self
            .features()
            .iter()
            .copied()
            .filter(|f| !cpu_has(f))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let working: Vec<&str> = Precision::ALL
            .into_iter()
            .filter(|p| p.features().iter().all(|f| cpu_has(f)))
            .map(Precision::name)
            .collect();
        Err(format!(
            "precision {} needs the CPU feature{} {}, which this CPU lacks; precisions that work here: {}",
            self.name(),
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            working.join(", ")
        ))
    }
}

/// The dense layers of a transformer layer, for [`Precision::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dense {
    /// The fused query/key/value projection.
    Qkv,
    AttentionOut,
    MlpIn,
    MlpOut,
}

impl Precision {
    /// The arithmetic of dense layer `which` in a model loaded in this precision. int8 keeps the
    /// query/key/value projection in f32: its input is a layer norm's output with outlier channels and
    /// its output becomes attention logits, where an error is exponentiated. Measured on the 78 reference
    /// cases of all-MiniLM-L6-v2 (worst-case cosine to f32, groups of 32 for weights and activations):
    /// every layer int8 0.99809; the qkv projection in bf16 0.99914; the attention output instead 0.99825;
    /// the MLP output instead 0.99846. Only keeping qkv wider leaves a margin above the 0.998 floor. It
    /// is bf16 where bf16 products run on AMX (several times the f32 rate), and f32 elsewhere: without
    /// AMX, `vdpbf16ps` runs at about a fifth of the FMA rate on some Xeons (bf16 products there are 0.6×
    /// f32's), which made that quarter of the FLOPs the int8 model's slowest part; f32 is exact and needs
    /// no AVX512_BF16 on a CPU that has VNNI.
    pub fn of(self, which: Dense) -> Precision {
        match (self, which) {
            (Precision::Int8, Dense::Qkv) if bf16_on_amx() => Precision::Bf16,
            (Precision::Int8, Dense::Qkv) => Precision::F32,
            (precision, _) => precision,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// Whether bf16 products run on AMX tiles here (else on `vdpbf16ps`, where the CPU has AVX512_BF16).
pub fn bf16_on_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Precision::Bf16.check_cpu().is_ok() && x86::amx_bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a unit test has turned AMX off on this thread, to check the `vdpbf16ps` kernel against it.
#[cfg(test)]
fn tests_without_amx() -> bool {
    tests::WITHOUT_AMX.with(std::cell::Cell::get)
}

#[cfg(not(test))]
fn tests_without_amx() -> bool {
    false
}

/// The instruction set the f32 products run on, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// f32 → bfloat16, rounded to nearest even (finite inputs; the engine's activations are finite).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// A weight matrix packed for the micro-kernels (see the module documentation).
pub struct Packed {
    /// Inputs: the rows of `Wᵀ`.
    k: usize,
    /// Output columns, the padding of the last strip excluded.
    n: usize,
    strips: usize,
    data: Data,
}

enum Data {
    /// `[strip][k][16]`
    F32(Vec<f32>),
    /// `[strip][k/2][16]`, each u32 the bf16 pair (input 2p, input 2p+1) of one column.
    Bf16(Vec<u32>),
    /// `[strip][kp/4][16]`, each u32 four int8 weights of inputs 4p..4p+4 of one column (kp: k padded to
    /// whole groups); `scale[strip][group][16]`: each group's scale per column; `start[strip][group][16]`:
    /// −128 × the group's weights summed, the value each group's i32 accumulator starts from (see the
    /// module documentation).
    Int8 {
        q: Vec<u32>,
        scale: Vec<f32>,
        start: Vec<i32>,
    },
}

impl Packed {
    /// Packs `W` ([outputs, inputs] row-major, as PyTorch stores it) in `precision`.
    pub fn new(weight: &[f32], inputs: usize, outputs: usize, precision: Precision) -> Packed {
        assert_eq!(weight.len(), inputs * outputs, "weight shape");
        let strips = outputs.div_ceil(LANES);
        let mut data = vec![0f32; strips * inputs * LANES];
        for (column, row) in weight.chunks_exact(inputs.max(1)).enumerate() {
            let (strip, lane) = (column / LANES, column % LANES);
            let base = strip * inputs * LANES + lane;
            for (i, &w) in row.iter().enumerate() {
                data[base + i * LANES] = w;
            }
        }
        Packed::from_strips(data, inputs, outputs, precision)
    }

    /// Packs a gated MLP's two input projections (`value`, `gate`: [inner, inputs] each) for the fused
    /// SwiGLU epilogue: strip 2s holds value columns 16s.., strip 2s+1 the gate columns of the same outputs.
    pub fn swiglu(
        value: &[f32],
        gate: &[f32],
        inputs: usize,
        inner: usize,
        precision: Precision,
    ) -> Packed {
        let value = Packed::new(value, inputs, inner, Precision::F32);
        let gate = Packed::new(gate, inputs, inner, Precision::F32);
        let (Data::F32(value), Data::F32(gate)) = (value.data, gate.data) else {
            unreachable!("packed as f32 above")
        };
        let strip = inputs * LANES;
        let mut data = Vec::with_capacity(2 * value.len());
        for (v, g) in value
            .chunks_exact(strip.max(1))
            .zip(gate.chunks_exact(strip.max(1)))
        {
            data.extend_from_slice(v);
            data.extend_from_slice(g);
        }
        let strips = 2 * inner.div_ceil(LANES);
        Packed::from_strips(data, inputs, strips * LANES, precision)
    }

    fn from_strips(data: Vec<f32>, k: usize, n: usize, precision: Precision) -> Packed {
        // The products of bf16 and int8 weights are AVX-512 code: refuse them (a clear panic, not an
        // illegal instruction later) where the CPU cannot run them. Models check this at load.
        if let Err(message) = precision.check_cpu() {
            panic!("{message}");
        }
        let strips = n.div_ceil(LANES);
        let data = match precision {
            Precision::F32 => Data::F32(data),
            Precision::Bf16 => {
                let pairs = k.div_ceil(2);
                let mut packed = vec![0u32; strips * pairs * LANES];
                for s in 0..strips {
                    for i in 0..k {
                        for lane in 0..LANES {
                            let w = u32::from(bf16(data[(s * k + i) * LANES + lane]));
                            packed[(s * pairs + i / 2) * LANES + lane] |= w << (16 * (i % 2));
                        }
                    }
                }
                Data::Bf16(packed)
            }
            Precision::Int8 => {
                let groups = k.div_ceil(GROUP);
                let quads = groups * GROUP / 4;
                // One scale per group of 32 inputs and column: max |w| / 127.
                let mut scale = vec![1f32; strips * groups * LANES];
                for s in 0..strips {
                    for g in 0..groups {
                        for lane in 0..LANES {
                            let max = (g * GROUP..((g + 1) * GROUP).min(k))
                                .map(|i| data[(s * k + i) * LANES + lane].abs())
                                .fold(0f32, f32::max);
                            if max > 0.0 {
                                scale[(s * groups + g) * LANES + lane] = max / 127.0;
                            }
                        }
                    }
                }
                let mut q = vec![0u32; strips * quads * LANES];
                let mut start = vec![0i32; strips * groups * LANES];
                for s in 0..strips {
                    for i in 0..k {
                        for lane in 0..LANES {
                            let at = (s * groups + i / GROUP) * LANES + lane;
                            let w = data[(s * k + i) * LANES + lane] / scale[at];
                            let w = w.round().clamp(-127.0, 127.0) as i8;
                            q[(s * quads + i / 4) * LANES + lane] |=
                                u32::from(w as u8) << (8 * (i % 4));
                            start[at] -= 128 * i32::from(w);
                        }
                    }
                }
                Data::Int8 { q, scale, start }
            }
        };
        Packed { k, n, strips, data }
    }

    pub fn inputs(&self) -> usize {
        self.k
    }

    pub fn outputs(&self) -> usize {
        self.n
    }

    pub fn precision(&self) -> Precision {
        match self.data {
            Data::F32(_) => Precision::F32,
            Data::Bf16(_) => Precision::Bf16,
            Data::Int8 { .. } => Precision::Int8,
        }
    }

    /// The bytes the packed weight occupies.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(d) => d.len() * 4,
            Data::Bf16(d) => d.len() * 4,
            Data::Int8 { q, scale, start } => (q.len() + scale.len() + start.len()) * 4,
        }
    }

    /// Where a split of the inputs between team members may fall for this precision.
    pub fn input_granule(&self) -> usize {
        match self.data {
            Data::F32(_) => 1,
            Data::Bf16(_) => 2,
            Data::Int8 { .. } => GROUP,
        }
    }

    /// Converts rows of f32 activations into the form this weight's products read, in `scratch`: `rows`
    /// rows `lda` floats apart, each holding the values of the weight's inputs `inputs` from its first
    /// column on (a team member's share of the inputs, or all of them). The result serves any number of
    /// products with this weight (or another of the same precision and inputs).
    pub fn prepare<'s>(
        &self,
        a: &'s [f32],
        rows: usize,
        lda: usize,
        inputs: Range<usize>,
        scratch: &'s mut Scratch,
    ) -> Prepared<'s> {
        assert!(
            inputs.end <= self.k && inputs.start <= inputs.end,
            "input range"
        );
        assert!(
            rows == 0 || (rows - 1) * lda + inputs.len() <= a.len(),
            "activations outside their buffer"
        );
        assert!(
            inputs.start.is_multiple_of(self.input_granule()),
            "input range misaligned for {}",
            self.precision()
        );
        let width = inputs.len();
        match self.data {
            Data::F32(_) => Prepared {
                rows,
                inputs,
                a: Operand::F32 { a, lda },
            },
            Data::Bf16(_) => {
                let pairs = width.div_ceil(2);
                // TILE_ROWS rows of zeros after the last: an AMX tile always loads 16 rows, and the rows
                // past the end only make products that are not stored.
                let padded = (rows + TILE_ROWS) * pairs;
                let words = grown(&mut scratch.words, padded);
                for r in 0..rows {
                    let src = &a[r * lda..r * lda + width];
                    to_bf16_pairs(src, &mut words[r * pairs..(r + 1) * pairs]);
                }
                words[rows * pairs..].fill(0);
                Prepared {
                    rows,
                    inputs,
                    a: Operand::Bf16 {
                        a: &scratch.words[..padded],
                        lda: pairs,
                    },
                }
            }
            Data::Int8 { .. } => {
                let groups = width.div_ceil(GROUP);
                let quads = groups * GROUP / 4;
                let words = grown(&mut scratch.words, rows * quads);
                let scales = grown(&mut scratch.scales, rows * groups);
                for r in 0..rows {
                    let src = &a[r * lda..r * lda + width];
                    quantise_row(
                        src,
                        &mut words[r * quads..(r + 1) * quads],
                        &mut scales[r * groups..(r + 1) * groups],
                    );
                }
                Prepared {
                    rows,
                    inputs,
                    a: Operand::Int8 {
                        a: &scratch.words[..rows * quads],
                        lda: quads,
                        scales: &scratch.scales[..rows * groups],
                        groups,
                    },
                }
            }
        }
    }

    /// `out[r, out_col + (j − cols.start)] ← epilogue((A·Wᵀ)[r, j])` for the prepared rows of A and the
    /// output columns `cols` of this weight (for [`Epilogue::SwiGlu`], columns of the gated output).
    pub fn product(
        &self,
        a: &Prepared,
        cols: Range<usize>,
        out: &mut [f32],
        ldo: usize,
        out_col: usize,
        epilogue: Epilogue,
    ) {
        let n = match epilogue {
            Epilogue::SwiGlu => self.strips / 2 * LANES,
            _ => self.n,
        };
        assert!(cols.start <= cols.end && cols.end <= n, "column range");
        let rows = a.rows;
        assert!(
            rows == 0 || (rows - 1) * ldo + out_col + cols.len() <= out.len(),
            "output outside its buffer"
        );
        if let Epilogue::Bias(b) | Epilogue::BiasActivation(b, _) = epilogue {
            assert!(b.len() >= cols.end, "bias shorter than the columns");
        }
        if rows == 0 || cols.is_empty() {
            return;
        }
        let job = Job {
            rows,
            inputs: a.inputs.clone(),
            cols,
            out: out.as_mut_ptr(),
            ldo,
            out_col,
            epilogue,
        };
        // SAFETY: the shapes were checked above; each variant reads A and W inside the ranges checked
        // here and in `prepare`, and writes only `out`'s rows × the given columns.
        unsafe {
            match (&self.data, &a.a) {
                (Data::F32(w), Operand::F32 { a, lda }) => {
                    let b = Strips {
                        ptr: w.as_ptr(),
                        row: LANES,
                        strip: self.k * LANES,
                    };
                    f32_product(&job, a.as_ptr(), *lda, b);
                }
                #[cfg(target_arch = "x86_64")]
                (Data::Bf16(w), Operand::Bf16 { a, lda }) => {
                    let pairs = self.k.div_ceil(2);
                    let amx = x86::amx_bf16() && !tests_without_amx();
                    x86::bf16_product(&job, a.as_ptr(), *lda, w.as_ptr(), pairs, amx)
                }
                #[cfg(target_arch = "x86_64")]
                (
                    Data::Int8 { q, scale, start },
                    Operand::Int8 {
                        a,
                        lda,
                        scales,
                        groups,
                    },
                ) => x86::int8_product(
                    &job,
                    x86::Int8A {
                        a: a.as_ptr(),
                        lda: *lda,
                        scales: scales.as_ptr(),
                        groups: *groups,
                    },
                    x86::Int8W {
                        q: q.as_ptr(),
                        scale: scale.as_ptr(),
                        start: start.as_ptr(),
                        quads: self.k.div_ceil(GROUP) * GROUP / 4,
                        groups: self.k.div_ceil(GROUP),
                    },
                ),
                _ => panic!("activations prepared for another precision than the weight"),
            }
        }
    }
}

/// Reusable buffers for prepared activations.
#[derive(Default)]
pub struct Scratch {
    words: Vec<u32>,
    scales: Vec<f32>,
}

fn grown<T: Default + Clone>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// One token's activations as bf16 pairs (inputs 2p and 2p+1 in one word). Only reached for bf16
/// weights, which [`Packed::new`] makes only on a CPU with AVX-512.
fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512(src: &[f32], dst: &mut [u32]) {
        portable(src, dst)
    }
    #[inline(always)]
    fn portable(src: &[f32], dst: &mut [u32]) {
        let mut pairs = src.chunks_exact(2);
        for (d, pair) in dst.iter_mut().zip(&mut pairs) {
            *d = u32::from(bf16(pair[0])) | u32::from(bf16(pair[1])) << 16;
        }
        if let [last] = pairs.remainder() {
            dst[src.len() / 2] = u32::from(bf16(*last));
        }
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_has("avx512bw") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { avx512(src, dst) };
    }
    portable(src, dst)
}

/// One token's activations as `q + 128` bytes in groups of [`GROUP`], one scale (max |x| / 127) a group;
/// the tail of the last group is zero (128). Rounds to nearest even by the float trick (adding 1.5·2²³),
/// which vectorises where `f32::round` is a library call.
fn quantise_row(src: &[f32], words: &mut [u32], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512(src: &[f32], words: &mut [u32], scales: &mut [f32]) {
        portable(src, words, scales)
    }
    #[inline(always)]
    fn group(src: &[f32; GROUP], out: &mut [u8; GROUP]) -> f32 {
        const ROUND: f32 = 12_582_912.0;
        // The max in 16 independent lanes first, as a comparison and a select (`f32::max`'s NaN rule
        // keeps it scalar), so that it vectorises.
        let mut lanes = [0f32; LANES];
        for half in src.chunks_exact(LANES) {
            for (lane, x) in lanes.iter_mut().zip(half) {
                let a = x.abs();
                *lane = if a > *lane { a } else { *lane };
            }
        }
        let max = lanes.iter().fold(0f32, |m, &x| if x > m { x } else { m });
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        let inverse = 1.0 / scale;
        for (o, &x) in out.iter_mut().zip(src) {
            // In [2²³, 2²⁴) a float's ulp is 1, so adding 1.5·2²³ + 128 rounds x/scale to the nearest
            // integer and leaves q + 128 in the low byte of the bits (a float-to-int cast would not
            // vectorise: Rust's saturating cast becomes scalar code).
            let t = (x * inverse).clamp(-127.0, 127.0) + (ROUND + 128.0);
            *o = t.to_bits() as u8;
        }
        scale
    }
    #[inline(always)]
    fn portable(src: &[f32], words: &mut [u32], scales: &mut [f32]) {
        let bytes: &mut [u8] = bytemuck_u8(words);
        let mut groups = src.chunks_exact(GROUP);
        for ((src, out), scale) in (&mut groups)
            .zip(bytes.chunks_exact_mut(GROUP))
            .zip(scales.iter_mut())
        {
            let src: &[f32; GROUP] = src.try_into().expect("a whole group");
            let out: &mut [u8; GROUP] = out.try_into().expect("a whole group");
            *scale = group(src, out);
        }
        let tail = groups.remainder();
        if !tail.is_empty() {
            let full = src.len() / GROUP;
            let mut padded = [0f32; GROUP];
            padded[..tail.len()].copy_from_slice(tail);
            let out: &mut [u8; GROUP] = (&mut bytes[full * GROUP..(full + 1) * GROUP])
                .try_into()
                .expect("a whole group");
            scales[full] = group(&padded, out);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_has("avx512bw") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { avx512(src, words, scales) };
    }
    portable(src, words, scales)
}

fn bytemuck_u8(words: &mut [u32]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers the same bytes.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 4) }
}

/// Activations ready for one precision's products.
pub struct Prepared<'a> {
    rows: usize,
    inputs: Range<usize>,
    a: Operand<'a>,
}

enum Operand<'a> {
    F32 {
        a: &'a [f32],
        lda: usize,
    },
    Bf16 {
        a: &'a [u32],
        lda: usize,
    },
    Int8 {
        a: &'a [u32],
        lda: usize,
        scales: &'a [f32],
        groups: usize,
    },
}

/// What happens to each product before it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `out = x · s`
    Scale(f32),
    /// `out = x + bias[j]`
    Bias(&'a [f32]),
    /// `out = act(x + bias[j])`
    BiasActivation(&'a [f32], Activation),
    /// `out = value · SiLU(gate)` for weights packed by [`Packed::swiglu`].
    SwiGlu,
    /// `out += x`
    Accumulate,
}

/// One product's shape, shared by the precision-specific drivers.
struct Job<'a> {
    rows: usize,
    inputs: Range<usize>,
    cols: Range<usize>,
    out: *mut f32,
    ldo: usize,
    out_col: usize,
    epilogue: Epilogue<'a>,
}

/// f32 strips: element (input i, lane l) of strip s at `ptr + s·strip + i·row + l`.
#[derive(Clone, Copy)]
pub(super) struct Strips {
    pub ptr: *const f32,
    pub row: usize,
    pub strip: usize,
}

impl Job<'_> {
    /// The strips the driver computes and how their tiles land in the output: for SwiGLU each output
    /// strip is a pair of weight strips.
    fn strips(&self) -> Range<usize> {
        self.cols.start / LANES..self.cols.end.div_ceil(LANES)
    }

    fn strips_per_output(&self) -> usize {
        match self.epilogue {
            Epilogue::SwiGlu => 2,
            _ => 1,
        }
    }

    /// Runs `tile(r0, mr, s, nv, &mut tile)` over every row block and pair of strips, in chunks of strips
    /// that stay in L2, and stores each tile through the epilogue.
    #[inline(always)]
    unsafe fn drive(
        &self,
        mr_max: usize,
        strip_bytes: usize,
        mut tile: impl FnMut(usize, usize, usize, usize, &mut Tile),
    ) {
        let strips = self.strips();
        let per = self.strips_per_output();
        // Output strips whose weights fill about CHUNK_BYTES, in pairs.
        let chunk = (CHUNK_BYTES / (strip_bytes * per).max(1)).max(2) & !1;
        let blocks = self.rows.div_ceil(mr_max);
        let mut buffer: Tile = [[0f32; 2 * LANES]; TILE_ROWS];
        let mut first = strips.start;
        while first < strips.end {
            let last = (first + chunk).min(strips.end);
            for block in 0..blocks {
                // Row blocks as even as possible (32 rows: 11 + 11 + 10, not 12 + 12 + 8).
                let rows = share(self.rows, 1, block, blocks);
                let (r0, mr) = (rows.start, rows.len());
                let mut s = first;
                while s < last {
                    let nv = (last - s).min(2);
                    if per == 2 {
                        tile(r0, mr, 2 * s, 2, &mut buffer);
                        self.store_swiglu(r0, mr, s, &buffer);
                        s += 1;
                    } else {
                        tile(r0, mr, s, nv, &mut buffer);
                        self.store(r0, mr, s, nv, &buffer);
                        s += nv;
                    }
                }
            }
            first = last;
        }
    }

    #[inline(always)]
    unsafe fn store(&self, r0: usize, mr: usize, s: usize, nv: usize, tile: &Tile) {
        let lo = (s * LANES).max(self.cols.start);
        let hi = ((s + nv) * LANES).min(self.cols.end);
        let full = lo == s * LANES && hi == (s + nv) * LANES;
        // A tile cut by the column range (a share's edge, a sequence shorter than a strip of keys) goes
        // through the same vector code on zero-padded copies.
        let mut bias = [0f32; 2 * LANES];
        let epilogue = match self.epilogue {
            Epilogue::Bias(b) if !full => {
                bias[..hi - lo].copy_from_slice(&b[lo..hi]);
                Epilogue::Bias(&bias)
            }
            Epilogue::BiasActivation(b, activation) if !full => {
                bias[..hi - lo].copy_from_slice(&b[lo..hi]);
                Epilogue::BiasActivation(&bias, activation)
            }
            other => other,
        };
        for (r, t) in tile.iter().enumerate().take(mr) {
            let out = self
                .out
                .add((r0 + r) * self.ldo + self.out_col + lo - self.cols.start);
            if full && nv == 2 {
                epilogue_lanes::<{ 2 * LANES }>(epilogue, t, out, lo);
            } else if full {
                epilogue_lanes::<LANES>(epilogue, &t[..LANES], out, lo);
            } else {
                let t = &t[lo - s * LANES..hi - s * LANES];
                let mut values = [0f32; 2 * LANES];
                values[..t.len()].copy_from_slice(t);
                let mut stored = [0f32; 2 * LANES];
                let out = std::slice::from_raw_parts_mut(out, t.len());
                if let Epilogue::Accumulate = epilogue {
                    stored[..t.len()].copy_from_slice(out);
                }
                epilogue_lanes::<{ 2 * LANES }>(epilogue, &values, stored.as_mut_ptr(), 0);
                out.copy_from_slice(&stored[..t.len()]);
            }
        }
    }

    #[inline(always)]
    unsafe fn store_swiglu(&self, r0: usize, mr: usize, s: usize, tile: &Tile) {
        let lo = (s * LANES).max(self.cols.start);
        let hi = ((s + 1) * LANES).min(self.cols.end);
        for (r, t) in tile.iter().enumerate().take(mr) {
            let out = self
                .out
                .add((r0 + r) * self.ldo + self.out_col + lo - self.cols.start);
            let (value, gate) = t.split_at(LANES);
            if hi - lo == LANES {
                let out = &mut *(out as *mut [f32; LANES]);
                for l in 0..LANES {
                    out[l] = value[l] * silu(gate[l]);
                }
            } else {
                for j in lo..hi {
                    let l = j - s * LANES;
                    *out.add(j - lo) = value[l] * silu(gate[l]);
                }
            }
        }
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
unsafe fn epilogue_lanes<const W: usize>(epilogue: Epilogue, t: &[f32], out: *mut f32, j: usize) {
    let t: &[f32; W] = t.try_into().expect("a whole tile row");
    let out = &mut *(out as *mut [f32; W]);
    match epilogue {
        Epilogue::Scale(s) => {
            for l in 0..W {
                out[l] = t[l] * s;
            }
        }
        Epilogue::Bias(b) => {
            let b: &[f32; W] = b[j..j + W].try_into().expect("bias lanes");
            for l in 0..W {
                out[l] = t[l] + b[l];
            }
        }
        Epilogue::BiasActivation(b, activation) => {
            let b: &[f32; W] = b[j..j + W].try_into().expect("bias lanes");
            // One loop per activation, so that each vectorises.
            match activation {
                Activation::Gelu => {
                    for l in 0..W {
                        out[l] = Activation::Gelu.apply(t[l] + b[l]);
                    }
                }
                Activation::GeluTanh => {
                    for l in 0..W {
                        out[l] = Activation::GeluTanh.apply(t[l] + b[l]);
                    }
                }
            }
        }
        Epilogue::Accumulate => {
            for l in 0..W {
                out[l] += t[l];
            }
        }
        Epilogue::SwiGlu => unreachable!("stored by store_swiglu"),
    }
}

/// The f32 micro-kernel: `MR` rows of A (`a`, row stride `lda`) times `NV` strips over `k` inputs, stored
/// into `tile`'s rows from its first, columns from `col`. Plain code over 16-lane arrays: compiled inside a
/// `#[target_feature]` function, LLVM keeps the accumulators in vector registers (as long as they fit)
/// and emits one broadcast and `NV` FMAs per row and input.
#[inline(always)]
unsafe fn micro_f32<const M: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    tile: &mut [[f32; 2 * LANES]],
    col: usize,
) {
    let mut acc = [[[0f32; LANES]; NV]; M];
    for p in 0..k {
        let mut bv = [[0f32; LANES]; NV];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = *(b.ptr.add(v * b.strip + p * b.row) as *const [f32; LANES]);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = *a.add(r * lda + p);
            for v in 0..NV {
                for l in 0..LANES {
                    acc[v][l] = av.mul_add(bv[v][l], acc[v][l]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            tile[r][col + v * LANES..col + (v + 1) * LANES].copy_from_slice(acc);
        }
    }
}

/// The portable micro-kernel: the same loops with a separate multiply and add, since without an FMA
/// unit `mul_add` is a slow library call.
#[inline(always)]
unsafe fn micro_f32_portable<const M: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    tile: &mut Tile,
) {
    let mut acc = [[[0f32; LANES]; NV]; M];
    for p in 0..k {
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = *a.add(r * lda + p);
            for (v, acc) in acc.iter_mut().enumerate() {
                let bv = &*(b.ptr.add(v * b.strip + p * b.row) as *const [f32; LANES]);
                for l in 0..LANES {
                    acc[l] += av * bv[l];
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            tile[r][v * LANES..(v + 1) * LANES].copy_from_slice(acc);
        }
    }
}

/// Expands `$call::<M, NV>(...)` for the run-time row count `mr` (1..=12) and strip count `nv` (1 or 2).
macro_rules! dispatch_tile {
    ($mr:expr, $nv:expr, $call:ident ( $($arg:expr),* )) => {
        match ($mr, $nv) {
            (1, 1) => $call::<1, 1>($($arg),*), (1, _) => $call::<1, 2>($($arg),*),
            (2, 1) => $call::<2, 1>($($arg),*), (2, _) => $call::<2, 2>($($arg),*),
            (3, 1) => $call::<3, 1>($($arg),*), (3, _) => $call::<3, 2>($($arg),*),
            (4, 1) => $call::<4, 1>($($arg),*), (4, _) => $call::<4, 2>($($arg),*),
            (5, 1) => $call::<5, 1>($($arg),*), (5, _) => $call::<5, 2>($($arg),*),
            (6, 1) => $call::<6, 1>($($arg),*), (6, _) => $call::<6, 2>($($arg),*),
            (7, 1) => $call::<7, 1>($($arg),*), (7, _) => $call::<7, 2>($($arg),*),
            (8, 1) => $call::<8, 1>($($arg),*), (8, _) => $call::<8, 2>($($arg),*),
            (9, 1) => $call::<9, 1>($($arg),*), (9, _) => $call::<9, 2>($($arg),*),
            (10, 1) => $call::<10, 1>($($arg),*), (10, _) => $call::<10, 2>($($arg),*),
            (11, 1) => $call::<11, 1>($($arg),*), (11, _) => $call::<11, 2>($($arg),*),
            (_, 1) => $call::<12, 1>($($arg),*), (_, _) => $call::<12, 2>($($arg),*),
        }
    };
}
pub(super) use dispatch_tile;

/// Computes one tile: `mr` rows × `nv` strips over `k` inputs.
type F32Tile = unsafe fn(usize, *const f32, usize, Strips, usize, usize, &mut Tile);

// The tile functions carry the target features themselves, so that the micro-kernel is compiled for
// them wherever the driver's closure ends up (a closure is not compiled with its caller's features).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    mr: usize,
    nv: usize,
    tile: &mut Tile,
) {
    dispatch_tile!(mr, nv, micro_f32(k, a, lda, b, tile, 0))
}

/// Most rows of an AVX2 sub-tile: AVX2 has 16 vector registers of 8 lanes, so the driver's 12-row ×
/// 2-strip tile (48 accumulators) would spill on every FMA; 6 rows × 1 strip keep 12 accumulators, the
/// strip's 2 registers and the broadcast in registers.
#[cfg(target_arch = "x86_64")]
const MR_AVX2: usize = 6;

/// The driver's tile as sub-tiles of at most [`MR_AVX2`] rows (as even as possible) × one strip: each
/// sub-tile of rows is read from L1 by both strips. (Measured on a Zen 3 without AVX-512, 32 × 384 → 1536
/// on one thread: 27–30 GFLOPS for the whole tile, 66–89 as sub-tiles; strips outside the rows' loop
/// instead, 67–69; 3 rows × 2 strips, 43.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    mr: usize,
    nv: usize,
    tile: &mut Tile,
) {
    let parts = mr.div_ceil(MR_AVX2);
    for part in 0..parts {
        let rows = share(mr, 1, part, parts);
        let (a, sub) = (a.add(rows.start * lda), &mut tile[rows.start..]);
        for v in 0..nv {
            let b = Strips {
                ptr: b.ptr.add(v * b.strip),
                ..b
            };
            dispatch_tile!(rows.len(), 1, micro_f32(k, a, lda, b, &mut *sub, v * LANES))
        }
    }
}

unsafe fn tile_portable(
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    mr: usize,
    nv: usize,
    tile: &mut Tile,
) {
    dispatch_tile!(mr, nv, micro_f32_portable(k, a, lda, b, tile))
}

#[inline(always)]
unsafe fn f32_body(job: &Job, a: *const f32, lda: usize, b: Strips, tile_fn: F32Tile) {
    let k = job.inputs.len();
    let b = Strips {
        ptr: b.ptr.add(job.inputs.start * b.row),
        ..b
    };
    job.drive(MR, k * LANES * 4, |r0, mr, s, nv, tile| {
        let b = Strips {
            ptr: b.ptr.add(s * b.strip),
            ..b
        };
        tile_fn(k, a.add(r0 * lda), lda, b, mr, nv, tile)
    });
}

/// An f32 product on the best instruction set of this CPU; `b` may be packed weights or any strided
/// operand laid out as strips (attention's keys and values). The driver (and its epilogue) is compiled
/// for the instruction set too.
unsafe fn f32_product(job: &Job, a: *const f32, lda: usize, b: Strips) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(job: &Job, a: *const f32, lda: usize, b: Strips) {
            f32_body(job, a, lda, b, tile_avx512)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(job: &Job, a: *const f32, lda: usize, b: Strips) {
            f32_body(job, a, lda, b, tile_avx2)
        }
        match isa() {
            Isa::Avx512 => return avx512(job, a, lda, b),
            Isa::Avx2 => return avx2(job, a, lda, b),
            Isa::Portable => {}
        }
    }
    f32_body(job, a, lda, b, tile_portable)
}

/// An f32 product of raw operands for attention: `out[r, out_col + j] ← epilogue(Σ_i a[r·lda + i] ·
/// b(i, j))` for `rows` rows, inputs `0..k` and columns `cols` of the strips `b`.
///
/// # Safety
/// `a` must hold `rows` rows of `k` floats at stride `lda`; `b` the strips covering `cols` over `k`
/// inputs (whole strips: up to the next multiple of 16 columns); `out` the rows × columns written.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn f32_raw(
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: Strips,
    cols: Range<usize>,
    out: *mut f32,
    ldo: usize,
    epilogue: Epilogue,
) {
    let job = Job {
        rows,
        inputs: 0..k,
        cols,
        out,
        ldo,
        out_col: 0,
        epilogue,
    };
    f32_product(&job, a, lda, b);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The bf16 and int8 micro-kernels, on AVX-512 intrinsics (checked at load by
    //! [`Precision::check_cpu`](super::Precision::check_cpu)).

    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{Job, Tile, LANES, MR, MR_INT8, TILE_ROWS};

    #[inline(always)]
    unsafe fn micro_bf16<const M: usize, const NV: usize>(
        pairs: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        strip: usize,
        tile: &mut Tile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; M];
        for p in 0..pairs {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm512_loadu_si512(b.add(v * strip + p * LANES).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(*a.add(r * lda + p) as i32);
                for v in 0..NV {
                    acc[v] = _mm512_dpbf16_ps(
                        acc[v],
                        std::mem::transmute::<__m512i, __m512bh>(av),
                        std::mem::transmute::<__m512i, __m512bh>(bv[v]),
                    );
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile[r][v * LANES..].as_mut_ptr(), *acc);
            }
        }
    }

    /// Whether the bf16 products run on AMX: the CPU has AMX-TILE and AMX-BF16, and the kernel lets this
    /// process use the tile registers (Linux asks each process to request them). Decided once.
    pub(super) fn amx_bf16() -> bool {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| {
            // CPUID leaf 7, subleaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = __cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with an integer request and argument touches no memory of ours; it fails
            // (and AMX stays unused) where the kernel lacks AMX support or a filter forbids the call.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        })
    }

    /// The tile configuration of every AMX product: palette 1, tiles 0–7 each 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static TILE_CONFIG: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut t = 0;
        while t < 8 {
            bytes[16 + 2 * t] = 64;
            bytes[48 + t] = TILE_ROWS as u8;
            t += 1;
        }
        TileConfig(bytes)
    };

    /// One tile of rows × one or two strips on AMX: C (tmm0, tmm1) += A (tmm2: 16 rows × 16 input pairs)
    /// · B (tmm3, tmm4: a strip's 16 pairs × 16 columns), over the inputs 32 at a time.
    #[allow(clippy::too_many_arguments)]
    unsafe fn amx_tile(
        pairs: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        strip: usize,
        nv: usize,
        tile: &mut Tile,
    ) {
        let (a_stride, b_stride) = (lda * 4, LANES * 4);
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack));
        for p in (0..pairs).step_by(TILE_ROWS) {
            asm!(
                "tileloadd tmm2, [{a} + {sa} * 1]",
                "tileloadd tmm3, [{b} + {sb} * 1]",
                "tdpbf16ps tmm0, tmm2, tmm3",
                a = in(reg) a.add(p),
                sa = in(reg) a_stride,
                b = in(reg) b.add(p * LANES),
                sb = in(reg) b_stride,
                options(nostack, readonly),
            );
            if nv == 2 {
                asm!(
                    "tileloadd tmm4, [{b} + {sb} * 1]",
                    "tdpbf16ps tmm1, tmm2, tmm4",
                    b = in(reg) b.add(strip + p * LANES),
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
        }
        let row = 2 * LANES * 4;
        asm!(
            "tilestored [{c} + {sc} * 1], tmm0",
            "tilestored [{d} + {sc} * 1], tmm1",
            c = in(reg) tile.as_mut_ptr().cast::<f32>(),
            d = in(reg) tile.as_mut_ptr().cast::<f32>().add(LANES),
            sc = in(reg) row,
            options(nostack),
        );
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn bf16_product(
        job: &Job,
        a: *const u32,
        lda: usize,
        w: *const u32,
        pairs_total: usize,
        amx: bool,
    ) {
        // Inputs are bf16 pairs: the range starts on an even input (checked in `prepare`).
        let pairs = job.inputs.len().div_ceil(2);
        let w = w.add(job.inputs.start / 2 * LANES);
        let strip = pairs_total * LANES;
        if amx && pairs.is_multiple_of(TILE_ROWS) {
            // The configuration is per thread: set it for this product, and release the tiles after so
            // that a context switch does not save 8 KiB of tile data for an idle thread.
            asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
            job.drive(TILE_ROWS, pairs * LANES * 4, |r0, _, s, nv, tile| {
                amx_tile(
                    pairs,
                    a.add(r0 * lda),
                    lda,
                    w.add(s * strip),
                    strip,
                    nv,
                    tile,
                )
            });
            asm!("tilerelease", options(nostack, nomem));
            return;
        }
        job.drive(MR, pairs * LANES * 4, |r0, mr, s, nv, tile| {
            bf16_tile(
                pairs,
                a.add(r0 * lda),
                lda,
                w.add(s * strip),
                strip,
                mr,
                nv,
                tile,
            )
        });
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bf16_tile(
        pairs: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        strip: usize,
        mr: usize,
        nv: usize,
        tile: &mut Tile,
    ) {
        super::dispatch_tile!(mr, nv, micro_bf16(pairs, a, lda, b, strip, tile))
    }

    pub(super) struct Int8A {
        pub a: *const u32,
        pub lda: usize,
        pub scales: *const f32,
        pub groups: usize,
    }

    pub(super) struct Int8W {
        pub q: *const u32,
        pub scale: *const f32,
        pub start: *const i32,
        pub quads: usize,
        pub groups: usize,
    }

    /// `M` rows × `NV` strips over `groups` groups of 32 inputs: per group, eight `vpdpbusd` per tile
    /// element into an i32 accumulator that starts from the weights' offset correction, then one
    /// conversion and one FMA by the product of the row's and the column's group scales into the f32
    /// accumulator.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_int8<const M: usize, const NV: usize>(
        groups: usize,
        a: *const u32,
        lda: usize,
        scales: *const f32,
        lds: usize,
        w: &Int8W,
        s: usize,
        g0: usize,
        tile: &mut Tile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; M];
        for g in 0..groups {
            let mut start = [_mm512_setzero_si512(); NV];
            for (v, start) in start.iter_mut().enumerate() {
                *start =
                    _mm512_loadu_si512(w.start.add(((s + v) * w.groups + g0 + g) * LANES).cast());
            }
            let mut sums = [start; M];
            for p in 0..super::GROUP / 4 {
                let quad = (g0 + g) * super::GROUP / 4 + p;
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_loadu_si512(w.q.add(((s + v) * w.quads + quad) * LANES).cast());
                }
                for (r, sums) in sums.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*a.add(r * lda + g * super::GROUP / 4 + p) as i32);
                    for v in 0..NV {
                        sums[v] = _mm512_dpbusd_epi32(sums[v], av, bv[v]);
                    }
                }
            }
            let mut weight_scale = [_mm512_setzero_ps(); NV];
            for (v, weight_scale) in weight_scale.iter_mut().enumerate() {
                *weight_scale = _mm512_loadu_ps(w.scale.add(((s + v) * w.groups + g0 + g) * LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let scale = _mm512_set1_ps(*scales.add(r * lds + g));
                for v in 0..NV {
                    let scale = _mm512_mul_ps(weight_scale[v], scale);
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][v]), scale, acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile[r][v * LANES..].as_mut_ptr(), *acc);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8_product(job: &Job, a: Int8A, w: Int8W) {
        // The input range starts on a group (checked in `prepare`).
        let g0 = job.inputs.start / super::GROUP;
        let groups = a.groups;
        job.drive(
            MR_INT8,
            groups * super::GROUP * LANES,
            |r0, mr, s, nv, tile| int8_tile(&a, &w, r0, mr, s, nv, g0, tile),
        );
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn int8_tile(
        a: &Int8A,
        w: &Int8W,
        r0: usize,
        mr: usize,
        s: usize,
        nv: usize,
        g0: usize,
        tile: &mut Tile,
    ) {
        let (groups, lda) = (a.groups, a.lda);
        let rows = a.a.add(r0 * lda);
        let scales = a.scales.add(r0 * groups);
        macro_rules! call {
            ($m:literal, $n:literal) => {
                micro_int8::<$m, $n>(groups, rows, lda, scales, groups, w, s, g0, tile)
            };
        }
        match (mr, nv) {
            (1, 1) => call!(1, 1),
            (1, _) => call!(1, 2),
            (2, 1) => call!(2, 1),
            (2, _) => call!(2, 2),
            (3, 1) => call!(3, 1),
            (3, _) => call!(3, 2),
            (4, 1) => call!(4, 1),
            (4, _) => call!(4, 2),
            (5, 1) => call!(5, 1),
            (5, _) => call!(5, 2),
            (_, 1) => call!(6, 1),
            (_, _) => call!(6, 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// `x · Wᵀ` in f64.
    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                    .sum();
            }
        }
        out
    }

    fn run(
        packed: &Packed,
        x: &[f32],
        rows: usize,
        cols: Range<usize>,
        epilogue: Epilogue,
    ) -> Vec<f32> {
        let k = packed.inputs();
        let mut scratch = Scratch::default();
        let a = packed.prepare(x, rows, k, 0..k, &mut scratch);
        let width = cols.len();
        let mut out = vec![0.5f32; rows * width];
        packed.product(&a, cols, &mut out, width, 0, epilogue);
        out
    }

    #[test]
    fn f32_products_match_f64_for_every_tile_shape_and_column_range() {
        for (rows, k, n) in [
            (1, 7, 5),
            (13, 33, 40),
            (25, 64, 96),
            (12, 16, 16),
            (30, 100, 70),
        ] {
            let w = random(n * k, 1);
            let x = random(rows * k, 2);
            let bias = random(n, 3);
            let expected = reference(&x, &w, rows, k, n);
            let packed = Packed::new(&w, k, n, Precision::F32);
            for cols in [0..n, 3..n - 1, 16.min(n)..n] {
                let width = cols.len();
                let got = run(&packed, &x, rows, cols.clone(), Epilogue::Bias(&bias));
                for r in 0..rows {
                    for (c, j) in cols.clone().enumerate() {
                        let want = expected[r * n + j] + f64::from(bias[j]);
                        let d = (f64::from(got[r * width + c]) - want).abs();
                        assert!(d < 1e-4, "{rows}x{k}x{n} {cols:?} ({r},{j}): {d}");
                    }
                }
                let acc = run(&packed, &x, rows, cols.clone(), Epilogue::Accumulate);
                let gelu_out = run(
                    &packed,
                    &x,
                    rows,
                    cols.clone(),
                    Epilogue::BiasActivation(&bias, Activation::Gelu),
                );
                for r in 0..rows {
                    for (c, j) in cols.clone().enumerate() {
                        let y = expected[r * n + j];
                        assert!((f64::from(acc[r * width + c]) - (0.5 + y)).abs() < 1e-4);
                        let y = y + f64::from(bias[j]);
                        let g = f64::from(gelu_out[r * width + c]);
                        assert!((g - f64::from(super::super::gelu(y as f32))).abs() < 1e-4);
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_pairs_value_and_gate_columns() {
        let (rows, k, inner) = (9, 40, 48);
        let value = random(inner * k, 4);
        let gate = random(inner * k, 5);
        let x = random(rows * k, 6);
        let v = reference(&x, &value, rows, k, inner);
        let g = reference(&x, &gate, rows, k, inner);
        let packed = Packed::swiglu(&value, &gate, k, inner, Precision::F32);
        let cols = 16..48;
        let got = run(&packed, &x, rows, cols.clone(), Epilogue::SwiGlu);
        for r in 0..rows {
            for (c, j) in cols.clone().enumerate() {
                let (v, g) = (v[r * inner + j], g[r * inner + j]);
                let want = v * g / (1.0 + (-g).exp());
                assert!((f64::from(got[r * 32 + c]) - want).abs() < 1e-4);
            }
        }
    }

    thread_local! {
        pub(super) static WITHOUT_AMX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Where the CPU has AMX, the AMX and `vdpbf16ps` kernels give the same bf16 products (on a CPU
    /// without AMX only the latter exists, and the precision tests cover it).
    #[test]
    fn bf16_on_amx_agrees_with_vdpbf16ps() {
        if !bf16_on_amx() {
            return;
        }
        // Row counts below, at and past a tile's 16 (the padded rows), one and two strips per tile, a column
        // range cut inside a strip, and the SwiGLU pairing.
        for (rows, k, n) in [
            (1, 32, 16),
            (5, 64, 40),
            (16, 96, 48),
            (17, 384, 64),
            (33, 64, 32),
        ] {
            let w = random(n * k, 11);
            let x = random(rows * k, 12);
            let packed = Packed::new(&w, k, n, Precision::Bf16);
            let gate = random(n * k, 13);
            let swiglu = Packed::swiglu(&w, &gate, k, n, Precision::Bf16);
            let products = || {
                (
                    run(&packed, &x, rows, 0..n, Epilogue::Scale(1.0)),
                    run(&packed, &x, rows, 3..n - 5, Epilogue::Scale(1.0)),
                    run(&swiglu, &x, rows, 0..n, Epilogue::SwiGlu),
                )
            };
            let amx = products();
            WITHOUT_AMX.with(|off| off.set(true));
            let plain = products();
            WITHOUT_AMX.with(|off| off.set(false));
            for (a, p) in [(&amx.0, &plain.0), (&amx.1, &plain.1), (&amx.2, &plain.2)] {
                let scale = p.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                for (a, p) in a.iter().zip(p) {
                    // The same bf16 products, summed in another order.
                    assert!(
                        (a - p).abs() <= 1e-5 * scale * k as f32,
                        "{rows}×{k}→{n}: {a} vs {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn reduced_precisions_stay_close_to_f32() {
        for precision in [Precision::Bf16, Precision::Int8] {
            if precision.check_cpu().is_err() {
                continue;
            }
            let (rows, k, n) = (14, 96, 48);
            let w = random(n * k, 7);
            let x = random(rows * k, 8);
            let expected = reference(&x, &w, rows, k, n);
            let packed = Packed::new(&w, k, n, precision);
            let got = run(&packed, &x, rows, 0..n, Epilogue::Scale(1.0));
            let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (f64::from(*g) - e).abs() < 0.02 * scale,
                    "{precision}: {g} vs {e}"
                );
            }
            // A split of the inputs (the second half of the groups) gives the matching partial sums.
            let mut scratch = Scratch::default();
            let a = packed.prepare(&x[GROUP..], rows, k, GROUP..k, &mut scratch);
            let mut part = vec![0f32; rows * n];
            packed.product(&a, 0..n, &mut part, n, 0, Epilogue::Scale(1.0));
            let tail = reference(
                &x.chunks(k)
                    .flat_map(|r| r[GROUP..].to_vec())
                    .collect::<Vec<_>>(),
                &w.chunks(k)
                    .flat_map(|r| r[GROUP..].to_vec())
                    .collect::<Vec<_>>(),
                rows,
                k - GROUP,
                n,
            );
            for (g, e) in part.iter().zip(&tail) {
                assert!(
                    (f64::from(*g) - e).abs() < 0.02 * scale,
                    "{precision} split"
                );
            }
        }
    }

    #[test]
    fn the_portable_and_avx2_kernels_agree_with_the_dispatched_one() {
        // Row counts that give the driver tiles of every height, and AVX2 sub-tiles of every height.
        for rows in [1, 5, 6, 7, 11, 12, 13, 17, 32] {
            kernels_agree(rows);
        }
    }

    fn kernels_agree(rows: usize) {
        let (k, n) = (50, 40);
        let w = random(n * k, 9);
        let x = random(rows * k, 10);
        let packed = Packed::new(&w, k, n, Precision::F32);
        let Data::F32(data) = &packed.data else {
            unreachable!()
        };
        let b = Strips {
            ptr: data.as_ptr(),
            row: LANES,
            strip: k * LANES,
        };
        let run_with = |f: &dyn Fn(&Job)| {
            let mut out = vec![0f32; rows * n];
            let job = Job {
                rows,
                inputs: 0..k,
                cols: 0..n,
                out: out.as_mut_ptr(),
                ldo: n,
                out_col: 0,
                epilogue: Epilogue::Scale(1.0),
            };
            f(&job);
            out
        };
        // SAFETY: the job's shapes fit the buffers above.
        let dispatched = run_with(&|job| unsafe { f32_product(job, x.as_ptr(), k, b) });
        let portable = run_with(&|job| unsafe { f32_body(job, x.as_ptr(), k, b, tile_portable) });
        for (i, (a, b)) in dispatched.iter().zip(&portable).enumerate() {
            let exact: f64 = (0..k)
                .map(|p| x[i / n * k + p] as f64 * w[i % n * k + p] as f64)
                .sum();
            assert!((a - b).abs() < 1e-4, "{rows} rows: {a} vs {b}");
            assert!(
                (*a as f64 - exact).abs() < 1e-4,
                "{rows} rows: {a} vs {exact}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(job: &Job, a: *const f32, lda: usize, b: Strips) {
                f32_body(job, a, lda, b, tile_avx2)
            }
            // SAFETY: as above, and the CPU has AVX2 and FMA.
            let avx2 = run_with(&|job| unsafe { avx2(job, x.as_ptr(), k, b) });
            for (a, b) in portable.iter().zip(&avx2) {
                assert!((a - b).abs() < 1e-4, "{rows} rows: {a} vs {b}");
            }
        }
    }

    #[test]
    fn unavailable_precisions_name_the_missing_feature() {
        assert!(Precision::F32.check_cpu().is_ok());
        for precision in [Precision::Bf16, Precision::Int8] {
            if let Err(message) = precision.check_cpu() {
                assert!(
                    message.contains("avx512") && message.contains("f32"),
                    "{message}"
                );
            }
        }
        assert_eq!(Precision::parse("bf16"), Ok(Precision::Bf16));
        assert!(Precision::parse("fp8")
            .unwrap_err()
            .contains("f32, bf16 and int8"));
    }
}
