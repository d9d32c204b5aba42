//! The interactive explorer of interaction graphs: one self-contained HTML file (JavaScript,
//! CSS and data inlined, no network requests) built from saved results, plus an export of
//! each pruned graph in the `{metadata, nodes, links}` layout of circuit-tracer's and
//! Neuronpedia's graph viewers.
//!
//! What goes into the file, per graph (LIB, PCA, neurons of one run):
//! - every feature of every node layer with its importance `Lambda` (method.md section 4.8)
//!   and its Leiden module (section 10, modularity);
//! - the edges `E_ij` (section 5), pruned per output feature `i`: its largest incoming edges
//!   until they hold `edge_mass` of its incoming total, at most `max_in_edges` of them. The
//!   constant feature's edges are left out, as in the drawings and the modularity graph. The
//!   kept share of each matrix's total is stated in the file and shown in the view;
//! - what each feature represents: for modular arithmetic its 2-D Fourier power spectrum over
//!   `(a, b)` and dominant frequencies (section 10); for MNIST its input-space direction at the
//!   input layer (row `j` of `C_pinv`: `f ~ fhat C_pinv`, section 2) and the test images on
//!   which `fhat_j = (f C)_j` is largest in size; for language models the token contexts where
//!   it is largest in size.
//!
//! The top activations need `C`, which the statistics pass computes (section 4 follows
//! section 3), so they cannot be gathered during that pass: they come from one forward-only
//! pass over the data after the build, keeping a top-`k` list per feature (memory independent
//! of the data size).
//!
//! Large arrays travel as base64 of little-endian binary (f32 weights scaled by their matrix's
//! largest, u32 indices, u8 / i8 images and spectra), the rest as JSON.

use super::config::{load_data, load_model, load_tokenizer, DataConfig, RunConfig};
use super::fourier::{feature_grids, label_from_power, power_spectra, FourierLabel};
use super::modularity::{cluster_graph, Clusters, EdgeNorm, ModularityOptions};
use super::report::{base64, escape_html};
use super::view::{GraphView, LayerView};
use crate::algorithm::{Graph, NodeBasis};
use crate::data::modadd::Split;
use crate::data::Dataset;
use crate::io::write_atomic;
use crate::models::{Model, OUTPUT};
use crate::tensor::linalg::mm;
use anyhow::{ensure, Context};
use faer::Mat;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const TEMPLATE: &str = include_str!("../../assets/explorer/explorer.html");
const SCRIPT: &str = include_str!("../../assets/explorer/explorer.js");
const STYLE: &str = include_str!("../../assets/explorer/explorer.css");

/// How much of each graph goes into the file.
#[derive(Clone, Debug)]
pub struct ExplorerOptions {
    /// Share of each output feature's incoming edge mass kept, in (0, 1].
    pub edge_mass: f64,
    /// At most this many incoming edges per output feature.
    pub max_in_edges: usize,
    /// Top-activating samples (images, token contexts) kept per feature.
    pub top_k: usize,
    /// Tokens shown before and after the activating token.
    pub context: (usize, usize),
    /// Fourier spectra stored for this many leading features per node layer (labels for all).
    pub max_spectra: usize,
    /// Leiden resolution for the graphs clustered here.
    pub gamma: f64,
}

impl ExplorerOptions {
    /// Errors on settings that cannot be used.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.edge_mass > 0.0 && self.edge_mass <= 1.0,
            "--edge-mass {} is outside (0, 1]",
            self.edge_mass
        );
        ensure!(self.max_in_edges >= 1, "--max-in-edges must be at least 1");
        ensure!(
            self.gamma.is_finite() && self.gamma >= 0.0,
            "--gamma {} must be finite and >= 0",
            self.gamma
        );
        Ok(())
    }
}

impl Default for ExplorerOptions {
    fn default() -> Self {
        Self {
            edge_mass: 0.95,
            max_in_edges: 64,
            top_k: 8,
            context: (6, 3),
            max_spectra: 64,
            gamma: 1.0,
        }
    }
}

/// The kept edges of one edge matrix (see [`prune_edges`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PrunedEdges {
    pub n_out: usize,
    pub n_in: usize,
    /// `(output i, input j, E_ij)`, largest first (ties: by `i`, then `j`).
    pub edges: Vec<(u32, u32, f64)>,
    /// Sum of all positive entries between non-constant features.
    pub total: f64,
    /// Sum of the kept entries.
    pub kept: f64,
    /// Number of positive entries between non-constant features.
    pub n_positive: usize,
}

