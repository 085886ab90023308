//! Multi-head self-attention of one unpadded sequence on the f32 micro-kernels of [`super::gemm`], in every
//! precision (attention's products are a small share of the work and the most sensitive to rounding).
//!
//! Per head: the keys are packed once into strips of 16 keys (`Kᵀ`), then each block of query rows takes
//! its scores `Q·Kᵀ / √d` in one product (a short sequence's block is all of it, its scores a few registers
//! wide), the softmax of each row, and `P·V` in a second product straight from the values in place. A long
//! sequence goes in blocks of query rows, so its memory grows with its length, not with its square.

use super::gemm::{self, Epilogue, Strips, LANES};
use super::softmax_rows;

/// The most attention scores one block of queries holds (256 KiB, about L2's share of it).
const BLOCK_SCORES: usize = 64 << 10;

/// Where one sequence's heads lie in a buffer of rows: row `i` of the sequence starts at `i·stride`, and
/// head `h`'s query, key and value at columns `q + h·head_dim`, `k + h·head_dim`, `v + h·head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub stride: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub head_dim: usize,
}

/// Reusable buffers of one thread's attention.
#[derive(Default)]
pub struct Scratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
}

fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The attention of heads `0..heads` of one sequence of `len` rows in `qkv` (laid out as `layout` says):
/// head `h`'s context goes to `out[i·ldo + h·head_dim ..]`.
pub fn attend(
    qkv: &[f32],
    len: usize,
    layout: Heads,
    heads: usize,
    out: &mut [f32],
    ldo: usize,
    scratch: &mut Scratch,
) {
    let d = layout.head_dim;
    if len == 0 || heads == 0 || d == 0 {
        return;
    }
    let last = [layout.q, layout.k, layout.v]
        .into_iter()
        .max()
        .unwrap_or(0)
        + heads * d;
    assert!(
        (len - 1) * layout.stride + last <= qkv.len(),
        "attention reads outside qkv"
    );
    assert!(
        (len - 1) * ldo + heads * d <= out.len(),
        "attention writes outside its output"
    );
    let key_strips = len.div_ceil(LANES);
    let dim_strips = d.div_ceil(LANES);
    let block = (BLOCK_SCORES / len).clamp(1, len);
    let scale = 1.0 / (d as f32).sqrt();
    let keys = grown(&mut scratch.keys, key_strips * d * LANES);
    // Values are read in place when a head is whole strips wide, else copied into zero-padded strips.
    let in_place = d.is_multiple_of(LANES);
    let values = grown(
        &mut scratch.values,
        if in_place {
            0
        } else {
            dim_strips * len * LANES
        },
    );
    let scores = grown(&mut scratch.scores, block * len);
    for h in 0..heads {
        let (q, k, v) = (layout.q + h * d, layout.k + h * d, layout.v + h * d);
        keys.fill(0.0);
        for j in 0..len {
            let key = &qkv[j * layout.stride + k..][..d];
            let (strip, lane) = (j / LANES, j % LANES);
            for (i, &x) in key.iter().enumerate() {
                keys[(strip * d + i) * LANES + lane] = x;
            }
        }
        let values = if in_place {
            Strips {
                ptr: qkv[v..].as_ptr(),
                row: layout.stride,
                strip: LANES,
            }
        } else {
            values.fill(0.0);
            for j in 0..len {
                for (i, &x) in qkv[j * layout.stride + v..][..d].iter().enumerate() {
                    values[((i / LANES) * len + j) * LANES + i % LANES] = x;
                }
            }
            Strips {
                ptr: values.as_ptr(),
                row: LANES,
                strip: len * LANES,
            }
        };
        let keys = Strips {
            ptr: keys.as_ptr(),
            row: LANES,
            strip: d * LANES,
        };
        for first in (0..len).step_by(block) {
            let rows = block.min(len - first);
            // SAFETY: the queries are `rows` rows of `d` floats inside `qkv` (checked above); the key
            // strips cover `len` columns (padded to whole strips) over `d` inputs; the scores hold
            // `rows × len`; the values cover `d` columns (whole strips, in place or padded) over `len`
            // inputs, and the output rows × `d` columns lie inside `out` (checked above).
            unsafe {
                gemm::f32_raw(
                    rows,
                    d,
                    qkv[first * layout.stride + q..].as_ptr(),
                    layout.stride,
                    keys,
                    0..len,
                    scores.as_mut_ptr(),
                    len,
                    Epilogue::Scale(scale),
                );
                softmax_rows(&mut scores[..rows * len], len);
                gemm::f32_raw(
                    rows,
                    len,
                    scores.as_ptr(),
                    len,
                    values,
                    0..d,
                    out[first * ldo + h * d..].as_mut_ptr(),
                    ldo,
                    Epilogue::Scale(1.0),
                );
            }
        }
    }
}

