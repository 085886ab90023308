//! Tokenisation as sentence-transformers does it: the model's tokenizer.json with its own truncation and
//! padding switched off (all-MiniLM-L6-v2's says 128 and pads; sentence-transformers ignores both), and
//! truncation at the model's maximum done here, keeping the closing special token.

use tokenizers::Tokenizer;

use super::ModelError;

pub struct TextTokenizer {
    inner: Tokenizer,
    /// How many special tokens the post-processor puts before and after the text ([CLS] … [SEP]: 1 and 1).
    prefix: usize,
    suffix: usize,
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
        Ok(TextTokenizer {
            inner,
            prefix,
            suffix,
        })
    }

    /// How many ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of `text` with the model's special tokens, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(ModelError::internal)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Cuts `ids` (as `encode` returned them) to `max` tokens the way the tokenizer's own truncation does:
    /// the text is cut, the special tokens around it stay.
    pub fn truncate(&self, ids: &mut Vec<u32>, max: usize) {
        if ids.len() <= max || max < self.prefix + self.suffix {
            ids.truncate(max);
            return;
        }
        let tail = ids.split_off(ids.len() - self.suffix);
        ids.truncate(max - self.suffix);
        ids.extend(tail);
    }
}