impl PrunedEdges {
    /// Kept share of the matrix's mass (1 for a matrix without mass).
    pub fn kept_share(&self) -> f64 {
        if self.total > 0.0 {
            self.kept / self.total
        } else {
            1.0
        }
    }
}

/// Prunes edge matrix `e` (`d_out x d_in`, entries `>= 0`) per output feature: for each
/// output `i >= skip_out`, its incoming edges from inputs `j >= skip_in` (the constant
/// features are skipped), largest first, until they hold `mass` of row `i`'s total or number
/// `max_in`.
pub fn prune_edges(
    e: &Mat<f64>,
    skip_in: usize,
    skip_out: usize,
    mass: f64,
    max_in: usize,
) -> anyhow::Result<PrunedEdges> {
    ensure!(mass > 0.0 && mass <= 1.0, "edge mass {mass} outside (0, 1]");
    ensure!(max_in >= 1, "at least one incoming edge per feature");
    let (n_out, n_in) = (e.nrows(), e.ncols());
    let mut edges = Vec::new();
    let (mut total, mut kept, mut n_positive) = (0.0, 0.0, 0);
    let mut row: Vec<(u32, f64)> = Vec::with_capacity(n_in);
    for i in skip_out.min(n_out)..n_out {
        row.clear();
        for j in skip_in.min(n_in)..n_in {
            let v = e[(i, j)];
            ensure!(
                v.is_finite() && v >= 0.0,
                "edge ({i}, {j}) is {v} (edges must be finite and >= 0)"
            );
            if v > 0.0 {
                row.push((j as u32, v));
            }
        }
        row.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let row_total: f64 = row.iter().map(|r| r.1).sum();
        total += row_total;
        n_positive += row.len();
        let mut acc = 0.0;
        for &(j, v) in row.iter().take(max_in) {
            edges.push((i as u32, j, v));
            acc += v;
            if acc >= mass * row_total * (1.0 - 1e-12) {
                break;
            }
        }
        kept += acc;
    }
    edges.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    Ok(PrunedEdges {
        n_out,
        n_in,
        edges,
        total,
        kept,
        n_positive,
    })
}

/// One graph of the explorer, with what was computed for it.
pub struct ExplorerGraph<'a> {
    pub name: String,
    pub graph: &'a Graph,
    pub clusters: Option<Clusters>,
    pub pruned: Vec<PrunedEdges>,
}

/// What [`write_explorer`] wrote.
#[derive(Clone, Debug)]
pub struct ExplorerFiles {
    pub html: PathBuf,
    /// One circuit-tracer-layout JSON per graph.
    pub json: Vec<PathBuf>,
    pub html_bytes: usize,
}

/// A feature's entry in a top-activation list: `(|value|, value, sample, position)`.
type Hit = (f64, f64, u32, u32);

/// Whether `a` ranks before `b`: larger `|value|`, then earlier sample and position.
fn before(a: &Hit, b: &Hit) -> bool {
    match b.0.total_cmp(&a.0) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => (a.2, a.3) < (b.2, b.3),
    }
}

/// Puts `hit` into the sorted list `top` of at most `k` entries.
fn offer(top: &mut Vec<Hit>, k: usize, hit: Hit) {
    if top.len() == k && !before(&hit, &top[k - 1]) {
        return;
    }
    let at = top.partition_point(|t| before(t, &hit));
    top.insert(at, hit);
    top.truncate(k);
}

