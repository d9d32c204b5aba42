//! The modular-addition transformer trainer: one attention + MLP block (relu, no layer norm),
//! learned positional embeddings, causal attention scaled by `1/sqrt(d_head)`, an unembedding
//! with bias; full-batch AdamW on the cross-entropy at the last position.
//!
//! Only the last position's output is trained on, so queries, the attention output and the MLP
//! are computed for the last position alone; keys and values are needed at every position. The
//! input at position `s` is a row of `E_s = W_E + W_pos[s]`, so queries, keys and values are
//! rows of per-position tables `E_s W + b` (`d_vocab` rows) rather than one GEMM per sample;
//! their gradients are scattered into the same tables and pulled back by GEMMs.

use super::mlp::normal;
use super::{
    add_row, check_finite, col_sums, cross_entropy, gemm, matmul, par, progress, rows, rows_mut,
    show_eval, Adam, EvalPoint, Float, ModaddTrainConfig, Precision, TrainKind, TrainReport,
};
use crate::data::Dataset;
use crate::io::weights::Tensors;
use crate::tensor::HostTensor;
use anyhow::{bail, ensure};
use faer::{Accum, Mat, Par};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Trains the transformer of `cfg` (`d_vocab = modulus + 1`, `n_ctx` = the data's positions)
/// on `train`, evaluating on `test`. Returns the weights under TransformerLens names and
/// shapes, and the report.
pub fn train_modadd(
    cfg: &ModaddTrainConfig,
    train: &dyn Dataset,
    test: &dyn Dataset,
) -> anyhow::Result<(Tensors, TrainReport)> {
    ensure!(
        cfg.kind == TrainKind::Modadd,
        "key `kind` must be \"modadd\""
    );
    let m = &cfg.model;
    ensure!(
        m.d_model > 0 && m.n_heads > 0 && m.d_head > 0 && m.d_mlp > 0,
        "[model] sizes must be positive"
    );
    let o = &cfg.optim;
    ensure!(
        o.lr > 0.0 && o.lr.is_finite(),
        "[optim] lr must be positive"
    );
    ensure!(!train.is_empty(), "the train set is empty");
    let ctx = train.inputs(0..1).pos;
    let shape = Shape {
        vocab: cfg.data.modulus + 1,
        ctx,
        d: m.d_model,
        heads: m.n_heads,
        dh: m.d_head,
        mlp: m.d_mlp,
    };
    match cfg.precision {
        Precision::F32 => run::<f32>(cfg, shape, train, test),
        Precision::F64 => run::<f64>(cfg, shape, train, test),
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// Input and output vocabulary.
    pub vocab: usize,
    pub ctx: usize,
    pub d: usize,
    pub heads: usize,
    pub dh: usize,
    pub mlp: usize,
}

impl Shape {
    fn hd(&self) -> usize {
        self.heads * self.dh
    }
}

/// Parameters (and, with the same shapes, their gradients). TransformerLens's per-head 3-D
/// tensors are held with the heads side by side: column `h * d_head + j` of `w_q` is
/// `W_Q[h, :, j]`, row `h * d_head + i` of `w_o` is `W_O[h, i, :]`. Biases are `1 x n` rows.
#[derive(Clone)]
pub(crate) struct Params<T: Float> {
    pub w_e: Mat<T>,
    pub w_pos: Mat<T>,
    pub w_q: Mat<T>,
    pub w_k: Mat<T>,
    pub w_v: Mat<T>,
    pub b_q: Mat<T>,
    pub b_k: Mat<T>,
    pub b_v: Mat<T>,
    pub w_o: Mat<T>,
    pub b_o: Mat<T>,
    pub w_in: Mat<T>,
    pub b_in: Mat<T>,
    pub w_out: Mat<T>,
    pub b_out: Mat<T>,
    pub w_u: Mat<T>,
    pub b_u: Mat<T>,
}

impl<T: Float> Params<T> {
    /// TransformerLens's "gpt2" init: every weight normal with std `std`, biases 0.
    pub(crate) fn init(s: Shape, std: f64, rng: &mut ChaCha8Rng) -> Self {
        let mut w = |r, c| Mat::from_fn(r, c, |_, _| T::of(std * normal(rng)));
        let (w_e, w_pos) = (w(s.vocab, s.d), w(s.ctx, s.d));
        let (w_q, w_k, w_v) = (w(s.d, s.hd()), w(s.d, s.hd()), w(s.d, s.hd()));
        let w_o = w(s.hd(), s.d);
        let (w_in, w_out) = (w(s.d, s.mlp), w(s.mlp, s.d));
        let w_u = w(s.d, s.vocab);
        let z = |c| Mat::zeros(1, c);
        Self {
            w_e,
            w_pos,
            w_q,
            w_k,
            w_v,
            b_q: z(s.hd()),
            b_k: z(s.hd()),
            b_v: z(s.hd()),
            w_o,
            b_o: z(s.d),
            w_in,
            b_in: z(s.mlp),
            w_out,
            b_out: z(s.d),
            w_u,
            b_u: z(s.vocab),
        }
    }

    fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        for m in z.mats_mut() {
            m.fill(T::of(0.0));
        }
        z
    }

    pub(crate) fn mats(&self) -> Vec<&Mat<T>> {
        vec![
            &self.w_e,
            &self.w_pos,
            &self.w_q,
            &self.w_k,
            &self.w_v,
            &self.b_q,
            &self.b_k,
            &self.b_v,
            &self.w_o,
            &self.b_o,
            &self.w_in,
            &self.b_in,
            &self.w_out,
            &self.b_out,
            &self.w_u,
            &self.b_u,
        ]
    }

    pub(crate) fn mats_mut(&mut self) -> Vec<&mut Mat<T>> {
        vec![
            &mut self.w_e,
            &mut self.w_pos,
            &mut self.w_q,
            &mut self.w_k,
            &mut self.w_v,
            &mut self.b_q,
            &mut self.b_k,
            &mut self.b_v,
            &mut self.w_o,
            &mut self.b_o,
            &mut self.w_in,
            &mut self.b_in,
            &mut self.w_out,
            &mut self.b_out,
            &mut self.w_u,
            &mut self.b_u,
        ]
    }

    /// TransformerLens names and shapes, as f64 host tensors.
    pub(crate) fn to_tensors(&self, s: Shape) -> Tensors {
        let mut t = Tensors::new();
        let mut put = |name: &str, shape: Vec<usize>, f: &dyn Fn(usize) -> T| {
            let len = shape.iter().product();
            let data = (0..len).map(|i| f(i).to_f64()).collect();
            t.insert(name.to_string(), HostTensor::new(shape, data));
        };
        let (d, dh) = (s.d, s.dh);
        put("embed.W_E", vec![s.vocab, d], &mat(&self.w_e));
        put("pos_embed.W_pos", vec![s.ctx, d], &mat(&self.w_pos));
        // [h, i, j] of W_Q/K/V is entry (i, h * dh + j).
        for (name, w) in [("W_Q", &self.w_q), ("W_K", &self.w_k), ("W_V", &self.w_v)] {
            let f = |x: usize| {
                let (h, i, j) = (x / (d * dh), (x / dh) % d, x % dh);
                w[(i, h * dh + j)]
            };
            put(&format!("blocks.0.attn.{name}"), vec![s.heads, d, dh], &f);
        }
        for (name, b) in [("b_Q", &self.b_q), ("b_K", &self.b_k), ("b_V", &self.b_v)] {
            put(&format!("blocks.0.attn.{name}"), vec![s.heads, dh], &|x| {
                b[(0, x)]
            });
        }
        // [h, i, k] of W_O is entry (h * dh + i, k): the row-major order of w_o itself.
        put("blocks.0.attn.W_O", vec![s.heads, dh, d], &mat(&self.w_o));
        put("blocks.0.attn.b_O", vec![d], &|x| self.b_o[(0, x)]);
        put("blocks.0.mlp.W_in", vec![d, s.mlp], &mat(&self.w_in));
        put("blocks.0.mlp.b_in", vec![s.mlp], &|x| self.b_in[(0, x)]);
        put("blocks.0.mlp.W_out", vec![s.mlp, d], &mat(&self.w_out));
        put("blocks.0.mlp.b_out", vec![d], &|x| self.b_out[(0, x)]);
        put("unembed.W_U", vec![d, s.vocab], &mat(&self.w_u));
        put("unembed.b_U", vec![s.vocab], &|x| self.b_u[(0, x)]);
        t
    }
}

/// Entry `i` of `m` in row-major order.
fn mat<T: Float>(m: &Mat<T>) -> impl Fn(usize) -> T + '_ {
    let c = m.ncols();
    move |i| m[(i / c, i % c)]
}

