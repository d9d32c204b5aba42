//! Ablation experiments (method.md section 10): how many features (node ablation) or edges
//! (edge ablation) of a basis the model needs to keep its accuracy or loss.

use super::config::{load_data, load_model, RunConfig};
use super::eval::{score_logits_with, BasisSection, Kept, Score, Targets};
use crate::algorithm::pass::{chunks, progress};
use crate::algorithm::{Graph, NodeBasis};
use crate::data::modadd::Split;
use crate::data::Dataset;
use crate::io::write_atomic;
use crate::models::Model;
use crate::tensor::linalg::mm;
use crate::tensor::Batch;
use anyhow::{bail, Context};
use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationConfig {
    pub ablation: AblationSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AblationKind {
    Node,
    Edge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Every n up to `cutoff`, then `cutoff * base^k`, then all.
    Exponential,
    /// `0, step, 2 step, ...`, then all.
    Linear,
    /// The smallest count within `delta` of the unablated score.
    Bisect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Accuracy,
    Loss,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationSettings {
    pub kind: AblationKind,
    pub schedule: Schedule,
    #[serde(default = "cutoff")]
    pub cutoff: usize,
    #[serde(default = "base")]
    pub base: f64,
    #[serde(default = "step")]
    pub step: usize,
    #[serde(default = "delta")]
    pub delta: f64,
    #[serde(default = "test")]
    pub split: Split,
    #[serde(default = "accuracy")]
    pub metric: Metric,
    /// Node layers to ablate (default: every node layer but `output`; for edges, every matrix).
    #[serde(default)]
    pub node_layers: Option<Vec<String>>,
    #[serde(default = "batch")]
    pub batch_size: usize,
}

fn cutoff() -> usize {
    20
}
fn base() -> f64 {
    2.0
}
fn step() -> usize {
    1
}
fn delta() -> f64 {
    0.001
}
fn test() -> Split {
    Split::Test
}
fn accuracy() -> Metric {
    Metric::Accuracy
}
fn batch() -> usize {
    1024
}

/// `ablation.json`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct AblationResult {
    pub basis: String,
    pub metric: String,
    pub baseline: f64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub node_layers: BTreeMap<String, Curve>,
    /// Bisect node ablation: the fewest features within `delta`, per node layer.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub features_required: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub edges_required: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub edge_curves: BTreeMap<String, Curve>,
    /// Kept edges for the bisect result, per matrix: `(out, in)` pairs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub kept_edges: BTreeMap<String, Vec<[usize; 2]>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Curve {
    pub n_kept: Vec<usize>,
    pub score: Vec<f64>,
}

impl AblationConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| super::config::toml_error(&text, &e))
            .with_context(|| format!("invalid ablation config {}", path.display()))
    }
}

/// The counts a schedule visits for `total` features or edges (bisect is adaptive; see
/// [`bisect`]).
pub fn schedule_counts(s: &AblationSettings, total: usize) -> Vec<usize> {
    let mut v: Vec<usize> = match s.schedule {
        Schedule::Linear => (0..=total).step_by(s.step.max(1)).collect(),
        Schedule::Exponential | Schedule::Bisect => {
            let mut v: Vec<usize> = (0..=s.cutoff.min(total)).collect();
            let mut x = s.cutoff.max(1) as f64;
            while (x as usize) < total {
                x *= s.base.max(1.01);
                v.push((x as usize).min(total));
            }
            v
        }
    };
    v.push(total);
    v.sort_unstable();
    v.dedup();
    v
}