/// Top-`k` lists of `fhat = f C` per feature of each of `bases` over all samples of `data`,
/// from one forward pass (batches in parallel, one list per feature and thread, merged).
/// Positions are those of the input when the node layer has as many, else the last input
/// position (a last-position section).
pub fn top_activations(
    model: &Model,
    data: &dyn Dataset,
    bases: &[&NodeBasis],
    k: usize,
) -> anyhow::Result<Vec<Vec<Vec<Hit>>>> {
    let mut targets: Vec<(usize, usize)> = Vec::new();
    for (t, b) in bases.iter().enumerate() {
        let index = model
            .node_index(&b.name)
            .with_context(|| format!("node layer `{}` is not in the model", b.name))?;
        let d = model.node_features(index);
        if let Some(c) = &b.c {
            ensure!(
                c.nrows() == d,
                "node layer `{}` has {d} features in the model, C has {} rows",
                b.name,
                c.nrows()
            );
        }
        targets.push((index, t));
    }
    targets.sort_unstable();
    if data.is_empty() || k == 0 {
        return Ok(bases.iter().map(|b| vec![Vec::new(); b.d_lib()]).collect());
    }
    let in_pos = data.inputs(0..1).pos;
    let batch = (1024 / in_pos.max(1)).max(1);
    let init =
        || -> Vec<Vec<Vec<Hit>>> { bases.iter().map(|b| vec![Vec::new(); b.d_lib()]).collect() };
    let merge = |mut a: Vec<Vec<Vec<Hit>>>, b: Vec<Vec<Vec<Hit>>>| {
        for (la, lb) in a.iter_mut().zip(b) {
            for (fa, fb) in la.iter_mut().zip(lb) {
                for h in fb {
                    offer(fa, k, h);
                }
            }
        }
        a
    };
    let out = crate::algorithm::pass::chunks(data.len(), batch)
        .into_par_iter()
        .fold(init, |mut acc, range| {
            let start = range.start;
            let (mut f, mut at) = (data.inputs(range), data.start());
            for &(index, t) in &targets {
                if index != at {
                    f = model.run(f, at, index);
                    at = index;
                }
                let fhat = match &bases[t].c {
                    Some(c) => mm(f.data.as_ref(), c.as_ref()),
                    None => f.data.clone(),
                };
                let pos = f.pos;
                for (j, top) in acc[t].iter_mut().enumerate() {
                    let col = fhat.col(j);
                    for (r, &v) in col.iter().enumerate() {
                        let (x, s) = (r / pos, r % pos);
                        let p = if pos == in_pos { s } else { in_pos - 1 };
                        offer(top, k, (v.abs(), v, (start + x) as u32, p as u32));
                    }
                }
            }
            acc
        })
        .reduce(init, merge);
    Ok(out)
}

fn f32_bytes(v: impl IntoIterator<Item = f64>) -> Vec<u8> {
    v.into_iter()
        .flat_map(|x| (x as f32).to_le_bytes())
        .collect()
}

fn i32_bytes(v: impl IntoIterator<Item = i64>) -> Vec<u8> {
    v.into_iter()
        .flat_map(|x| (x as i32).to_le_bytes())
        .collect()
}