/// A matrix's entries in row-major order.
fn to_rows<T: Float>(m: &Mat<T>) -> Vec<T> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    // Four running sums: independent adds rather than one serial chain.
    let mut acc = [T::of(0.0); 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::of(0.0), |s, (x, y)| s + *x * *y);
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// What the backward pass needs from the forward pass.
pub(crate) struct Cache<T: Float> {
    /// `E_s = W_E + W_pos[s]`, `[vocab, d]` per position.
    e: Vec<Mat<T>>,
    /// Row-major tables `[vocab, heads * d_head]`: queries at the last position, keys and values
    /// at every position.
    q: Vec<T>,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    /// Attention pattern of the last position, `[n, heads, ctx]`.
    attn: Vec<T>,
    /// Mixed values, row-major `[n, heads * d_head]`.
    z: Vec<T>,
    r1: Mat<T>,
    h: Mat<T>,
    r2: Mat<T>,
}

/// Forward pass on `tokens` (row-major `[n, ctx]`): the last position's logits and the cache.
pub(crate) fn forward<T: Float>(
    p: &Params<T>,
    s: Shape,
    tokens: &[usize],
    par: Par,
) -> (Mat<T>, Cache<T>) {
    let (ctx, hd, dh) = (s.ctx, s.hd(), s.dh);
    let n = tokens.len() / ctx;
    let last = ctx - 1;
    // Embedding: position s reads row `token` of E_s = W_E + W_pos[s].
    let e: Vec<Mat<T>> = (0..ctx)
        .map(|pos| {
            let mut e = p.w_e.clone();
            add_row(&mut e, &p.w_pos.subrows(pos, 1).to_owned());
            e
        })
        .collect();
    // Query / key / value tables `E_s W + b`.
    let table = |e: &Mat<T>, w: &Mat<T>, b: &Mat<T>| {
        let mut t = matmul(e.as_ref(), w.as_ref(), par);
        add_row(&mut t, b);
        to_rows(&t)
    };
    let q = table(&e[last], &p.w_q, &p.b_q);
    let k: Vec<Vec<T>> = e.iter().map(|e| table(e, &p.w_k, &p.b_k)).collect();
    let v: Vec<Vec<T>> = e.iter().map(|e| table(e, &p.w_v, &p.b_v)).collect();
    // Attention of the last position (causal: it sees every position), per sample and head:
    // a = softmax_s(q . k_s / sqrt(d_head)), z = sum_s a_s v_s.
    let scale = T::of(1.0 / (dh as f64).sqrt());
    let mut attn = vec![T::of(0.0); n * s.heads * ctx];
    let mut z = vec![T::of(0.0); n * hd];
    for i in 0..n {
        let tok = &tokens[i * ctx..(i + 1) * ctx];
        for h in 0..s.heads {
            let o = h * dh;
            let qv = &q[tok[last] * hd + o..][..dh];
            let a = &mut attn[(i * s.heads + h) * ctx..][..ctx];
            let mut max = T::of(f64::NEG_INFINITY);
            for pos in 0..ctx {
                a[pos] = dot(qv, &k[pos][tok[pos] * hd + o..][..dh]) * scale;
                if a[pos] > max {
                    max = a[pos];
                }
            }
            let mut sum = T::of(0.0);
            for x in a.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let zi = &mut z[i * hd + o..][..dh];
            for pos in 0..ctx {
                a[pos] /= sum;
                for (zj, vj) in zi.iter_mut().zip(&v[pos][tok[pos] * hd + o..][..dh]) {
                    *zj += a[pos] * *vj;
                }
            }
        }
    }
    // Residual stream at the last position: r1 = x + z W_O + b_O.
    let mut r1 = Mat::zeros(n, s.d);
    for j in 0..s.d {
        let src = e[last].col_as_slice(j);
        for (i, x) in r1.col_as_slice_mut(j).iter_mut().enumerate() {
            *x = src[tokens[i * ctx + last]];
        }
    }
    gemm(&mut r1, Accum::Add, rows(&z, n, hd), p.w_o.as_ref(), par);
    add_row(&mut r1, &p.b_o);
    // MLP: h = relu(r1 W_in + b_in), r2 = r1 + h W_out + b_out.
    let mut h = matmul(r1.as_ref(), p.w_in.as_ref(), par);
    add_row(&mut h, &p.b_in);
    let zero = T::of(0.0);
    for j in 0..h.ncols() {
        for x in h.col_as_slice_mut(j) {
            if *x < zero {
                *x = zero;
            }
        }
    }
    let mut r2 = r1.clone();
    gemm(&mut r2, Accum::Add, h.as_ref(), p.w_out.as_ref(), par);
    add_row(&mut r2, &p.b_out);
    // Unembedding: logits = r2 W_U + b_U.
    let mut logits = matmul(r2.as_ref(), p.w_u.as_ref(), par);
    add_row(&mut logits, &p.b_u);
    let cache = Cache {
        e,
        q,
        k,
        v,
        attn,
        z,
        r1,
        h,
        r2,
    };
    (logits, cache)
}

