//! Compact vectors: float embeddings turned into int8, uint8, binary or ubinary values with the semantics of
//! sentence-transformers' `quantize_embeddings`, and the per-dimension ranges int8/uint8 need, calibrated once
//! per model on a set of sentences compiled into the binary (`assets/calibration.txt`).
//!
//! Nothing here knows of HTTP: any API dialect (OpenAI's `encoding_format`, Cohere's `embedding_types`)
//! picks a [`CompactFormat`] and calls [`quantize`] on the embedding it would otherwise send as floats.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The calibration sentences: one per line, written for this project, varied in length, topic, style and
/// language. Changing them changes every model's int8/uint8 ranges.
pub const CALIBRATION_TEXT: &str = include_str!("../../assets/calibration.txt");

/// Calibration sentences go through the engine in batches of this many, in file order, so that the ranges
/// come out bit-identical run after run whatever else the server is doing.
const CALIBRATION_BATCH: usize = 32;

/// The calibration sentences, in order.
pub fn calibration_sentences() -> impl Iterator<Item = &'static str> {
    CALIBRATION_TEXT
        .lines()
        .filter(|line| !line.trim().is_empty())
}

/// A compact number format (not to be confused with [`crate::models::Precision`], the engine's arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactFormat {
    /// One value per dimension, −128..=127: the uint8 bucket minus 128.
    Int8,
    /// One value per dimension, 0..=255: the bucket of the value between the dimension's calibrated minimum
    /// and maximum, in 255 equal steps.
    Uint8,
    /// One bit per dimension (1 where the value is > 0), packed most significant bit first, each byte
    /// minus 128 as int8.
    Binary,
    /// The same bytes as `Binary`, as 0..=255.
    Ubinary,
}

impl CompactFormat {
    pub const ALL: [CompactFormat; 4] = [
        CompactFormat::Int8,
        CompactFormat::Uint8,
        CompactFormat::Binary,
        CompactFormat::Ubinary,
    ];

    /// The name sentence-transformers (and the APIs) use.
    pub fn name(self) -> &'static str {
        match self {
            CompactFormat::Int8 => "int8",
            CompactFormat::Uint8 => "uint8",
            CompactFormat::Binary => "binary",
            CompactFormat::Ubinary => "ubinary",
        }
    }

    pub fn from_name(name: &str) -> Option<CompactFormat> {
        CompactFormat::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether the format needs calibrated [`Ranges`].
    pub fn needs_ranges(self) -> bool {
        matches!(self, CompactFormat::Int8 | CompactFormat::Uint8)
    }

    /// Whether the format packs eight dimensions into each value.
    pub fn is_packed(self) -> bool {
        matches!(self, CompactFormat::Binary | CompactFormat::Ubinary)
    }
}

/// A quantised embedding: signed values (int8, binary) or unsigned ones (uint8, ubinary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compact {
    Signed(Vec<i8>),
    Unsigned(Vec<u8>),
}

/// Why an embedding cannot be given in a format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantizeError {
    /// Binary formats pack whole bytes: the width must be a multiple of 8.
    NotMultipleOf8 { width: usize },
    /// int8/uint8 without ranges, or ranges of another width.
    Ranges { width: usize, ranges: Option<usize> },
}

impl std::fmt::Display for QuantizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantizeError::NotMultipleOf8 { width } => write!(
                f,
                "binary formats pack 8 dimensions per byte, and {width} is not a multiple of 8"
            ),
            QuantizeError::Ranges { width, ranges } => match ranges {
                None => write!(f, "int8/uint8 of {width} dimensions need calibrated ranges"),
                Some(r) => write!(f, "ranges of {r} dimensions cannot quantise {width}"),
            },
        }
    }
}

/// Per-dimension minimum and maximum over a calibration set, as sentence-transformers' `ranges`
/// (`np.vstack([min, max])`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ranges {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

impl Ranges {
    /// The ranges of `embeddings` (all of one width; at least one).
    pub fn of(embeddings: &[Vec<f32>]) -> Ranges {
        let width = embeddings.first().map_or(0, Vec::len);
        let mut ranges = Ranges {
            min: vec![f32::INFINITY; width],
            max: vec![f32::NEG_INFINITY; width],
        };
        for embedding in embeddings {
            for ((x, lo), hi) in embedding.iter().zip(&mut ranges.min).zip(&mut ranges.max) {
                *lo = lo.min(*x);
                *hi = hi.max(*x);
            }
        }
        ranges
    }

    pub fn width(&self) -> usize {
        self.min.len()
    }
}

