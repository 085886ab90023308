//! From token states to the vector a client receives: mean pooling, the v1.5 layer norm, Matryoshka
//! truncation and L2 normalisation. (BERT pools its packed states itself, with `kernels::mean_rows`.)

use super::catalog::ModelSpec;

/// The mean of `rows` (token states of one sequence, padding excluded).
pub fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let width = rows.first().map_or(0, Vec::len);
    let mut sum = vec![0f64; width];
    for row in rows {
        for (s, x) in sum.iter_mut().zip(row) {
            *s += f64::from(*x);
        }
    }
    let count = rows.len().max(1) as f64;
    sum.into_iter().map(|s| (s / count) as f32).collect()
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