/// Rotary position embedding (GPT-NeoX's half-split form, as nomic's code applies it) of queries and
/// keys in place: the angles' cosines and sines for `[positions, head_dim / 2]`, computed as nomic's code
/// does (f32 inverse frequencies, f32 angles `position × inv_freq`) so that long positions round alike.
pub struct Rotary {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, positions: usize, base: f64) -> Rotary {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| (1.0 / base.powf(i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(positions * inv_freq.len());
        let mut sin = Vec::with_capacity(positions * inv_freq.len());
        for position in 0..positions {
            for &f in &inv_freq {
                let angle = f64::from(position as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rotary {
            half: head_dim / 2,
            cos,
            sin,
        }
    }

    /// The longest sequence the tables cover.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// (cos, sin) of `position` and frequency `i`.
    pub fn angle(&self, position: usize, i: usize) -> (f32, f32) {
        let at = position * self.half + i;
        (self.cos[at], self.sin[at])
    }

    /// Rotates heads `0..heads` at column `col` of each of the sequence's `len` rows (`stride` apart).
    pub fn apply(&self, rows: &mut [f32], len: usize, stride: usize, col: usize, heads: usize) {
        let half = self.half;
        assert!(len <= self.positions(), "rotary tables too short");
        for position in 0..len {
            let cos = &self.cos[position * half..][..half];
            let sin = &self.sin[position * half..][..half];
            let row = &mut rows[position * stride + col..][..heads * 2 * half];
            for head in row.chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one head in f64, the textbook way.
    fn naive(qkv: &[f32], len: usize, layout: Heads, h: usize) -> Vec<f64> {
        let d = layout.head_dim;
        let at =
            |j: usize, col: usize, i: usize| f64::from(qkv[j * layout.stride + col + h * d + i]);
        let mut out = vec![0f64; len * d];
        for i in 0..len {
            let logits: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|x| at(i, layout.q, x) * at(j, layout.k, x))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for x in 0..d {
                out[i * d + x] = (0..len)
                    .map(|j| weights[j] / total * at(j, layout.v, x))
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_the_textbook_for_short_long_and_odd_heads() {
        for (len, heads, d) in [
            (1, 2, 16),
            (3, 2, 8),
            (37, 3, 32),
            (700, 2, 64),
            (20, 2, 24),
        ] {
            let hidden = heads * d;
            let stride = 3 * hidden + 5;
            let qkv: Vec<f32> = (0..len * stride)
                .map(|i| (((i * 7919) % 211) as f32 / 105.0 - 1.0) * 1.5)
                .collect();
            let layout = Heads {
                stride,
                q: 0,
                k: hidden,
                v: 2 * hidden,
                head_dim: d,
            };
            let mut out = vec![0f32; len * hidden];
            attend(
                &qkv,
                len,
                layout,
                heads,
                &mut out,
                hidden,
                &mut Scratch::default(),
            );
            for h in 0..heads {
                let want = naive(&qkv, len, layout, h);
                for i in 0..len {
                    for x in 0..d {
                        let got = f64::from(out[i * hidden + h * d + x]);
                        assert!(
                            (got - want[i * d + x]).abs() < 2e-5,
                            "len {len} head {h} ({i},{x}): {got} vs {}",
                            want[i * d + x]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rotary_angles_are_f32_products_like_the_reference() {
        let rotary = Rotary::new(16, 2048, 1000.0);
        // inv_freq[0] is 1, so frequency 0 is the position itself.
        assert_eq!(
            rotary.angle(1500, 0),
            ((1500f64).cos() as f32, (1500f64).sin() as f32)
        );
        // The last frequency is 1000^(-14/16).
        let f = (1.0 / 1000f64.powf(14.0 / 16.0)) as f32;
        assert_eq!(rotary.angle(700, 7).0, f64::from(700f32 * f).cos() as f32);
    }
}
