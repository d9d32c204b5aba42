//! Streaming passes over a dataset: batches in parallel (rayon), each running the model up to
//! the node layers it needs, folding into accumulators merged in batch order ([`fold`]).
//! Memory depends on the batch size, never on the dataset size.

use super::stats::Moments;
use super::NodeLayer;
use crate::data::Dataset;
use crate::models::Model;
use crate::tensor::Batch;
use faer::Mat;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
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

/// Folds `step(acc, chunk_index, samples)` over all batches in parallel and merges, in an order
/// that does not depend on scheduling: batches run in waves of one per thread, each batch into
/// its own accumulator, and the accumulators are merged into the total in batch order. So a
/// build gives the same bits run to run and on any number of threads (rayon's work-stealing
/// `fold` / `reduce` groups the batches differently each run, moving results by rounding: 1e-8
/// relative at modular addition's `ln1.0`). A wave holds one accumulator per thread, as the
/// work-stealing fold did; merging per batch costs one accumulator addition per batch, small
/// against the batch's own products.
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
    let ranges: Vec<(usize, Range<usize>)> =
        chunks(data.len(), batch).into_iter().enumerate().collect();
    let pb = progress(ranges.len() as u64, label);
    let wave = rayon::current_num_threads().max(1);
    let mut total: Option<A> = None;
    for group in ranges.chunks(wave) {
        let parts: Vec<A> = group
            .par_iter()
            .map(|(c, range)| {
                let mut acc = init();
                step(&mut acc, *c, range.clone());
                pb.inc(1);
                acc
            })
            .collect();
        for part in parts {
            total = Some(match total {
                None => part,
                Some(t) => merge(t, part),
            });
        }
    }
    pb.finish_and_clear();
    total.unwrap_or_else(init)
}

/// The random stream of sample `index` (of the whole dataset, [`Dataset::first_sample`]
/// included) in a pass seeded `seed`: the sign vectors of stochastic sources depend on the
/// sample alone, never on the batching, so shards, MPI ranks and resumed builds draw the same.
pub fn sample_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// Positions per sample at module `index`'s input.
pub fn data_positions(model: &Model, data: &dyn Dataset, index: usize) -> usize {
    activations_at(model, data, index, 0..1).pos
}

/// Activations at every node layer for samples `range`, from one forward pass (or the
/// dataset's cache).
pub fn node_activations(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    range: Range<usize>,
) -> Vec<Batch> {
    let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
    activations_at_all(model, data, &indices, range)
}

/// Activations at the inputs of modules `indices` (ascending) for samples `range`.
fn activations_at_all(
    model: &Model,
    data: &dyn Dataset,
    indices: &[usize],
    range: Range<usize>,
) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::with_capacity(indices.len());
    let _ = each_activation(model, data, indices, range, &mut |_, b| {
        out.push(b.clone());
        Ok(())
    });
    out
}

/// Calls `visit(k, activations)` at the input of each module `indices[k]` (ascending) for
/// samples `range`, in order, holding one node layer at a time (all of SmolLM2's 61 at once
/// are 36 MB per 128-token sample: 2.3 GB for the 64 samples of the statistics' first batch,
/// which was the 30-block build's peak); stops at the first error `visit` returns.
fn each_activation(
    model: &Model,
    data: &dyn Dataset,
    indices: &[usize],
    range: Range<usize>,
    visit: &mut dyn FnMut(usize, &Batch) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut last: Option<(usize, Batch)> = None;
    for (k, &index) in indices.iter().enumerate() {
        let b = match data.cached(index, range.clone()) {
            Some(b) => b,
            None => match last.take() {
                Some((a, prev)) => model.run(prev, a, index),
                None => activations_at(model, data, index, range.clone()),
            },
        };
        visit(k, &b)?;
        last = Some((index, b));
    }
    Ok(())
}

/// Activations at one node layer for samples `range`.
pub fn activations_at(
    model: &Model,
    data: &dyn Dataset,
    index: usize,
    range: Range<usize>,
) -> Batch {
    if let Some(b) = data.cached(index, range.clone()) {
        return b;
    }
    model.run(data.inputs(range), data.start(), index)
}

/// Bytes of activations beyond the first node layer's that a build keeps in memory: all of
/// them, else all of them in a scratch file (a small model's later node layers, or SmolLM2's
/// 60, read by every basis and edge pass, instead of re-running the sections before them each
/// time: with 30 blocks that re-running was most of the build, O(L^2) block forwards).
const LATER_LAYERS_BYTES: usize = 256 << 20;

/// Where a cached node layer lives.
enum Stored {
    Memory(Batch),
    /// Rows `(sample, position)` of `features` f64s (little-endian, row-major) from byte
    /// `offset` of the scratch file.
    File {
        offset: u64,
        pos: usize,
        features: usize,
    },
}

