//! Datasets: each yields model inputs as [`Batch`]es (in the model's input format, see
//! [`crate::models::InputKind`]) plus a class label per sample, read at the last position, or,
//! for text, next-token targets read off the inputs.

pub mod cifar;
pub mod gguf_tokenizer;
pub mod mnist;
pub mod modadd;
pub mod text;
pub mod tokenizer;

use crate::tensor::Batch;
use std::ops::Range;
use std::sync::Arc;

pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Model inputs of samples `range`, `r = 1`.
    fn inputs(&self, range: Range<usize>) -> Batch;
    /// Class labels of samples `range` (the target at the last position).
    fn labels(&self, range: Range<usize>) -> Vec<usize>;
    /// Short description for logs and `graph.json`.
    fn describe(&self) -> String;
    /// Language modelling: the targets are the inputs themselves, position `t` predicting the
    /// token at `t + 1`, instead of [`Dataset::labels`].
    fn next_token_targets(&self) -> bool {
        false
    }
    /// The module whose input [`Dataset::inputs`] are: 0 for raw data; later for activations
    /// already computed up to a node layer (a build's cached prefix).
    fn start(&self) -> usize {
        0
    }
    /// Activations at the input of module `index` for samples `range`, when the dataset holds
    /// them (a build's cache of its node layers); `None`: run the model from
    /// [`Dataset::start`].
    fn cached(&self, _index: usize, _range: Range<usize>) -> Option<Batch> {
        None
    }
    /// Index of sample 0 in the whole dataset this one is a slice of ([`Samples`]): what
    /// stochastic sign vectors are seeded by, so that every shard and MPI rank draws the same
    /// signs for the same sample.
    fn first_sample(&self) -> usize {
        0
    }
}

/// Samples `range` of a dataset, renumbered from 0: a shard's block, or one checkpointed piece
/// of a stage.
pub struct Samples<'a> {
    inner: &'a dyn Dataset,
    range: Range<usize>,
}

impl<'a> Samples<'a> {
    /// `range` must lie within `0..inner.len()`.
    pub fn new(inner: &'a dyn Dataset, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= inner.len());
        Self { inner, range }
    }

    fn shift(&self, r: Range<usize>) -> Range<usize> {
        self.range.start + r.start..self.range.start + r.end
    }
}

impl Dataset for Samples<'_> {
    fn len(&self) -> usize {
        self.range.len()
    }
    fn inputs(&self, range: Range<usize>) -> Batch {
        self.inner.inputs(self.shift(range))
    }
    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.inner.labels(self.shift(range))
    }
    fn describe(&self) -> String {
        format!(
            "{} (samples {}..{})",
            self.inner.describe(),
            self.range.start,
            self.range.end
        )
    }
    fn next_token_targets(&self) -> bool {
        self.inner.next_token_targets()
    }
    fn start(&self) -> usize {
        self.inner.start()
    }
    fn cached(&self, index: usize, range: Range<usize>) -> Option<Batch> {
        self.inner.cached(index, self.shift(range))
    }
    fn first_sample(&self) -> usize {
        self.inner.first_sample() + self.range.start
    }
}

/// The first `n` samples of a shared dataset (a pilot, or a `n_samples` limit).
pub struct First {
    inner: Arc<dyn Dataset>,
    n: usize,
}

impl First {
    pub fn new(inner: Arc<dyn Dataset>, n: usize) -> Self {
        let n = n.min(inner.len());
        Self { inner, n }
    }
}

impl Dataset for First {
    fn len(&self) -> usize {
        self.n
    }
    fn inputs(&self, range: Range<usize>) -> Batch {
        self.inner.inputs(range)
    }
    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.inner.labels(range)
    }
    fn describe(&self) -> String {
        format!("{} (first {})", self.inner.describe(), self.n)
    }
    fn next_token_targets(&self) -> bool {
        self.inner.next_token_targets()
    }
    fn first_sample(&self) -> usize {
        self.inner.first_sample()
    }
}