/// Smallest `n` in `lo..=hi` with `ok(n)`, assuming `ok` is monotone and `ok(hi)`.
pub fn bisect(mut lo: usize, mut hi: usize, mut ok: impl FnMut(usize) -> bool) -> usize {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

/// Smallest `n` in `0..=total` with `ok(n)` (monotone, `ok(total)`), probing `0, 1, 2, 4, ...`
/// first: the answer is usually a small fraction of `total`, and an evaluation with few kept
/// edges is cheap (output features with equal masks share one forward pass).
pub fn gallop_bisect(total: usize, mut ok: impl FnMut(usize) -> bool) -> usize {
    if ok(0) {
        return 0;
    }
    let mut hi = 1;
    while hi < total && !ok(hi) {
        hi *= 2;
    }
    let hi = hi.min(total);
    bisect(hi / 2 + 1, hi, ok)
}

/// Whether `score` is within `delta` of `baseline` in the metric's good direction.
fn within(metric: Metric, score: f64, baseline: f64, delta: f64) -> bool {
    match metric {
        Metric::Accuracy => score >= baseline - delta,
        Metric::Loss => score <= baseline + delta,
    }
}

fn pick(metric: Metric, s: Score) -> f64 {
    match metric {
        Metric::Accuracy => s.accuracy,
        Metric::Loss => s.loss,
    }
}

/// Basis coordinates `fhat = f C` at one node layer for the whole evaluation set, in batches,
/// with labels.
struct Cached {
    batches: Vec<CachedBatch>,
}

struct CachedBatch {
    /// Rows `(sample, position)`.
    fhat: Mat<f64>,
    n: usize,
    pos: usize,
    targets: Targets,
}

/// Samples per cached batch at most: evaluations run batches in parallel, and many small ones
/// share the cores evenly (9 batches of 1024 on 2 cores take 5 rounds, 70 of 128 take 35) and
/// stay in cache (see [`BasisSection::run`]).
const CACHED_BATCH: usize = 128;

impl Cached {
    /// `c`: the basis (`None`: the activations themselves); batches of at most `batch` (and
    /// [`CACHED_BATCH`]) samples.
    fn new(
        model: &Model,
        data: &dyn Dataset,
        index: usize,
        batch: usize,
        c: Option<&Mat<f64>>,
    ) -> Self {
        let batch = super::eval::eval_batch(model, data, batch).min(CACHED_BATCH);
        let batches = chunks(data.len(), batch)
            .into_par_iter()
            .map(|r| {
                let targets = Targets::of(data, r.clone());
                let f = model.run(data.inputs(r), 0, index);
                let fhat = match c {
                    Some(c) => mm(f.data.as_ref(), c.as_ref()),
                    None => f.data,
                };
                CachedBatch {
                    fhat,
                    n: f.n,
                    pos: f.pos,
                    targets,
                }
            })
            .collect();
        Self { batches }
    }

    /// The metric of the logits `logits(batch)` of every batch.
    fn score(&self, metric: Metric, logits: &(dyn Fn(&CachedBatch) -> Batch + Sync)) -> f64 {
        let parts: Vec<_> = self
            .batches
            .par_iter()
            .map(|b| score_batch(metric, &logits(b), b))
            .collect();
        total(metric, parts)
    }
}

/// Correct predictions, summed cross-entropy (for [`Metric::Loss`] only) and predictions of
/// one batch's logits.
fn score_batch(metric: Metric, logits: &Batch, b: &CachedBatch) -> (f64, f64, f64) {
    score_logits_with(logits, &b.targets, metric == Metric::Loss)
}

/// The metric over batches, summed in order.
fn total(metric: Metric, parts: Vec<(f64, f64, f64)>) -> f64 {
    let (c, l, n) = parts
        .into_iter()
        .fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    pick(
        metric,
        Score {
            accuracy: c / n,
            loss: l / n,
        },
    )
}

/// The unablated model's score.
fn baseline_score(model: &Model, data: &dyn Dataset, s: &AblationSettings) -> f64 {
    let end = model.modules.len();
    let cached = Cached::new(model, data, end, s.batch_size, None);
    cached.score(s.metric, &|b| Batch::new(b.n, 1, b.pos, b.fhat.clone()))
}

/// Errors (instead of a panic later) on a basis whose matrices do not fit its node layer
/// `index` of the model.
fn check_basis(model: &Model, b: &NodeBasis, index: usize) -> anyhow::Result<()> {
    let d = model.node_features(index);
    if b.d_orig != d {
        bail!(
            "node layer `{}` has {d} features in the model, {} in the graph",
            b.name,
            b.d_orig
        );
    }
    match (&b.c, &b.c_pinv) {
        (None, None) => Ok(()),
        (Some(c), Some(cp)) if c.nrows() == d && cp.shape() == (c.ncols(), d) => Ok(()),
        (Some(c), Some(cp)) => bail!(
            "node layer `{}`: C is {}x{} and C_pinv {}x{}, for {d} features",
            b.name,
            c.nrows(),
            c.ncols(),
            cp.nrows(),
            cp.ncols()
        ),
        _ => bail!("node layer `{}` has only one of C and C_pinv", b.name),
    }
}

/// `(C, C_pinv)` of a basis, identities for the neuron basis.
fn basis_pair(b: &NodeBasis) -> (Mat<f64>, Mat<f64>) {
    let d = b.d_orig;
    match (&b.c, &b.c_pinv) {
        (Some(c), Some(cp)) => (c.clone(), cp.clone()),
        _ => (Mat::identity(d, d), Mat::identity(d, d)),
    }
}

/// `C_k C_pinv` keeping the first `n` basis directions.
#[cfg(test)]
fn projection(b: &NodeBasis, n: usize) -> Mat<f64> {
    let (c, cp) = basis_pair(b);
    let n = n.min(c.ncols());
    mm(c.subcols(0, n), cp.subrows(0, n))
}

/// Node ablation of every (selected) node layer of a graph.
pub fn node_ablation(
    model: &Model,
    data: &dyn Dataset,
    graph: &Graph,
    s: &AblationSettings,
) -> anyhow::Result<AblationResult> {
    let baseline = baseline_score(model, data, s);
    let end = model.modules.len();
    let mut result = AblationResult {
        metric: format!("{:?}", s.metric).to_lowercase(),
        baseline,
        ..Default::default()
    };
    for b in &graph.layers {
        if b.name == crate::models::OUTPUT {
            continue;
        }
        if let Some(sel) = &s.node_layers {
            if !sel.contains(&b.name) {
                continue;
            }
        }
        let index = model
            .node_index(&b.name)
            .with_context(|| format!("graph node layer `{}` is not in the model", b.name))?;
        check_basis(model, b, index)?;
        // Keeping the first n directions: f C_n C_pinv_n through the rest of the model, i.e.
        // fhat[:, ..n] times C_pinv's first n rows pushed through its linear head.
        let (c, cp) = basis_pair(b);
        let cached = Cached::new(model, data, index, s.batch_size, b.c.as_ref().map(|_| &c));
        let rest = BasisSection::new(model, index, end, cp, None);
        let total = b.d_lib();
        let eval = |n: usize| {
            cached.score(s.metric, &|x| {
                rest.run(x.fhat.as_ref(), x.n, x.pos, Kept::First(n), None)
            })
        };
        let mut curve = Curve::default();
        match s.schedule {
            Schedule::Bisect => {
                let mut memo = HashMap::new();
                let n = bisect(0, total, |n| {
                    let v = *memo.entry(n).or_insert_with(|| eval(n));
                    within(s.metric, v, baseline, s.delta)
                });
                let mut pts: Vec<_> = memo.into_iter().collect();
                pts.sort_by_key(|p| p.0);
                curve.n_kept = pts.iter().map(|p| p.0).collect();
                curve.score = pts.iter().map(|p| p.1).collect();
                result.features_required.insert(b.name.clone(), n);
            }
            _ => {
                let counts = schedule_counts(s, total);
                let pb = progress(counts.len() as u64, &format!("ablating {}", b.name));
                for n in counts {
                    curve.n_kept.push(n);
                    curve.score.push(eval(n));
                    pb.inc(1);
                }
                pb.finish_and_clear();
            }
        }
        result.node_layers.insert(b.name.clone(), curve);
    }
    Ok(result)
}

/// Edges of matrix `e` ranked by weight, excluding those from the constant feature (input
/// feature 0 when the input layer has one), which are always kept.
fn ranked_edges(e: &Mat<f64>, skip_constant: bool) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (0..e.nrows())
        .flat_map(|i| (usize::from(skip_constant)..e.ncols()).map(move |j| (i, j)))
        .collect();
    v.sort_by(|a, b| e[(b.0, b.1)].total_cmp(&e[(a.0, a.1)]));
    v
}

