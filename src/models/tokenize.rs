//! Tokenisation as sentence-transformers does it: the model's tokenizer.json with its own truncation and
//! padding switched off (all-MiniLM-L6-v2's says 128 and pads; sentence-transformers ignores both), and
//! truncation at the model's maximum done here, keeping the special tokens around the text, from either end.
//! Pairs (a cross-encoder's query and document) are cut `longest_first`, by the tokenizers library's own
//! rule, as the Python tokenizer cuts them when `CrossEncoder` asks for `truncation=True`. Also what the
//! tokenizer endpoints need: each token with its byte offsets, and decoding ids back to text.

use tokenizers::utils::truncation;
use tokenizers::{Encoding, PostProcessor, Tokenizer};

use super::ModelError;

/// Which end of an over-long input truncation cuts off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationDirection {
    /// Keep the start, cut the end (sentence-transformers' default).
    #[default]
    Right,
    /// Keep the end, cut the start (`tokenizer.truncation_side = "left"`).
    Left,
}

/// One token of a text, as `/tokenize` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    pub id: u32,
    /// The vocabulary's string for the token (`[CLS]`, `##ing`, …).
    pub token: String,
    /// Whether the post-processor added it (`[CLS]`, `[SEP]`); such tokens cover no text.
    pub special: bool,
    /// Byte offsets `start..stop` of the text the token came from.
    pub offsets: (usize, usize),
}

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
    /// the text is cut at the end or the start, the special tokens around it stay.
    pub fn truncate(&self, ids: &mut Vec<u32>, max: usize, direction: TruncationDirection) {
        if ids.len() <= max {
            return;
        }
        let (prefix, suffix) = (self.opening.len(), self.closing.len());
        if max < prefix + suffix {
            // No room for the text at all; a model this short does not exist, but cut the same way as ids.
            truncate_ids(ids, max, direction);
            return;
        }
        let excess = ids.len() - max;
        let cut = match direction {
            TruncationDirection::Right => {
                let end = ids.len() - suffix;
                end - excess..end
            }
            TruncationDirection::Left => prefix..prefix + excess,
        };
        ids.drain(cut);
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

    /// Every token of `text` with its byte offsets, untruncated; the special tokens only if asked.
    pub fn spans(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenSpan>, ModelError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(ModelError::internal)?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_special_tokens_mask())
            .zip(encoding.get_offsets())
            .map(|(((&id, token), &special), &offsets)| TokenSpan {
                id,
                token: token.clone(),
                special: special == 1,
                offsets,
            })
            .collect())
    }

    /// The text of `ids`, as the tokenizer's decoder writes it. An id the vocabulary lacks is an error (the
    /// tokenizers crate would skip it silently).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(ModelError::invalid(format!(
                "token id {bad} is not in the vocabulary (0..{})",
                self.inner.get_vocab_size(true)
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(ModelError::internal)
    }
}

