//! Evaluating a model: accuracy and mean cross-entropy of the class read at the last position,
//! or, for language models, of every next token; optionally with a node layer replaced by a
//! projection (the ablations of method.md section 10).

use crate::algorithm::pass::fold;
use crate::data::Dataset;
use crate::models::{Activation, Cache, Model, Module, Structure};
use crate::tensor::linalg::mm;
use crate::tensor::Batch;
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub accuracy: f64,
    pub loss: f64,
}

/// A change to the activations at one module's input, applied during evaluation.
pub struct Intervention<'a> {
    /// Module index whose input is replaced.
    pub index: usize,
    /// Maps the activation rows at that node layer.
    pub apply: &'a (dyn Fn(&Batch) -> Batch + Sync),
}

/// Logits per batch at most (rows x vocabulary): a language model's logits over a large
/// vocabulary would otherwise dominate memory (64 x 128 tokens x 49152 f64 = 3.2 GB).
const MAX_LOGITS: usize = 1 << 24;

/// Samples per batch for evaluating `model` on `data`: at most `batch`, fewer where the
/// logits would exceed [`MAX_LOGITS`].
pub fn eval_batch(model: &Model, data: &dyn Dataset, batch: usize) -> usize {
    let pos = data.inputs(0..1.min(data.len())).pos.max(1);
    let vocab = model.modules.last().map_or(1, |m| m.out_features()).max(1);
    batch.min(MAX_LOGITS / (pos * vocab)).max(1)
}

/// Accuracy and mean cross-entropy of the logits against the data's targets (the class at the
/// last position, or every next token for text).
pub fn evaluate(
    model: &Model,
    data: &dyn Dataset,
    intervention: Option<&Intervention<'_>>,
    batch: usize,
) -> Score {
    let end = model.modules.len();
    let (correct, loss, n) = fold(
        data,
        eval_batch(model, data, batch),
        "evaluating",
        || (0.0f64, 0.0f64, 0.0f64),
        |acc, _, range| {
            let targets = Targets::of(data, range.clone());
            let x = data.inputs(range);
            let y = match intervention {
                None => model.run(x, 0, end),
                Some(iv) => {
                    let h = model.run(x, 0, iv.index);
                    model.run((iv.apply)(&h), iv.index, end)
                }
            };
            let (c, l, count) = score_logits(&y, &targets);
            acc.0 += c;
            acc.1 += l;
            acc.2 += count;
        },
        |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2),
    );
    Score {
        accuracy: correct / n,
        loss: loss / n,
    }
}

/// What a batch's logits are scored against.
pub enum Targets {
    /// One class per sample, read at the last position.
    Labels(Vec<usize>),
    /// Language modelling: position `t < pos - 1` of every sample predicts the input token at
    /// `t + 1` (`tokens` in rows `(sample, position)`, the inputs themselves).
    NextTokens { tokens: Vec<usize>, pos: usize },
}

impl Targets {
    /// The targets of samples `range`.
    pub fn of(data: &dyn Dataset, range: std::ops::Range<usize>) -> Self {
        if data.next_token_targets() {
            let x = data.inputs(range);
            Targets::NextTokens {
                tokens: x.data.col(0).iter().map(|&t| t as usize).collect(),
                pos: x.pos,
            }
        } else {
            Targets::Labels(data.labels(range))
        }
    }
}

/// Number correct, summed cross-entropy and number of predictions scored.
pub fn score_logits(y: &Batch, targets: &Targets) -> (f64, f64, f64) {
    score_logits_with(y, targets, true)
}

/// [`score_logits`], the cross-entropy (the exponentials) only `with_loss` (else 0).
pub fn score_logits_with(y: &Batch, targets: &Targets, with_loss: bool) -> (f64, f64, f64) {
    let mut correct = 0.0;
    let mut loss = 0.0;
    let mut count = 0.0;
    let mut score = |row: usize, label: usize| {
        let logits = y.data.row(row);
        if with_loss {
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            loss += lse - logits[label];
        }
        let argmax = (0..logits.ncols()).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
        if argmax == label {
            correct += 1.0;
        }
        count += 1.0;
    };
    match targets {
        Targets::Labels(labels) => {
            for (x, &label) in labels.iter().enumerate() {
                score(y.row(x, 0, y.pos - 1), label);
            }
        }
        Targets::NextTokens { tokens, pos } => {
            assert_eq!(
                y.pos, *pos,
                "next-token scoring needs logits at every position (no last_pos_module_type)"
            );
            for x in 0..y.n {
                for t in 0..pos.saturating_sub(1) {
                    score(y.row(x, 0, t), tokens[x * pos + t + 1]);
                }
            }
        }
    }
    (correct, loss, count)
}

