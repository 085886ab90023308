//! The byte-plane ("shuffle") transform that makes embedded safetensors weights compress: f32 values barely
//! compress as they are, because each 4-byte word mixes a repetitive byte (sign and exponent) with noisy
//! mantissa bytes; grouping byte 0 of every word, then byte 1, and so on gives zstd long runs of alike bytes.
//! The transform only reorders bytes, so unshuffling restores the file bit for bit (the loader checks the
//! pinned sha256 afterwards anyway). The safetensors header stays as it is; a tail shorter than a word stays
//! at the end. Shared by build.rs (which compresses) and the binary (which decompresses).

/// The suffix of a blob made by [`shuffle_safetensors`] and then zstd.
pub const SHUFFLED_ZSTD: &str = "shuf4.zst";
/// The suffix of a blob that is plain zstd.
pub const PLAIN_ZSTD: &str = "zst";

const WORD: usize = 4;

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

/// Header unchanged, then the tensor data as 4 planes: byte 0 of every word, byte 1, byte 2, byte 3.
pub fn shuffle_safetensors(file: &[u8]) -> Result<Vec<u8>, String> {
    let start = data_start(file)?;
    let (head, data) = file.split_at(start);
    let words = data.len() / WORD;
    let mut out = Vec::with_capacity(file.len());
    out.extend_from_slice(head);
    for plane in 0..WORD {
        out.extend(data[..words * WORD].chunks_exact(WORD).map(|w| w[plane]));
    }
    out.extend_from_slice(&data[words * WORD..]);
    Ok(out)
}

/// The inverse of [`shuffle_safetensors`].
pub fn unshuffle_safetensors(shuffled: &[u8]) -> Result<Vec<u8>, String> {
    let start = data_start(shuffled)?;
    let (head, data) = shuffled.split_at(start);
    let words = data.len() / WORD;
    let mut out = vec![0u8; shuffled.len()];
    out[..start].copy_from_slice(head);
    let (body, tail) = out[start..].split_at_mut(words * WORD);
    let planes: Vec<&[u8]> = data[..words * WORD].chunks_exact(words.max(1)).collect();
    if let [p0, p1, p2, p3] = planes[..] {
        // Zipped iterators rather than indexing: no bounds checks in a loop over every weight.
        let bytes = p0.iter().zip(p1).zip(p2).zip(p3);
        for (word, (((b0, b1), b2), b3)) in body.chunks_exact_mut(WORD).zip(bytes) {
            word.copy_from_slice(&[*b0, *b1, *b2, *b3]);
        }
    }
    tail.copy_from_slice(&data[words * WORD..]);
    Ok(out)
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
        for data_len in [0, 1, 3, 4, 5, 12, 1001, 4096] {
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
