//! The LIB algorithm (method.md sections 3-7): statistics, bases and edges, and [`build`], which
//! runs them over a model and a dataset to produce a [`Graph`].

pub mod attention;
pub mod basis;
pub mod edges;
pub mod graph;
pub mod integration;
pub mod pass;
pub mod section;
pub mod stages;
pub mod stats;

pub use graph::{Graph, NodeBasis};

/// Numbers per batch in the VJP / JVP passes (the batch's largest tangent or cotangent block):
/// small enough that a batch's working set stays in cache (~0.25 MB), large enough for
/// efficient GEMMs. Larger batches are memory-bound (fresh buffers, copies, page faults).
pub const CHUNK_NUMBERS: usize = 32_768;

/// Largest activations at the first node layer that a build keeps in memory for all samples
/// ([`pass::Prefix`]; later node layers have a budget of their own).
pub const PREFIX_BYTES: usize = 1 << 30;

/// Prefix of the per-stage entries of a graph's timings (`stage edges.ln1.0`), after the
/// totals of the build's phases.
pub const STAGE_TIMING: &str = "stage ";

use crate::data::{Dataset, Samples};
use crate::io::weights::Tensors;
use crate::models::{Model, OUTPUT};
use crate::tensor::HostTensor;
use anyhow::{bail, Context};
use faer::Mat;
use serde::{Deserialize, Serialize};
use stages::{Collective, Distribution, Partial, Source, StageRunner, StageStore, STATS};
use std::cell::OnceCell;
use std::time::Instant;

/// Which basis to compute at each node layer (method.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BasisFormula {
    /// The LIB of the paper.
    #[default]
    #[serde(rename = "jacobian")]
    Jacobian,
    /// PCA (with centring) or uncentred SVD of the Gram matrix.
    #[serde(rename = "svd")]
    Svd,
    /// The neuron basis: `C = I`.
    #[serde(rename = "neuron")]
    Neuron,
    /// Legacy `(1-0)*alpha`.
    #[serde(rename = "(1-0)*alpha")]
    OneZeroAlpha,
    /// Legacy `(1-alpha)^2`.
    #[serde(rename = "(1-alpha)^2")]
    OneMinusAlphaSquared,
}

/// How edges are computed (method.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EdgeFormula {
    #[default]
    Squared,
    Stochastic,
    Functional,
    /// No edges.
    None,
}

/// Precision of the Jacobian and tangent products. Grams, `M'` and edges are summed in f64 and
/// every eigendecomposition is f64 whichever is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F64,
    /// About twice the GEMM throughput, with relative rounding near 6e-8 per product.
    F32,
}

/// Settings of a LIB build. Defaults follow method.md.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibConfig {
    /// Node layers in model order; `output` may close the list.
    pub node_layers: Vec<String>,
    #[serde(default)]
    pub basis_formula: BasisFormula,
    /// Centre the Gram matrix and keep the constant direction apart (method.md 4.1); the
    /// reference's default, so a reference config means the same here.
    #[serde(default = "yes")]
    pub center: bool,
    #[serde(default = "yes")]
    pub isolate_ln_var: bool,
    #[serde(default = "default_tau")]
    pub tau: f64,
    #[serde(default)]
    pub integration_rule: integration::Rule,
    #[serde(default)]
    pub n_intervals: usize,
    /// Rotate the last node layer (centred PCA, method.md 4 "Final node layer"); else it stays
    /// in neuron coordinates and needs no Gram matrix.
    #[serde(default)]
    pub rotate_final_node_layer: bool,
    #[serde(default)]
    pub edge_formula: EdgeFormula,
    /// Sign vectors per sample for `stochastic` edges.
    #[serde(default = "one")]
    pub n_stochastic_sources_edges: usize,
    /// Position sign sources for the basis (method.md section 7); `None` = exact.
    #[serde(default)]
    pub n_stochastic_sources_pos: Option<usize>,
    /// Hidden sign sources for the basis (method.md section 7); `None` = exact.
    #[serde(default)]
    pub n_stochastic_sources_hidden: Option<usize>,
    /// Samples per batch of the streaming passes.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Precision of the per-row Jacobian products (edges of MLP sections) and of the general
    /// path's projection of JVPs onto the next basis.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
    #[serde(default)]
    pub seed: u64,
}

