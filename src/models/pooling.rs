//! From token states to the vector a client receives: pooling (every mode, for every architecture), the
//! v1.5 layer norm, Matryoshka truncation and L2 normalisation.

use super::catalog::{ModelSpec, Pooling};

/// Pools each sequence's rows: `states` holds the sequences' token states back to back (`width` wide),
/// `lengths` says how many rows each has. Sums are taken in f64, as the pooled vector is the one output
/// every client sees; an empty sequence pools to zeros.
pub fn pool(states: &[f32], width: usize, lengths: &[usize], mode: Pooling) -> Vec<Vec<f32>> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let rows = &states[start * width..(start + len) * width];
            start += len;
            if len == 0 {
                return vec![0.0; width];
            }
            match mode {
                Pooling::Cls => rows[..width].to_vec(),
                Pooling::Max => {
                    let mut max = rows[..width].to_vec();
                    for row in rows.chunks_exact(width).skip(1) {
                        for (m, &x) in max.iter_mut().zip(row) {
                            *m = m.max(x);
                        }
                    }
                    max
                }
                Pooling::Mean | Pooling::MeanSqrtLen => {
                    let mut sum = vec![0f64; width];
                    for row in rows.chunks_exact(width) {
                        for (s, &x) in sum.iter_mut().zip(row) {
                            *s += f64::from(x);
                        }
                    }
                    let divisor = match mode {
                        Pooling::Mean => len as f64,
                        _ => (len as f64).sqrt(),
                    };
                    sum.into_iter().map(|s| (s / divisor) as f32).collect()
                }
            }
        })
        .collect()
}

/// Turns a pooled vector into the embedding of width `dims` that `spec` promises.
pub fn finish(spec: &ModelSpec, pooled: Vec<f32>, dims: usize) -> Vec<f32> {
    let mut embedding = finish_unnormalized(spec, pooled, dims);
    if spec.normalize {
        // torch.nn.functional.normalize: v / max(‖v‖, 1e-12).
        let norm = embedding
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for x in &mut embedding {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    embedding
}

/// Every step of [`finish`] before the L2 normalisation: what a client that normalises (or not) by
/// itself asks for.
pub fn finish_unnormalized(spec: &ModelSpec, mut pooled: Vec<f32>, dims: usize) -> Vec<f32> {
    if spec.post_pooling_layer_norm {
        // nomic-embed-text-v1.5: F.layer_norm over the full width, no affine parameters, eps 1e-5.
        let n = pooled.len().max(1) as f64;
        let mean = pooled.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = pooled
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let inv = 1.0 / (var + 1e-5).sqrt();
        for x in &mut pooled {
            *x = ((f64::from(*x) - mean) * inv) as f32;
        }
    }
    pooled.truncate(dims);
    pooled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_pools_each_sequence_of_a_packed_batch() {
        // Two sequences, 2 wide: [[1, -2], [3, 4], [5, 0]] and [[-1, 7]].
        let states = [1.0, -2.0, 3.0, 4.0, 5.0, 0.0, -1.0, 7.0];
        let pooled = |mode| pool(&states, 2, &[3, 1], mode);
        assert_eq!(pooled(Pooling::Cls), vec![vec![1.0, -2.0], vec![-1.0, 7.0]]);
        assert_eq!(pooled(Pooling::Max), vec![vec![5.0, 4.0], vec![-1.0, 7.0]]);
        assert_eq!(
            pooled(Pooling::Mean),
            vec![vec![3.0, 2.0 / 3.0], vec![-1.0, 7.0]]
        );
        let root3 = 3f64.sqrt();
        assert_eq!(
            pooled(Pooling::MeanSqrtLen),
            vec![
                vec![(9.0 / root3) as f32, (2.0 / root3) as f32],
                vec![-1.0, 7.0]
            ]
        );
        assert_eq!(pool(&[], 2, &[0], Pooling::Max), vec![vec![0.0, 0.0]]);
    }
}
