//! Tokenisation as sentence-transformers does it: the model's tokenizer.json with its own truncation and
//! padding switched off (all-MiniLM-L6-v2's says 128 and pads; sentence-transformers ignores both), and
//! truncation at the model's maximum done here, keeping the closing special token. Pairs (a cross-encoder's
//! query and document) are cut `longest_first`, by the tokenizers library's own rule, as the Python
//! tokenizer cuts them when `CrossEncoder` asks for `truncation=True`.

use tokenizers::utils::truncation;
use tokenizers::{Encoding, PostProcessor, Tokenizer};

use super::ModelError;

/// A pair of texts ready for a cross-encoder.
pub struct Pair {
    /// `[CLS] query [SEP] document [SEP]`, at most the maximum asked for.
    pub ids: Vec<u32>,
    /// 0 for `[CLS] query [SEP]`, 1 for `document [SEP]`, as the tokenizer's template says.
    pub token_types: Vec<u32>,
    /// How many tokens the pair had before truncation.
    pub untruncated: usize,
}

pub struct TextTokenizer {
    inner: Tokenizer,
    /// The special tokens the post-processor puts before and after a text ([CLS] … [SEP]).
    opening: Vec<u32>,
    closing: Vec<u32>,
}

impl TextTokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<TextTokenizer, ModelError> {
        let mut inner = Tokenizer::from_bytes(json)
            .map_err(|e| ModelError::new(format!("tokenizer.json cannot be read: {e}")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| {
            ModelError::new(format!("tokenizer.json: cannot switch truncation off: {e}"))
        })?;
        let plain = inner.encode("a", false).map_err(ModelError::internal)?;
        let special = inner.encode("a", true).map_err(ModelError::internal)?;
        let prefix = special
            .get_ids()
            .windows(plain.len())
            .position(|w| w == plain.get_ids())
            .unwrap_or(0);
        let suffix = special.len().saturating_sub(prefix + plain.len());
        let ids = special.get_ids();
        Ok(TextTokenizer {
            opening: ids[..prefix].to_vec(),
            closing: ids[ids.len() - suffix..].to_vec(),
            inner,
        })
    }

    /// The ids of `text` with the model's special tokens, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(ModelError::internal)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The tokens of `text` without special tokens, untruncated: one side of a pair.
    pub fn encode_plain(&self, text: &str) -> Result<Encoding, ModelError> {
        self.inner.encode(text, false).map_err(ModelError::internal)
    }

    /// `query` (from [`TextTokenizer::encode_plain`]) and `document` as one input of at most `max` tokens,
    /// with the template's special tokens and token types; when too long, the longer side is cut first
    /// (`longest_first`, from the right).
    pub fn encode_pair(
        &self,
        query: &Encoding,
        document: &str,
        max: usize,
    ) -> Result<Pair, ModelError> {
        let document = self.encode_plain(document)?;
        let special = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        let untruncated = query.len() + document.len() + special;
        let params = truncation::TruncationParams {
            max_length: max.saturating_sub(special),
            strategy: truncation::TruncationStrategy::LongestFirst,
            stride: 0,
            direction: truncation::TruncationDirection::Right,
        };
        let (query, document) =
            truncation::truncate_encodings(query.clone(), Some(document), &params)
                .map_err(ModelError::internal)?;
        let pair = self
            .inner
            .post_process(query, document, true)
            .map_err(ModelError::internal)?;
        Ok(Pair {
            ids: pair.get_ids().to_vec(),
            token_types: pair.get_type_ids().to_vec(),
            untruncated,
        })
    }

    /// Cuts `ids` (as `encode` returned them) to `max` tokens the way the tokenizer's own truncation does:
    /// the text is cut, the special tokens around it stay.
    pub fn truncate(&self, ids: &mut Vec<u32>, max: usize) {
        let suffix = self.closing.len();
        if ids.len() <= max || max < self.opening.len() + suffix {
            ids.truncate(max);
            return;
        }
        let tail = ids.split_off(ids.len() - suffix);
        ids.truncate(max - suffix);
        ids.extend(tail);
    }

    /// Whether `ids` begin and end with the special tokens this tokenizer puts around a text, as ids that
    /// came from it do; `Err` says which are expected, by name and id.
    pub fn check_framing(&self, ids: &[u32]) -> Result<(), String> {
        let framed = ids.len() >= self.opening.len() + self.closing.len()
            && ids.starts_with(&self.opening)
            && ids.ends_with(&self.closing);
        if framed {
            return Ok(());
        }
        let named = |ids: &[u32]| -> String {
            ids.iter()
                .map(|&id| match self.inner.id_to_token(id) {
                    Some(token) => format!("{token} ({id})"),
                    None => id.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        Err(format!(
            "begin with {} and end with {}",
            named(&self.opening),
            named(&self.closing)
        ))
    }
}