impl Default for LibConfig {
    /// method.md's defaults with no node layers: tests and library users fill in `node_layers`.
    fn default() -> Self {
        toml::from_str("node_layers = []").expect("defaults parse")
    }
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_tau() -> f64 {
    1e-15
}
fn default_batch() -> usize {
    512
}

impl LibConfig {
    /// Rejects settings that would run but give empty or meaningless results, saying why (the
    /// reference asserts on the first; the others it accepts and silently ignores or zeroes).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.tau.is_nan() || self.tau < 0.0 {
            bail!("[lib] tau must be >= 0, got {}", self.tau);
        }
        let rule = self.integration_rule;
        if self.basis_formula == BasisFormula::OneMinusAlphaSquared
            && rule == integration::Rule::Gradient
        {
            bail!("[lib] basis_formula = \"(1-alpha)^2\" with integration_rule = \"gradient\": the formula's gradient vanishes at alpha = 1, the only point of that rule, so every basis would be empty; use \"gauss-legendre\" or \"trapezoidal\"");
        }
        if self.edge_formula == EdgeFormula::Functional && rule == integration::Rule::Gradient {
            bail!("[lib] edge_formula = \"functional\" with integration_rule = \"gradient\": functional edges compare the module at alpha = 1 with itself, so every edge would be 0; use \"gauss-legendre\" or \"trapezoidal\"");
        }
        if self.basis_formula == BasisFormula::Neuron && self.center {
            bail!("[lib] basis_formula = \"neuron\" with center = true: the neuron basis is C = I and never centres; set center = false");
        }
        let stochastic =
            self.n_stochastic_sources_pos.is_some() || self.n_stochastic_sources_hidden.is_some();
        if stochastic && matches!(self.basis_formula, BasisFormula::Svd | BasisFormula::Neuron) {
            let name = if self.basis_formula == BasisFormula::Svd {
                "svd"
            } else {
                "neuron"
            };
            bail!("[lib] n_stochastic_sources_pos / n_stochastic_sources_hidden with basis_formula = \"{name}\": the {name} basis has no Jacobian metric for sign sources to estimate; remove them");
        }
        Ok(())
    }

    /// Whether node layer `l` of `n_layers` gets a basis: all but an unrotated last layer,
    /// which stays in neuron coordinates (method.md 4, "Final node layer") and so needs
    /// neither a basis nor a Gram matrix (a `d_vocab^2` Gram at a language model's `output`).
    pub fn rotates(&self, l: usize, n_layers: usize) -> bool {
        l + 1 < n_layers || self.rotate_final_node_layer
    }
}

/// Resolved node layer: its name and the index of the module it feeds.
#[derive(Clone, Debug)]
pub struct NodeLayer {
    pub name: String,
    pub index: usize,
}

/// Checks the node-layer list against the model: known names, model order, no duplicates,
/// at least two layers, `output` last if present, no token-id input layers.
pub fn resolve_node_layers(model: &Model, names: &[String]) -> anyhow::Result<Vec<NodeLayer>> {
    if names.len() < 2 {
        bail!("node_layers needs at least two layers, got {names:?}");
    }
    let mut out: Vec<NodeLayer> = Vec::new();
    for name in names {
        let index = model.node_index(name).with_context(|| {
            format!(
                "node layer `{name}` does not exist in model `{}`; valid names: {}, {OUTPUT}",
                model.name,
                model.module_ids().join(", ")
            )
        })?;
        if let crate::models::InputKind::Tokens { .. } = model.input {
            if index == 0 {
                bail!("node layer `{name}` receives token ids, which cannot be differentiated; pick a later node layer");
            }
            crate::models::transformer::check_node_layer(name)?;
        }
        if let Some(prev) = out.last() {
            if index == prev.index {
                bail!("node layer `{name}` is listed twice");
            }
            if index < prev.index {
                bail!("node layer `{name}` comes before `{}` in the model; list node layers in model order", prev.name);
            }
        }
        out.push(NodeLayer {
            name: name.clone(),
            index,
        });
    }
    Ok(out)
}