/// `(output feature, its kept inputs)`: what one memoised column of [`EdgeSection`] depends on.
type MemoKey = (usize, Vec<usize>);

/// A memoised column: per cached batch, and the evaluation that last used it.
type MemoEntry = (Vec<Vec<f64>>, u64);

/// Doubles of section outputs [`EdgeSection`] keeps for reuse (128 MB).
const MEMO_NUMBERS: usize = 1 << 24;

/// One edge matrix's section `from -> to` set up for masked evaluation (method.md section 10):
/// each output feature computed only from its kept input features.
///
/// An output feature's coordinate depends only on its own kept set, and successive counts of a
/// bisection change the kept sets of few output features (between `k` and `k'`, only those
/// with an edge ranked in between), so each `(output feature, kept set)` column is computed
/// once and reused while it fits in [`MEMO_NUMBERS`] (least recently used dropped first).
struct EdgeSection<'a> {
    /// Activations at `from` in the input basis.
    cached: Cached,
    /// The section from the input basis to the output basis's coordinates.
    section: BasisSection<'a>,
    /// The rest of the model, from the output basis's coordinates (through `C_pinv_out`).
    rest: BasisSection<'a>,
    /// Per cached batch: the unmasked section's output coordinates (for every output feature
    /// that keeps all its inputs).
    full: Vec<Batch>,
    d_in: usize,
    d_out: usize,
    has_constant: bool,
    /// `(output feature, kept inputs)` to its column per cached batch and the evaluation that
    /// last used it.
    memo: HashMap<MemoKey, MemoEntry>,
    /// Doubles held in `memo`, and its budget.
    memo_size: usize,
    memo_budget: usize,
    /// Evaluations so far.
    clock: u64,
    /// Output-feature columns computed so far (not taken from `memo` or `full`).
    computed: usize,
}

