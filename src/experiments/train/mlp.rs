//! The MLP trainer: `input -> hidden... -> classes`, relu between layers, minibatch Adam on the
//! mean cross-entropy, PyTorch's default `Linear` initialisation and seeded shuffling.

use super::{
    add_row, col_sums, cross_entropy, gemm, matmul, par, progress, rows, show_eval, Adam,
    EvalPoint, Float, MlpTrainConfig, Precision, TrainKind, TrainReport,
};
use crate::data::Dataset;
use crate::io::weights::Tensors;
use crate::models::mlp::MlpWeights;
use crate::models::Activation;
use crate::tensor::{Batch, HostTensor};
use anyhow::{bail, ensure};
use faer::{Accum, Mat, MatRef, Par};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Trains the MLP of `cfg` on `train` (features with a trailing constant 1, one position, as
/// [`crate::models::InputKind::Features`]), evaluating on `test`.
pub fn train_mlp(
    cfg: &MlpTrainConfig,
    train: &dyn Dataset,
    test: &dyn Dataset,
) -> anyhow::Result<(MlpWeights, TrainReport)> {
    ensure!(cfg.kind == TrainKind::Mlp, "key `kind` must be \"mlp\"");
    let o = &cfg.optim;
    ensure!(o.batch > 0, "[optim] batch must be positive");
    ensure!(
        o.lr > 0.0 && o.lr.is_finite(),
        "[optim] lr must be positive"
    );
    ensure!(!train.is_empty(), "the train set is empty");
    let m = &cfg.model;
    let dims: Vec<usize> = std::iter::once(m.input_size)
        .chain(m.hidden.iter().copied())
        .chain(std::iter::once(m.output_size))
        .collect();
    ensure!(
        dims.iter().all(|&d| d > 0),
        "[model] sizes must be positive"
    );
    match cfg.precision {
        Precision::F32 => run::<f32>(cfg, &dims, train, test),
        Precision::F64 => run::<f64>(cfg, &dims, train, test),
    }
}

/// The saved form: `layers.{k}.W` (`[in, out]`) and `layers.{k}.b`.
pub fn mlp_tensors(w: &MlpWeights) -> Tensors {
    let mut t = Tensors::new();
    for (k, (wk, bk)) in w.layers.iter().enumerate() {
        t.insert(format!("layers.{k}.W"), HostTensor::from_mat(wk));
        t.insert(
            format!("layers.{k}.b"),
            HostTensor::new(vec![bk.len()], bk.clone()),
        );
    }
    t
}

/// A dataset held in memory as row-major features (trailing 1 dropped) and labels.
struct Loaded<T> {
    x: Vec<T>,
    labels: Vec<usize>,
    features: usize,
}

impl<T: Float> Loaded<T> {
    fn new(ds: &dyn Dataset, features: usize, classes: usize, what: &str) -> anyhow::Result<Self> {
        let n = ds.len();
        let mut x = Vec::with_capacity(n * features);
        let mut labels = Vec::with_capacity(n);
        const CHUNK: usize = 4096;
        for start in (0..n).step_by(CHUNK) {
            let range = start..(start + CHUNK).min(n);
            let b: Batch = ds.inputs(range.clone());
            if b.pos != 1 || b.features() != features + 1 {
                bail!(
                    "{what} set: inputs have {} positions x {} features, expected 1 x {} \
                     ({features} features and a trailing 1)",
                    b.pos,
                    b.features(),
                    features + 1
                );
            }
            for i in 0..b.rows() {
                if b.data[(i, features)] != 1.0 {
                    bail!("{what} set: sample {} lacks the trailing bias 1", start + i);
                }
                for j in 0..features {
                    let v = b.data[(i, j)];
                    if !v.is_finite() {
                        bail!("{what} set: sample {} has a non-finite feature", start + i);
                    }
                    x.push(T::of(v));
                }
            }
            for (i, l) in ds.labels(range).into_iter().enumerate() {
                if l >= classes {
                    bail!(
                        "{what} set: sample {} has label {l}, but the model has {classes} outputs",
                        start + i
                    );
                }
                labels.push(l);
            }
        }
        Ok(Self {
            x,
            labels,
            features,
        })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn view(&self, range: std::ops::Range<usize>) -> MatRef<'_, T> {
        let f = self.features;
        rows(&self.x[range.start * f..range.end * f], range.len(), f)
    }
}

/// MLP parameters `layers[k] = (W [in, out], b [1, out])`; also the shape of their gradients.
pub(crate) struct Net<T: Float> {
    pub(crate) layers: Vec<(Mat<T>, Mat<T>)>,
}

impl<T: Float> Net<T> {
    /// PyTorch's `nn.Linear` default: `W` and `b` uniform in `+-1/sqrt(fan_in)`.
    pub(crate) fn init(dims: &[usize], rng: &mut ChaCha8Rng) -> Self {
        let layers = dims
            .windows(2)
            .map(|d| {
                let bound = 1.0 / (d[0] as f64).sqrt();
                let mut u = || T::of(rng.random_range(-bound..bound));
                let w = Mat::from_fn(d[0], d[1], |_, _| u());
                let b = Mat::from_fn(1, d[1], |_, _| u());
                (w, b)
            })
            .collect();
        Self { layers }
    }

    fn zeros_like(&self) -> Self {
        let z = |m: &Mat<T>| Mat::zeros(m.nrows(), m.ncols());
        Self {
            layers: self.layers.iter().map(|(w, b)| (z(w), z(b))).collect(),
        }
    }

    fn mats(&self) -> Vec<&Mat<T>> {
        self.layers.iter().flat_map(|(w, b)| [w, b]).collect()
    }

    fn mats_mut(&mut self) -> Vec<&mut Mat<T>> {
        self.layers.iter_mut().flat_map(|(w, b)| [w, b]).collect()
    }

    /// Forward: `h_0 = x`, `h_k = relu(h_{k-1} W_k + b_k)`, the last layer without relu.
    /// Returns `[h_1, ..., h_{K-1}, logits]`.
    pub(crate) fn forward(&self, x: MatRef<'_, T>, par: Par) -> Vec<Mat<T>> {
        let k = self.layers.len();
        let mut hs: Vec<Mat<T>> = Vec::with_capacity(k);
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let input = if i == 0 { x } else { hs[i - 1].as_ref() };
            let mut z = matmul(input, w.as_ref(), par);
            add_row(&mut z, b);
            if i + 1 < k {
                relu(&mut z);
            }
            hs.push(z);
        }
        hs
    }

    /// Backward of [`Self::forward`] from `g = dL/dlogits` (consumed):
    /// `dW_k = h_{k-1}^T g`, `db_k = sum_rows g`, `g <- (g W_k^T) * relu'(h_{k-1})`
    /// (`relu'(z) = [h > 0]` since `h = relu(z)`).
    pub(crate) fn backward(
        &self,
        x: MatRef<'_, T>,
        hs: &[Mat<T>],
        mut g: Mat<T>,
        grads: &mut Self,
        par: Par,
    ) {
        for i in (0..self.layers.len()).rev() {
            let input = if i == 0 { x } else { hs[i - 1].as_ref() };
            let (dw, db) = &mut grads.layers[i];
            gemm(
                dw.as_mut(),
                Accum::Replace,
                input.transpose(),
                g.as_ref(),
                par,
            );
            *db = col_sums(g.as_ref());
            if i > 0 {
                let mut gi = matmul(g.as_ref(), self.layers[i].0.transpose(), par);
                relu_mask(&mut gi, &hs[i - 1]);
                g = gi;
            }
        }
    }

    /// Summed loss and number correct over `data`.
    fn evaluate(&self, data: &Loaded<T>, par: Par) -> (f64, f64) {
        let (mut loss, mut correct) = (0.0, 0usize);
        const CHUNK: usize = 4096;
        for start in (0..data.len()).step_by(CHUNK) {
            let range = start..(start + CHUNK).min(data.len());
            let mut hs = self.forward(data.view(range.clone()), par);
            let logits = hs.last_mut().expect("at least one layer");
            let (l, c) = cross_entropy(logits, &data.labels[range], false);
            loss += l;
            correct += c;
        }
        let n = data.len().max(1) as f64;
        (loss / n, correct as f64 / n)
    }

    fn to_weights(&self) -> MlpWeights {
        MlpWeights {
            layers: self
                .layers
                .iter()
                .map(|(w, b)| {
                    (
                        Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)].to_f64()),
                        (0..b.ncols()).map(|j| b[(0, j)].to_f64()).collect(),
                    )
                })
                .collect(),
            act: Activation::Relu,
        }
    }
}

