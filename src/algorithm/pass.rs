//! Streaming passes over a dataset: batches in parallel (rayon), each running the model up to
//! the node layers it needs, folding into per-thread accumulators that are merged at the end.
//! Memory depends on the batch size, never on the dataset size.

use super::stats::Moments;
use super::NodeLayer;
use crate::data::Dataset;
use crate::models::Model;
use crate::tensor::Batch;
use faer::Mat;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::ops::Range;

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>28} [{bar:30}] {pos}/{len} batches, {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}

/// Sample ranges of at most `batch` samples.
pub fn chunks(n: usize, batch: usize) -> Vec<Range<usize>> {
    let batch = batch.max(1);
    (0..n.div_ceil(batch))
        .map(|c| c * batch..((c + 1) * batch).min(n))
        .collect()
}

/// Folds `step(acc, chunk_index, samples)` over all batches in parallel and merges.
pub fn fold<A, I, S, M>(
    data: &dyn Dataset,
    batch: usize,
    label: &str,
    init: I,
    step: S,
    merge: M,
) -> A
where
    A: Send,
    I: Fn() -> A + Sync + Send,
    S: Fn(&mut A, usize, Range<usize>) + Sync + Send,
    M: Fn(A, A) -> A + Sync + Send,
{
    let ranges = chunks(data.len(), batch);
    let pb = progress(ranges.len() as u64, label);
    let out = ranges
        .into_par_iter()
        .enumerate()
        .fold(&init, |mut acc, (c, range)| {
            step(&mut acc, c, range);
            pb.inc(1);
            acc
        })
        .reduce(&init, &merge);
    pb.finish_and_clear();
    out
}

/// Activations at every node layer for samples `range`, from one forward pass.
pub fn node_activations(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    range: Range<usize>,
) -> Vec<Batch> {
    let mut x = data.inputs(range);
    let mut at = data.start();
    let mut out = Vec::with_capacity(layers.len());
    for layer in layers {
        x = model.run(x, at, layer.index);
        at = layer.index;
        out.push(x.clone());
    }
    out
}

/// Activations at one node layer for samples `range`.
pub fn activations_at(
    model: &Model,
    data: &dyn Dataset,
    index: usize,
    range: Range<usize>,
) -> Batch {
    model.run(data.inputs(range), data.start(), index)
}

/// Activations at module `start` for every sample of `data`, held in memory, as a dataset
/// whose inputs enter the model at `start`: the many passes of a build (one per basis and
/// edge matrix) then skip the modules before the first node layer instead of re-running
/// them each time (SmolLM2's blocks before the ones studied).
pub struct Prefix<'a> {
    inner: &'a dyn Dataset,
    acts: Batch,
    start: usize,
}

impl<'a> Prefix<'a> {
    /// The prefix when `start > 0` and the activations take at most `max_bytes`.
    pub fn new(
        model: &Model,
        data: &'a dyn Dataset,
        start: usize,
        batch: usize,
        max_bytes: usize,
    ) -> Option<Self> {
        let n = data.len();
        if start == data.start() || n == 0 {
            return None;
        }
        let one = activations_at(model, data, start, 0..1);
        if n * one.rows() * one.features() * 8 > max_bytes {
            return None;
        }
        let parts: Vec<Batch> = chunks(n, batch)
            .into_par_iter()
            .map(|r| activations_at(model, data, start, r))
            .collect();
        let mut acts = Mat::zeros(n * one.rows(), one.features());
        let mut row = 0;
        for p in &parts {
            acts.subrows_mut(row, p.rows()).copy_from(&p.data);
            row += p.rows();
        }
        Some(Self {
            inner: data,
            acts: Batch::new(n, 1, one.pos, acts),
            start,
        })
    }
}

impl Dataset for Prefix<'_> {
    fn len(&self) -> usize {
        self.acts.n
    }
    fn inputs(&self, range: Range<usize>) -> Batch {
        let pos = self.acts.pos;
        let rows = self.acts.data.subrows(range.start * pos, range.len() * pos);
        Batch::new(range.len(), 1, pos, rows.to_owned())
    }
    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.inner.labels(range)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn next_token_targets(&self) -> bool {
        self.inner.next_token_targets()
    }
    fn start(&self) -> usize {
        self.start
    }
}

/// Means and Gram matrices of all node layers in one pass (method.md section 3).
pub fn moments(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    batch: usize,
) -> anyhow::Result<Vec<Moments>> {
    let first = node_activations(model, data, layers, 0..batch.min(data.len()));
    for (b, layer) in first.iter().zip(layers) {
        check_finite(b, &layer.name)?;
    }
    let shifts: Vec<Vec<f64>> = first
        .iter()
        .map(|b| Moments::shift_for(b.data.as_ref()))
        .collect();
    let result = fold(
        data,
        batch,
        "means and Gram matrices",
        || {
            shifts
                .iter()
                .map(|s| Moments::new(s.clone()))
                .collect::<Vec<_>>()
        },
        |acc, _, range| {
            for (m, b) in acc
                .iter_mut()
                .zip(node_activations(model, data, layers, range))
            {
                m.add(b.data.as_ref());
            }
        },
        |a, b| a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect(),
    );
    for (m, layer) in result.iter().zip(layers) {
        if m.sum.iter().any(|v| !v.is_finite())
            || m.outer.col_iter().any(|c| c.iter().any(|v| !v.is_finite()))
        {
            anyhow::bail!(
                "node layer `{}`: activations contain NaN or infinity",
                layer.name
            );
        }
    }
    Ok(result)
}

fn check_finite(b: &Batch, name: &str) -> anyhow::Result<()> {
    if b.data.col_iter().any(|c| c.iter().any(|v| !v.is_finite())) {
        anyhow::bail!("node layer `{name}`: activations contain NaN or infinity");
    }
    Ok(())
}
