//! Training the reference models from scratch: the MNIST MLP ([`train_mlp`]) and the
//! modular-addition transformer ([`train_modadd`]), with hand-derived parameter gradients,
//! faer GEMMs and Adam / AdamW. [`train_from_config`] reads a TOML config (see
//! `configs/modadd-train.toml` and `configs/mnist-train.toml`), trains, and writes the model as
//! safetensors plus a JSON report `<out>.json`.
//!
//! The trainers are generic over the float type ([`Float`]): f32 for speed (the default), f64
//! for the finite-difference gradient checks.

pub mod mlp;
pub mod transformer;

pub use mlp::{train_mlp, GaussianMixture};
pub use transformer::train_modadd;

use crate::data::modadd::{ModOp, ModularArithmetic, Split};
use crate::data::Dataset;
use crate::io::weights::{save_safetensors, Tensors};
use anyhow::{bail, Context};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The float type a trainer computes in.
pub trait Float: faer::traits::RealField + Copy + Send + Sync + 'static {
    fn of(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Float for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Float for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Which model a config trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainKind {
    Mlp,
    Modadd,
}

/// The float type training computes in (the saved model is always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F64,
}

fn default_threads() -> usize {
    1
}
fn default_one() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-8
}
fn default_adam_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_adamw_betas() -> [f64; 2] {
    [0.9, 0.98]
}
fn default_op() -> ModOp {
    ModOp::Add
}

/// `kind = "modadd"`: a one-layer attention + MLP transformer on `[a, b, p] -> (a op b) mod p`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModaddTrainConfig {
    pub kind: TrainKind,
    /// Seed of the parameter initialisation.
    pub seed: u64,
    /// Evaluate train and test loss / accuracy every this many steps (and after the last).
    #[serde(default = "default_one")]
    pub eval_every: usize,
    #[serde(default)]
    pub precision: Precision,
    /// Threads for the GEMMs (1 = sequential).
    #[serde(default = "default_threads")]
    pub threads: usize,
    pub data: ModaddDataConfig,
    pub model: TransformerDims,
    pub optim: AdamWConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModaddDataConfig {
    pub modulus: usize,
    #[serde(default = "default_op")]
    pub op: ModOp,
    /// Fraction of the `p^2` pairs in the train split (ignored with `split_file`).
    pub frac_train: f64,
    /// Seed of the train / test split.
    pub seed: u64,
    /// Train pair indices `a * p + b`, one a line (the reference's split file).
    #[serde(default)]
    pub split_file: Option<PathBuf>,
}

/// Transformer dimensions; `d_vocab = modulus + 1` and `n_ctx` come from the data.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerDims {
    pub d_model: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    /// Standard deviation of the normal initialisation of every weight matrix (biases start
    /// at 0); default TransformerLens's `0.8 / sqrt(d_model)`.
    #[serde(default)]
    pub init_std: Option<f64>,
}

/// Full-batch AdamW with decoupled weight decay and a linear warm-up.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_adamw_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// The learning rate ramps linearly from `lr / warmup` to `lr` over the first `warmup` steps.
    #[serde(default)]
    pub warmup: usize,
    pub steps: usize,
}

/// `kind = "mlp"`: a relu MLP classifier trained with minibatch Adam.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpTrainConfig {
    pub kind: TrainKind,
    /// Seed of the parameter initialisation and of the shuffling.
    pub seed: u64,
    /// Evaluate train and test loss / accuracy every this many epochs (and after the last).
    #[serde(default = "default_one")]
    pub eval_every: usize,
    #[serde(default)]
    pub precision: Precision,
    /// Threads for the GEMMs (1 = sequential).
    #[serde(default = "default_threads")]
    pub threads: usize,
    pub data: MlpDataConfig,
    pub model: MlpDims,
    pub optim: AdamConfig,
}

/// Where an MLP's data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpDataSource {
    /// MNIST IDX files under `dir`.
    Mnist,
    /// A seeded Gaussian mixture ([`GaussianMixture`]) of `model.output_size` classes in
    /// `model.input_size` dimensions, for tests and smoke runs.
    Synthetic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpDataConfig {
    pub source: MlpDataSource,
    /// Folder of the MNIST IDX files (`source = "mnist"`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Synthetic train / test sizes and seed.
    #[serde(default)]
    pub n_train: Option<usize>,
    #[serde(default)]
    pub n_test: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// MLP dimensions: `input_size -> hidden[0] -> ... -> output_size`, relu between layers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpDims {
    pub input_size: usize,
    pub hidden: Vec<usize>,
    pub output_size: usize,
}

/// Minibatch Adam; a nonzero `weight_decay` is decoupled (AdamW).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_adam_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    pub epochs: usize,
    pub batch: usize,
}

/// Loss and accuracy on both splits after `step` optimiser steps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
}