impl<'a> EdgeSection<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &'a Model,
        data: &dyn Dataset,
        from: usize,
        to: usize,
        b_in: &NodeBasis,
        b_out: &NodeBasis,
        batch: usize,
    ) -> Self {
        let (c_in, cp_in) = basis_pair(b_in);
        let (c_out, cp_out) = basis_pair(b_out);
        let cached = Cached::new(model, data, from, batch, b_in.c.as_ref().map(|_| &c_in));
        let section = BasisSection::new(model, from, to, cp_in, Some(&c_out));
        let rest = BasisSection::new(model, to, model.modules.len(), cp_out, None);
        let d_in = b_in.d_lib();
        let full = cached
            .batches
            .par_iter()
            .map(|b| section.run(b.fhat.as_ref(), b.n, b.pos, Kept::First(d_in), None))
            .collect();
        Self {
            cached,
            section,
            rest,
            full,
            d_in,
            d_out: b_out.d_lib(),
            has_constant: b_in.has_constant,
            memo: HashMap::new(),
            memo_size: 0,
            memo_budget: MEMO_NUMBERS,
            clock: 0,
            computed: 0,
        }
    }

    /// Each output feature's kept inputs: the top `k` edges of `ranked` plus the constant's,
    /// ascending.
    fn kept_sets(&self, ranked: &[(usize, usize)], k: usize) -> Vec<Vec<usize>> {
        let mut kept: Vec<Vec<usize>> = (0..self.d_out)
            .map(|_| if self.has_constant { vec![0] } else { vec![] })
            .collect();
        for &(i, j) in &ranked[..k.min(ranked.len())] {
            kept[i].push(j);
        }
        for m in kept.iter_mut() {
            m.sort_unstable();
            m.dedup();
        }
        kept
    }

    /// `per_batch(batch, logits)` for every cached batch, with the top `k` edges (and the
    /// constant's) kept.
    fn masked<T: Send>(
        &mut self,
        ranked: &[(usize, usize)],
        k: usize,
        per_batch: &(dyn Fn(&CachedBatch, Batch) -> T + Sync),
    ) -> Vec<T> {
        self.clock += 1;
        let kept = self.kept_sets(ranked, k);
        // Where each output feature's column comes from.
        enum Source<'m> {
            Full,
            Memo(&'m [Vec<f64>]),
            /// Column `c` of new group `g`.
            New(usize, usize),
        }
        let mut groups: Vec<(&[usize], Vec<usize>)> = Vec::new();
        let mut index: HashMap<&[usize], usize> = HashMap::new();
        let mut sources = Vec::with_capacity(self.d_out);
        for (i, m) in kept.iter().enumerate() {
            if m.len() == self.d_in {
                sources.push(Source::Full);
            } else if let Some((cols, _)) = self.memo.get(&(i, m.clone())) {
                sources.push(Source::Memo(cols));
            } else {
                let g = *index.entry(m).or_insert_with(|| {
                    groups.push((m, Vec::new()));
                    groups.len() - 1
                });
                sources.push(Source::New(g, groups[g].1.len()));
                groups[g].1.push(i);
            }
        }
        self.computed += groups.iter().map(|g| g.1.len()).sum::<usize>();
        let (section, rest, d_out) = (&self.section, &self.rest, self.d_out);
        let results: Vec<(T, Vec<Mat<f64>>)> = self
            .cached
            .batches
            .par_iter()
            .zip(&self.full)
            .enumerate()
            .map(|(bi, (b, full))| {
                let new: Vec<Mat<f64>> = groups
                    .iter()
                    .map(|(m, outs)| {
                        section
                            .run(b.fhat.as_ref(), b.n, b.pos, Kept::Only(m), Some(outs))
                            .data
                    })
                    .collect();
                let mut out = Mat::zeros(full.rows(), d_out);
                for (i, s) in sources.iter().enumerate() {
                    let dst = out.col_as_slice_mut(i);
                    match s {
                        Source::Full => dst.copy_from_slice(full.data.col_as_slice(i)),
                        Source::Memo(cols) => dst.copy_from_slice(&cols[bi]),
                        Source::New(g, c) => dst.copy_from_slice(new[*g].col_as_slice(*c)),
                    }
                }
                let logits = rest.run(out.as_ref(), full.n, full.pos, Kept::First(d_out), None);
                (per_batch(b, logits), new)
            })
            .collect();
        drop(sources);
        let (values, new): (Vec<T>, Vec<Vec<Mat<f64>>>) = results.into_iter().unzip();
        self.remember(&kept, &groups, new);
        values
    }

    /// Marks this evaluation's memo entries used, adds its new columns and drops the least
    /// recently used entries beyond the budget.
    fn remember(
        &mut self,
        kept: &[Vec<usize>],
        groups: &[(&[usize], Vec<usize>)],
        new: Vec<Vec<Mat<f64>>>,
    ) {
        for (i, m) in kept.iter().enumerate() {
            if let Some(e) = self.memo.get_mut(&(i, m.clone())) {
                e.1 = self.clock;
            }
        }
        for (g, (m, outs)) in groups.iter().enumerate() {
            for (c, &i) in outs.iter().enumerate() {
                let cols: Vec<Vec<f64>> =
                    new.iter().map(|b| b[g].col_as_slice(c).to_vec()).collect();
                self.memo_size += cols.iter().map(Vec::len).sum::<usize>();
                self.memo.insert((i, m.to_vec()), (cols, self.clock));
            }
        }
        if self.memo_size > self.memo_budget {
            let mut by_age: Vec<(MemoKey, u64)> = self
                .memo
                .iter()
                .map(|(key, e)| (key.clone(), e.1))
                .collect();
            by_age.sort_by_key(|e| e.1);
            for (key, _) in by_age {
                if self.memo_size <= self.memo_budget {
                    break;
                }
                if let Some((cols, _)) = self.memo.remove(&key) {
                    self.memo_size -= cols.iter().map(Vec::len).sum::<usize>();
                }
            }
        }
    }

    fn score(&mut self, metric: Metric, ranked: &[(usize, usize)], k: usize) -> f64 {
        let parts = self.masked(ranked, k, &|b, logits| score_batch(metric, &logits, b));
        total(metric, parts)
    }
}