/// Backward pass from `g = dL/dlogits`, writing every parameter gradient into `grads`; each
/// step undoes the matching forward step above, in reverse order.
pub(crate) fn backward<T: Float>(
    p: &Params<T>,
    s: Shape,
    tokens: &[usize],
    c: &Cache<T>,
    g: &Mat<T>,
    grads: &mut Params<T>,
    par: Par,
) {
    let (ctx, hd, dh) = (s.ctx, s.hd(), s.dh);
    let n = tokens.len() / ctx;
    let last = ctx - 1;
    // Unembedding.
    gemm(
        &mut grads.w_u,
        Accum::Replace,
        c.r2.transpose(),
        g.as_ref(),
        par,
    );
    grads.b_u = col_sums(g.as_ref());
    let g_r2 = matmul(g.as_ref(), p.w_u.transpose(), par);
    // MLP: relu'(pre) = [h > 0].
    gemm(
        &mut grads.w_out,
        Accum::Replace,
        c.h.transpose(),
        g_r2.as_ref(),
        par,
    );
    grads.b_out = col_sums(g_r2.as_ref());
    let mut g_pre = matmul(g_r2.as_ref(), p.w_out.transpose(), par);
    let zero = T::of(0.0);
    for j in 0..g_pre.ncols() {
        for (x, &hv) in g_pre
            .col_as_slice_mut(j)
            .iter_mut()
            .zip(c.h.col_as_slice(j))
        {
            if hv <= zero {
                *x = zero;
            }
        }
    }
    gemm(
        &mut grads.w_in,
        Accum::Replace,
        c.r1.transpose(),
        g_pre.as_ref(),
        par,
    );
    grads.b_in = col_sums(g_pre.as_ref());
    let mut g_r1 = g_r2;
    gemm(
        &mut g_r1,
        Accum::Add,
        g_pre.as_ref(),
        p.w_in.transpose(),
        par,
    );
    // Attention output.
    gemm(
        &mut grads.w_o,
        Accum::Replace,
        rows(&c.z, n, hd).transpose(),
        g_r1.as_ref(),
        par,
    );
    grads.b_o = col_sums(g_r1.as_ref());
    let mut g_z = vec![T::of(0.0); n * hd];
    gemm(
        rows_mut(&mut g_z, n, hd),
        Accum::Replace,
        g_r1.as_ref(),
        p.w_o.transpose(),
        par,
    );
    // Attention: dv_s += a_s dz; da_s = dz . v_s; ds = a * (da - sum_s a da);
    // dq += sum_s ds_s k_s / sqrt(d_head); dk_s += ds_s q / sqrt(d_head). Scattered into the
    // table rows the forward pass read.
    let scale = T::of(1.0 / (dh as f64).sqrt());
    let mut gq = vec![T::of(0.0); s.vocab * hd];
    let mut gk = vec![vec![T::of(0.0); s.vocab * hd]; ctx];
    let mut gv = vec![vec![T::of(0.0); s.vocab * hd]; ctx];
    let mut ds = vec![T::of(0.0); ctx];
    for i in 0..n {
        let tok = &tokens[i * ctx..(i + 1) * ctx];
        for h in 0..s.heads {
            let o = h * dh;
            let a = &c.attn[(i * s.heads + h) * ctx..][..ctx];
            let gzi = &g_z[i * hd + o..][..dh];
            let mut mean = T::of(0.0);
            for pos in 0..ctx {
                let row = tok[pos] * hd + o;
                ds[pos] = dot(gzi, &c.v[pos][row..][..dh]);
                mean += a[pos] * ds[pos];
                for (x, &y) in gv[pos][row..][..dh].iter_mut().zip(gzi) {
                    *x += a[pos] * y;
                }
            }
            let qrow = tok[last] * hd + o;
            for pos in 0..ctx {
                let w = a[pos] * (ds[pos] - mean) * scale;
                let row = tok[pos] * hd + o;
                for j in 0..dh {
                    gq[qrow + j] += w * c.k[pos][row + j];
                    gk[pos][row + j] += w * c.q[qrow + j];
                }
            }
        }
    }
    // Tables `E_s W + b`: dW += E_s^T dT, db += sum_rows dT, dE_s = dT W^T.
    grads.w_k.fill(zero);
    grads.w_v.fill(zero);
    grads.b_k.fill(zero);
    grads.b_v.fill(zero);
    grads.w_e.fill(zero);
    let mut g_e: Vec<Mat<T>> = Vec::with_capacity(ctx);
    for pos in 0..ctx {
        let (tk, tv) = (rows(&gk[pos], s.vocab, hd), rows(&gv[pos], s.vocab, hd));
        let et = c.e[pos].transpose();
        gemm(&mut grads.w_k, Accum::Add, et, tk, par);
        gemm(&mut grads.w_v, Accum::Add, et, tv, par);
        grads.b_k += col_sums(tk);
        grads.b_v += col_sums(tv);
        let mut ge = matmul(tk, p.w_k.transpose(), par);
        gemm(&mut ge, Accum::Add, tv, p.w_v.transpose(), par);
        g_e.push(ge);
    }
    let tq = rows(&gq, s.vocab, hd);
    gemm(
        &mut grads.w_q,
        Accum::Replace,
        c.e[last].transpose(),
        tq,
        par,
    );
    grads.b_q = col_sums(tq);
    gemm(&mut g_e[last], Accum::Add, tq, p.w_q.transpose(), par);
    // The residual stream's embedding at the last position.
    for j in 0..s.d {
        let dst = g_e[last].col_as_slice_mut(j);
        for (i, &g) in g_r1.col_as_slice(j).iter().enumerate() {
            dst[tokens[i * ctx + last]] += g;
        }
    }
    // E_s = W_E + W_pos[s].
    for (pos, ge) in g_e.iter().enumerate() {
        grads.w_e += ge;
        let sums = col_sums(ge.as_ref());
        for j in 0..s.d {
            grads.w_pos[(pos, j)] = sums[(0, j)];
        }
    }
}