fn relu<T: Float>(m: &mut Mat<T>) {
    let zero = T::of(0.0);
    for j in 0..m.ncols() {
        for x in m.col_as_slice_mut(j) {
            if *x < zero {
                *x = zero;
            }
        }
    }
}

/// `g *= [h > 0]`, the relu derivative read off its output.
fn relu_mask<T: Float>(g: &mut Mat<T>, h: &Mat<T>) {
    let zero = T::of(0.0);
    for j in 0..g.ncols() {
        for (x, &hv) in g.col_as_slice_mut(j).iter_mut().zip(h.col_as_slice(j)) {
            if hv <= zero {
                *x = zero;
            }
        }
    }
}

fn run<T: Float>(
    cfg: &MlpTrainConfig,
    dims: &[usize],
    train: &dyn Dataset,
    test: &dyn Dataset,
) -> anyhow::Result<(MlpWeights, TrainReport)> {
    let (features, classes) = (dims[0], dims[dims.len() - 1]);
    let train_set = Loaded::<T>::new(train, features, classes, "train")?;
    let test_set = Loaded::<T>::new(test, features, classes, "test")?;
    let par = par(cfg.threads);
    let o = &cfg.optim;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut net = Net::<T>::init(dims, &mut rng);
    let mut grads = net.zeros_like();
    let mut adam = Adam::new(&net.mats(), o.lr, o.weight_decay, o.betas, o.eps, 0);

    let n = train_set.len();
    let batches_per_epoch = n.div_ceil(o.batch);
    let total = batches_per_epoch * o.epochs;
    let pb = progress(total, "steps");
    let start = Instant::now();
    let mut history = Vec::new();
    let mut order: Vec<usize> = (0..n).collect();
    let mut xb: Vec<T> = Vec::with_capacity(o.batch * features);
    let mut yb: Vec<usize> = Vec::with_capacity(o.batch);
    let mut step = 0;
    let eval = |net: &Net<T>, step| {
        let (train_loss, train_accuracy) = net.evaluate(&train_set, par);
        let (test_loss, test_accuracy) = net.evaluate(&test_set, par);
        EvalPoint {
            step,
            train_loss,
            train_accuracy,
            test_loss,
            test_accuracy,
        }
    };
    for epoch in 0..o.epochs {
        // Like a shuffling DataLoader without drop_last: a fresh permutation each epoch, the
        // last batch possibly short.
        order.shuffle(&mut rng);
        for chunk in order.chunks(o.batch) {
            xb.clear();
            yb.clear();
            for &i in chunk {
                xb.extend_from_slice(&train_set.x[i * features..(i + 1) * features]);
                yb.push(train_set.labels[i]);
            }
            let x = rows(&xb, chunk.len(), features);
            let mut hs = net.forward(x, par);
            let mut g = hs.pop().expect("at least one layer");
            let (loss, _) = cross_entropy(&mut g, &yb, true);
            if !loss.is_finite() {
                bail!("training diverged at step {step} (loss {loss})");
            }
            net.backward(x, &hs, g, &mut grads, par);
            adam.step(net.mats_mut(), grads.mats());
            step += 1;
            pb.inc(1);
        }
        if (epoch + 1) % cfg.eval_every.max(1) == 0 || epoch + 1 == o.epochs {
            let e = eval(&net, step);
            show_eval(&pb, &e);
            history.push(e);
        }
    }
    if history.is_empty() {
        history.push(eval(&net, step));
    }
    pb.finish();
    let weights = net.to_weights();
    super::check_finite(&mlp_tensors(&weights))?;
    let report = TrainReport::new(
        TrainKind::Mlp,
        serde_json::to_value(cfg)?,
        train,
        test,
        step,
        start.elapsed().as_secs_f64(),
        history,
    );
    Ok((weights, report))
}

