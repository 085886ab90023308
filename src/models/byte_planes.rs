//! The byte-plane ("shuffle") transform that makes embedded safetensors weights compress: f32 values barely
//! compress as they are, because each 4-byte word mixes a repetitive byte (sign and exponent) with noisy
//! mantissa bytes; grouping byte 0 of every word, then byte 1, and so on gives zstd long runs of alike bytes.
//! The transform only reorders bytes, so unshuffling restores the file bit for bit (the loader checks the
//! pinned sha256 afterwards anyway). The safetensors header stays as it is; the tensor data is shuffled in
//! blocks of [`BLOCK`] bytes, so the binary can unshuffle while it decompresses, through one small buffer,
//! instead of holding the whole shuffled file beside the result; a block's tail shorter than a word stays
//! at its end. Shared by build.rs (which compresses) and the binary (which decompresses).

use std::io::Read;

/// The suffix of a blob made by [`shuffle_safetensors`] and then zstd.
pub const SHUFFLED_ZSTD: &str = "shuf4.zst";
/// The suffix of a blob that is plain zstd.
pub const PLAIN_ZSTD: &str = "zst";

const WORD: usize = 4;
/// Large enough that zstd sees long runs within a plane, small enough to stay in cache while unshuffling.
pub const BLOCK: usize = 1 << 20;

/// Whether a file is stored shuffled: safetensors files, whose tensor data is words of 4 or 8 bytes.
pub fn is_shuffled(file_name: &str) -> bool {
    file_name.ends_with(".safetensors")
}

/// The blob suffix (codec) a file is stored with.
pub fn codec(file_name: &str) -> &'static str {
    if is_shuffled(file_name) {
        SHUFFLED_ZSTD
    } else {
        PLAIN_ZSTD
    }
}

/// Header unchanged, then each block of the tensor data as 4 planes: byte 0 of every word, byte 1, 2, 3.
pub fn shuffle_safetensors(file: &[u8]) -> Result<Vec<u8>, String> {
    let start = data_start(file)?;
    let (head, data) = file.split_at(start);
    let mut out = Vec::with_capacity(file.len());
    out.extend_from_slice(head);
    for block in data.chunks(BLOCK) {
        let words = block.len() / WORD;
        for plane in 0..WORD {
            out.extend(block[..words * WORD].chunks_exact(WORD).map(|w| w[plane]));
        }
        out.extend_from_slice(&block[words * WORD..]);
    }
    Ok(out)
}

/// The inverse of [`shuffle_safetensors`], for a file in memory.
pub fn unshuffle_safetensors(shuffled: &[u8]) -> Result<Vec<u8>, String> {
    unshuffle_from(shuffled, shuffled.len())
}

/// The inverse of [`shuffle_safetensors`], reading the shuffled file from `reader` (e.g. a zstd decoder)
/// one block at a time; `expected_len` sizes the result up front.
pub fn unshuffle_from(mut reader: impl Read, expected_len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(expected_len);
    let mut length = [0u8; 8];
    reader
        .read_exact(&mut length)
        .map_err(|e| format!("cannot read the safetensors header length: {e}"))?;
    let header_len = u64::from_le_bytes(length);
    out.extend_from_slice(&length);
    let header_read = (&mut reader)
        .take(header_len)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read the safetensors header: {e}"))?;
    if header_read as u64 != header_len {
        return Err("a safetensors header length beyond the end of the file".into());
    }
    let mut block = vec![0u8; BLOCK];
    loop {
        let filled = fill(&mut reader, &mut block)?;
        if filled == 0 {
            return Ok(out);
        }
        unshuffle_block(&block[..filled], &mut out);
        if filled < BLOCK {
            return Ok(out);
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, String> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the tensor data: {e}")),
        }
    }
    Ok(filled)
}

fn unshuffle_block(block: &[u8], out: &mut Vec<u8>) {
    let words = block.len() / WORD;
    let (planes, tail) = block.split_at(words * WORD);
    let (p0, rest) = planes.split_at(words);
    let (p1, rest) = rest.split_at(words);
    let (p2, p3) = rest.split_at(words);
    let start = out.len();
    out.resize(start + block.len(), 0);
    let (body, rest) = out[start..].split_at_mut(words * WORD);
    // Zipped iterators rather than indexing: no bounds checks in a loop over every weight.
    let bytes = p0.iter().zip(p1).zip(p2).zip(p3);
    for (word, (((b0, b1), b2), b3)) in body.chunks_exact_mut(WORD).zip(bytes) {
        word.copy_from_slice(&[*b0, *b1, *b2, *b3]);
    }
    rest.copy_from_slice(tail);
}

/// Where the tensor data begins: after the 8-byte little-endian header length and the JSON header.
fn data_start(file: &[u8]) -> Result<usize, String> {
    let length: [u8; 8] = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("a safetensors file shorter than its 8-byte header length")?;
    usize::try_from(u64::from_le_bytes(length))
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&start| start <= file.len())
        .ok_or_else(|| "a safetensors header length beyond the end of the file".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors_like(data_len: usize) -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
        file
    }

    #[test]
    fn unshuffle_restores_every_byte() {
        for data_len in [
            0,
            1,
            3,
            4,
            5,
            12,
            1001,
            BLOCK - 1,
            BLOCK,
            BLOCK + 6,
            2 * BLOCK + 4,
        ] {
            let file = safetensors_like(data_len);
            let shuffled = shuffle_safetensors(&file).unwrap();
            assert_eq!(shuffled.len(), file.len());
            assert_eq!(
                unshuffle_safetensors(&shuffled).unwrap(),
                file,
                "data length {data_len}"
            );
        }
    }

    #[test]
    fn shuffle_groups_bytes_by_position_and_keeps_the_header() {
        let file = safetensors_like(8);
        let start = file.len() - 8;
        let shuffled = shuffle_safetensors(&file).unwrap();
        assert_eq!(shuffled[..start], file[..start]);
        let d = &file[start..];
        assert_eq!(
            shuffled[start..],
            [d[0], d[4], d[1], d[5], d[2], d[6], d[3], d[7]]
        );
    }

    #[test]
    fn a_truncated_header_is_an_error_not_a_panic() {
        assert!(shuffle_safetensors(&[1, 2, 3]).is_err());
        assert!(unshuffle_safetensors(&u64::MAX.to_le_bytes()).is_err());
        assert!(unshuffle_safetensors(&100u64.to_le_bytes()).is_err());
    }
}