/// Bytes per feature index in a matrix with up to `n` features a side: 2 below 65536.
pub fn index_bytes(n: usize) -> usize {
    if n <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Feature indices as u16 or u32 ([`index_bytes`]), little-endian.
fn index_array(v: impl IntoIterator<Item = u32>, n: usize) -> Vec<u8> {
    if index_bytes(n) == 2 {
        v.into_iter()
            .flat_map(|x| (x as u16).to_le_bytes())
            .collect()
    } else {
        u32_bytes(v)
    }
}

fn u32_bytes(v: impl IntoIterator<Item = u32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A spectrum value as a byte: `255 (1 + log10(P / P_max) / 4)`, four decades, 0 below.
pub fn power_byte(p: f64, max: f64) -> u8 {
    if max <= 0.0 || p <= 0.0 {
        return 0;
    }
    (255.0 * (1.0 + (p / max).log10() / 4.0))
        .round()
        .clamp(0.0, 255.0) as u8
}

/// The graph as the cluster code sees it.
fn graph_view(g: &Graph) -> GraphView {
    GraphView {
        layers: g
            .layers
            .iter()
            .map(|b| LayerView {
                name: b.name.clone(),
                importance: if b.lambda.len() == b.d_lib() {
                    b.lambda.clone()
                } else {
                    vec![1.0; b.d_lib()]
                },
                has_constant: b.has_constant,
                labels: None,
            })
            .collect(),
        edges: g.edges.clone(),
    }
}

/// Prunes `g`'s edge matrices and clusters it (unless `clusters` are given or it has no
/// edges).
pub fn prepare<'a>(
    name: &str,
    g: &'a Graph,
    clusters: Option<Clusters>,
    opts: &ExplorerOptions,
) -> anyhow::Result<ExplorerGraph<'a>> {
    let pruned = g
        .edges
        .iter()
        .enumerate()
        .map(|(l, e)| {
            let (a, b) = (&g.layers[l], &g.layers[l + 1]);
            prune_edges(
                e,
                usize::from(a.has_constant),
                usize::from(b.has_constant),
                opts.edge_mass,
                opts.max_in_edges,
            )
            .with_context(|| format!("graph {name}: edges {} -> {}", a.name, b.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let clusters = match clusters {
        Some(c) => Some(c),
        None if !g.edges.is_empty() => Some(
            cluster_graph(
                &graph_view(g),
                &ModularityOptions {
                    gamma: opts.gamma,
                    seed: 0,
                    norm: EdgeNorm::Sqrt,
                },
            )
            .with_context(|| format!("clustering graph {name}"))?,
        ),
        None => None,
    };
    Ok(ExplorerGraph {
        name: name.to_string(),
        graph: g,
        clusters,
        pruned,
    })
}

/// Node id of feature `j` of node layer `l` in the exported JSON: `{l}_{j}_0` (layer,
/// feature, context position as circuit-tracer writes them).
pub fn node_id(l: usize, j: usize) -> String {
    format!("{l}_{j}_0")
}

/// The pruned graph in circuit-tracer's / Neuronpedia's `{metadata, qParams, nodes, links}`
/// layout: one node per non-constant feature (layer = node-layer index, `ctx_idx` 0,
/// `activation` = Lambda, `clerp` = a readable label), one link per kept edge with
/// `weight = E_ij` as stored in `graph.safetensors`.
pub fn circuit_json(
    slug: &str,
    g: &ExplorerGraph<'_>,
    labels: &[Option<Vec<String>>],
    opts: &ExplorerOptions,
) -> Value {
    let layers = &g.graph.layers;
    let mut nodes = Vec::new();
    for (l, b) in layers.iter().enumerate() {
        let first = usize::from(b.has_constant);
        let feature_type = if b.name == OUTPUT {
            "logit"
        } else {
            "cross layer transcoder"
        };
        for j in first..b.d_lib() {
            let lambda = b.lambda.get(j).copied();
            let mut clerp = format!("{} #{j}", b.name);
            if let Some(lab) = labels
                .get(l)
                .and_then(|v| v.as_ref())
                .and_then(|v| v.get(j))
            {
                clerp += &format!(" {lab}");
            }
            if let Some(m) = g.clusters.as_ref().and_then(|c| c.of(l, j)) {
                clerp += &format!(" (module {m})");
            }
            nodes.push(json!({
                "node_id": node_id(l, j),
                "jsNodeId": format!("{l}_{j}-0"),
                "feature": j,
                "layer": l.to_string(),
                "ctx_idx": 0,
                "feature_type": feature_type,
                "token_prob": 0.0,
                "is_target_logit": false,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "clerp": clerp,
                "influence": Value::Null,
                "activation": lambda,
            }));
        }
    }
    let mut links = Vec::new();
    for (l, p) in g.pruned.iter().enumerate() {
        for &(i, j, w) in &p.edges {
            links.push(json!({
                "source": node_id(l, j as usize),
                "target": node_id(l + 1, i as usize),
                "weight": w,
            }));
        }
    }
    json!({
        "metadata": {
            "slug": slug,
            "scan": "ibasis",
            "transcoder_list": [],
            "prompt_tokens": [],
            "prompt": "",
            "node_threshold": Value::Null,
            "schema_version": 1,
            "ibasis": {
                "graph": g.name,
                "node_layers": layers.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
                "edge_mass": opts.edge_mass,
                "max_in_edges": opts.max_in_edges,
                "kept_share": g.pruned.iter().map(|p| p.kept_share()).collect::<Vec<_>>(),
                "weight": "E_ij, the squared edge of method.md section 5 (>= 0)",
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    })
}

/// Per node layer of a graph, its features' Fourier labels (modular arithmetic only).
pub type LayerLabels = Vec<Option<Vec<String>>>;

/// What the data says a feature represents.
enum Kind {
    /// Modular arithmetic `(p, op)`: Fourier spectra.
    Modular(usize, crate::data::modadd::ModOp),
    /// Greyscale images `h x w` (MNIST): input directions, top test images.
    Image(usize, usize),
    /// Token ids: top contexts from the build's data.
    Text(String),
    None,
}

fn kind_of(cfg: &RunConfig) -> Kind {
    match &cfg.data {
        DataConfig::ModularArithmetic { modulus, op, .. } => Kind::Modular(*modulus, *op),
        DataConfig::Mnist { .. } => Kind::Image(28, 28),
        DataConfig::Text { tokenizer, .. } => Kind::Text(tokenizer.clone()),
        _ => Kind::None,
    }
}

/// Builds the explorer's data (the JSON embedded in the page) for `graphs` of one run, with
/// what its features represent when the run's config and model are given. Also returns the
/// Fourier labels per graph and layer (for the JSON export).
pub fn explorer_data(
    source: Option<(&RunConfig, &Model)>,
    graphs: &[ExplorerGraph<'_>],
    title: &str,
    opts: &ExplorerOptions,
) -> anyhow::Result<(Value, Vec<LayerLabels>)> {
    let (kind, cfg, model) = match source {
        Some((cfg, model)) => (kind_of(cfg), Some(cfg), Some(model)),
        None => (Kind::None, None, None),
    };
    let mut all_labels: Vec<LayerLabels> = Vec::new();
    let mut graph_values = Vec::new();
    // Top activations (images, text): one pass for all graphs.
    let top_data: Option<Box<dyn Dataset>> = match (&kind, cfg) {
        (Kind::Image(..), Some(cfg)) => Some(load_data(&cfg.with_split(Split::Test))?),
        (Kind::Text(_), Some(cfg)) => Some(load_data(&cfg.data)?),
        _ => None,
    };
    let mut bases: Vec<(usize, usize, &NodeBasis)> = Vec::new();
    for (gi, g) in graphs.iter().enumerate() {
        for (l, b) in g.graph.layers.iter().enumerate() {
            if b.name != OUTPUT {
                bases.push((gi, l, b));
            }
        }
    }
    // tops[g][l]: per feature, its hits.
    let mut tops: Vec<Vec<Option<Vec<Vec<Hit>>>>> = graphs
        .iter()
        .map(|g| vec![None; g.graph.layers.len()])
        .collect();
    let mut used: Vec<u32> = Vec::new();
    if let (Some(data), Some(model)) = (&top_data, model) {
        let refs: Vec<&NodeBasis> = bases.iter().map(|t| t.2).collect();
        let hits = top_activations(model, data.as_ref(), &refs, opts.top_k)?;
        for ((gi, l, _), h) in bases.iter().zip(hits) {
            for list in &h {
                used.extend(list.iter().map(|x| x.2));
            }
            tops[*gi][*l] = Some(h);
        }
        used.sort_unstable();
        used.dedup();
    }
    let row_of = |s: u32| used.binary_search(&s).map(|r| r as i64).unwrap_or(-1);

    for (gi, g) in graphs.iter().enumerate() {
        let layers = &g.graph.layers;
        let mut layer_values = Vec::new();
        let mut labels: Vec<Option<Vec<String>>> = vec![None; layers.len()];
        // Fourier spectra of the non-output layers.
        let mut fourier: Vec<Option<Value>> = vec![None; layers.len()];
        if let (Kind::Modular(p, op), Some(model)) = (&kind, model) {
            let idx: Vec<usize> = (0..layers.len())
                .filter(|&l| layers[l].name != OUTPUT)
                .collect();
            let refs: Vec<&NodeBasis> = idx.iter().map(|&l| &layers[l]).collect();
            let grids = feature_grids(model, &refs, *p, *op)?;
            let h = p / 2 + 1;
            for (&l, grid) in idx.iter().zip(&grids) {
                let spectra = power_spectra(grid.as_ref(), *p);
                let labs: Vec<FourierLabel> = spectra.par_iter().map(label_from_power).collect();
                let n = spectra.len().min(opts.max_spectra);
                let mut bytes = Vec::with_capacity(n * p * h);
                let mut maxes = Vec::with_capacity(n);
                for s in spectra.iter().take(n) {
                    let max = s
                        .col_iter()
                        .flat_map(|c| c.iter().copied().collect::<Vec<_>>())
                        .fold(0.0, f64::max);
                    maxes.push(max);
                    for ka in 0..*p {
                        for kb in 0..h {
                            bytes.push(power_byte(s[(ka, kb)], max));
                        }
                    }
                }
                labels[l] = Some(labs.iter().map(|f| f.label.clone()).collect());
                fourier[l] = Some(json!({
                    "p": p,
                    "h": h,
                    "n": n,
                    "max": maxes,
                    "power": base64(&bytes),
                    "dominant": labs.iter().map(|f| f.dominant.clone()).collect::<Vec<_>>(),
                    "split": labs.iter().map(|f| [f.constant, f.a, f.b, f.cross]).collect::<Vec<_>>(),
                }));
            }
        }
        for (l, b) in layers.iter().enumerate() {
            let d = b.d_lib();
            let module: Option<Vec<i64>> = g.clusters.as_ref().map(|c| {
                (0..d)
                    .map(|j| c.of(l, j).map(|m| m as i64).unwrap_or(-1))
                    .collect()
            });
            let mut direction = Value::Null;
            if let (Kind::Image(h, w), Some(cp), Some(model)) = (&kind, &b.c_pinv, model) {
                let index = model.node_index(&b.name);
                if index == Some(0) && b.d_orig == h * w + 1 && cp.ncols() == b.d_orig {
                    let mut bytes = Vec::with_capacity(d * h * w);
                    let mut scale = Vec::with_capacity(d);
                    for j in 0..d {
                        let m = (0..h * w).map(|i| cp[(j, i)].abs()).fold(0.0, f64::max);
                        scale.push(m);
                        for i in 0..h * w {
                            let q = if m > 0.0 {
                                (127.0 * cp[(j, i)] / m).round()
                            } else {
                                0.0
                            };
                            bytes.push(q as i8 as u8);
                        }
                    }
                    direction =
                        json!({"h": h, "w": w, "n": d, "scale": scale, "data": base64(&bytes)});
                }
            }
            let top = match &tops[gi][l] {
                Some(lists) => {
                    let k = opts.top_k;
                    let mut value = Vec::with_capacity(d * k);
                    let mut row = Vec::with_capacity(d * k);
                    let mut pos = Vec::with_capacity(d * k);
                    for list in lists {
                        for slot in 0..k {
                            match list.get(slot) {
                                Some(h) => {
                                    value.push(h.1);
                                    row.push(row_of(h.2));
                                    pos.push(h.3 as i64);
                                }
                                None => {
                                    value.push(f64::NAN);
                                    row.push(-1);
                                    pos.push(-1);
                                }
                            }
                        }
                    }
                    json!({
                        "k": k,
                        "value": base64(&f32_bytes(value)),
                        "row": base64(&i32_bytes(row)),
                        "pos": base64(&i32_bytes(pos)),
                    })
                }
                None => Value::Null,
            };
            layer_values.push(json!({
                "name": b.name,
                "d_orig": b.d_orig,
                "d_lib": d,
                "pos": b.pos,
                "has_constant": b.has_constant,
                "lambda": if b.lambda.len() == d { json!(b.lambda) } else { Value::Null },
                "module": module,
                "labels": labels[l],
                "fourier": fourier[l].take(),
                "direction": direction,
                "top": top,
            }));
        }
        let edges: Vec<Value> = g
            .pruned
            .iter()
            .enumerate()
            .map(|(l, p)| {
                let w_max = p.edges.first().map(|e| e.2).unwrap_or(0.0);
                let scaled = p
                    .edges
                    .iter()
                    .map(|e| if w_max > 0.0 { e.2 / w_max } else { 0.0 });
                json!({
                    "in": l,
                    "out": l + 1,
                    "n_in": p.n_in,
                    "n_out": p.n_out,
                    "total": p.total,
                    "kept": p.kept,
                    "kept_share": p.kept_share(),
                    "n_positive": p.n_positive,
                    "n_kept": p.edges.len(),
                    "w_max": w_max,
                    "index_bytes": index_bytes(p.n_in.max(p.n_out)),
                    "src": base64(&index_array(p.edges.iter().map(|e| e.1), p.n_in.max(p.n_out))),
                    "dst": base64(&index_array(p.edges.iter().map(|e| e.0), p.n_in.max(p.n_out))),
                    "w": base64(&f32_bytes(scaled)),
                })
            })
            .collect();
        graph_values.push(json!({
            "name": g.name,
            "n_modules": g.clusters.as_ref().map(|c| c.n_clusters),
            "q": g.clusters.as_ref().map(|c| c.q),
            "layers": layer_values,
            "edges": edges,
        }));
        all_labels.push(labels);
    }
    // The samples the top lists point at: images, or token ids with their texts.
    let mut images = Value::Null;
    let mut tokens = Value::Null;
    if let Some(data) = &top_data {
        match &kind {
            Kind::Image(h, w) => {
                let mut pixels = Vec::with_capacity(used.len() * h * w);
                for &s in &used {
                    let x = data.inputs(s as usize..s as usize + 1);
                    ensure!(
                        x.features() == h * w + 1,
                        "{}: {} input features, expected {h} x {w} pixels and the bias",
                        data.describe(),
                        x.features()
                    );
                    for i in 0..h * w {
                        pixels.push((x.data[(0, i)] * 255.0).round().clamp(0.0, 255.0) as u8);
                    }
                }
                images = json!({"h": h, "w": w, "samples": used, "pixels": base64(&pixels)});
            }
            Kind::Text(spec) => {
                let tok = load_tokenizer(spec)?;
                let mut ids = Vec::new();
                let mut n_ctx = 0;
                for &s in &used {
                    let x = data.inputs(s as usize..s as usize + 1);
                    n_ctx = x.pos;
                    ids.extend(x.data.col(0).iter().map(|&t| t as u32));
                }
                let mut distinct = ids.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let mut vocab = serde_json::Map::new();
                for id in distinct {
                    vocab.insert(id.to_string(), Value::String(tok.decode(&[id])?));
                }
                tokens = json!({
                    "n_ctx": n_ctx,
                    "samples": used,
                    "ids": base64(&u32_bytes(ids)),
                    "vocab": vocab,
                });
            }
            _ => {}
        }
    }
    let data = json!({
        "format": "ibasis-explorer/1",
        "title": title,
        "model": cfg.map(|c| c.model_path().display().to_string()),
        "settings": {
            "edge_mass": opts.edge_mass,
            "max_in_edges": opts.max_in_edges,
            "top_k": opts.top_k,
            "context": [opts.context.0, opts.context.1],
            "max_spectra": opts.max_spectra,
        },
        "data": top_data.as_ref().map(|d| d.describe()),
        "graphs": graph_values,
        "images": images,
        "tokens": tokens,
    });
    Ok((data, all_labels))
}

/// Fills `{{NAME}}` markers of the template in one pass (inserted text is never scanned).
fn fill(template: &str, values: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let end = rest[at..]
            .find("}}")
            .context("unclosed {{ in the explorer template")?
            + at;
        let name = &rest[at + 2..end];
        let (_, v) = values
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("unknown marker {{{{{name}}}}} in the explorer template"))?;
        out.push_str(v);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The page: template, style, script and `data` (JSON, `<` escaped so that no `</script>`
/// can end the data block early).
pub fn render_html(title: &str, data: &Value) -> anyhow::Result<String> {
    let json = serde_json::to_string(data)?.replace('<', "\\u003c");
    fill(
        TEMPLATE,
        &[
            ("TITLE", &escape_html(title)),
            ("STYLE", STYLE),
            ("SCRIPT", SCRIPT),
            ("DATA", &json),
        ],
    )
}

/// The JSON export of graph `name` beside `html`: `explorer.html` -> `explorer-lib.json`.
pub fn json_path(html: &Path, name: &str) -> PathBuf {
    let stem = html
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "explorer".into());
    html.with_file_name(format!("{stem}-{name}.json"))
}

/// Writes the explorer of `graphs` (named, with the first graph's clusters if already
/// computed) into `html`, and each pruned graph as circuit-tracer JSON beside it.
pub fn write_explorer(
    html: &Path,
    cfg: &RunConfig,
    model: &Model,
    graphs: &[(&str, &Graph)],
    first_clusters: Option<&Clusters>,
    title: &str,
    opts: &ExplorerOptions,
) -> anyhow::Result<ExplorerFiles> {
    ensure!(!graphs.is_empty(), "the explorer needs at least one graph");
    opts.validate()?;
    let mut prepared = Vec::with_capacity(graphs.len());
    for (i, (name, g)) in graphs.iter().enumerate() {
        let given = if i == 0 {
            first_clusters.cloned()
        } else {
            None
        };
        prepared.push(prepare(name, g, given, opts)?);
    }
    let (data, labels) = explorer_data(Some((cfg, model)), &prepared, title, opts)?;
    let page = render_html(title, &data)?;
    if let Some(dir) = html.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(html, page.as_bytes())?;
    let mut json = Vec::new();
    for (g, labs) in prepared.iter().zip(&labels) {
        let path = json_path(html, &g.name);
        let v = circuit_json(&format!("ibasis-{}", g.name), g, labs, opts);
        write_atomic(&path, serde_json::to_string(&v)?.as_bytes())?;
        json.push(path);
    }
    Ok(ExplorerFiles {
        html: html.to_path_buf(),
        json,
        html_bytes: page.len(),
    })
}

/// `ibasis explore --graph DIR [--graph DIR ...] --out FILE`: the explorer of saved graphs
/// (named after their folders), with the model and data of the first graph's build config.
pub fn explore_from_dirs(
    dirs: &[PathBuf],
    out: &Path,
    opts: &ExplorerOptions,
) -> anyhow::Result<ExplorerFiles> {
    ensure!(!dirs.is_empty(), "give at least one --graph folder");
    opts.validate()?;
    let mut loaded = Vec::new();
    for d in dirs {
        let (g, s) = Graph::load(d)?;
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| format!("graph{}", loaded.len()));
        loaded.push((name, g, s));
    }
    for (name, g, _) in &loaded[1..] {
        let first = &loaded[0].1;
        ensure!(
            g.layers.len() == first.layers.len()
                && g.layers.iter().zip(&first.layers).all(|(a, b)| a.name == b.name),
            "graph {name} has other node layers than graph {} (the explorer shows graphs of one run)",
            loaded[0].0
        );
    }
    let cfg: RunConfig =
        serde_json::from_value(super::ablate::strip_extras(loaded[0].2.config.clone()))
            .with_context(|| {
                format!(
                    "{}: graph.json has no usable build config",
                    dirs[0].display()
                )
            })?;
    let model = load_model(&cfg.model)?;
    let graphs: Vec<(&str, &Graph)> = loaded.iter().map(|(n, g, _)| (n.as_str(), g)).collect();
    let title = format!("ibasis explorer: {}", cfg.model_path().display());
    write_explorer(out, &cfg, &model, &graphs, None, &title, opts)
}

/// Standard base64 of `bytes` (how the page stores binary arrays).
pub fn base64_of(bytes: &[u8]) -> String {
    base64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::modadd::{ModOp, ModularArithmetic};
    use crate::models::transformer::{transformer_from_tensors, TransformerOptions};
    use rand::{Rng, SeedableRng};

    /// One forward pass in parallel batches gives the lists that sorting every activation of
    /// every sample gives; a last-position node layer reports the last input position.
    #[test]
    fn top_activations_match_a_full_sort() {
        let p = 11;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let tensors = crate::experiments::eval::testing::random_transformer(&mut rng, p);
        let opts = TransformerOptions {
            last_pos_module_type: Some("add_resid1".into()),
            ..Default::default()
        };
        let model = transformer_from_tensors(&tensors, &opts, "random").unwrap();
        let data = ModularArithmetic::new(p, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
        let basis = |name: &str, d_lib: Option<usize>, rng: &mut rand_chacha::ChaCha8Rng| {
            let d = model.node_features(model.node_index(name).unwrap());
            NodeBasis {
                c: d_lib.map(|k| Mat::from_fn(d, k, |_, _| rng.random_range(-1.0..1.0))),
                ..NodeBasis::neuron(name, d, 1)
            }
        };
        let bases = [
            basis("unembed", Some(4), &mut rng),
            basis("ln1.0", None, &mut rng),
            basis("ln2.0", Some(3), &mut rng),
        ];
        let refs: Vec<&NodeBasis> = bases.iter().collect();
        let k = 5;
        let got = top_activations(&model, &data, &refs, k).unwrap();
        let n = data.len();
        let in_pos = data.inputs(0..1).pos;
        for (b, got) in bases.iter().zip(&got) {
            let f = model.run(data.inputs(0..n), 0, model.node_index(&b.name).unwrap());
            let fhat = match &b.c {
                Some(c) => mm(f.data.as_ref(), c.as_ref()),
                None => f.data.clone(),
            };
            assert_eq!(got.len(), fhat.ncols());
            for (j, list) in got.iter().enumerate() {
                let mut all: Vec<Hit> = (0..fhat.nrows())
                    .map(|r| {
                        let (x, s) = (r / f.pos, r % f.pos);
                        let pos = if f.pos == in_pos { s } else { in_pos - 1 };
                        let v = fhat[(r, j)];
                        (v.abs(), v, x as u32, pos as u32)
                    })
                    .collect();
                all.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.2, a.3).cmp(&(b.2, b.3))));
                assert_eq!(list.len(), k);
                for (h, w) in list.iter().zip(&all) {
                    assert_eq!((h.2, h.3), (w.2, w.3), "{} feature {j}", b.name);
                    assert!((h.1 - w.1).abs() <= 1e-10 * w.0.max(1.0));
                }
            }
        }
        // unembed sits after the last-position section: one position, reported as the last.
        assert!(got[0][0].iter().all(|h| h.3 as usize == in_pos - 1));
        assert!(got[1].iter().flatten().any(|h| (h.3 as usize) < in_pos - 1));
    }

    #[test]
    fn template_markers_are_filled_once() {
        let t = "a{{X}}b{{Y}}{{X}}";
        assert_eq!(
            fill(t, &[("X", "{{Y}}"), ("Y", "2")]).unwrap(),
            "a{{Y}}b2{{Y}}"
        );
        assert!(fill("{{Z}}", &[("X", "")]).is_err());
        assert!(fill("{{X", &[("X", "")]).is_err());
        let page = render_html("t<", &json!({"s": "</script><!--"})).unwrap();
        assert!(!page.contains("</script><!--"));
        assert!(page.contains("t&lt;"));
    }

    #[test]
    fn power_bytes_span_four_decades() {
        assert_eq!(power_byte(1.0, 1.0), 255);
        assert_eq!(power_byte(1e-2, 1.0), 128);
        assert_eq!(power_byte(1e-4, 1.0), 0);
        assert_eq!(power_byte(1e-9, 1.0), 0);
        assert_eq!(power_byte(0.0, 1.0), 0);
        assert_eq!(power_byte(3.0, 0.0), 0);
    }
}