/// A seeded Gaussian mixture: `classes` unit-variance clusters in `features` dimensions whose
/// means (drawn from `seed` alone, so train and test share them) lie about 7 standard
/// deviations apart, nearly separable. Inputs end with a constant 1, like MNIST's.
pub struct GaussianMixture {
    x: Vec<f64>,
    labels: Vec<usize>,
    features: usize,
    classes: usize,
}

impl GaussianMixture {
    /// `n` samples from stream `stream` (use different streams for train and test).
    pub fn new(
        features: usize,
        classes: usize,
        n: usize,
        seed: u64,
        stream: u64,
    ) -> anyhow::Result<Self> {
        ensure!(
            features > 0 && classes > 0,
            "a Gaussian mixture needs features and classes"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // ||mu_a - mu_b||^2 ~ 2 features s^2 = 50.
        let s = 5.0 / (features as f64).sqrt();
        let means: Vec<f64> = (0..classes * features)
            .map(|_| s * normal(&mut rng))
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream + 1);
        let mut x = Vec::with_capacity(n * features);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let c = rng.random_range(0..classes);
            labels.push(c);
            x.extend((0..features).map(|j| means[c * features + j] + normal(&mut rng)));
        }
        Ok(Self {
            x,
            labels,
            features,
            classes,
        })
    }
}