/// Refuses a build whose largest dense matrices cannot fit in the memory available now
/// (Linux's `MemAvailable`; no check elsewhere), naming the largest, before allocating them:
/// - each `d x d` f64 Gram is held once per rayon worker while accumulating, plus the reduced
///   sum and its symmetrised copy;
/// - an unrotated last node layer is the identity projection `Q` of the layer before it (in
///   the metric and the edges), materialised as a dense `d x d` matrix.
pub fn check_build_memory(
    model: &Model,
    layers: &[NodeLayer],
    grams: &[bool],
) -> anyhow::Result<()> {
    let copies = (rayon::current_num_threads() + 2) as f64;
    let gb = |d: usize| (d as f64).powi(2) * 8.0 / 1e9;
    // (what, node layer, features, GB)
    let mut needs: Vec<(&str, &str, usize, f64)> = Vec::new();
    for (l, (layer, &gram)) in layers.iter().zip(grams).enumerate() {
        let d = model.node_features(layer.index);
        if gram {
            needs.push(("Gram matrix", layer.name.as_str(), d, gb(d) * copies));
        } else if l > 0 {
            needs.push(("identity projection Q", layer.name.as_str(), d, gb(d)));
        }
    }
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let total: f64 = needs.iter().map(|n| n.3).sum();
    if total * 1e9 > available as f64 {
        let (what, name, d, _) = needs
            .iter()
            .max_by(|a, b| a.3.total_cmp(&b.3))
            .expect("a need");
        let hint = if *what == "Gram matrix" {
            "; with rotate_final_node_layer = false the last node layer needs no Gram"
        } else {
            "; end the node layers before it (e.g. at `unembed`) or rotate it"
        };
        bail!(
            "the build needs about {total:.1} GB of dense matrices while {:.1} GB of memory is available; the largest is the {what} of node layer `{name}` with {d} features ({:.1} GB){hint}",
            available as f64 / 1e9,
            gb(*d)
        );
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo`, bytes (`None` where there is no such file).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Builds the graph: statistics, bases from the last node layer backwards, then edges, in one
/// process, keeping nothing on disk.
pub fn build(model: &Model, data: &dyn Dataset, cfg: &LibConfig) -> anyhow::Result<Graph> {
    match build_staged(model, data, cfg, &BuildOptions::default())?.0 {
        Outcome::Graph(g) => Ok(g),
        Outcome::Pending(stages) => bail!("stages {stages:?} were left pending"),
    }
}

/// Where a build keeps its stages and which samples it sums ([`stages`]).
#[derive(Default)]
pub struct BuildOptions<'a> {
    /// Stage files to reuse and write; `None`: keep nothing.
    pub store: Option<&'a StageStore>,
    pub distribution: Distribution<'a>,
    /// Read stages only, never pass over the data: assemble the graph when every stage is on
    /// disk, else say which is next.
    pub assemble_only: bool,
}

/// What a staged build came to.
pub enum Outcome {
    Graph(Graph),
    /// The stages this process could not finish: a shard's (written as pieces, for
    /// `ibasis merge`), or the next ones an assembly needs.
    Pending(Vec<String>),
}

/// [`build`] with stage files, shards or MPI ranks ([`BuildOptions`]). Returns the outcome and
/// how each stage came about (reused or computed).
pub fn build_staged(
    model: &Model,
    data: &dyn Dataset,
    cfg: &LibConfig,
    opts: &BuildOptions,
) -> anyhow::Result<(Outcome, Vec<(String, Source)>)> {
    let t0 = Instant::now();
    let layers = resolve_node_layers(model, &cfg.node_layers)?;
    cfg.check()?;
    if data.is_empty() {
        bail!("the dataset is empty");
    }
    let n = data.len();
    let block = opts.distribution.block(n);
    if block.is_empty() && !opts.assemble_only {
        bail!("this process's share of the {n} samples is empty: use fewer shards or ranks than samples");
    }
    let points = integration::points(cfg.integration_rule, cfg.n_intervals)?;
    let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
    let grams: Vec<bool> = (0..layers.len())
        .map(|l| cfg.rotates(l, layers.len()))
        .collect();
    check_build_memory(model, &layers, &grams)?;
    // This process's samples, their node-layer cache made on the first pass that needs it (an
    // assembly from stage files makes none).
    let mine = Samples::new(data, block);
    let prefix: OnceCell<Option<pass::Prefix>> = OnceCell::new();
    let local = || -> anyhow::Result<&dyn Dataset> {
        let p = prefix.get_or_init(|| {
            pass::Prefix::new(model, &mine, &indices, cfg.batch_size, PREFIX_BYTES)
        });
        Ok(match p {
            Some(p) => p,
            None => &mine,
        })
    };
    let runner = StageRunner {
        store: opts.store,
        distribution: opts.distribution,
        n_samples: n,
        batch: cfg.batch_size,
        assemble_only: opts.assemble_only,
        log: Default::default(),
    };
    let log = |runner: StageRunner| runner.log.into_inner().unwrap_or_default();
    let mut timings = Vec::new();

    // Statistics (method.md section 3), summed about reference points from the first batch of
    // the whole dataset, which every shard and rank computes alike.
    let t = Instant::now();
    let shifts: OnceCell<Vec<Vec<f64>>> = OnceCell::new();
    let stats = runner.run(STATS, &local, &|piece| {
        if shifts.get().is_none() {
            let s = pass::moment_shifts(model, data, &layers, cfg.batch_size)?;
            let _ = shifts.set(s);
        }
        let m = pass::moments_about(
            model,
            piece,
            &layers,
            &grams,
            &shifts.get().unwrap()[..],
            cfg.batch_size,
        )?;
        Ok(moments_partial(&layers, &m, piece.len()))
    })?;
    let Some(stats) = stats else {
        return Ok((Outcome::Pending(vec![STATS.to_string()]), log(runner)));
    };
    let mut moments = moments_from(&layers, &stats)?;
    // The sums are copied into `moments`: 162 MB at SmolLM2's 61 node layers.
    drop(stats);
    timings.push(("statistics".to_string(), t.elapsed().as_secs_f64()));

    // Bases (section 4), from the last node layer backwards: M' of layer l needs C of l + 1.
    let t = Instant::now();
    let positions: Vec<usize> = pass::node_activations(model, data, &layers, 0..1)
        .iter()
        .map(|b| b.pos)
        .collect();
    let mut bases: Vec<NodeBasis> = Vec::with_capacity(layers.len());
    for (l, layer) in layers.iter().enumerate().rev() {
        let stage = format!("metric.{}", layer.name);
        let mut metric = |q: &Mat<f64>,
                          formula: BasisFormula|
         -> anyhow::Result<Option<basis::Metric>> {
            let p = runner.run(&stage, &local, &|piece| {
                let m = basis::jacobian_metric(model, piece, cfg, &layers, l, q, &points, formula)?;
                Ok(metric_partial(&m, piece.len()))
            })?;
            Ok(p.map(|p| metric_from(&p)))
        };
        let next = bases.last();
        let basis = basis::node_basis(
            cfg,
            &layers,
            l,
            positions[l],
            &moments[l],
            next,
            &mut metric,
        )
        .with_context(|| format!("basis of node layer `{}`", layer.name))?;
        let Some(mut basis) = basis else {
            return Ok((Outcome::Pending(vec![stage]), log(runner)));
        };
        // Layer l's sums are done with (the basis keeps its Gram): 2.7 MB a layer.
        moments[l] = stats::Moments::mean_only(Vec::new());
        if let Distribution::Ranks(comm) = opts.distribution {
            share_basis(comm, &mut basis);
        }
        bases.push(basis);
    }
    bases.reverse();
    timings.push(("bases".to_string(), t.elapsed().as_secs_f64()));

    // Edges (section 5): every section's given all bases.
    let t = Instant::now();
    let mut edge_mats = Vec::new();
    let mut pending = Vec::new();
    if cfg.edge_formula != EdgeFormula::None {
        for l in 0..layers.len() - 1 {
            let stage = format!("edges.{}", layers[l].name);
            let e = runner
                .run(&stage, &local, &|piece| {
                    let e = edges::edges(
                        model,
                        piece,
                        cfg,
                        &layers,
                        l,
                        &bases[l],
                        &bases[l + 1],
                        &points,
                    )?;
                    Ok(mat_partial("edges", &e, piece.len()))
                })
                .with_context(|| format!("edges {} -> {}", layers[l].name, layers[l + 1].name))?;
            match e {
                Some(p) => edge_mats.push(mat_from(&p, "edges")),
                None => pending.push(stage),
            }
        }
    }
    if !pending.is_empty() {
        return Ok((Outcome::Pending(pending), log(runner)));
    }
    timings.push(("edges".to_string(), t.elapsed().as_secs_f64()));
    timings.push(("total".to_string(), t0.elapsed().as_secs_f64()));
    // Then each stage computed here (`graph.json`'s per-stage times).
    for (stage, source) in runner.log.lock().unwrap().iter() {
        if let Source::Computed { seconds, .. } = source {
            timings.push((format!("{STAGE_TIMING}{stage}"), *seconds));
        }
    }
    let graph = Graph {
        layers: bases,
        edges: edge_mats,
        timings,
    };
    Ok((Outcome::Graph(graph), log(runner)))
}

/// Per-layer sums of [`stats::Moments`] as a stage partial (the reference points fixed).
fn moments_partial(layers: &[NodeLayer], m: &[stats::Moments], samples: usize) -> Partial {
    let mut p = Partial {
        samples,
        ..Partial::default()
    };
    for (layer, m) in layers.iter().zip(m) {
        let name = &layer.name;
        let d = m.sum.len();
        p.sums.insert(
            format!("{name}/rows"),
            HostTensor::new(vec![1], vec![m.rows]),
        );
        p.sums.insert(
            format!("{name}/sum"),
            HostTensor::new(vec![d], m.sum.clone()),
        );
        if m.has_gram() {
            p.sums
                .insert(format!("{name}/outer"), HostTensor::from_mat(&m.outer));
        }
        p.fixed.insert(
            format!("{name}/shift"),
            HostTensor::new(vec![d], m.shift.clone()),
        );
    }
    p
}

/// The inverse of [`moments_partial`].
fn moments_from(layers: &[NodeLayer], p: &Partial) -> anyhow::Result<Vec<stats::Moments>> {
    layers
        .iter()
        .map(|layer| {
            let name = &layer.name;
            let get = |t: &Tensors, k: &str| {
                t.get(&format!("{name}/{k}"))
                    .cloned()
                    .with_context(|| format!("stage `{STATS}` holds no `{name}/{k}`"))
            };
            let shift = get(&p.fixed, "shift")?.data;
            let sum = get(&p.sums, "sum")?.data;
            if sum.len() != shift.len() {
                bail!(
                    "stage `{STATS}`: `{name}` has sums of {} features and a shift of {}",
                    sum.len(),
                    shift.len()
                );
            }
            let mut m = match p.sums.get(&format!("{name}/outer")) {
                Some(o) => {
                    let outer = o
                        .to_mat()
                        .filter(|o| o.nrows() == sum.len() && o.ncols() == sum.len());
                    let outer = outer.with_context(|| {
                        format!(
                            "stage `{STATS}`: `{name}/outer` is not {0} x {0}",
                            sum.len()
                        )
                    })?;
                    stats::Moments {
                        outer,
                        ..stats::Moments::new(shift)
                    }
                }
                None => stats::Moments::mean_only(shift),
            };
            m.sum = sum;
            m.rows = get(&p.sums, "rows")?.data[0];
            Ok(m)
        })
        .collect()
}

/// An average over `samples` samples as the sum a stage partial holds.
fn mat_partial(name: &str, avg: &Mat<f64>, samples: usize) -> Partial {
    let mut p = Partial {
        samples,
        ..Partial::default()
    };
    let sum = avg * faer::Scale(samples as f64);
    p.sums.insert(name.to_string(), HostTensor::from_mat(&sum));
    p
}

/// The average over all samples of a stage partial's matrix `name`.
fn mat_from(p: &Partial, name: &str) -> Mat<f64> {
    let m = p.sums[name].to_mat().expect("a matrix");
    m * faer::Scale(1.0 / p.samples as f64)
}

fn metric_partial(m: &basis::Metric, samples: usize) -> Partial {
    let mut p = mat_partial("m", &m.m, samples);
    if let Some(lp) = &m.lambda_prime {
        let sum = lp * faer::Scale(samples as f64);
        p.sums
            .insert("lambda_prime".to_string(), HostTensor::from_mat(&sum));
    }
    p
}

fn metric_from(p: &Partial) -> basis::Metric {
    basis::Metric {
        m: mat_from(p, "m"),
        lambda_prime: p
            .sums
            .contains_key("lambda_prime")
            .then(|| mat_from(p, "lambda_prime")),
    }
}

/// Rank 0's basis on every rank (the ranks computed it from the same sums; rank 0's is the one
/// written, so the edges of every rank use exactly it).
fn share_basis(comm: &dyn Collective, basis: &mut NodeBasis) {
    for m in [&mut basis.c, &mut basis.c_pinv] {
        let mut v: Vec<f64> = match m {
            Some(m) => {
                let mut v = vec![m.nrows() as f64, m.ncols() as f64];
                v.extend(
                    m.col_iter()
                        .flat_map(|c| c.iter().copied().collect::<Vec<_>>()),
                );
                v
            }
            None => vec![],
        };
        comm.broadcast(&mut v);
        *m = (v.len() >= 2).then(|| {
            let (r, c) = (v[0] as usize, v[1] as usize);
            Mat::from_fn(r, c, |i, j| v[2 + j * r + i])
        });
    }
    comm.broadcast(&mut basis.lambda);
}

#[cfg(test)]
mod tests;