/// Activations at the node layers for every sample of `data`, as a dataset whose inputs enter
/// the model at the first node layer: the many passes of a build (one per basis and edge
/// matrix) then skip the modules before it instead of re-running them each time (SmolLM2's
/// blocks before the ones studied), and read later node layers from memory when they are small
/// enough ([`LATER_LAYERS_BYTES`]), else from an unlinked scratch file in the temporary
/// folder (`TMPDIR`), which the page cache mostly serves from memory it can reclaim.
pub struct Prefix<'a> {
    inner: &'a dyn Dataset,
    /// Module index and activations of each cached node layer, the first being the one the
    /// inputs enter at when `start` says so.
    layers: Vec<(usize, Stored)>,
    file: Option<std::fs::File>,
    start: usize,
}

impl<'a> Prefix<'a> {
    /// The cache of node layers `indices` (ascending): the first when it is not the raw input
    /// and takes at most `max_bytes` (in memory), the later ones in memory when all of them fit
    /// [`LATER_LAYERS_BYTES`], else in a scratch file (none if it cannot be written); `None`
    /// when nothing is kept.
    pub fn new(
        model: &Model,
        data: &'a dyn Dataset,
        indices: &[usize],
        batch: usize,
        max_bytes: usize,
    ) -> Option<Self> {
        Self::with_budget(model, data, indices, batch, max_bytes, LATER_LAYERS_BYTES)
    }

