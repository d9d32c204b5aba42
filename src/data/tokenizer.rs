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
