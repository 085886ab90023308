//! From token states to the vector a client receives: pooling (every mode, for every architecture), the
//! v1.5 layer norm, Matryoshka truncation and L2 normalisation; and from a cross-encoder's logits to its
//! score.

use super::catalog::{ModelSpec, Pooling, ScoreActivation};

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

/// A one-label cross-encoder's score: `activation` of its logit (`logits[0]`), as the `torch.nn` module
/// computes it, in f64.
pub fn score(activation: ScoreActivation, logits: &[f32]) -> f32 {
    let x = f64::from(logits.first().copied().unwrap_or(0.0));
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    // torch.nn.Softplus (beta 1, threshold 20): linear above the threshold.
    let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
    let y = match activation {
        ScoreActivation::Identity => x,
        ScoreActivation::Sigmoid => sigmoid(x),
        ScoreActivation::Tanh => x.tanh(),
        ScoreActivation::ReLu => x.max(0.0),
        ScoreActivation::Softmax => {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            f64::from(logits[0] - max).exp() / total
        }
        ScoreActivation::LogSigmoid => -softplus(-x),
        ScoreActivation::Softplus => softplus(x),
        ScoreActivation::Gelu => {
            0.5 * x * (1.0 + f64::from(super::kernels::erf((x / std::f64::consts::SQRT_2) as f32)))
        }
        ScoreActivation::Silu => x * sigmoid(x),
    };
    y as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_the_torch_activations_of_the_logit() {
        let close = |a: f32, b: f64| (f64::from(a) - b).abs() < 1e-6;
        let at = |activation, x: f32| score(activation, &[x]);
        assert!(close(
            at(ScoreActivation::Sigmoid, 2.0),
            0.880_797_077_977_882_4
        ));
        assert!(close(at(ScoreActivation::Identity, -1.5), -1.5));
        assert!(close(
            at(ScoreActivation::Tanh, 0.5),
            0.462_117_157_260_009_8
        ));
        assert!(close(at(ScoreActivation::ReLu, -3.0), 0.0));
        assert!(close(at(ScoreActivation::Softmax, -3.0), 1.0));
        assert!(close(
            at(ScoreActivation::LogSigmoid, 1.0),
            -0.313_261_687_518_222_8
        ));
        assert!(close(
            at(ScoreActivation::Softplus, 1.0),
            1.313_261_687_518_222_8
        ));
        assert!(close(at(ScoreActivation::Softplus, 30.0), 30.0));
        assert!(close(
            at(ScoreActivation::Gelu, 1.0),
            0.841_344_746_068_542_9
        ));
        assert!(close(
            at(ScoreActivation::Silu, 1.0),
            0.731_058_578_630_004_9
        ));
        // Far out, the logistic saturates instead of overflowing.
        assert_eq!(at(ScoreActivation::Sigmoid, -1000.0), 0.0);
        assert_eq!(at(ScoreActivation::Sigmoid, 1000.0), 1.0);
    }

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
