//! The model files compiled into the binary: zstd blobs staged by build.rs under `$OUT_DIR/embedded`.

use include_dir::{include_dir, Dir};

use super::catalog::ModelSpec;
use super::ModelError;

static EMBEDDED: Dir<'static> = include_dir!("$OUT_DIR/embedded");

/// The decompressed bytes of one embedded file of `spec`.
pub fn read(spec: &ModelSpec, file: &str) -> Result<Vec<u8>, ModelError> {
    let path = format!("{}/{file}.zst", spec.name);
    let blob = EMBEDDED.get_file(&path).ok_or_else(|| {
        ModelError::new(format!("this binary does not embed {}/{file}", spec.name))
    })?;
    zstd::decode_all(blob.contents()).map_err(|e| {
        ModelError::new(format!(
            "the embedded copy of {}/{file} is corrupt: {e}",
            spec.name
        ))
    })
}

/// The compressed size of the embedded files of `spec`, for `embedding-server models`.
pub fn compressed_size(spec: &ModelSpec) -> u64 {
    EMBEDDED
        .get_dir(spec.name)
        .map(|dir| dir.files().map(|f| f.contents().len() as u64).sum())
        .unwrap_or(0)
}
