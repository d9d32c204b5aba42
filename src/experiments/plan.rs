//! `ibasis plan`: what a build will cost before running it: matrix-product FLOPs, peak memory
//! and expected wall time, per step.
//!
//! Counting FLOPs analytically for every module (attention, layer norms, gated MLPs, closed
//! forms) would duplicate each code path in a cost model that drifts from the code. Instead the
//! plan runs the build's own passes on a **pilot**: the first `n_pilot` samples, with random
//! stand-in bases of the dimensions the full run will have (full rank, the worst case: LIB keeps
//! at most `min(d, N P)` directions). Every pass streams over samples in batches whose size
//! does not depend on the dataset size, so time and FLOPs scale linearly with the number of
//! samples; the fixed costs (eigendecompositions) are timed on matrices of the full size. Peak
//! memory is the pilot's: the build's does not grow with the samples beyond its batches (up to
//! `batch_size` samples, the pilot's fewer). Measured: 30-block SmolLM2 3.34 GB planned, 3.12 GB
//! built; its 3 blocks 2.81 GB planned, 1.93 GB built; MNIST 0.30 GB planned, 0.40 GB built.

use super::config::{check_compatible, load_data, load_model, RunConfig};
use crate::algorithm::basis::{jacobian_metric, metric_path, node_basis};
use crate::algorithm::edges::{edge_path, edges};
use crate::algorithm::pass::Prefix;
use crate::algorithm::PREFIX_BYTES;
use crate::algorithm::{
    check_build_memory, integration, pass, resolve_node_layers, BasisFormula, EdgeFormula,
};
use crate::algorithm::{LibConfig, NodeBasis};
use crate::data::{Dataset, First};
use crate::models::Model;
use crate::tensor::linalg::{eigh_abs_desc, flops};
use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One step of a build.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub name: String,
    /// How the step is computed (closed form, VJP with `r` cotangents, ...).
    pub path: String,
    /// Matrix-product FLOPs of the full run.
    pub flops: f64,
    /// Expected seconds of the full run.
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub n_samples: usize,
    pub n_pilot: usize,
    pub positions: usize,
    pub steps: Vec<Step>,
    /// Peak resident memory of the pilot, bytes: near the full run's, whose batches
    /// hold up to `batch_size` samples where the pilot's hold at most its own size.
    pub peak_bytes: Option<u64>,
}

impl Plan {
    pub fn total_seconds(&self) -> f64 {
        self.steps.iter().map(|s| s.seconds).sum()
    }
    pub fn total_flops(&self) -> f64 {
        self.steps.iter().map(|s| s.flops).sum()
    }
}

/// Samples of the larger pilot: two full batches for every core where that is at most an
/// eighth of the dataset (a pilot of fewer, smaller batches runs on fewer cores and smaller
/// GEMMs: MNIST's 937-sample pilot, one batch on one core, timed its edges at 10 GFLOP/s
/// against the build's 32), else an eighth; at least one sample per core. The smaller pilot
/// has half as many.
fn pilot_size(n: usize, batch: usize) -> usize {
    let threads = rayon::current_num_threads();
    let full = (2 * threads * batch.max(1)).max(n / 64);
    n.min(full.min((n / 8).max(2 * threads)))
}

/// Two pilots of `n1 < n2` samples (or one when the dataset is that small): a step's FLOPs are
/// `fixed + n * per_sample`, fitted through both, so one-off costs (materialising fixed linear
/// maps) are not multiplied by `N / n`; its time goes at the large pilot's seconds per FLOP.
struct Pilots<'a> {
    small: &'a dyn Dataset,
    large: &'a dyn Dataset,
    n: usize,
}

impl Pilots<'_> {
    /// Runs `step` on both pilots and extrapolates its FLOPs and seconds to `n` samples.
    fn extrapolate<T>(
        &self,
        mut step: impl FnMut(&dyn Dataset) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, f64, f64)> {
        let (n1, n2) = (self.small.len() as f64, self.large.len() as f64);
        let (_, f1, t1) = measure(|| step(self.small));
        let (out, f2, t2) = measure(|| step(self.large));
        let out = out?;
        if n2 <= n1 {
            return Ok((out, f2, t2));
        }
        let n = self.n as f64;
        let flops = fit(n1, f1, n2, f2, n);
        // Time at the large pilot's rate per FLOP: the FLOPs are counted, not timed, so their
        // fit separates the fixed costs exactly, where two timings can differ by the first
        // run's warm-up alone (MNIST: a 3750-sample pilot timed 0.29 s, a 7500 one 0.33 s).
        let seconds = if f2 > 0.0 {
            t2 * flops / f2
        } else {
            fit(n1, t1, n2, t2, n)
        };
        Ok((out, flops, seconds))
    }
}