    /// [`Self::new`] with `later_budget` bytes in memory for the later node layers.
    pub(crate) fn with_budget(
        model: &Model,
        data: &'a dyn Dataset,
        indices: &[usize],
        batch: usize,
        max_bytes: usize,
        later_budget: usize,
    ) -> Option<Self> {
        let n = data.len();
        let (&first, later) = indices.split_first()?;
        if n == 0 {
            return None;
        }
        let one = activations_at_all(model, data, indices, 0..1);
        let bytes = |b: &Batch| n * b.rows() * b.features() * 8;
        let keep_first = first != data.start() && bytes(&one[0]) <= max_bytes;
        let later_bytes: usize = one[1..].iter().map(bytes).sum();
        let in_memory = later_bytes <= later_budget;
        let file = (!later.is_empty() && !in_memory)
            .then(tempfile::tempfile)
            .and_then(|f| f.ok());
        let keep_later = !later.is_empty() && (in_memory || file.is_some());
        let kept: Vec<usize> = indices
            .iter()
            .enumerate()
            .filter(|&(i, _)| if i == 0 { keep_first } else { keep_later })
            .map(|(_, &index)| index)
            .collect();
        if kept.is_empty() {
            return None;
        }
        let first_kept = keep_first.then_some(0);
        let spilled = |k: usize| file.is_some() && Some(k) != first_kept;
        // Byte offset of each spilled layer in the file.
        let mut offsets = vec![0u64; kept.len()];
        let mut end = 0u64;
        for (k, &index) in kept.iter().enumerate() {
            if spilled(k) {
                offsets[k] = end;
                let b = &one[indices.iter().position(|&i| i == index).unwrap_or(0)];
                end += bytes(b) as u64;
            }
        }
        // Spilling, the batches go in waves small enough that their activations at every
        // layer stay within the memory budget.
        let per_sample: usize = one.iter().map(|b| b.rows() * b.features() * 8).sum();
        let batch = match &file {
            Some(_) => batch.min((LATER_LAYERS_BYTES / per_sample.max(1)).max(1)),
            None => batch,
        };
        let write_failed = std::sync::atomic::AtomicBool::new(false);
        let parts: Vec<Vec<Option<Batch>>> = chunks(n, batch)
            .into_par_iter()
            .map(|r| {
                let mut kept_here: Vec<Option<Batch>> = Vec::with_capacity(kept.len());
                let _ = each_activation(model, data, &kept, r.clone(), &mut |k, b| {
                    if !spilled(k) {
                        kept_here.push(Some(b.clone()));
                        return Ok(());
                    }
                    let row_bytes = (b.features() * 8) as u64;
                    let at = offsets[k] + (r.start * b.pos) as u64 * row_bytes;
                    let mut buf = Vec::with_capacity(b.rows() * b.features() * 8);
                    for i in 0..b.rows() {
                        for j in 0..b.features() {
                            buf.extend_from_slice(&b.data[(i, j)].to_le_bytes());
                        }
                    }
                    use std::os::unix::fs::FileExt;
                    if let Some(f) = &file {
                        if f.write_all_at(&buf, at).is_err() {
                            write_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    kept_here.push(None);
                    Ok(())
                });
                kept_here
            })
            .collect();
        let failed = write_failed.into_inner();
        let layers = kept
            .iter()
            .enumerate()
            .filter(|&(k, _)| !(failed && spilled(k)))
            .map(|(k, &index)| {
                if spilled(k) {
                    let proto = &one[indices.iter().position(|&i| i == index).unwrap_or(0)];
                    let stored = Stored::File {
                        offset: offsets[k],
                        pos: proto.pos,
                        features: proto.features(),
                    };
                    return (index, stored);
                }
                let proto = parts[0][k].as_ref().expect("kept in memory");
                let mut acts = Mat::zeros(n * proto.pos, proto.features());
                let mut row = 0;
                for p in &parts {
                    let b = p[k].as_ref().expect("kept in memory");
                    acts.subrows_mut(row, b.rows()).copy_from(&b.data);
                    row += b.rows();
                }
                (index, Stored::Memory(Batch::new(n, 1, proto.pos, acts)))
            })
            .collect::<Vec<_>>();
        if layers.is_empty() {
            return None;
        }
        Some(Self {
            inner: data,
            layers,
            file: if failed { None } else { file },
            start: if keep_first { first } else { data.start() },
        })
    }

    /// Samples `range` of the cached node layer at module `index`.
    fn layer(&self, index: usize, range: Range<usize>) -> Option<Batch> {
        let stored = &self.layers.iter().find(|l| l.0 == index)?.1;
        match stored {
            Stored::Memory(acts) => Some(rows(acts, range)),
            Stored::File {
                offset,
                pos,
                features,
            } => {
                use std::os::unix::fs::FileExt;
                let (pos, features) = (*pos, *features);
                let n_rows = range.len() * pos;
                let mut buf = vec![0u8; n_rows * features * 8];
                let at = offset + (range.start * pos * features * 8) as u64;
                // A read that fails (the scratch file's disk gone) falls back to running the
                // model from the first node layer.
                self.file.as_ref()?.read_exact_at(&mut buf, at).ok()?;
                let value = |i: usize, j: usize| {
                    let b = &buf[(i * features + j) * 8..][..8];
                    f64::from_le_bytes(b.try_into().expect("8 bytes"))
                };
                let data = Mat::from_fn(n_rows, features, value);
                Some(Batch::new(range.len(), 1, pos, data))
            }
        }
    }
}

impl Dataset for Prefix<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn inputs(&self, range: Range<usize>) -> Batch {
        match self.layer(self.start, range.clone()) {
            Some(acts) => acts,
            None => self.inner.inputs(range),
        }
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
    fn cached(&self, index: usize, range: Range<usize>) -> Option<Batch> {
        self.layer(index, range)
    }
    fn first_sample(&self) -> usize {
        self.inner.first_sample()
    }
}

/// Samples `range` of a cached node layer.
fn rows(acts: &Batch, range: Range<usize>) -> Batch {
    let pos = acts.pos;
    let data = acts.data.subrows(range.start * pos, range.len() * pos);
    Batch::new(range.len(), 1, pos, data.to_owned())
}

/// Means and Gram matrices of all node layers in one pass (method.md section 3).
/// Means of every node layer and Gram matrices of those with `grams[l]` (see
/// [`crate::algorithm::LibConfig::rotates`]).
pub fn moments(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    grams: &[bool],
    batch: usize,
) -> anyhow::Result<Vec<Moments>> {
    let shifts = moment_shifts(model, data, layers, batch)?;
    moments_about(model, data, layers, grams, &shifts, batch)
}

/// Samples whose mean is the reference point of the sums: any point near the mean keeps the
/// centred Gram free of cancellation (its error grows with `|mean - shift|^2` against the
/// variance), and a few samples are near enough. The whole first batch made the 30-block
/// SmolLM2 build run every block over all 64 samples twice (~50 s of its statistics).
const SHIFT_SAMPLES: usize = 8;

/// The reference point of each node layer's sums ([`Moments::shift_for`]): from the first
/// [`SHIFT_SAMPLES`] samples of `data` (at most a batch), so every shard of a build, given the
/// whole dataset here, shares it.
pub fn moment_shifts(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    batch: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
    let mut shifts = Vec::with_capacity(layers.len());
    let first = 0..batch.min(SHIFT_SAMPLES).min(data.len());
    each_activation(model, data, &indices, first, &mut |k, b| {
        check_finite(b, &layers[k].name)?;
        shifts.push(Moments::shift_for(b.data.as_ref()));
        Ok(())
    })?;
    Ok(shifts)
}

/// [`moments`] about given reference points `shifts`.
pub fn moments_about(
    model: &Model,
    data: &dyn Dataset,
    layers: &[NodeLayer],
    grams: &[bool],
    shifts: &[Vec<f64>],
    batch: usize,
) -> anyhow::Result<Vec<Moments>> {
    let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
    let result = fold(
        data,
        batch,
        "means and Gram matrices",
        || {
            shifts
                .iter()
                .zip(grams)
                .map(|(s, &gram)| match gram {
                    true => Moments::new(s.clone()),
                    false => Moments::mean_only(s.clone()),
                })
                .collect::<Vec<_>>()
        },
        |acc, _, range| {
            let _ = each_activation(model, data, &indices, range, &mut |k, b| {
                acc[k].add(b.data.as_ref());
                Ok(())
            });
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
