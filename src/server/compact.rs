//! Compact vectors for any API dialect (OpenAI's `encoding_format` today, Cohere's `embedding_types`
//! later): [`prepare`] checks a format against the width before the engine spends anything and has the
//! model's int8/uint8 ranges calibrated if the format needs them; [`convert`] turns the finished float
//! embeddings into it. The maths is `models::quantize`; this adds only the HTTP errors.

use std::sync::Arc;

use super::errors::ApiError;
use crate::models::quantize::{self, Calibrated, Compact, CompactFormat};
use crate::models::Model;

/// What converting needs: the format, and the ranges for `dims` if it is int8/uint8.
pub struct Prepared {
    precision: CompactFormat,
    calibrated: Option<Arc<Calibrated>>,
    dims: usize,
}

/// Checks that `model`'s embeddings of width `dims` can be given in `precision` (a 400 about `param`
/// otherwise), calibrating the model's ranges on first use.
pub fn prepare(
    model: &Model,
    precision: CompactFormat,
    dims: usize,
    param: &str,
) -> Result<Prepared, ApiError> {
    if precision.is_packed() && !dims.is_multiple_of(8) {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "{} packs 8 dimensions per byte, so it needs a width that is a multiple of 8, not {dims}; ask for other \"dimensions\" or another format.",
                precision.name()
            ),
        ));
    }
    let calibrated = if precision.needs_ranges() {
        Some(ranges(model)?)
    } else {
        None
    };
    Ok(Prepared {
        precision,
        calibrated,
        dims,
    })
}

/// The model's int8/uint8 ranges, calibrated on first use (which takes a moment; the log says how long).
pub fn ranges(model: &Model) -> Result<Arc<Calibrated>, ApiError> {
    model.quantization_ranges().map_err(|e| {
        eprintln!("error: calibrating {}: {e}", model.spec.name);
        ApiError::internal()
    })
}

/// `embeddings` (each of the width `prepare` was given) in the prepared format.
pub fn convert(prepared: &Prepared, embeddings: &[Vec<f32>]) -> Result<Vec<Compact>, ApiError> {
    let ranges = prepared
        .calibrated
        .as_ref()
        .and_then(|c| c.for_dims(prepared.dims));
    embeddings
        .iter()
        .map(|e| quantize::quantize(e, prepared.precision, ranges))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            // `prepare` checked the width and found the ranges: this is a bug, not the client's doing.
            eprintln!("error: quantising to {}: {e}", prepared.precision.name());
            ApiError::internal()
        })
}