/// `embedding` in `precision`, exactly as `quantize_embeddings(embedding, precision, ranges=ranges)` gives it
/// for a float32 input: for int8/uint8, `clip(floor((x − min) / step), 0, 255)` with
/// `step = (max − min) / 255` (1 where that is 0), all in f32; for binary, the bits of `x > 0`.
pub fn quantize(
    embedding: &[f32],
    precision: CompactFormat,
    ranges: Option<&Ranges>,
) -> Result<Compact, QuantizeError> {
    let width = embedding.len();
    if precision.is_packed() {
        if !width.is_multiple_of(8) {
            return Err(QuantizeError::NotMultipleOf8 { width });
        }
        let bytes = embedding.chunks_exact(8).map(|eight| {
            eight
                .iter()
                .fold(0u8, |byte, &x| (byte << 1) | u8::from(x > 0.0))
        });
        return Ok(match precision {
            // numpy: (packed − 128) wraps in uint8, then reads as int8: the top bit flipped.
            CompactFormat::Binary => Compact::Signed(bytes.map(|b| (b ^ 0x80) as i8).collect()),
            _ => Compact::Unsigned(bytes.collect()),
        });
    }
    let ranges = ranges
        .filter(|r| r.width() == width)
        .ok_or(QuantizeError::Ranges {
            width,
            ranges: ranges.map(Ranges::width),
        })?;
    let buckets = embedding
        .iter()
        .zip(&ranges.min)
        .zip(&ranges.max)
        .map(|((&x, &lo), &hi)| {
            let step = (hi - lo) / 255.0;
            let step = if step == 0.0 { 1.0 } else { step };
            ((x - lo) / step).floor().clamp(0.0, 255.0) as u8
        });
    Ok(match precision {
        CompactFormat::Int8 => {
            Compact::Signed(buckets.map(|q| (i16::from(q) - 128) as i8).collect())
        }
        _ => Compact::Unsigned(buckets.collect()),
    })
}

/// A model's calibrated ranges, one per embedding width it can give.
#[derive(Debug)]
pub struct Calibrated {
    /// `(dimensions, ranges)`, in the order of the model's allowed widths.
    pub ranges: Vec<(usize, Ranges)>,
    pub sentences: usize,
    /// The sha256 of `assets/calibration.txt`, so that a client can tell which set the ranges came from.
    pub sha256: String,
    pub seconds: f64,
}

impl Calibrated {
    pub fn for_dims(&self, dims: usize) -> Option<&Ranges> {
        self.ranges.iter().find(|(d, _)| *d == dims).map(|(_, r)| r)
    }
}

/// The once-per-model calibration: computed on first use, by one caller while any others wait for it.
#[derive(Default)]
pub struct Calibration {
    done: Mutex<Option<Arc<Calibrated>>>,
}