/// What a training run did; written as `<out>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub kind: TrainKind,
    /// The config the run used, as JSON.
    pub config: serde_json::Value,
    /// Descriptions of the train and test sets.
    pub train_data: String,
    pub test_data: String,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Wall time of the training loop, evaluations included.
    pub seconds: f64,
    /// The final evaluation.
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// Every evaluation, in order (the last is the final one).
    pub history: Vec<EvalPoint>,
}

impl TrainReport {
    fn new(
        kind: TrainKind,
        config: serde_json::Value,
        train: &dyn Dataset,
        test: &dyn Dataset,
        steps: usize,
        seconds: f64,
        history: Vec<EvalPoint>,
    ) -> Self {
        let last = history.last().cloned().unwrap_or_default();
        Self {
            kind,
            config,
            train_data: train.describe(),
            test_data: test.describe(),
            steps,
            seconds,
            train_loss: last.train_loss,
            train_accuracy: last.train_accuracy,
            test_loss: last.test_loss,
            test_accuracy: last.test_accuracy,
            history,
        }
    }
}

/// Reads a training config, trains, and writes the model (f32 safetensors) to `out` and the
/// report to `<out>.json`, both atomically. Relative paths in the config (`split_file`, `dir`)
/// are taken relative to the current directory.
pub fn train_from_config(config_path: &Path, out: &Path) -> anyhow::Result<TrainReport> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read config {}", config_path.display()))?;
    let file = config_path.display();
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| crate::experiments::config::toml_error(&text, &e))
        .with_context(|| format!("{file}"))?;
    let kind = match table.get("kind") {
        Some(toml::Value::String(s)) => s.clone(),
        Some(_) => bail!("{file}: key `kind` must be a string (\"mlp\" or \"modadd\")"),
        None => bail!("{file}: missing key `kind` (\"mlp\" or \"modadd\")"),
    };
    let (tensors, report) = match kind.as_str() {
        "modadd" => {
            let cfg: ModaddTrainConfig = toml::from_str(&text)
                .map_err(|e| crate::experiments::config::toml_error(&text, &e))
                .with_context(|| format!("{file}"))?;
            let d = &cfg.data;
            let split = |s| {
                ModularArithmetic::new(
                    d.modulus,
                    d.op,
                    s,
                    d.frac_train,
                    d.seed,
                    d.split_file.as_deref(),
                )
                .with_context(|| format!("{file}: [data]"))
            };
            let (train, test) = (split(Split::Train)?, split(Split::Test)?);
            train_modadd(&cfg, &train, &test).with_context(|| format!("{file}"))?
        }
        "mlp" => {
            let cfg: MlpTrainConfig = toml::from_str(&text)
                .map_err(|e| crate::experiments::config::toml_error(&text, &e))
                .with_context(|| format!("{file}"))?;
            let (train, test) = mlp_data(&cfg).with_context(|| format!("{file}: [data]"))?;
            let (w, report) = train_mlp(&cfg, train.as_ref(), test.as_ref())
                .with_context(|| format!("{file}"))?;
            (mlp::mlp_tensors(&w), report)
        }
        other => {
            bail!("{file}: key `kind`: unknown kind {other:?}, expected \"mlp\" or \"modadd\"")
        }
    };
    save_safetensors(out, &tensors, true)?;
    let json = serde_json::to_vec_pretty(&report)?;
    crate::io::write_atomic(&report_path(out), &json)?;
    Ok(report)
}

/// `<out>.json`: the report beside the model.
pub fn report_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

type DataPair = (Box<dyn Dataset>, Box<dyn Dataset>);

fn mlp_data(cfg: &MlpTrainConfig) -> anyhow::Result<DataPair> {
    let d = &cfg.data;
    match d.source {
        MlpDataSource::Synthetic => {
            let seed = d.seed.unwrap_or(0);
            let (n_train, n_test) = (d.n_train.unwrap_or(4096), d.n_test.unwrap_or(1024));
            let (f, c) = (cfg.model.input_size, cfg.model.output_size);
            Ok((
                Box::new(GaussianMixture::new(f, c, n_train, seed, 0)?),
                Box::new(GaussianMixture::new(f, c, n_test, seed, 1)?),
            ))
        }
        MlpDataSource::Mnist => {
            let dir = d
                .dir
                .as_deref()
                .context("key `dir` is required with source = \"mnist\"")?;
            mnist_data(dir)
        }
    }
}

/// The MNIST train and test sets under `dir`.
fn mnist_data(dir: &Path) -> anyhow::Result<DataPair> {
    use crate::data::mnist::Mnist;
    Ok((
        Box::new(Mnist::load(dir, true)?),
        Box::new(Mnist::load(dir, false)?),
    ))
}