/// `f -> f P` for a projection matrix `P` (e.g. `C_k C_pinv`).
pub fn project(f: &Batch, p: &Mat<f64>) -> Batch {
    Batch::new(
        f.n,
        f.r,
        f.pos,
        crate::tensor::linalg::mm(f.data.as_ref(), p.as_ref()),
    )
}

/// Which basis directions of a [`BasisSection`]'s input are kept (the others are zeroed).
#[derive(Clone, Copy)]
pub enum Kept<'a> {
    /// The first `k` (node ablation).
    First(usize),
    /// These, in any order without repeats (edge ablation's mask of one output feature).
    Only(&'a [usize]),
}

/// The modules `from..to` of a model fed from a basis and read in another, for evaluating the
/// section many times on cached activations with some basis directions zeroed: the input is
/// `x = fhat_kept R` (`R` such as `C_pinv`, one row per basis direction), the output `y P` (`P`
/// such as `C_out`, or nothing).
///
/// The section's linear head (its leading [`Module::fixed_linear`], identity and
/// [`Structure::Linear`] modules, and the matrix of a first [`Structure::Dense`]) is pushed
/// through `R` once, so that zeroing directions is a product of `fhat`'s kept columns with
/// `R`'s kept rows, one small GEMM instead of `fhat C_pinv` and the head's products on the full
/// width. Likewise the linear suffix (trailing modules of the same kinds) is folded into `P`,
/// of which only the wanted columns are multiplied. The nonlinear middle runs as it is, but
/// for [`Structure::Elementwise`] modules, applied in place. A wholly linear section is one
/// matrix.
pub struct BasisSection<'a> {
    /// `R` through the linear head (`d_basis x width`); when `linear`, `R` times the whole
    /// section times `P`.
    dirs: Mat<f64>,
    /// The activation right after `dirs` (that of a folded [`Structure::Dense`], or a leading
    /// [`Structure::Elementwise`]) and the number of leading features it applies to.
    act: Option<(Activation, usize)>,
    /// The modules run as they are.
    mid: &'a [Box<dyn Module>],
    /// The linear suffix times `P` (`None`: neither).
    tail: Option<Mat<f64>>,
    /// `dirs` is the whole section (no activation, middle or tail).
    linear: bool,
    /// Features of the widest activation inside the section.
    width: usize,
    /// Activation numbers per chunk of [`Self::run`].
    run_numbers: usize,
}

/// Activation numbers per chunk of [`BasisSection::run`] (2 MB): a whole evaluation batch's
/// activations (a 1024-sample batch of the modular-addition transformer is 13 MB after
/// `attn_in`) run several times slower, on fresh pages and out of cache.
const RUN_NUMBERS: usize = 1 << 18;