impl Calibration {
    /// The ranges, computing them with `embed` first if no earlier call has. `embed` gets the sentences a
    /// batch at a time and returns, per sentence, its embedding at each width of `dims`.
    pub fn get_or_compute<E>(
        &self,
        dims: &[usize],
        mut embed: impl FnMut(&[&str]) -> Result<Vec<Vec<Vec<f32>>>, E>,
    ) -> Result<Arc<Calibrated>, E> {
        // Held while computing: a second first request waits here and then takes the result. A panic while
        // computing leaves `None` behind, so the next caller simply tries again.
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(calibrated) = done.as_ref() {
            return Ok(Arc::clone(calibrated));
        }
        let started = Instant::now();
        let sentences: Vec<&str> = calibration_sentences().collect();
        let mut by_width: Vec<Vec<Vec<f32>>> =
            vec![Vec::with_capacity(sentences.len()); dims.len()];
        for batch in sentences.chunks(CALIBRATION_BATCH) {
            for per_sentence in embed(batch)? {
                for (width, embedding) in by_width.iter_mut().zip(per_sentence) {
                    width.push(embedding);
                }
            }
        }
        let calibrated = Arc::new(Calibrated {
            ranges: dims
                .iter()
                .zip(&by_width)
                .map(|(&d, embeddings)| (d, Ranges::of(embeddings)))
                .collect(),
            sentences: sentences.len(),
            sha256: super::sha256_hex(CALIBRATION_TEXT.as_bytes()),
            seconds: started.elapsed().as_secs_f64(),
        });
        *done = Some(Arc::clone(&calibrated));
        Ok(calibrated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_packs_the_sign_bits_most_significant_first() {
        let mut v = vec![-1.0f32; 16];
        v[0] = 0.5; // first bit of the first byte: 0b1000_0000
        v[7] = 2.0; // last bit of the first byte
        v[9] = 1e-30; // > 0 counts, 0.0 does not
        v[10] = 0.0;
        assert_eq!(
            quantize(&v, CompactFormat::Ubinary, None).unwrap(),
            Compact::Unsigned(vec![0b1000_0001, 0b0100_0000])
        );
        // 129 − 128 = 1 and 64 − 128 = −64.
        assert_eq!(
            quantize(&v, CompactFormat::Binary, None).unwrap(),
            Compact::Signed(vec![1, -64])
        );
        assert_eq!(
            quantize(&[1.0; 8], CompactFormat::Binary, None).unwrap(),
            Compact::Signed(vec![127])
        );
        assert_eq!(
            quantize(&[-1.0; 8], CompactFormat::Binary, None).unwrap(),
            Compact::Signed(vec![-128])
        );
    }

    #[test]
    fn binary_needs_a_multiple_of_8() {
        let error = quantize(&[1.0; 12], CompactFormat::Ubinary, None).unwrap_err();
        assert_eq!(error, QuantizeError::NotMultipleOf8 { width: 12 });
        assert!(error.to_string().contains("12"));
    }

    #[test]
    fn scalar_buckets_follow_the_ranges_and_clip() {
        let ranges = Ranges {
            min: vec![-1.0, 0.0, 5.0],
            max: vec![1.0, 255.0, 5.0],
        };
        // Dimension 1 has steps of exactly 1; dimension 2 a zero range, so a step of 1.
        let v = [0.0f32, 17.5, 7.9];
        assert_eq!(
            quantize(&v, CompactFormat::Uint8, Some(&ranges)).unwrap(),
            Compact::Unsigned(vec![127, 17, 2])
        );
        assert_eq!(
            quantize(&v, CompactFormat::Int8, Some(&ranges)).unwrap(),
            Compact::Signed(vec![-1, -111, -126])
        );
        let outside = [-5.0f32, 300.0, 4.0];
        assert_eq!(
            quantize(&outside, CompactFormat::Uint8, Some(&ranges)).unwrap(),
            Compact::Unsigned(vec![0, 255, 0])
        );
        assert_eq!(
            quantize(&[2.0f32, 255.0, 5.0], CompactFormat::Int8, Some(&ranges)).unwrap(),
            Compact::Signed(vec![127, 127, -128])
        );
    }

    #[test]
    fn scalar_formats_refuse_missing_or_mismatched_ranges() {
        let ranges = Ranges::of(&[vec![0.0, 1.0]]);
        assert!(quantize(&[0.5], CompactFormat::Int8, None).is_err());
        assert!(quantize(&[0.5], CompactFormat::Int8, Some(&ranges)).is_err());
    }

    #[test]
    fn ranges_are_per_dimension_extremes() {
        let ranges = Ranges::of(&[vec![1.0, -2.0], vec![-3.0, 4.0], vec![0.0, 0.0]]);
        assert_eq!(ranges.min, [-3.0, -2.0]);
        assert_eq!(ranges.max, [1.0, 4.0]);
    }

    #[test]
    fn the_calibration_set_is_a_few_hundred_distinct_sentences() {
        let sentences: Vec<&str> = calibration_sentences().collect();
        assert!(
            (300..1000).contains(&sentences.len()),
            "{}",
            sentences.len()
        );
        let distinct: std::collections::BTreeSet<&str> = sentences.iter().copied().collect();
        assert_eq!(distinct.len(), sentences.len(), "a sentence appears twice");
        assert!(
            sentences.iter().any(|s| !s.is_ascii()),
            "some non-English text"
        );
    }

    #[test]
    fn calibration_runs_once_even_when_asked_at_once() {
        let calibration = Calibration::default();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let embed = |batch: &[&str]| -> Result<Vec<Vec<Vec<f32>>>, ()> {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(batch
                .iter()
                .map(|s| vec![vec![s.len() as f32, -(s.len() as f32)]])
                .collect())
        };
        let results: Vec<Arc<Calibrated>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| calibration.get_or_compute(&[2], embed).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let batches = calibration_sentences().count().div_ceil(CALIBRATION_BATCH);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), batches);
        assert!(results.iter().all(|r| Arc::ptr_eq(r, &results[0])));
        let longest = calibration_sentences().map(str::len).max().unwrap() as f32;
        assert_eq!(results[0].for_dims(2).unwrap().max[0], longest);
    }

    #[test]
    fn a_failed_calibration_is_tried_again() {
        let calibration = Calibration::default();
        let failed = calibration.get_or_compute(&[1], |_| Err::<Vec<Vec<Vec<f32>>>, _>("engine"));
        assert_eq!(failed.unwrap_err(), "engine");
        let ok = calibration
            .get_or_compute(&[1], |batch| {
                Ok::<_, ()>(batch.iter().map(|_| vec![vec![1.0]]).collect())
            })
            .unwrap();
        assert_eq!(ok.for_dims(1).unwrap().min, [1.0]);
    }
}
