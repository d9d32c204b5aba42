//! Ablation experiments (method.md section 10): how many features (node ablation) or edges
//! (edge ablation) of a basis the model needs to keep its accuracy or loss.

use super::config::{load_data, load_model, RunConfig};
use super::eval::{score_logits, Score, Targets};
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

/// Activations at one node layer for the whole evaluation set, in batches, with labels.
struct Cached {
    batches: Vec<(Batch, Targets)>,
}

impl Cached {
    fn new(model: &Model, data: &dyn Dataset, index: usize, batch: usize) -> Self {
        let batches = chunks(data.len(), super::eval::eval_batch(model, data, batch))
            .into_par_iter()
            .map(|r| {
                let targets = Targets::of(data, r.clone());
                (model.run(data.inputs(r), 0, index), targets)
            })
            .collect();
        Self { batches }
    }

    /// Runs the rest of the model from `index` on `map(batch)` and scores it.
    fn score(&self, model: &Model, index: usize, map: &(dyn Fn(&Batch) -> Batch + Sync)) -> Score {
        let end = model.modules.len();
        let (c, l, n) = self
            .batches
            .par_iter()
            .map(|(f, targets)| {
                let y = model.run(map(f), index, end);
                score_logits(&y, targets)
            })
            .reduce(|| (0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
        Score {
            accuracy: c / n,
            loss: l / n,
        }
    }
}

/// `C_k C_pinv` keeping the first `n` basis directions.
fn projection(b: &NodeBasis, n: usize) -> Mat<f64> {
    let d = b.d_orig;
    let (c, cp) = match (&b.c, &b.c_pinv) {
        (Some(c), Some(cp)) => (c.clone(), cp.clone()),
        _ => (Mat::identity(d, d), Mat::identity(d, d)),
    };
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
    let identity = |f: &Batch| f.clone();
    let end_index = model.modules.len();
    let baseline = {
        let cached = Cached::new(model, data, end_index, s.batch_size);
        pick(s.metric, cached.score(model, end_index, &identity))
    };
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
        let cached = Cached::new(model, data, index, s.batch_size);
        let total = b.d_lib();
        let eval = |n: usize| {
            let p = projection(b, n);
            pick(
                s.metric,
                cached.score(model, index, &|f: &Batch| super::eval::project(f, &p)),
            )
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

/// Evaluates the model with each output feature of section `l -> l + 1` computed only from its
/// kept input features (the top `k` edges plus the constant's). Output features sharing a mask
/// share one forward pass.
#[allow(clippy::too_many_arguments)]
fn edge_masked_score(
    model: &Model,
    cached: &Cached,
    from: usize,
    to: usize,
    b_in: &NodeBasis,
    b_out: &NodeBasis,
    ranked: &[(usize, usize)],
    k: usize,
) -> Score {
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
    // Group output features by mask.
    let mut groups: HashMap<Vec<bool>, Vec<usize>> = HashMap::new();
    for (i, m) in masks.into_iter().enumerate() {
        groups.entry(m).or_default().push(i);
    }
    let eye = |d| Mat::<f64>::identity(d, d);
    let c_in = b_in.c.clone().unwrap_or_else(|| eye(b_in.d_orig));
    let cp_in = b_in.c_pinv.clone().unwrap_or_else(|| eye(b_in.d_orig));
    let c_out = b_out.c.clone().unwrap_or_else(|| eye(b_out.d_orig));
    let cp_out = b_out.c_pinv.clone().unwrap_or_else(|| eye(b_out.d_orig));
    let groups: Vec<(Vec<bool>, Vec<usize>)> = groups.into_iter().collect();
    let map = |f: &Batch| -> Batch {
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
        Batch::new(f.n, 1, pos_out, mm(out_hat.as_ref(), cp_out.as_ref()))
    };
    // `cached` holds activations at `from`; `map` runs the section, scoring continues at `to`.
    cached.score(model, to, &|f: &Batch| map(f))
}

/// Edge ablation of every edge matrix of a graph.
pub fn edge_ablation(
    model: &Model,
    data: &dyn Dataset,
    graph: &Graph,
    s: &AblationSettings,
) -> anyhow::Result<AblationResult> {
    let end = model.modules.len();
    let baseline = pick(
        s.metric,
        Cached::new(model, data, end, s.batch_size).score(model, end, &|f: &Batch| f.clone()),
    );
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
        let cached = Cached::new(model, data, from, s.batch_size);
        let ranked = ranked_edges(e, b_in.has_constant);
        let eval = |k: usize| {
            pick(
                s.metric,
                edge_masked_score(model, &cached, from, to, b_in, b_out, &ranked, k),
            )
        };
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
