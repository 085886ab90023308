//! From token states to the vector a client receives: mean pooling, the v1.5 layer norm, Matryoshka
//! truncation and L2 normalisation. (The architectures mean-pool their packed states with `kernels::mean_rows`.)

use super::catalog::ModelSpec;

/// Turns a pooled vector into the embedding of width `dims` that `spec` promises.
pub fn finish(spec: &ModelSpec, mut pooled: Vec<f32>, dims: usize) -> Vec<f32> {
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
    if spec.normalize {
        // torch.nn.functional.normalize: v / max(‖v‖, 1e-12).
        let norm = pooled
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for x in &mut pooled {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    pooled
}