/// Token ids of a dataset as row-major `[n, ctx]`, and its labels, checked against the vocab.
fn load_tokens(ds: &dyn Dataset, s: Shape, what: &str) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
    let n = ds.len();
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let b = ds.inputs(0..n);
    if b.pos != s.ctx || b.features() != 1 {
        bail!(
            "{what} set: inputs have {} positions x {} features, expected {} token ids",
            b.pos,
            b.features(),
            s.ctx
        );
    }
    let mut tokens = Vec::with_capacity(n * s.ctx);
    for i in 0..b.rows() {
        let t = b.data[(i, 0)];
        if !(t >= 0.0 && t < s.vocab as f64 && t.fract() == 0.0) {
            bail!(
                "{what} set: token {t} is not an id below d_vocab = {}",
                s.vocab
            );
        }
        tokens.push(t as usize);
    }
    let labels = ds.labels(0..n);
    if let Some(&l) = labels.iter().find(|&&l| l >= s.vocab) {
        bail!("{what} set: label {l} is not below d_vocab = {}", s.vocab);
    }
    Ok((tokens, labels))
}

fn run<T: Float>(
    cfg: &ModaddTrainConfig,
    s: Shape,
    train: &dyn Dataset,
    test: &dyn Dataset,
) -> anyhow::Result<(Tensors, TrainReport)> {
    let (train_tok, train_lab) = load_tokens(train, s, "train")?;
    let (test_tok, test_lab) = load_tokens(test, s, "test")?;
    let par = par(cfg.threads);
    let o = &cfg.optim;
    let std = cfg
        .model
        .init_std
        .unwrap_or(0.8 / (cfg.model.d_model as f64).sqrt());
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut p = Params::<T>::init(s, std, &mut rng);
    let mut grads = p.zeros_like();
    let mut adam = Adam::new(&p.mats(), o.lr, o.weight_decay, o.betas, o.eps, o.warmup);
    let evaluate = |p: &Params<T>, tokens: &[usize], labels: &[usize]| {
        if labels.is_empty() {
            return (0.0, 0.0);
        }
        let (mut logits, _) = forward(p, s, tokens, par);
        let (loss, correct) = cross_entropy(&mut logits, labels, false);
        let n = labels.len() as f64;
        (loss / n, correct as f64 / n)
    };
    let pb = progress(o.steps, "steps");
    let start = Instant::now();
    let mut history = Vec::new();
    let n = train_lab.len() as f64;
    for step in 0..o.steps {
        let (mut g, cache) = forward(&p, s, &train_tok, par);
        let (loss, correct) = cross_entropy(&mut g, &train_lab, true);
        if !loss.is_finite() {
            bail!("training diverged at step {step} (loss {loss})");
        }
        // The train numbers of this forward pass are those of the parameters after `step`
        // updates; only the test set needs another pass.
        if step % cfg.eval_every.max(1) == 0 {
            let (test_loss, test_accuracy) = evaluate(&p, &test_tok, &test_lab);
            let e = EvalPoint {
                step,
                train_loss: loss / n,
                train_accuracy: correct as f64 / n,
                test_loss,
                test_accuracy,
            };
            show_eval(&pb, &e);
            history.push(e);
        }
        backward(&p, s, &train_tok, &cache, &g, &mut grads, par);
        adam.step(p.mats_mut(), grads.mats());
        pb.inc(1);
    }
    let (train_loss, train_accuracy) = evaluate(&p, &train_tok, &train_lab);
    let (test_loss, test_accuracy) = evaluate(&p, &test_tok, &test_lab);
    history.push(EvalPoint {
        step: o.steps,
        train_loss,
        train_accuracy,
        test_loss,
        test_accuracy,
    });
    show_eval(&pb, &history[history.len() - 1]);
    pb.finish();
    let tensors = p.to_tensors(s);
    check_finite(&tensors)?;
    let report = TrainReport::new(
        TrainKind::Modadd,
        serde_json::to_value(cfg)?,
        train,
        test,
        o.steps,
        start.elapsed().as_secs_f64(),
        history,
    );
    Ok((tensors, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::modadd::{ModOp, ModularArithmetic, Split};
    use crate::experiments::train::{AdamWConfig, ModaddDataConfig, TransformerDims};

    fn small() -> (Shape, Params<f64>, Vec<usize>, Vec<usize>) {
        let s = Shape {
            vocab: 7,
            ctx: 3,
            d: 8,
            heads: 2,
            dh: 4,
            mlp: 16,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut p = Params::<f64>::init(s, 0.6, &mut rng);
        // Nonzero biases, so that their gradients are checked at a generic point.
        for b in [
            &mut p.b_q,
            &mut p.b_k,
            &mut p.b_v,
            &mut p.b_o,
            &mut p.b_in,
            &mut p.b_out,
            &mut p.b_u,
        ] {
            for j in 0..b.ncols() {
                b[(0, j)] = 0.3 * normal(&mut rng);
            }
        }
        let n = 9;
        let tokens: Vec<usize> = (0..n * 3).map(|i| (i * 5 + i / 3) % 7).collect();
        let labels: Vec<usize> = (0..n).map(|i| (i * 3) % 7).collect();
        (s, p, tokens, labels)
    }

    fn loss(p: &Params<f64>, s: Shape, tokens: &[usize], labels: &[usize]) -> f64 {
        let (mut logits, _) = forward(p, s, tokens, Par::Seq);
        cross_entropy(&mut logits, labels, false).0 / labels.len() as f64
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (s, mut p, tokens, labels) = small();
        let (mut g, cache) = forward(&p, s, &tokens, Par::Seq);
        cross_entropy(&mut g, &labels, true);
        let mut grads = p.zeros_like();
        backward(&p, s, &tokens, &cache, &g, &mut grads, Par::Seq);
        let analytic: Vec<Mat<f64>> = grads.mats().into_iter().cloned().collect();
        let names = [
            "W_E", "W_pos", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "b_in",
            "W_out", "b_out", "W_U", "b_U",
        ];
        let h = 1e-6;
        let mut worst_all = 0.0f64;
        for (k, a) in analytic.iter().enumerate() {
            let mut worst = 0.0f64;
            let mut norm = 0.0f64;
            for i in 0..a.nrows() {
                for j in 0..a.ncols() {
                    let orig = p.mats()[k][(i, j)];
                    p.mats_mut()[k][(i, j)] = orig + h;
                    let lp = loss(&p, s, &tokens, &labels);
                    p.mats_mut()[k][(i, j)] = orig - h;
                    let lm = loss(&p, s, &tokens, &labels);
                    p.mats_mut()[k][(i, j)] = orig;
                    let fd = (lp - lm) / (2.0 * h);
                    worst = worst.max((fd - a[(i, j)]).abs());
                    norm = norm.max(a[(i, j)].abs());
                }
            }
            if names[k] == "b_K" {
                // q . b_K shifts every score of a head equally, which softmax ignores.
                assert!(norm < 1e-12 && worst < 1e-8, "b_K: {norm} {worst}");
                eprintln!("transformer gradient check b_K: zero, as it should be ({norm:.1e})");
                continue;
            }
            assert!(norm > 1e-4, "{}: gradient vanishes", names[k]);
            let rel = worst / norm;
            eprintln!(
                "transformer gradient check {}: max error / max |grad| = {rel:.2e}",
                names[k]
            );
            worst_all = worst_all.max(rel);
        }
        assert!(worst_all < 1e-6, "worst {worst_all}");
    }

    #[test]
    fn trains_small_modular_addition_and_saves_tl_shapes() {
        let p = 7;
        let train = ModularArithmetic::new(p, ModOp::Add, Split::Train, 0.8, 0, None).unwrap();
        let test = ModularArithmetic::new(p, ModOp::Add, Split::Test, 0.8, 0, None).unwrap();
        let cfg = ModaddTrainConfig {
            kind: TrainKind::Modadd,
            seed: 0,
            eval_every: 50,
            precision: Precision::F32,
            threads: 1,
            data: ModaddDataConfig {
                modulus: p,
                op: ModOp::Add,
                frac_train: 0.8,
                seed: 0,
                split_file: None,
            },
            model: TransformerDims {
                d_model: 16,
                n_heads: 2,
                d_head: 8,
                d_mlp: 32,
                init_std: None,
            },
            optim: AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                betas: [0.9, 0.98],
                eps: 1e-8,
                warmup: 10,
                steps: 300,
            },
        };
        let (t, report) = train_modadd(&cfg, &train, &test).unwrap();
        assert!(report.train_accuracy == 1.0, "{report:?}");
        assert_eq!(t["blocks.0.attn.W_Q"].shape, vec![2, 16, 8]);
        assert_eq!(t["blocks.0.attn.W_O"].shape, vec![2, 8, 16]);
        assert_eq!(t["blocks.0.attn.b_K"].shape, vec![2, 8]);
        assert_eq!(t["embed.W_E"].shape, vec![8, 16]);
        assert_eq!(t["pos_embed.W_pos"].shape, vec![3, 16]);
        assert_eq!(t["unembed.b_U"].shape, vec![8]);
        assert_eq!(t.len(), 16);
    }

    /// The saved tensors, run through a plain per-head TransformerLens-style forward pass over
    /// all three positions, give the trainer's logits.
    #[test]
    #[allow(clippy::needless_range_loop)] // index loops mirror the einsums they check
    fn saved_tensors_match_a_reference_forward() {
        let (s, p, tokens, _) = small();
        let (logits, _) = forward(&p, s, &tokens, Par::Seq);
        let t = p.to_tensors(s);
        let at = |name: &str, idx: &[usize]| {
            let x = &t[name];
            let mut flat = 0;
            for (k, &i) in idx.iter().enumerate() {
                flat = flat * x.shape[k] + i;
            }
            x.data[flat]
        };
        let d = s.d;
        for n in 0..tokens.len() / 3 {
            let tok = &tokens[n * 3..n * 3 + 3];
            let resid: Vec<Vec<f64>> = (0..3)
                .map(|pos| {
                    (0..d)
                        .map(|j| at("embed.W_E", &[tok[pos], j]) + at("pos_embed.W_pos", &[pos, j]))
                        .collect()
                })
                .collect();
            let proj = |w: &str, b: &str, h: usize, x: &[f64]| -> Vec<f64> {
                (0..s.dh)
                    .map(|j| (0..d).map(|i| x[i] * at(w, &[h, i, j])).sum::<f64>() + at(b, &[h, j]))
                    .collect()
            };
            let mut r1: Vec<f64> = (0..d)
                .map(|k| resid[2][k] + at("blocks.0.attn.b_O", &[k]))
                .collect();
            for h in 0..s.heads {
                let q = proj("blocks.0.attn.W_Q", "blocks.0.attn.b_Q", h, &resid[2]);
                let scores: Vec<f64> = (0..3)
                    .map(|pos| {
                        let k = proj("blocks.0.attn.W_K", "blocks.0.attn.b_K", h, &resid[pos]);
                        q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>() / (s.dh as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                let mut z = vec![0.0; s.dh];
                for pos in 0..3 {
                    let v = proj("blocks.0.attn.W_V", "blocks.0.attn.b_V", h, &resid[pos]);
                    let a = (scores[pos] - mx).exp() / sum;
                    for j in 0..s.dh {
                        z[j] += a * v[j];
                    }
                }
                for k in 0..d {
                    r1[k] += (0..s.dh)
                        .map(|i| z[i] * at("blocks.0.attn.W_O", &[h, i, k]))
                        .sum::<f64>();
                }
            }
            let hid: Vec<f64> = (0..s.mlp)
                .map(|m| {
                    ((0..d)
                        .map(|i| r1[i] * at("blocks.0.mlp.W_in", &[i, m]))
                        .sum::<f64>()
                        + at("blocks.0.mlp.b_in", &[m]))
                    .max(0.0)
                })
                .collect();
            let r2: Vec<f64> = (0..d)
                .map(|k| {
                    r1[k]
                        + (0..s.mlp)
                            .map(|m| hid[m] * at("blocks.0.mlp.W_out", &[m, k]))
                            .sum::<f64>()
                        + at("blocks.0.mlp.b_out", &[k])
                })
                .collect();
            for v in 0..s.vocab {
                let l = (0..d)
                    .map(|k| r2[k] * at("unembed.W_U", &[k, v]))
                    .sum::<f64>()
                    + at("unembed.b_U", &[v]);
                assert!((l - logits[(n, v)]).abs() < 1e-10);
            }
        }
    }
}
