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
    let bytes = if codec == byte_planes::SHUFFLED_ZSTD {
        // Unshuffled block by block as it is decompressed: the shuffled file never sits whole in memory.
        let decoder =
            zstd::stream::read::Decoder::with_buffer(blob.contents()).map_err(|e| corrupt(&e))?;
        byte_planes::unshuffle_from(decoder, size).map_err(|e| corrupt(&e))
    } else {
        zstd::decode_all(blob.contents()).map_err(|e| corrupt(&e))
    };
    release_pages(blob.contents());
    bytes
}

/// Drops the blob's pages from the resident set. They were read once, to decompress; they are clean pages
/// of the executable, so the kernel can read them again if ever needed. Without this the compressed
/// weights stay resident beside the decompressed ones, nearly doubling idle RSS.
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > start {
        // SAFETY: the range is whole pages inside a read-only, file-backed static; MADV_DONTNEED on such a
        // mapping only discards cached copies, and later reads fault the same bytes back in from the file.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// Whether this build compiled in the files of the model `name` (build.rs stages exactly those).
pub fn has(name: &str) -> bool {
    EMBEDDED.get_dir(name).is_some()
}

/// The compressed size of the embedded files of `spec`, for `embedding-server models`.
pub fn compressed_size(spec: &ModelSpec) -> u64 {
    EMBEDDED
        .get_dir(&spec.name)
        .map(|dir| dir.files().map(|f| f.contents().len() as u64).sum())
        .unwrap_or(0)
}