/// Cuts `ids` to `max` without regard to special tokens: what is left when `max` cannot even hold them.
fn truncate_ids(ids: &mut Vec<u32>, max: usize, direction: TruncationDirection) {
    if ids.len() <= max {
        return;
    }
    match direction {
        TruncationDirection::Right => ids.truncate(max),
        TruncationDirection::Left => {
            ids.drain(..ids.len() - max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WordPiece tokenizer with [CLS] … [SEP] framing, as BERT models have.
    fn bert_like() -> TextTokenizer {
        let json = r###"{
          "version": "1.0",
          "truncation": null,
          "padding": null,
          "added_tokens": [
            {"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
          "pre_tokenizer": {"type": "BertPreTokenizer"},
          "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}
          },
          "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
          "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                    "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "b": 4, "c": 5, "d": 6, "e": 7, "##b": 8, "é": 9}}
        }"###;
        TextTokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    #[test]
    fn truncation_keeps_the_framing_and_cuts_the_chosen_end() {
        let tokenizer = bert_like();
        let ids = tokenizer.encode("a b c d e").unwrap();
        assert_eq!(ids, [1, 3, 4, 5, 6, 7, 2]);
        let cut = |max, direction| {
            let mut ids = ids.clone();
            tokenizer.truncate(&mut ids, max, direction);
            ids
        };
        assert_eq!(cut(5, TruncationDirection::Right), [1, 3, 4, 5, 2]);
        assert_eq!(cut(5, TruncationDirection::Left), [1, 5, 6, 7, 2]);
        assert_eq!(cut(2, TruncationDirection::Left), [1, 2]);
        assert_eq!(cut(7, TruncationDirection::Left), ids);
        assert_eq!(cut(1, TruncationDirection::Left), [2]);
    }

    #[test]
    fn ids_sent_as_they_are_lose_their_first_or_last_ones() {
        let mut right = vec![1, 2, 3, 4];
        truncate_ids(&mut right, 3, TruncationDirection::Right);
        assert_eq!(right, [1, 2, 3]);
        let mut left = vec![1, 2, 3, 4];
        truncate_ids(&mut left, 3, TruncationDirection::Left);
        assert_eq!(left, [2, 3, 4]);
    }

    #[test]
    fn framing_is_the_special_tokens_around_a_text() {
        let tokenizer = bert_like();
        assert!(tokenizer.check_framing(&[1, 3, 4, 2]).is_ok());
        assert!(tokenizer.check_framing(&[1, 2]).is_ok());
        for unframed in [&[3, 4][..], &[1, 3], &[3, 2], &[2, 1], &[1]] {
            let error = tokenizer.check_framing(unframed).unwrap_err();
            assert_eq!(error, "begin with [CLS] (1) and end with [SEP] (2)");
        }
    }

    #[test]
    fn pairs_are_framed_typed_and_cut_longest_first() {
        let tokenizer = bert_like();
        let pair = |query: &str, document: &str, max| {
            let query = tokenizer.encode_plain(query).unwrap();
            let pair = tokenizer.encode_pair(&query, document, max).unwrap();
            (pair.ids, pair.token_types, pair.untruncated)
        };
        assert_eq!(
            pair("a b", "c", 16),
            (vec![1, 3, 4, 2, 5, 2], vec![0, 0, 0, 0, 1, 1], 6)
        );
        // Only the longer text loses tokens while the shorter fits in half...
        assert_eq!(pair("a", "b c d e", 6).0, [1, 3, 2, 4, 5, 2]);
        assert_eq!(pair("b c d e", "a", 6).0, [1, 4, 5, 2, 3, 2]);
        // ...then both are cut to half the room, the second text taking the odd token.
        assert_eq!(pair("a b c", "c d e", 8).0, [1, 3, 4, 2, 5, 6, 7, 2]);
        assert_eq!(pair("a b c", "c d e", 7).0, [1, 3, 4, 2, 5, 6, 2]);
        assert_eq!(pair("", "", 3), (vec![1, 2, 2], vec![0, 0, 1], 3));
    }

    #[test]
    fn spans_have_byte_offsets_and_mark_the_framing_special() {
        let tokenizer = bert_like();
        let text = "é ab";
        let spans = tokenizer.spans(text, true).unwrap();
        let ids: Vec<u32> = spans.iter().map(|s| s.id).collect();
        // Lowercasing strips the accent, so "é" is the token "e", whose offsets still cover the two bytes of "é".
        assert_eq!(ids, [1, 7, 3, 8, 2]);
        assert!(spans[0].special && spans[4].special && !spans[1].special);
        assert_eq!(&text[spans[1].offsets.0..spans[1].offsets.1], "é");
        assert_eq!(spans[2].offsets, (3, 4));
        assert_eq!((spans[3].token.as_str(), spans[3].offsets), ("##b", (4, 5)));
        let plain = tokenizer.spans(text, false).unwrap();
        assert_eq!(plain.len(), 3);
    }

    #[test]
    fn decoding_refuses_ids_outside_the_vocabulary() {
        let tokenizer = bert_like();
        assert_eq!(tokenizer.decode(&[1, 3, 8, 2], true).unwrap(), "ab");
        assert_eq!(
            tokenizer.decode(&[1, 3, 8, 2], false).unwrap(),
            "[CLS] ab [SEP]"
        );
        let error = tokenizer.decode(&[3, 10], true).unwrap_err();
        assert!(error.message.contains("10"), "{}", error.message);
    }
}