impl<'a> BasisSection<'a> {
    /// `rows`: `R` (`d_basis x` the features of node layer `from`); `out`: `P` (the features
    /// of node layer `to` `x d_out`).
    pub fn new(
        model: &'a Model,
        from: usize,
        to: usize,
        rows: Mat<f64>,
        out: Option<&Mat<f64>>,
    ) -> Self {
        let modules = &model.modules[from..to];
        let mut dirs = rows;
        let mut act = None;
        let mut i = 0;
        while i < modules.len() && act.is_none() {
            let m = modules[i].as_ref();
            match through(m, dirs) {
                Ok(d) => dirs = d,
                Err(d) => {
                    dirs = d;
                    match m.structure() {
                        Structure::Dense { w, act: a } => {
                            dirs = mm(dirs.as_ref(), w);
                            act = Some((a, w.ncols()));
                        }
                        Structure::Elementwise { act: a, width }
                            if m.in_features() == m.out_features() =>
                        {
                            act = Some((a, width))
                        }
                        _ => break,
                    }
                }
            }
            i += 1;
        }
        let rest = &modules[i..];
        let n_suffix = rest
            .iter()
            .rev()
            .take_while(|m| is_linear(m.as_ref()))
            .count();
        let (mid, suffix) = rest.split_at(rest.len() - n_suffix);
        let w_suffix = suffix.iter().any(|m| !m.is_identity()).then(|| {
            let d = suffix[0].in_features();
            suffix
                .iter()
                .fold(Mat::identity(d, d), |w, m| match through(m.as_ref(), w) {
                    Ok(w) | Err(w) => w,
                })
        });
        let mut tail = match (w_suffix, out) {
            (Some(w), Some(p)) => Some(mm(w.as_ref(), p.as_ref())),
            (Some(w), None) => Some(w),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        };
        let linear = act.is_none() && mid.is_empty();
        if linear {
            if let Some(t) = tail.take() {
                dirs = mm(dirs.as_ref(), t.as_ref());
            }
        }
        let width = mid
            .iter()
            .map(|m| m.out_features())
            .chain([dirs.ncols()])
            .max()
            .unwrap_or(0);
        Self {
            dirs,
            act,
            mid,
            tail,
            linear,
            width,
            run_numbers: RUN_NUMBERS,
        }
    }

    /// The section's output (rows `(sample, position)`) for `n` samples of `pos` positions
    /// whose basis coordinates are `fhat`, keeping the directions `kept`; `cols`: only these
    /// output columns, in this order (all when `None`).
    pub fn run(
        &self,
        fhat: MatRef<'_, f64>,
        n: usize,
        pos: usize,
        kept: Kept<'_>,
        cols: Option<&[usize]>,
    ) -> Batch {
        let chunk = (self.run_numbers / (pos * self.width).max(1)).max(1);
        if n <= chunk {
            return self.run_chunk(fhat, n, pos, kept, cols);
        }
        let parts: Vec<Batch> = (0..n)
            .step_by(chunk)
            .map(|x0| {
                let nc = chunk.min(n - x0);
                self.run_chunk(fhat.subrows(x0 * pos, nc * pos), nc, pos, kept, cols)
            })
            .collect();
        let (pos_out, width) = (parts[0].pos, parts[0].features());
        let mut data = Mat::zeros(n * pos_out, width);
        let mut row = 0;
        for p in &parts {
            data.as_mut().subrows_mut(row, p.rows()).copy_from(&p.data);
            row += p.rows();
        }
        Batch::new(n, 1, pos_out, data)
    }

    /// Runs in chunks of `numbers` activation numbers instead of [`RUN_NUMBERS`].
    #[cfg(test)]
    pub fn set_run_numbers(&mut self, numbers: usize) {
        self.run_numbers = numbers;
    }

    fn run_chunk(
        &self,
        fhat: MatRef<'_, f64>,
        n: usize,
        pos: usize,
        kept: Kept<'_>,
        cols: Option<&[usize]>,
    ) -> Batch {
        let rows = fhat.nrows();
        let dir_cols = if self.linear { cols } else { None };
        let width = dir_cols.map_or(self.dirs.ncols(), |c| c.len());
        let kept = match kept {
            Kept::First(k) => Kept::First(k.min(self.dirs.nrows()).min(fhat.ncols())),
            only => only,
        };
        let mut x = match kept {
            Kept::First(0) => Mat::zeros(rows, width),
            Kept::First(k) => match dir_cols {
                None => mm(fhat.subcols(0, k), self.dirs.subrows(0, k)),
                Some(c) => mm(
                    fhat.subcols(0, k),
                    gather(self.dirs.as_ref(), 0..k, c).as_ref(),
                ),
            },
            Kept::Only([]) => Mat::zeros(rows, width),
            Kept::Only(idx) => {
                let f = Mat::from_fn(rows, idx.len(), |r, j| fhat[(r, idx[j])]);
                let d = match dir_cols {
                    None => Mat::from_fn(idx.len(), width, |i, j| self.dirs[(idx[i], j)]),
                    Some(c) => gather(self.dirs.as_ref(), idx.iter().copied(), c),
                };
                mm(f.as_ref(), d.as_ref())
            }
        };
        if let Some((act, width)) = self.act {
            apply(&mut x, act, width);
        }
        let mut y = Batch::new(n, 1, pos, x);
        for m in self.mid {
            if m.is_identity() {
                continue;
            }
            match m.structure() {
                // In place, without the derivatives the module's forward keeps for its JVP.
                Structure::Elementwise { act, width } if m.in_features() == m.out_features() => {
                    apply(&mut y.data, act, width)
                }
                _ => y = m.forward(&y).0,
            }
        }
        let data = match (&self.tail, cols) {
            (Some(t), None) => mm(y.data.as_ref(), t.as_ref()),
            (Some(t), Some(c)) => {
                let t = Mat::from_fn(t.nrows(), c.len(), |i, j| t[(i, c[j])]);
                mm(y.data.as_ref(), t.as_ref())
            }
            (None, Some(c)) if !self.linear => {
                Mat::from_fn(y.rows(), c.len(), |i, j| y.data[(i, c[j])])
            }
            (None, _) => y.data,
        };
        Batch::new(y.n, 1, y.pos, data)
    }
}