/// The cost at `n` samples of a step costing `y1` at `n1 < n2` samples and `y2` at `n2`:
/// the line through both, its slope kept within `[0.3, 1]` of `y2 / n2` (timing noise can
/// make it implausible) and its intercept non-negative.
fn fit(n1: f64, y1: f64, n2: f64, y2: f64, n: f64) -> f64 {
    let avg = y2 / n2;
    let slope = ((y2 - y1) / (n2 - n1)).clamp(0.3 * avg, avg);
    (y2 - slope * n2).max(0.0) + slope * n
}

/// Plans the build a config describes (`model` overriding its model file).
pub fn run_plan(config_path: &Path, model: Option<&Path>) -> anyhow::Result<Plan> {
    let mut cfg = RunConfig::load(config_path)?;
    if let Some(m) = model {
        cfg.set_model_path(m.to_path_buf());
    }
    let model = load_model(&cfg.model)?;
    let data = load_data(&cfg.data)?;
    check_compatible(&model, data.as_ref())?;
    plan(&model, data, &cfg.lib)
}

/// A random `rows x cols` matrix (a stand-in basis: timing does not depend on its values).
fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |_, _| rng.random::<f64>() - 0.5)
}

/// Times `f` and counts its FLOPs.
fn measure<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (f0, t) = (flops(), Instant::now());
    let out = f();
    (out, (flops() - f0) as f64, t.elapsed().as_secs_f64())
}

pub fn plan(model: &Model, data: Box<dyn Dataset>, cfg: &LibConfig) -> anyhow::Result<Plan> {
    let layers = resolve_node_layers(model, &cfg.node_layers)?;
    cfg.check()?;
    let n = data.len();
    anyhow::ensure!(n > 0, "the dataset is empty");
    let grams: Vec<bool> = (0..layers.len())
        .map(|l| cfg.rotates(l, layers.len()))
        .collect();
    // The pilot accumulates the same Grams as the build: refuse before allocating them.
    check_build_memory(model, &layers, &grams)?;
    let n_pilot = pilot_size(n, cfg.batch_size);
    let data: Arc<dyn Dataset> = data.into();
    let (small, large) = (
        First::new(data.clone(), (n_pilot / 2).max(1)),
        First::new(data, n_pilot),
    );
    // As the build does: the activations at the first node layer computed once.
    let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
    let small_prefix = Prefix::new(model, &small, &indices, cfg.batch_size, PREFIX_BYTES);
    let large_prefix = Prefix::new(model, &large, &indices, cfg.batch_size, PREFIX_BYTES);
    let pilots = Pilots {
        small: small_prefix.as_ref().map_or(&small as &dyn Dataset, |p| p),
        large: large_prefix.as_ref().map_or(&large as &dyn Dataset, |p| p),
        n,
    };
    let pilot = pilots.large;
    let mut steps = Vec::new();
    if large_prefix.is_some() {
        let raw = Pilots {
            small: &small,
            large: &large,
            n,
        };
        let (_, f, t) = raw.extrapolate(|d| {
            Ok(Prefix::new(model, d, &indices, cfg.batch_size, PREFIX_BYTES).is_some())
        })?;
        steps.push(Step {
            name: "prefix".into(),
            path: format!(
                "forward to {} (and later node layers when small), kept in memory",
                layers[0].name
            ),
            flops: f,
            seconds: t,
        });
    }
    let points = integration::points(cfg.integration_rule, cfg.n_intervals)?;
    let positions = pilot.inputs(0..1).pos;
    let n_pilot = pilot.len();

    let (moments, f, t) =
        pilots.extrapolate(|d| pass::moments(model, d, &layers, &grams, cfg.batch_size))?;
    steps.push(Step {
        name: "statistics".into(),
        path: "forward pass, means and Gram matrices".into(),
        flops: f,
        seconds: t,
    });

    // The bases the large pilot's own build finds: what the full run keeps is at least what
    // the pilot keeps (at most `N P` directions, and LIB's cut by the metric's spectrum: on
    // MNIST layers.0 keeps 178 of 785, so full-rank stand-ins made the edges 4x too dear),
    // and those bases time the metric and edge passes.
    let dims: Vec<usize> = moments.iter().map(|m| m.mean().len()).collect();
    let mut eigh_seconds: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
    let mut eigh_cost = |d: usize| -> (f64, f64) {
        *eigh_seconds.entry(d).or_insert_with(|| {
            let mut r = ChaCha8Rng::seed_from_u64(d as u64);
            let a = random(&mut r, d, d);
            let sym = &a + a.transpose();
            let t = Instant::now();
            let _ = eigh_abs_desc(sym.as_ref());
            // Flop count of a dense symmetric eigensolver, ~(4/3 + 8/3... ) d^3: quote 9 d^3.
            (9.0 * (d as f64).powi(3), t.elapsed().as_secs_f64())
        })
    };
    // Sections of the same method and dimensions cost the same (SmolLM2's 30 blocks): each
    // is timed once.
    let mut timed: BTreeMap<(String, usize, usize), (f64, f64)> = BTreeMap::new();
    let last = layers.len() - 1;
    let mut bases: Vec<NodeBasis> = Vec::with_capacity(layers.len());
    let mut basis_steps = Vec::new();
    for l in (0..layers.len()).rev() {
        let name = &layers[l].name;
        let pos = crate::algorithm::pass::data_positions(model, pilot, layers[l].index);
        let lib =
            l < last && !matches!(cfg.basis_formula, BasisFormula::Svd | BasisFormula::Neuron);
        let n_next = bases.last().map_or(0, |b: &NodeBasis| b.d_lib());
        let path = if lib {
            metric_path(model, pilot, cfg, &layers, l, n_next)
        } else {
            "PCA".into()
        };
        let key = (path.clone(), dims[l], n_next);
        let mut cost = (0.0, 0.0);
        let known = timed.get(&key).copied();
        let mut metric = |q: &Mat<f64>, formula: BasisFormula| {
            let (m, f, t) = pilots
                .extrapolate(|d| jacobian_metric(model, d, cfg, &layers, l, q, &points, formula))?;
            cost = known.unwrap_or((f, t));
            Ok(Some(m))
        };
        let basis = node_basis(cfg, &layers, l, pos, &moments[l], bases.last(), &mut metric)?
            .expect("the plan's metric is always known");
        if cfg.rotates(l, layers.len()) {
            timed.insert(key, cost);
            let (ef, et) = eigh_cost(dims[l]);
            let twice = if lib { 2.0 } else { 1.0 };
            basis_steps.push(Step {
                name: format!("basis {name}"),
                path,
                flops: twice * ef + cost.0,
                seconds: twice * et + cost.1,
            });
        }
        bases.push(basis);
    }
    bases.reverse();
    basis_steps.reverse();
    steps.extend(basis_steps);

    if cfg.edge_formula != EdgeFormula::None {
        for l in 0..last {
            let (bi, bo) = (&bases[l], &bases[l + 1]);
            let (n_in, n_out) = (bi.d_lib(), bo.d_lib());
            let path = edge_path(model, cfg, &layers, l, n_in, n_out);
            let key = (path.clone(), n_in, n_out);
            let (f, t) = match timed.get(&key) {
                Some(&c) => c,
                None => {
                    let (_, f, t) = pilots
                        .extrapolate(|d| edges(model, d, cfg, &layers, l, bi, bo, &points))?;
                    timed.insert(key, (f, t));
                    (f, t)
                }
            };
            steps.push(Step {
                name: format!("edges {} -> {}", layers[l].name, layers[l + 1].name),
                path,
                flops: f,
                seconds: t,
            });
        }
    }
    Ok(Plan {
        n_samples: n,
        n_pilot,
        positions,
        steps,
        peak_bytes: super::bench::peak_resident_bytes(),
    })
}