impl Dataset for GaussianMixture {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn inputs(&self, range: std::ops::Range<usize>) -> Batch {
        let f = self.features;
        let start = range.start;
        let data = Mat::from_fn(range.len(), f + 1, |i, j| {
            if j == f {
                1.0
            } else {
                self.x[(start + i) * f + j]
            }
        });
        Batch::new(range.len(), 1, 1, data)
    }
    fn labels(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        self.labels[range].to_vec()
    }
    fn describe(&self) -> String {
        format!(
            "Gaussian mixture, {} classes in {} dimensions, {} samples",
            self.classes,
            self.features,
            self.len()
        )
    }
}

/// A standard normal draw (Box-Muller).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // in (0, 1], so ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::train::{AdamConfig, MlpDataConfig, MlpDataSource, MlpDims};

    fn loss(net: &Net<f64>, x: MatRef<'_, f64>, y: &[usize]) -> f64 {
        let mut hs = net.forward(x, Par::Seq);
        cross_entropy(hs.last_mut().unwrap(), y, false).0 / y.len() as f64
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut net = Net::<f64>::init(&[5, 6, 4, 3], &mut rng);
        let x = Mat::from_fn(8, 5, |_, _| normal(&mut rng));
        let y: Vec<usize> = (0..8).map(|i| i % 3).collect();
        let mut hs = net.forward(x.as_ref(), Par::Seq);
        let mut g = hs.pop().unwrap();
        cross_entropy(&mut g, &y, true);
        let mut grads = net.zeros_like();
        net.backward(x.as_ref(), &hs, g, &mut grads, Par::Seq);
        let analytic: Vec<Mat<f64>> = grads.mats().into_iter().cloned().collect();
        let h = 1e-6;
        let mut worst = 0.0f64;
        for (k, a) in analytic.iter().enumerate() {
            for i in 0..a.nrows() {
                for j in 0..a.ncols() {
                    let orig = net.mats()[k][(i, j)];
                    net.mats_mut()[k][(i, j)] = orig + h;
                    let lp = loss(&net, x.as_ref(), &y);
                    net.mats_mut()[k][(i, j)] = orig - h;
                    let lm = loss(&net, x.as_ref(), &y);
                    net.mats_mut()[k][(i, j)] = orig;
                    let fd = (lp - lm) / (2.0 * h);
                    worst =
                        worst.max((fd - a[(i, j)]).abs() / (1e-6 + fd.abs().max(a[(i, j)].abs())));
                }
            }
        }
        eprintln!("MLP gradient check: worst relative error {worst:.2e}");
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    fn synthetic_config(epochs: usize) -> MlpTrainConfig {
        MlpTrainConfig {
            kind: TrainKind::Mlp,
            seed: 3,
            eval_every: 1,
            precision: Precision::F32,
            threads: 1,
            data: MlpDataConfig {
                source: MlpDataSource::Synthetic,
                dir: None,
                n_train: Some(2000),
                n_test: Some(500),
                seed: Some(1),
            },
            model: MlpDims {
                input_size: 50,
                hidden: vec![32, 32],
                output_size: 5,
            },
            optim: AdamConfig {
                lr: 1e-3,
                weight_decay: 0.0,
                betas: [0.9, 0.999],
                eps: 1e-8,
                epochs,
                batch: 64,
            },
        }
    }

    #[test]
    fn learns_a_gaussian_mixture() {
        let cfg = synthetic_config(3);
        let train = GaussianMixture::new(50, 5, 2000, 1, 0).unwrap();
        let test = GaussianMixture::new(50, 5, 500, 1, 1).unwrap();
        let (w, report) = train_mlp(&cfg, &train, &test).unwrap();
        assert_eq!(report.steps, 3 * 2000usize.div_ceil(64));
        assert!(report.test_accuracy > 0.97, "{report:?}");
        // The saved weights compute what training evaluated.
        let x = train.inputs(0..100);
        let feats = x.data.as_ref().subcols(0, 50);
        let logits = w.forward_unfolded(feats);
        let labels = train.labels(0..100);
        let correct = (0..100)
            .filter(|&i| {
                let row: Vec<f64> = (0..5).map(|j| logits[(i, j)]).collect();
                let arg = (0..5).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                arg == labels[i]
            })
            .count();
        assert!(correct >= 95);
    }

    #[test]
    fn same_seed_same_model() {
        let cfg = synthetic_config(1);
        let train = GaussianMixture::new(50, 5, 300, 1, 0).unwrap();
        let test = GaussianMixture::new(50, 5, 100, 1, 1).unwrap();
        let (a, _) = train_mlp(&cfg, &train, &test).unwrap();
        let (b, _) = train_mlp(&cfg, &train, &test).unwrap();
        assert_eq!(a.layers[1].0, b.layers[1].0);
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let mut cfg = synthetic_config(1);
        cfg.model.input_size = 40;
        let train = GaussianMixture::new(50, 5, 100, 1, 0).unwrap();
        assert!(train_mlp(&cfg, &train, &train).is_err());
    }

    #[test]
    fn config_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("mlp.toml");
        std::fs::write(
            &cfg_path,
            "kind = \"mlp\"\nseed = 0\n[data]\nsource = \"synthetic\"\nn_train = 256\n\
             n_test = 64\n[model]\ninput_size = 20\nhidden = [16]\noutput_size = 3\n\
             [optim]\nlr = 1e-3\nepochs = 1\nbatch = 32\n",
        )
        .unwrap();
        let out = dir.path().join("model.safetensors");
        let report = crate::experiments::train::train_from_config(&cfg_path, &out).unwrap();
        assert_eq!(report.steps, 8);
        let t = crate::io::weights::load_safetensors(&out).unwrap();
        assert_eq!(t["layers.0.W"].shape, vec![20, 16]);
        assert_eq!(t["layers.1.b"].shape, vec![3]);
        let json = std::fs::read_to_string(super::super::report_path(&out)).unwrap();
        let back: TrainReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.steps, 8);
    }
}