/// Whether a module is one fixed linear map of every row: [`Module::fixed_linear`], an
/// identity, or [`Structure::Linear`].
fn is_linear(m: &dyn Module) -> bool {
    m.fixed_linear() || m.is_identity() || matches!(m.structure(), Structure::Linear(_))
}

/// The rows of `x` through a module that [`is_linear`] (`Err(x)` for any other).
fn through(m: &dyn Module, x: Mat<f64>) -> Result<Mat<f64>, Mat<f64>> {
    if m.is_identity() {
        return Ok(x);
    }
    if m.fixed_linear() {
        let no_cache: Cache = Box::new(());
        let r = x.nrows();
        return Ok(m.jvp(&no_cache, &Batch::new(1, r, 1, x)).data);
    }
    match m.structure() {
        Structure::Linear(w) => Ok(mm(x.as_ref(), w)),
        _ => Err(x),
    }
}

/// `x_ij = act(x_ij)` for the first `width` columns `j`.
fn apply(x: &mut Mat<f64>, act: Activation, width: usize) {
    for j in 0..width.min(x.ncols()) {
        for v in x.col_as_slice_mut(j) {
            *v = act.apply(*v);
        }
    }
}

/// `m[rows, cols]`.
fn gather(
    m: MatRef<'_, f64>,
    rows: impl ExactSizeIterator<Item = usize>,
    cols: &[usize],
) -> Mat<f64> {
    let rows: Vec<usize> = rows.collect();
    Mat::from_fn(rows.len(), cols.len(), |i, j| m[(rows[i], cols[j])])
}

/// Small random models for tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::io::weights::Tensors;
    use crate::tensor::HostTensor;
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    /// Random TransformerLens-named weights of a one-layer model on `p + 1` tokens.
    pub fn random_transformer(rng: &mut ChaCha8Rng, p: usize) -> Tensors {
        let (dm, h, dh, dmlp) = (8, 2, 3, 12);
        let mut t = Tensors::new();
        let mut put = |name: &str, shape: Vec<usize>, scale: f64| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| scale * rng.random_range(-1.0..1.0))
                .collect();
            t.insert(name.to_string(), HostTensor::new(shape, data));
        };
        put("embed.W_E", vec![p + 1, dm], 1.0);
        put("pos_embed.W_pos", vec![3, dm], 0.5);
        for w in ["W_Q", "W_K", "W_V"] {
            put(&format!("blocks.0.attn.{w}"), vec![h, dm, dh], 0.7);
        }
        for b in ["b_Q", "b_K", "b_V"] {
            put(&format!("blocks.0.attn.{b}"), vec![h, dh], 0.2);
        }
        put("blocks.0.attn.W_O", vec![h, dh, dm], 0.5);
        put("blocks.0.attn.b_O", vec![dm], 0.2);
        put("blocks.0.mlp.W_in", vec![dm, dmlp], 0.5);
        put("blocks.0.mlp.b_in", vec![dmlp], 0.2);
        put("blocks.0.mlp.W_out", vec![dmlp, dm], 0.5);
        put("blocks.0.mlp.b_out", vec![dm], 0.2);
        put("unembed.W_U", vec![dm, p], 0.5);
        put("unembed.b_U", vec![p], 0.2);
        t
    }
}