/// Adam / AdamW state: first and second moments of every parameter matrix.
pub(crate) struct Adam<T: Float> {
    lr: f64,
    weight_decay: f64,
    betas: [f64; 2],
    eps: f64,
    warmup: usize,
    t: usize,
    m: Vec<Mat<T>>,
    v: Vec<Mat<T>>,
}

impl<T: Float> Adam<T> {
    pub(crate) fn new(
        shapes: &[&Mat<T>],
        lr: f64,
        weight_decay: f64,
        betas: [f64; 2],
        eps: f64,
        warmup: usize,
    ) -> Self {
        let zeros = || {
            shapes
                .iter()
                .map(|p| Mat::zeros(p.nrows(), p.ncols()))
                .collect()
        };
        Self {
            lr,
            weight_decay,
            betas,
            eps,
            warmup,
            t: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// The learning rate of the next step: linear warm-up, then constant.
    // The reference's LambdaLR `min(step / warmup, 1)` spends its first step at lr 0; we start
    // at `lr / warmup` instead.
    fn current_lr(&self) -> f64 {
        if self.warmup == 0 {
            self.lr
        } else {
            self.lr * ((self.t + 1) as f64 / self.warmup as f64).min(1.0)
        }
    }

    /// One step as in PyTorch's `AdamW` (decoupled decay `p *= 1 - lr * wd`, bias-corrected
    /// moments, `eps` added to `sqrt(v_hat)`).
    pub(crate) fn step(&mut self, params: Vec<&mut Mat<T>>, grads: Vec<&Mat<T>>) {
        let lr = self.current_lr();
        self.t += 1;
        let [b1, b2] = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let decay = T::of(1.0 - lr * self.weight_decay);
        let step = T::of(lr / bc1);
        let inv_bc2 = T::of(1.0 / bc2);
        let (b1, b2, eps) = (T::of(b1), T::of(b2), T::of(self.eps));
        let (c1, c2) = (T::of(1.0) - b1, T::of(1.0) - b2);
        for (k, (p, g)) in params.into_iter().zip(grads).enumerate() {
            for j in 0..p.ncols() {
                let (pc, gc) = (p.col_as_slice_mut(j), g.col_as_slice(j));
                let (mc, vc) = (self.m[k].col_as_slice_mut(j), self.v[k].col_as_slice_mut(j));
                for i in 0..pc.len() {
                    let gi = gc[i];
                    mc[i] = b1 * mc[i] + c1 * gi;
                    vc[i] = b2 * vc[i] + c2 * gi * gi;
                    pc[i] = pc[i] * decay - step * mc[i] / ((vc[i] * inv_bc2).sqrt() + eps);
                }
            }
        }
    }
}

/// `dst (=|+=) a b`.
#[inline]
pub(crate) fn gemm<T: Float>(
    dst: impl faer::mat::AsMatMut<T = T, Rows = usize, Cols = usize>,
    acc: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    par: Par,
) {
    faer::linalg::matmul::matmul(dst, acc, a, b, T::of(1.0), par);
}

/// `a b` as a new matrix.
pub(crate) fn matmul<T: Float>(a: MatRef<'_, T>, b: MatRef<'_, T>, par: Par) -> Mat<T> {
    let mut c = Mat::zeros(a.nrows(), b.ncols());
    gemm(&mut c, Accum::Replace, a, b, par);
    c
}

/// Adds the row vector `b` (`1 x cols`) to every row of `m`.
pub(crate) fn add_row<T: Float>(m: &mut Mat<T>, b: &Mat<T>) {
    for j in 0..m.ncols() {
        let bj = b[(0, j)];
        for x in m.col_as_slice_mut(j) {
            *x += bj;
        }
    }
}

/// Column sums of `m` as a `1 x cols` row (the gradient of a broadcast bias).
pub(crate) fn col_sums<T: Float>(m: MatRef<'_, T>) -> Mat<T> {
    let mut out = Mat::zeros(1, m.ncols());
    for j in 0..m.ncols() {
        let mut s = T::of(0.0);
        match m.col(j).try_as_col_major() {
            // Contiguous columns (the common case): a plain slice loop.
            Some(c) => {
                for &x in c.as_slice() {
                    s += x;
                }
            }
            None => {
                for i in 0..m.nrows() {
                    s += m[(i, j)];
                }
            }
        }
        out[(0, j)] = s;
    }
    out
}

/// Softmax cross-entropy of `logits` (`n x classes`) against `labels`: returns the summed loss,
/// the number of correct argmaxes; overwrites `logits` with `d(mean loss)/d logits =
/// (softmax - onehot) / n` when `grad` (and with scratch otherwise).
pub(crate) fn cross_entropy<T: Float>(
    logits: &mut Mat<T>,
    labels: &[usize],
    grad: bool,
) -> (f64, usize) {
    let (n, c) = (logits.nrows(), logits.ncols());
    // Row-wise reductions over a column-major matrix: sweep columns, keep one accumulator a row.
    let mut max = vec![f64::NEG_INFINITY; n];
    let mut arg = vec![0usize; n];
    for j in 0..c {
        for (i, &x) in logits.col_as_slice(j).iter().enumerate() {
            let x = x.to_f64();
            if x > max[i] {
                max[i] = x;
                arg[i] = j;
            }
        }
    }
    // Overwrite the logits with exp(logit - max) (one exp each), summing rows in f64.
    let mut label_logit = vec![0.0f64; n];
    let mut sum = vec![0.0f64; n];
    for j in 0..c {
        for (i, x) in logits.col_as_slice_mut(j).iter_mut().enumerate() {
            if labels[i] == j {
                label_logit[i] = x.to_f64();
            }
            *x = (*x - T::of(max[i])).exp();
            sum[i] += x.to_f64();
        }
    }
    let mut loss = 0.0;
    let mut correct = 0;
    for i in 0..n {
        loss += max[i] + sum[i].ln() - label_logit[i];
        correct += usize::from(arg[i] == labels[i]);
    }
    if grad {
        let scale: Vec<T> = sum.iter().map(|s| T::of(1.0 / (s * n as f64))).collect();
        let inv_n = T::of(1.0 / n as f64);
        for j in 0..c {
            for (i, x) in logits.col_as_slice_mut(j).iter_mut().enumerate() {
                *x *= scale[i];
                if labels[i] == j {
                    *x -= inv_n;
                }
            }
        }
    }
    (loss, correct)
}

/// `Par` for a thread count (1 = sequential).
pub(crate) fn par(threads: usize) -> Par {
    if threads <= 1 {
        Par::Seq
    } else {
        Par::rayon(threads)
    }
}

/// A progress bar over `len` steps (drawn on stderr only when it is a terminal).
pub(crate) fn progress(len: usize, unit: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// Shows an evaluation on the progress bar, or as a line on stderr when the bar is hidden
/// (stderr not a terminal), so that logs keep the learning curve.
pub(crate) fn show_eval(pb: &indicatif::ProgressBar, e: &EvalPoint) {
    let msg = format!(
        "loss {:.3e}/{:.3e} acc {:.4}/{:.4} (train/test)",
        e.train_loss, e.test_loss, e.train_accuracy, e.test_accuracy
    );
    if pb.is_hidden() {
        eprintln!("step {} {msg}", e.step);
    } else {
        pb.set_message(msg);
    }
}

/// A row-major buffer viewed as an `nrows x ncols` matrix.
pub(crate) fn rows<T: Float>(data: &[T], nrows: usize, ncols: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(data, nrows, ncols)
}

pub(crate) fn rows_mut<T: Float>(data: &mut [T], nrows: usize, ncols: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(data, nrows, ncols)
}

/// Checks that training produced finite parameters before they are written.
pub(crate) fn check_finite(tensors: &Tensors) -> anyhow::Result<()> {
    for (name, t) in tensors {
        if t.data.iter().any(|v| !v.is_finite()) {
            bail!("training diverged: tensor `{name}` contains NaN or infinity");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "kind = \"modadd\"\nseed = 0\n[data]\nmodulus = 7\nfrac_train = 0.5\nseed = 0\n\
             [model]\nd_model = 8\nn_heads = 2\nd_head = 4\nd_mlp = 16\n\
             [optim]\nlr = 1e-3\nsteps = 1\nlearning_rate = 3\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            train_from_config(&path, &dir.path().join("m")).unwrap_err()
        );
        assert!(
            err.contains("bad.toml") && err.contains("learning_rate"),
            "{err}"
        );
        std::fs::write(&path, "kind = \"cnn\"\n").unwrap();
        let err = format!(
            "{:#}",
            train_from_config(&path, &dir.path().join("m")).unwrap_err()
        );
        assert!(err.contains("bad.toml") && err.contains("kind"), "{err}");
    }

    #[test]
    fn cross_entropy_matches_direct_formula() {
        let mut z = Mat::from_fn(2, 3, |i, j| (i as f64) - 0.5 * j as f64);
        let labels = [2, 0];
        let (loss, correct) = cross_entropy(&mut z.clone(), &labels, false);
        let direct: f64 = (0..2)
            .map(|i| {
                let lse = (0..3).map(|j| z[(i, j)].exp()).sum::<f64>().ln();
                lse - z[(i, labels[i])]
            })
            .sum();
        assert!((loss - direct).abs() < 1e-12);
        assert_eq!(correct, 1);
        cross_entropy(&mut z, &labels, true);
        for i in 0..2 {
            let s: f64 = (0..3).map(|j| z[(i, j)]).sum();
            assert!(s.abs() < 1e-12);
        }
    }
}
