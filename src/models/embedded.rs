//! The model files compiled into the binary: blobs staged by build.rs under `$OUT_DIR/embedded`, named
//! `<model>/<file>.<codec>`: `zst` (plain zstd) or `shuf4.zst` (byte planes, then zstd; see `byte_planes`).

use include_dir::{include_dir, Dir};

use super::byte_planes;
use super::catalog::ModelSpec;
use super::ModelError;

static EMBEDDED: Dir<'static> = include_dir!("$OUT_DIR/embedded");

/// The decompressed bytes of one embedded file of `spec`; the caller checks them against the pinned hash.
pub fn read(spec: &ModelSpec, file: &str) -> Result<Vec<u8>, ModelError> {
    let codec = byte_planes::codec(file);
    let path = format!("{}/{file}.{codec}", spec.name);
    let blob = EMBEDDED.get_file(&path).ok_or_else(|| {
        ModelError::new(format!("this binary does not embed {}/{file}", spec.name))
    })?;
    let corrupt = |e: &dyn std::fmt::Display| {
        ModelError::new(format!(
            "the embedded copy of {}/{file} is corrupt: {e}",
            spec.name
        ))
    };
    let size = spec
        .files
        .iter()
        .find(|f| f.name == file)
        .map_or(0, |f| f.size as usize);
    if codec == byte_planes::SHUFFLED_ZSTD {
        // Unshuffled block by block as it is decompressed: the shuffled file never sits whole in memory.
        let decoder =
            zstd::stream::read::Decoder::with_buffer(blob.contents()).map_err(|e| corrupt(&e))?;
        byte_planes::unshuffle_from(decoder, size).map_err(|e| corrupt(&e))
    } else {
        zstd::decode_all(blob.contents()).map_err(|e| corrupt(&e))
    }
}

/// The compressed size of the embedded files of `spec`, for `embedding-server models`.
pub fn compressed_size(spec: &ModelSpec) -> u64 {
    EMBEDDED
        .get_dir(spec.name)
        .map(|dir| dir.files().map(|f| f.contents().len() as u64).sum())
        .unwrap_or(0)
}