/// Edge ablation of every edge matrix of a graph.
pub fn edge_ablation(
    model: &Model,
    data: &dyn Dataset,
    graph: &Graph,
    s: &AblationSettings,
) -> anyhow::Result<AblationResult> {
    let baseline = baseline_score(model, data, s);
    let mut result = AblationResult {
        metric: format!("{:?}", s.metric).to_lowercase(),
        baseline,
        ..Default::default()
    };
    if graph.edges.is_empty() {
        bail!("the graph has no edges to ablate (built with edge_formula = \"none\"?)");
    }
    for (l, e) in graph.edges.iter().enumerate() {
        let (b_in, b_out) = (&graph.layers[l], &graph.layers[l + 1]);
        let key = format!("{}/{}", b_in.name, b_out.name);
        if let Some(sel) = &s.node_layers {
            if !sel.contains(&b_in.name) {
                continue;
            }
        }
        let from = model
            .node_index(&b_in.name)
            .with_context(|| format!("`{}` is not in the model", b_in.name))?;
        let to = model
            .node_index(&b_out.name)
            .with_context(|| format!("`{}` is not in the model", b_out.name))?;
        check_basis(model, b_in, from)?;
        check_basis(model, b_out, to)?;
        if e.shape() != (b_out.d_lib(), b_in.d_lib()) {
            bail!(
                "edges {key} are {}x{}, the bases have {} and {} directions",
                e.nrows(),
                e.ncols(),
                b_out.d_lib(),
                b_in.d_lib()
            );
        }
        let mut section = EdgeSection::new(model, data, from, to, b_in, b_out, s.batch_size);
        let ranked = ranked_edges(e, b_in.has_constant);
        let mut eval = |k: usize| section.score(s.metric, &ranked, k);
        let mut curve = Curve::default();
        match s.schedule {
            Schedule::Bisect => {
                let mut memo = HashMap::new();
                let pb = progress(64, &format!("bisecting edges {key}"));
                let n = gallop_bisect(ranked.len(), |k| {
                    pb.inc(1);
                    let v = *memo.entry(k).or_insert_with(|| eval(k));
                    within(s.metric, v, baseline, s.delta)
                });
                pb.finish_and_clear();
                let mut pts: Vec<_> = memo.into_iter().collect();
                pts.sort_by_key(|p| p.0);
                curve.n_kept = pts.iter().map(|p| p.0).collect();
                curve.score = pts.iter().map(|p| p.1).collect();
                result.edges_required.insert(key.clone(), n);
                result.kept_edges.insert(
                    key.clone(),
                    ranked[..n].iter().map(|&(i, j)| [i, j]).collect(),
                );
            }
            _ => {
                let counts = schedule_counts(s, ranked.len());
                let pb = progress(counts.len() as u64, &format!("ablating edges {key}"));
                for k in counts {
                    curve.n_kept.push(k);
                    curve.score.push(eval(k));
                    pb.inc(1);
                }
                pb.finish_and_clear();
            }
        }
        result.edge_curves.insert(key, curve);
    }
    Ok(result)
}

