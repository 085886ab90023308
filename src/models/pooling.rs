//! From token states to the vector a client receives: pooling, the v1.5 layer norm, Matryoshka truncation
//! and L2 normalisation, plus grouping a batch by length so that padding costs little.

use super::catalog::ModelSpec;
use super::ModelError;

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

/// Runs `run` over groups of sequences of similar length (sorted, so a group pads little) and returns the
/// results in the order of `batch`.
pub fn in_length_groups<F>(batch: &[&[u32]], mut run: F) -> Result<Vec<Vec<f32>>, ModelError>
where
    F: FnMut(&[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError>,
{
    const MAX_GROUP: usize = 64;
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].len());
    let mut results: Vec<Option<Vec<f32>>> = vec![None; batch.len()];
    let mut start = 0;
    while start < order.len() {
        let shortest = batch[order[start]].len();
        let mut end = start + 1;
        // A group grows while its longest member is at most 25% (+8 tokens) longer than its shortest.
        while end < order.len()
            && end - start < MAX_GROUP
            && batch[order[end]].len() <= shortest + shortest / 4 + 8
        {
            end += 1;
        }
        let group: Vec<&[u32]> = order[start..end].iter().map(|&i| batch[i]).collect();
        for (&i, vector) in order[start..end].iter().zip(run(&group)?) {
            results[i] = Some(vector);
        }
        start = end;
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| ModelError::new("the encoder returned too few vectors")))
        .collect()
}