/// Seconds as `1.2 s`, `3.4 min` or `1.1 h`.
pub fn human_seconds(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.1} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// The plan as a table for a person.
pub fn describe(p: &Plan, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{title}: {} samples x {} positions (pilots of {} and {} samples, extrapolated linearly)",
        p.n_samples,
        p.positions,
        (p.n_pilot / 2).max(1),
        p.n_pilot
    );
    let w = p
        .steps
        .iter()
        .map(|x| x.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let pw = p
        .steps
        .iter()
        .map(|x| x.path.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "  {:<w$}  {:<pw$}  {:>10}  {:>10}",
        "step", "how", "GFLOP", "time"
    );
    for x in &p.steps {
        let _ = writeln!(
            s,
            "  {:<w$}  {:<pw$}  {:>10.1}  {:>10}",
            x.name,
            x.path,
            x.flops / 1e9,
            human_seconds(x.seconds)
        );
    }
    let _ = writeln!(
        s,
        "  {:<w$}  {:<pw$}  {:>10.1}  {:>10}",
        "total",
        "",
        p.total_flops() / 1e9,
        human_seconds(p.total_seconds())
    );
    if let Some(b) = p.peak_bytes {
        let _ = writeln!(
            s,
            "  peak memory of the pilot ~{:.2} GB (the full run's batches hold up to batch_size samples, the pilot's fewer)",
            b as f64 / 1e9
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn linear_fit_separates_fixed_and_per_sample_costs() {
        // cost = 5 + 2 n: exact.
        assert!((fit(10.0, 25.0, 20.0, 45.0, 1000.0) - 2005.0).abs() < 1e-9);
        // Purely per-sample: exact.
        assert!((fit(4.0, 8.0, 8.0, 16.0, 64.0) - 128.0).abs() < 1e-9);
        // Noise making the small pilot slower than the large one: slope clamped to 0.3 of the
        // large pilot's average (0.3 * 1.0), intercept 10 - 3 = 7.
        assert!((fit(5.0, 12.0, 10.0, 10.0, 100.0) - 37.0).abs() < 1e-9);
    }
}