/// `ibasis ablate`: runs an ablation config on a built graph, writes `out/ablation.json`.
pub fn run_ablate(
    config: &Path,
    graph_dir: &Path,
    out: &Path,
    model_override: Option<&Path>,
) -> anyhow::Result<AblationResult> {
    let settings = AblationConfig::load(config)?.ablation;
    let (graph, summary) = Graph::load(graph_dir)?;
    let mut build: RunConfig = serde_json::from_value(strip_extras(summary.config.clone()))
        .with_context(|| {
            format!(
                "{}: graph.json has no usable build config",
                graph_dir.display()
            )
        })?;
    if let Some(m) = model_override {
        build.set_model_path(PathBuf::from(m));
    }
    let model = load_model(&build.model)?;
    let data = load_data(&build.with_split(settings.split))?;
    super::config::check_compatible(&model, data.as_ref())?;
    let mut result = match settings.kind {
        AblationKind::Node => node_ablation(&model, data.as_ref(), &graph, &settings)?,
        AblationKind::Edge => edge_ablation(&model, data.as_ref(), &graph, &settings)?,
    };
    result.basis = format!("{:?}", build.lib.basis_formula).to_lowercase();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(
        &out.join("ablation.json"),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    Ok(result)
}

/// The build config inside graph.json, without the keys `build` added for people.
pub fn strip_extras(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("config_file");
        o.remove("data_description");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::modadd::{ModOp, ModularArithmetic};
    use crate::models::mlp::MlpWeights;
    use crate::models::transformer::{transformer_from_tensors, Normalization, TransformerOptions};
    use crate::models::Activation;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_mat(rng: &mut ChaCha8Rng, r: usize, c: usize, scale: f64) -> Mat<f64> {
        Mat::from_fn(r, c, |_, _| scale * rng.random_range(-1.0..1.0))
    }

    /// A random basis of `d_lib` directions (`None`: the neuron basis, no `C`). `C_pinv` is
    /// random too: the masked evaluations below compute the same function of any `C`, `C_pinv`.
    fn random_basis(
        rng: &mut ChaCha8Rng,
        name: &str,
        d_orig: usize,
        d_lib: Option<usize>,
        has_constant: bool,
    ) -> NodeBasis {
        let (c, c_pinv) = match d_lib {
            Some(k) => (
                Some(random_mat(rng, d_orig, k, 1.0)),
                Some(random_mat(rng, k, d_orig, 1.0 / (k as f64).sqrt())),
            ),
            None => (None, None),
        };
        NodeBasis {
            c,
            c_pinv,
            has_constant,
            ..NodeBasis::neuron(name, d_orig, 1)
        }
    }

    /// The straightforward masked section (the implementation before [`EdgeSection`]): per
    /// group of output features with equal masks, the whole section on `(fhat . mask) C_pinv`,
    /// projected onto `C_out`; then the rest of the model on `out_hat C_pinv_out`.
    #[allow(clippy::too_many_arguments)]
    fn reference_edge_logits(
        model: &Model,
        f: &Batch,
        from: usize,
        to: usize,
        b_in: &NodeBasis,
        b_out: &NodeBasis,
        ranked: &[(usize, usize)],
        k: usize,
    ) -> Batch {
        let d_in = b_in.d_lib();
        let d_out = b_out.d_lib();
        let mut masks = vec![vec![false; d_in]; d_out];
        for m in masks.iter_mut() {
            if b_in.has_constant {
                m[0] = true;
            }
        }
        for &(i, j) in &ranked[..k.min(ranked.len())] {
            masks[i][j] = true;
        }
        let mut groups: HashMap<Vec<bool>, Vec<usize>> = HashMap::new();
        for (i, m) in masks.into_iter().enumerate() {
            groups.entry(m).or_default().push(i);
        }
        let (c_in, cp_in) = basis_pair(b_in);
        let (c_out, cp_out) = basis_pair(b_out);
        let fhat = mm(f.data.as_ref(), c_in.as_ref());
        let mut out_hat: Option<Mat<f64>> = None;
        let mut pos_out = 0;
        for (mask, outs) in &groups {
            let masked = Mat::from_fn(
                fhat.nrows(),
                d_in,
                |r, j| if mask[j] { fhat[(r, j)] } else { 0.0 },
            );
            let x = Batch::new(f.n, 1, f.pos, mm(masked.as_ref(), cp_in.as_ref()));
            let y = model.run(x, from, to);
            pos_out = y.pos;
            let yhat = mm(y.data.as_ref(), c_out.as_ref());
            let acc = out_hat.get_or_insert_with(|| Mat::zeros(yhat.nrows(), d_out));
            for &i in outs {
                acc.col_mut(i).copy_from(yhat.col(i));
            }
        }
        let out_hat = out_hat.expect("at least one output feature");
        let x = Batch::new(f.n, 1, pos_out, mm(out_hat.as_ref(), cp_out.as_ref()));
        model.run(x, to, model.modules.len())
    }

    /// Largest entry of `|a - b|` over the largest `|b|`.
    fn rel_diff(a: &Batch, b: &Batch) -> f64 {
        assert_eq!((a.n, a.pos), (b.n, b.pos));
        assert_eq!(a.data.shape(), b.data.shape());
        let mut diff = 0.0f64;
        let mut scale = 0.0f64;
        for j in 0..a.data.ncols() {
            for i in 0..a.data.nrows() {
                diff = diff.max((a.data[(i, j)] - b.data[(i, j)]).abs());
                scale = scale.max(b.data[(i, j)].abs());
            }
        }
        diff / scale.max(1e-300)
    }

    /// The folded evaluations reassociate the same products (`(fhat M) C_pinv W` as
    /// `fhat (C_pinv W)`, a fixed linear suffix times `C_out` first): each logit is a sum of a
    /// few hundred terms no larger than the logits' scale here (random weights of order one),
    /// so the two agree to ~1e-14 of that scale. 1e-10 leaves four orders of margin for the
    /// softmax and activations, while a wrongly kept or dropped feature changes logits by
    /// order one.
    const TOL: f64 = 1e-10;

    /// Checks edge and node ablations' logits on `model` against the straightforward
    /// computations for every consecutive pair of `layers` (bases: `(name, d_lib or neuron,
    /// has_constant)`).
    fn check_against_reference(
        model: &Model,
        data: &dyn Dataset,
        layers: &[(&str, Option<usize>, bool)],
        seed: u64,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let end = model.modules.len();
        let bases: Vec<NodeBasis> = layers
            .iter()
            .map(|&(name, d_lib, constant)| {
                let index = model.node_index(name).unwrap();
                random_basis(&mut rng, name, model.node_features(index), d_lib, constant)
            })
            .collect();
        let batch = 5;
        let ranges = chunks(
            data.len(),
            super::super::eval::eval_batch(model, data, batch),
        );
        for l in 0..bases.len() - 1 {
            let (b_in, b_out) = (&bases[l], &bases[l + 1]);
            let from = model.node_index(&b_in.name).unwrap();
            let to = model.node_index(&b_out.name).unwrap();
            let e = Mat::from_fn(b_out.d_lib(), b_in.d_lib(), |_, _| rng.random::<f64>());
            let ranked = ranked_edges(&e, b_in.has_constant);
            let total = ranked.len();
            // Counts up and down again (reusing memoised columns), with the memo's budget
            // ample and at a few columns (dropping most).
            let ks = [
                0,
                1,
                2,
                5,
                total / 3,
                total / 2,
                total - 1,
                total,
                total / 2 - 1,
                3,
                2,
                0,
            ];
            for budget in [MEMO_NUMBERS, 3 * data.len()] {
                let mut section = EdgeSection::new(model, data, from, to, b_in, b_out, batch);
                section.memo_budget = budget;
                if budget != MEMO_NUMBERS {
                    // And in chunks of 2 samples (or 1).
                    section.section.set_run_numbers(1);
                    section.rest.set_run_numbers(100);
                }
                assert_eq!(section.cached.batches.len(), ranges.len());
                for k in ks {
                    let got = section.masked(&ranked, k, &|_, logits| logits);
                    assert!(section.memo_size <= budget);
                    if budget == MEMO_NUMBERS && k == 2 && section.clock > 3 {
                        // Seen before: nothing computed again.
                        let before = section.computed;
                        section.masked(&ranked, k, &|_, _| ());
                        assert_eq!(section.computed, before);
                    }
                    for (r, got) in ranges.iter().zip(&got) {
                        let f = model.run(data.inputs(r.clone()), 0, from);
                        let want =
                            reference_edge_logits(model, &f, from, to, b_in, b_out, &ranked, k);
                        let d = rel_diff(got, &want);
                        assert!(
                            d < TOL,
                            "{} -> {} k {k}: relative difference {d:e}",
                            b_in.name,
                            b_out.name
                        );
                    }
                }
            }
            // Node ablation from b_in: the first n directions through the rest of the model.
            let (c, cp) = basis_pair(b_in);
            let cached = Cached::new(model, data, from, batch, b_in.c.as_ref().map(|_| &c));
            let mut rest = BasisSection::new(model, from, end, cp, None);
            rest.set_run_numbers(200);
            for n in [0, 1, b_in.d_lib() / 2, b_in.d_lib()] {
                let p = projection(b_in, n);
                for (i, r) in ranges.iter().enumerate() {
                    let f = model.run(data.inputs(r.clone()), 0, from);
                    let want = model.run(super::super::eval::project(&f, &p), from, end);
                    let x = &cached.batches[i];
                    let got = rest.run(x.fhat.as_ref(), x.n, x.pos, Kept::First(n), None);
                    let d = rel_diff(&got, &want);
                    assert!(
                        d < TOL,
                        "node ablation of {} at {n}: relative difference {d:e}",
                        b_in.name
                    );
                }
            }
        }
    }

    #[test]
    fn transformer_masked_sections_match_the_reference() {
        let p = 7;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let tensors = crate::experiments::eval::testing::random_transformer(&mut rng, p);
        let data = ModularArithmetic::new(p, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
        // The pipeline's setting: no norm, last position from add_resid1; the published node
        // layers, then others whose sections start or end inside attention and MLP.
        let opts = TransformerOptions {
            last_pos_module_type: Some("add_resid1".into()),
            ..Default::default()
        };
        let model = transformer_from_tensors(&tensors, &opts, "random").unwrap();
        check_against_reference(
            &model,
            &data,
            &[
                ("ln1.0", Some(7), true),
                ("ln2.0", Some(8), true),
                ("unembed", Some(6), true),
                ("output", None, false),
            ],
            1,
        );
        check_against_reference(
            &model,
            &data,
            &[
                ("add_embed", None, false),
                ("attn_out.0", Some(20), false),
                ("mlp_act.0", Some(15), true),
                ("add_resid2.0", Some(9), false),
                ("output", Some(5), false),
            ],
            2,
        );
        // Layer norm (sections starting with a nonlinear module), every position kept.
        let opts = TransformerOptions {
            normalization: Normalization::LnPre,
            ..Default::default()
        };
        let model = transformer_from_tensors(&tensors, &opts, "random").unwrap();
        check_against_reference(
            &model,
            &data,
            &[
                ("ln1.0", Some(8), true),
                ("ln1_out.0", Some(9), false),
                ("ln2.0", None, true),
                ("unembed", Some(6), true),
                ("output", None, false),
            ],
            3,
        );
    }

    #[test]
    fn mismatched_graphs_are_errors() {
        let p = 5;
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let tensors = crate::experiments::eval::testing::random_transformer(&mut rng, p);
        let model =
            transformer_from_tensors(&tensors, &TransformerOptions::default(), "r").unwrap();
        let data = ModularArithmetic::new(p, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
        let d = |name: &str| model.node_features(model.node_index(name).unwrap());
        let settings = AblationSettings {
            kind: AblationKind::Edge,
            schedule: Schedule::Bisect,
            cutoff: 2,
            base: 2.0,
            step: 1,
            delta: 0.001,
            split: Split::Test,
            metric: Metric::Accuracy,
            node_layers: None,
            batch_size: 8,
        };
        let good = |rng: &mut ChaCha8Rng| Graph {
            layers: vec![
                random_basis(rng, "ln2.0", d("ln2.0"), Some(4), true),
                random_basis(rng, "output", d("output"), None, false),
            ],
            edges: vec![Mat::zeros(d("output"), 4)],
            timings: vec![],
        };
        assert!(edge_ablation(&model, &data, &good(&mut rng), &settings).is_ok());
        assert!(node_ablation(&model, &data, &good(&mut rng), &settings).is_ok());
        let mut bad = Vec::new();
        let mut g = good(&mut rng);
        g.edges[0] = Mat::zeros(3, 4);
        bad.push(("edge shape", g));
        let mut g = good(&mut rng);
        g.layers[0].c = Some(Mat::zeros(d("ln2.0") + 1, 4));
        bad.push(("C rows", g));
        let mut g = good(&mut rng);
        g.layers[0].c_pinv = Some(Mat::zeros(3, d("ln2.0")));
        bad.push(("C_pinv rows", g));
        let mut g = good(&mut rng);
        g.layers[0].c_pinv = None;
        bad.push(("no C_pinv", g));
        let mut g = good(&mut rng);
        g.layers[0].d_orig += 1;
        bad.push(("d_orig", g));
        for (what, g) in &bad {
            assert!(
                edge_ablation(&model, &data, g, &settings).is_err(),
                "{what}"
            );
            if *what != "edge shape" {
                assert!(
                    node_ablation(&model, &data, g, &settings).is_err(),
                    "{what}"
                );
            }
        }
    }

    /// Random features (bias 1 appended) with random labels.
    struct Gaussian {
        x: Mat<f64>,
        labels: Vec<usize>,
    }

    impl Dataset for Gaussian {
        fn len(&self) -> usize {
            self.labels.len()
        }
        fn inputs(&self, range: std::ops::Range<usize>) -> Batch {
            let x = self.x.subrows(range.start, range.len()).to_owned();
            Batch::new(range.len(), 1, 1, x)
        }
        fn labels(&self, range: std::ops::Range<usize>) -> Vec<usize> {
            self.labels[range].to_vec()
        }
        fn describe(&self) -> String {
            "gaussian".into()
        }
    }

    #[test]
    fn mlp_masked_sections_match_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let dims = [6, 10, 9, 4];
        let weights = MlpWeights {
            layers: dims
                .windows(2)
                .map(|w| {
                    let m = random_mat(&mut rng, w[0], w[1], 0.8);
                    let b = (0..w[1]).map(|_| rng.random_range(-0.3..0.3)).collect();
                    (m, b)
                })
                .collect(),
            act: Activation::GeluTanh,
        };
        let model = weights.into_model("mlp");
        let n = 23;
        let data = Gaussian {
            x: Mat::from_fn(n, dims[0] + 1, |_, j| {
                if j == dims[0] {
                    1.0
                } else {
                    rng.random_range(-2.0..2.0)
                }
            }),
            labels: (0..n).map(|i| i % dims[3]).collect(),
        };
        check_against_reference(
            &model,
            &data,
            &[
                ("layers.0", Some(7), true),
                ("layers.1", Some(11), true),
                ("layers.2", None, false),
                ("output", Some(3), false),
            ],
            5,
        );
    }

    #[test]
    fn searches_find_the_threshold() {
        for total in [1, 2, 7, 100, 12650] {
            for answer in [0, 1, 3, total / 2, total - 1, total] {
                let answer = answer.min(total);
                let mut calls = 0;
                assert_eq!(bisect(0, total, |n| n >= answer), answer);
                assert_eq!(
                    gallop_bisect(total, |n| {
                        calls += 1;
                        n >= answer
                    }),
                    answer,
                    "total {total}"
                );
                assert!(calls <= 2 * (usize::BITS - total.leading_zeros()) as usize + 2);
            }
        }
    }
}
