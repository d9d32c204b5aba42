//! The basis of one node layer (method.md section 4), computed from the last node layer
//! backwards, and the Jacobian metric `M'` it needs (sections 4.6 and 7).
//!
//! In order: eigendecompose the Gram matrix with the constant direction (centring) and the LN
//! variance channel held apart (4.1), truncate (4.2), centre and whiten (4.3-4.4), stop for the
//! `svd` / `neuron` bases (4.5), otherwise measure how the next node layer's features depend on
//! this one (`M'`, 4.6), rotate into `M`'s eigenbasis with the masked directions fixed (4.7),
//! truncate again (4.8) and scale each direction by `sqrt(Lambda)` (4.9).

use super::attention::{attention_section, AttentionSection};
use super::pass::{activations_at, data_positions, fold, sample_rng};
use super::section::{classify, PartialAct, Shape};
use super::stats::Moments;
use super::{BasisFormula, LibConfig, NodeBasis, NodeLayer};
use crate::data::Dataset;
use crate::models::{Model, Section, OUTPUT};
use crate::tensor::linalg::{
    eigh_abs_desc, eigh_masked, fill_upper, gram_add_lower, mm, mm_tn, select_cols,
};
use crate::tensor::Batch;
use anyhow::bail;
use faer::Mat;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Eigen-directions of the Gram matrix after truncation 1 (method.md sections 4.1-4.2).
pub struct Pca {
    /// `d_orig x k`, the masked directions first.
    pub u: Mat<f64>,
    pub d: Vec<f64>,
    pub n_masked: usize,
    pub has_constant: bool,
}

/// Section 4.1-4.2. `center`: find the constant direction (exactly one eigenvector with a
/// nonzero bias component and a nonzero eigenvalue) and move it to index 0. `ln_var`: keep
/// coordinate 0 (the LN variance channel) as its own direction and decompose only the rest.
pub fn pca(gram: &Mat<f64>, center: bool, ln_var: bool, tau: f64) -> anyhow::Result<Pca> {
    let n = gram.nrows();
    let skip = usize::from(ln_var);
    let (vals, vecs) = eigh_abs_desc(gram.submatrix(skip, skip, n - skip, n - skip))?;
    // Directions as (eigenvalue, full-length vector).
    let mut dirs: Vec<(f64, Vec<f64>)> = (0..vals.len())
        .map(|k| {
            let mut v = vec![0.0; n];
            for i in 0..n - skip {
                v[skip + i] = vecs[(i, k)];
            }
            (vals[k], v)
        })
        .collect();
    let mut masked: Vec<(f64, Vec<f64>)> = Vec::new();
    if center {
        let constant: Vec<usize> = (0..dirs.len())
            .filter(|&k| dirs[k].1[n - 1].abs() > 1e-6 && dirs[k].0 > 1e-6)
            .collect();
        match constant.len() {
            1 => masked.push(dirs.remove(constant[0])),
            0 => bail!("centring found no constant direction (no eigenvector with a bias component); is the bias folded into the last coordinate?"),
            k => bail!("centring found {k} candidate constant directions (eigenvectors with a bias component and nonzero eigenvalue); expected exactly one"),
        }
    }
    if ln_var {
        let mut v = vec![0.0; n];
        v[0] = 1.0;
        masked.push((gram[(0, 0)], v));
    }
    // Truncation 1: keep eigenvalues above tau (masked directions too, if they pass).
    let keep_masked: Vec<_> = masked.into_iter().filter(|(d, _)| *d > tau).collect();
    let n_masked = keep_masked.len();
    let kept: Vec<(f64, Vec<f64>)> = keep_masked
        .into_iter()
        .chain(dirs.into_iter().filter(|(d, _)| *d > tau))
        .collect();
    let u = Mat::from_fn(n, kept.len(), |i, k| kept[k].1[i]);
    Ok(Pca {
        u,
        d: kept.iter().map(|(d, _)| *d).collect(),
        n_masked,
        has_constant: center,
    })
}

/// `W = Y U` and `W_pinv = U^T Y^-1` where `f Y = f - mu~` (method.md sections 4.3-4.4).
pub fn centre(u: &Mat<f64>, mean: Option<&[f64]>) -> (Mat<f64>, Mat<f64>) {
    let (d, k) = (u.nrows(), u.ncols());
    let mut w = u.clone();
    let mut w_pinv = u.transpose().to_owned();
    if let Some(mu) = mean {
        let last = d - 1;
        for c in 0..k {
            let shift: f64 = (0..last).map(|j| mu[j] * u[(j, c)]).sum();
            w[(last, c)] -= shift;
            for j in 0..last {
                w_pinv[(c, j)] += u[(last, c)] * mu[j];
            }
        }
    }
    (w, w_pinv)
}

/// `M'` of a node layer given `Q` (the next layer's `C`) and the basis formula: computed by
/// [`jacobian_metric`] over the data, or read from a stage file; `None` when this process
/// cannot know it yet (a shard of a distributed build).
pub type MetricSource<'a> =
    dyn FnMut(&Mat<f64>, BasisFormula) -> anyhow::Result<Option<Metric>> + 'a;

/// The basis of node layer `layers[l]` (`pos_in` positions per sample), given the already
/// computed basis of `layers[l + 1]`; `None` when `metric` has no `M'` yet.
pub fn node_basis(
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    pos_in: usize,
    moments: &Moments,
    next: Option<&NodeBasis>,
    metric: &mut MetricSource,
) -> anyhow::Result<Option<NodeBasis>> {
    let layer = &layers[l];
    let is_output = layer.name == OUTPUT;
    let is_last = l + 1 == layers.len();
    let mean = moments.mean();
    let d_orig = mean.len();
    let ln_var = cfg.isolate_ln_var && is_ln_out(&layer.name);
    // The model outputs carry no bias coordinate: no constant direction to find there.
    let center = cfg.center && !is_output;
    let gram = moments.gram(center);
    let mut basis = NodeBasis {
        mean: mean.clone(),
        gram: gram.clone(),
        ..NodeBasis::neuron(&layer.name, d_orig, pos_in)
    };
    if !cfg.rotates(l, layers.len()) {
        return Ok(Some(basis));
    }
    let formula = if is_last {
        BasisFormula::Svd
    } else {
        cfg.basis_formula
    };
    if formula == BasisFormula::Neuron {
        // A permutation of the neurons: the bias coordinate first (the constant feature, so
        // ablations keep it like the constant direction of the other bases), then the neurons
        // by decreasing E[f_i^2].
        let second = moments.gram(false);
        let mut order: Vec<usize> = (0..d_orig.saturating_sub(1)).collect();
        order.sort_by(|&a, &b| second[(b, b)].total_cmp(&second[(a, a)]));
        order.insert(0, d_orig - 1);
        let c = Mat::from_fn(d_orig, d_orig, |i, j| if order[j] == i { 1.0 } else { 0.0 });
        basis.c_pinv = Some(c.transpose().to_owned());
        basis.c = Some(c);
        basis.lambda = order.iter().map(|&i| second[(i, i)]).collect();
        basis.has_constant = !is_output;
        return Ok(Some(basis));
    }
    let p = pca(&gram, center, ln_var, cfg.tau)?;
    let mu = center.then_some(mean.as_slice());
    let (w, w_pinv) = centre(&p.u, mu);
    basis.n_masked = p.n_masked;
    basis.has_constant = center;
    if formula == BasisFormula::Svd {
        basis.c = Some(w.clone());
        basis.c_pinv = Some(w_pinv.clone());
        basis.lambda = p.d.clone();
        basis.w = Some(w);
        basis.w_pinv = Some(w_pinv);
        return Ok(Some(basis));
    }
    // Whitening: R = W D^-1/2, R_pinv = D^1/2 W_pinv.
    let k = p.d.len();
    let r = Mat::from_fn(d_orig, k, |i, j| w[(i, j)] / p.d[j].sqrt());
    let r_pinv = Mat::from_fn(k, d_orig, |i, j| w_pinv[(i, j)] * p.d[i].sqrt());
    let next = next.expect("a non-final node layer has a next layer");
    let q = next
        .c
        .clone()
        .unwrap_or_else(|| Mat::identity(next.d_orig, next.d_orig));
    let Some(metric) = metric(&q, formula)? else {
        return Ok(None);
    };
    let m = mm(
        mm(r_pinv.as_ref(), metric.m.as_ref()).as_ref(),
        r_pinv.transpose(),
    );
    let (mut lambda, v) = eigh_masked(m.as_ref(), p.n_masked)?;
    if let Some(lp) = &metric.lambda_prime {
        // Legacy formulas: Lambda = |diag(V^T R_pinv Lambda' R V)|.
        let t = mm(
            mm(mm(v.transpose(), r_pinv.as_ref()).as_ref(), lp.as_ref()).as_ref(),
            mm(r.as_ref(), v.as_ref()).as_ref(),
        );
        lambda = (0..k).map(|i| t[(i, i)].abs()).collect();
    }
    // Truncation 2, then sort the unmasked directions by Lambda, descending.
    let n_masked = (0..p.n_masked).filter(|&i| lambda[i] >= cfg.tau).count();
    let mut order: Vec<usize> = (0..p.n_masked).filter(|&i| lambda[i] >= cfg.tau).collect();
    let mut rest: Vec<usize> = (p.n_masked..k).filter(|&i| lambda[i] >= cfg.tau).collect();
    rest.sort_by(|&a, &b| lambda[b].total_cmp(&lambda[a]));
    order.extend(rest);
    let v = select_cols(v.as_ref(), &order);
    let lambda: Vec<f64> = order.iter().map(|&i| lambda[i]).collect();
    // C = R V L, C_pinv = L^-1 V^T R_pinv.
    let rv = mm(r.as_ref(), v.as_ref());
    let c = Mat::from_fn(d_orig, order.len(), |i, j| rv[(i, j)] * lambda[j].sqrt());
    let vtr = mm(v.transpose(), r_pinv.as_ref());
    let c_pinv = Mat::from_fn(order.len(), d_orig, |i, j| vtr[(i, j)] / lambda[i].sqrt());
    basis.has_constant = center && order.first() == Some(&0);
    basis.n_masked = n_masked;
    basis.c = Some(c);
    basis.c_pinv = Some(c_pinv);
    basis.w = Some(w);
    basis.w_pinv = Some(w_pinv);
    basis.v = Some(v);
    basis.lambda = lambda;
    Ok(Some(basis))
}

/// Node layers whose coordinate 0 is the layer-norm variance channel.
pub fn is_ln_out(name: &str) -> bool {
    name.starts_with("ln1_out.") || name.starts_with("ln2_out.") || name == "ln_final_out"
}

/// `M'` (and, for the legacy formulas, `Lambda' = E[g^T f]`), in original coordinates.
pub struct Metric {
    pub m: Mat<f64>,
    pub lambda_prime: Option<Mat<f64>>,
}

/// `M'_{jj'} = 1/(N P_in) sum_x sum_{t,i} sum_s g_{t,i,s,j} g_{t,i,s,j'}` with
/// `g = sum_p w_p d fhat^{l+1}_{t,i}(a_p f) / d(a_p f)_{s,j}` and `fhat^{l+1} = F(.) Q`
/// (method.md section 4.6). Sections with analytic structure skip the per-output products
/// (section 11): a linear section needs no data at all, `act(x W1) W2` needs only `E[d d^T]`.
#[allow(clippy::too_many_arguments)]
pub fn jacobian_metric(
    model: &Model,
    data: &dyn Dataset,
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    q: &Mat<f64>,
    points: &[(f64, f64)],
    formula: BasisFormula,
) -> anyhow::Result<Metric> {
    let (from, to) = (layers[l].index, layers[l + 1].index);
    let label = format!("metric {}", layers[l].name);
    let m = match metric_method(model, cfg, from, to, formula) {
        MetricMethod::Attention(att) => {
            att.metric(model, data, from, q, points, cfg.batch_size, &label)
        }
        MetricMethod::Linear(w) => {
            // g = W Q at every position: M' = W Q Q^T W^T (the weights sum to 1).
            let wq = mm(w.as_ref(), q.as_ref());
            mm(wq.as_ref(), wq.transpose())
        }
        MetricMethod::Dense { w1, act, w2 } => {
            // M' = W1 ((Q' Q'^T) o E[dbar dbar^T]) W1^T with Q' = W2 Q and
            // dbar = sum_p w_p act'(a_p f W1).
            let k = w1.ncols();
            let mut dd = fold(
                data,
                cfg.batch_size,
                &label,
                || (Mat::<f64>::zeros(k, k), 0.0f64),
                |acc, _, range| {
                    let f = activations_at(model, data, from, range);
                    let z = mm(f.data.as_ref(), w1.as_ref());
                    let dbar = act.integrated_derivative(&z, points);
                    gram_add_lower(&mut acc.0, dbar.as_ref(), 1.0);
                    acc.1 += f.rows() as f64;
                },
                |a, b| (a.0 + b.0, a.1 + b.1),
            );
            let qp = mm(w2.as_ref(), q.as_ref());
            let qq = mm(qp.as_ref(), qp.transpose());
            fill_upper(&mut dd.0);
            let inner = Mat::from_fn(k, k, |i, j| qq[(i, j)] * dd.0[(i, j)] / dd.1);
            mm(mm(w1.as_ref(), inner.as_ref()).as_ref(), w1.transpose())
        }
        MetricMethod::Vjp => return vjp_metric(model, data, cfg, layers, l, q, points, formula),
    };
    Ok(Metric {
        m,
        lambda_prime: None,
    })
}

/// How `M'` of the section `from -> to` is computed (method.md sections 4.6 and 11): the one
/// recogniser behind [`jacobian_metric`] and `ibasis plan`'s [`metric_path`].
pub(crate) enum MetricMethod<'a> {
    /// Closed form of a single-query attention section.
    Attention(AttentionSection<'a>),
    /// `x W`: `M' = W Q Q^T W^T`, no data.
    Linear(Mat<f64>),
    /// `act(x W1) W2`: from `E[d d^T]` of the hidden units.
    Dense {
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
    },
    /// The general path: batched VJPs, one cotangent per output direction or sign vector.
    Vjp,
}

/// Recognises the section `from -> to` for basis formula `formula` (the closed forms hold for
/// the exact `jacobian` formula; sign sources and the legacy formulas take the VJPs).
pub(crate) fn metric_method<'a>(
    model: &'a Model,
    cfg: &LibConfig,
    from: usize,
    to: usize,
    formula: BasisFormula,
) -> MetricMethod<'a> {
    let stochastic =
        cfg.n_stochastic_sources_pos.is_some() || cfg.n_stochastic_sources_hidden.is_some();
    if formula != BasisFormula::Jacobian || stochastic {
        return MetricMethod::Vjp;
    }
    let modules = &model.modules[from..to];
    if let Some(att) = attention_section(modules) {
        return MetricMethod::Attention(att);
    }
    match classify(modules) {
        Shape::Linear(w) => MetricMethod::Linear(w),
        Shape::Dense { w1, act, w2 } => MetricMethod::Dense { w1, act, w2 },
        Shape::Gated { .. } | Shape::General => MetricMethod::Vjp,
    }
}

/// How [`jacobian_metric`] computes `M'` for `layers[l]` when the next layer keeps `n_lib`
/// directions (for `ibasis plan`).
pub fn metric_path(
    model: &Model,
    data: &dyn Dataset,
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    n_lib: usize,
) -> String {
    let (from, to) = (layers[l].index, layers[l + 1].index);
    match metric_method(model, cfg, from, to, cfg.basis_formula) {
        MetricMethod::Attention(_) => "closed form, single-query attention".into(),
        MetricMethod::Linear(_) => "closed form, linear section (no data)".into(),
        MetricMethod::Dense { .. } => "closed form, E[d d^T] of act(x W1) W2".into(),
        MetricMethod::Vjp => {
            let pos_out = model
                .section(from, to)
                .out_pos(data_positions(model, data, from));
            let r = cotangents_per_sample(cfg, cfg.basis_formula, pos_out, n_lib);
            format!("VJP, {r} cotangents per sample")
        }
    }
}

/// Cotangents per sample of [`vjp_metric`]: one per output direction `(t, i)`, or per sign
/// vector with stochastic sources (method.md section 7); one for the legacy formulas.
fn cotangents_per_sample(
    cfg: &LibConfig,
    formula: BasisFormula,
    pos_out: usize,
    n_lib: usize,
) -> usize {
    if matches!(
        formula,
        BasisFormula::OneZeroAlpha | BasisFormula::OneMinusAlphaSquared
    ) {
        return 1;
    }
    match (
        cfg.n_stochastic_sources_pos,
        cfg.n_stochastic_sources_hidden,
    ) {
        (None, None) => pos_out * n_lib,
        (Some(p), None) => p * n_lib,
        (None, Some(h)) => h * pos_out,
        (Some(p), Some(h)) => p * h,
    }
}

/// The general path: batched VJPs through the section, one cotangent per output direction
/// (or per sign vector with stochastic sources, method.md section 7), summed over the
/// integration points, then the Gram matrix of the pulled-back rows.
#[allow(clippy::too_many_arguments)]
fn vjp_metric(
    model: &Model,
    data: &dyn Dataset,
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    q: &Mat<f64>,
    points: &[(f64, f64)],
    formula: BasisFormula,
) -> anyhow::Result<Metric> {
    let (from, to) = (layers[l].index, layers[l + 1].index);
    let section = model.section(from, to);
    let d_in = model.node_features(from);
    let d_out = q.nrows();
    let n_lib = q.ncols();
    let pos_in = data_positions(model, data, from);
    let pos_out = section.out_pos(pos_in);
    let legacy = matches!(
        formula,
        BasisFormula::OneZeroAlpha | BasisFormula::OneMinusAlphaSquared
    );
    let (n_pos, n_hidden) = (
        cfg.n_stochastic_sources_pos,
        cfg.n_stochastic_sources_hidden,
    );
    let r = cotangents_per_sample(cfg, formula, pos_out, n_lib);
    if r == 0 {
        bail!("zero stochastic sources requested");
    }
    // Keep each batch's pulled-back rows near CHUNK_NUMBERS numbers.
    let budget = super::CHUNK_NUMBERS / (r * pos_in.max(pos_out) * d_in.max(d_out)).max(1);
    let batch = budget.clamp(1, cfg.batch_size);
    let seed = cfg.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(l as u64 + 1));
    let qt = q.transpose().to_owned();
    let label = format!("metric {}", layers[l].name);
    // Exact cotangents are the same for every sample: pull them back through the section's
    // fixed linear suffix once (for one sample) and tile them over each batch's samples.
    let exact = !legacy && n_pos.is_none() && n_hidden.is_none();
    let split = section.modules.len() - section.fixed_linear_suffix();
    let (head, tail) = section.split_at(split);
    let pulled = exact.then(|| {
        let one = cotangents(&qt, 1, pos_out, None, None, (seed, 0));
        tail.vjp(&Section::no_caches(tail.modules.len()), &one)
    });
    let (mut m, lp, count) = fold(
        data,
        batch,
        &label,
        || {
            (
                Mat::<f64>::zeros(d_in, d_in),
                Mat::<f64>::zeros(d_in, d_in),
                0.0f64,
            )
        },
        |acc, _, range| {
            let first = data.first_sample() + range.start;
            let f = activations_at(model, data, from, range);
            let n = f.n;
            let fixed_cot = (!legacy && !exact)
                .then(|| cotangents(&qt, n, pos_out, n_pos, n_hidden, (seed, first)));
            let tiled = pulled.as_ref().map(|p| tile(p, n));
            let y_hat = legacy.then(|| {
                let y = model.run(f.clone(), from, to);
                mm(y.data.as_ref(), q.as_ref())
            });
            let mut g = Mat::<f64>::zeros(n * r * pos_in, d_in);
            for &(a, w) in points {
                let x = Batch::new(
                    n,
                    1,
                    pos_in,
                    Mat::from_fn(f.rows(), d_in, |i, j| a * f.data[(i, j)]),
                );
                let (y, caches) = section.forward(&x);
                if let Some(t) = &tiled {
                    let gp = head.vjp(&caches[..split], t);
                    g += faer::Scale(w) * &gp.data;
                    continue;
                }
                let cot = match (&fixed_cot, &y_hat, formula) {
                    (Some(cot), _, _) => cot.clone(),
                    (None, Some(yh), BasisFormula::OneZeroAlpha) => {
                        Batch::new(n, 1, pos_out, mm(yh.as_ref(), qt.as_ref()))
                    }
                    (None, Some(yh), _) => {
                        let fh = mm(y.data.as_ref(), q.as_ref());
                        let diff = Mat::from_fn(fh.nrows(), fh.ncols(), |i, j| {
                            2.0 * (yh[(i, j)] - fh[(i, j)])
                        });
                        Batch::new(n, 1, pos_out, mm(diff.as_ref(), qt.as_ref()))
                    }
                    _ => unreachable!(),
                };
                let gp = section.vjp(&caches, &cot);
                g += faer::Scale(w) * &gp.data;
            }
            gram_add_lower(&mut acc.0, g.as_ref(), 1.0);
            if legacy {
                acc.1 += mm_tn(g.as_ref(), f.data.as_ref());
            }
            acc.2 += f.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2),
    );
    fill_upper(&mut m);
    let scale = count * n_pos.unwrap_or(1) as f64 * n_hidden.unwrap_or(1) as f64;
    Ok(Metric {
        m: m * faer::Scale(1.0 / scale),
        lambda_prime: legacy.then(|| lp * faer::Scale(1.0 / count)),
    })
}

/// The one-sample batch `b` repeated for `n` samples (rows `(x, v, s)` are `x`-major).
fn tile(b: &Batch, n: usize) -> Batch {
    let rows = b.rows();
    let mut data = Mat::zeros(n * rows, b.features());
    for j in 0..b.features() {
        let src = b.data.col_as_slice(j);
        for dst in data.col_as_slice_mut(j).chunks_exact_mut(rows) {
            dst.copy_from_slice(src);
        }
    }
    Batch::new(n, b.r, b.pos, data)
}

/// Cotangents on the section output for `n` samples: rows `(x, v, t)`, one per output
/// direction `(t, i)` (exact), or sign-vector combinations of them (method.md section 7).
/// `qt` is `Q^T`, one row per LIB feature of the next layer; the signs of sample `x` come from
/// [`sample_rng`] of `(seed, first + x)`.
fn cotangents(
    qt: &Mat<f64>,
    n: usize,
    pos: usize,
    n_pos: Option<usize>,
    n_hidden: Option<usize>,
    (seed, first): (u64, usize),
) -> Batch {
    let (n_lib, d) = (qt.nrows(), qt.ncols());
    let rng = |x: usize| sample_rng(seed, first + x);
    let sign = |rng: &mut ChaCha8Rng| if rng.random::<bool>() { 1.0 } else { -1.0 };
    match (n_pos, n_hidden) {
        (None, None) => {
            let r = pos * n_lib;
            let mut data = Mat::zeros(n * r * pos, d);
            for x in 0..n {
                for t in 0..pos {
                    for i in 0..n_lib {
                        let row = (x * r + t * n_lib + i) * pos + t;
                        data.row_mut(row).copy_from(qt.row(i));
                    }
                }
            }
            Batch::new(n, r, pos, data)
        }
        (Some(np), None) => {
            let r = np * n_lib;
            let mut data = Mat::zeros(n * r * pos, d);
            for x in 0..n {
                let mut rng = rng(x);
                for v in 0..r {
                    let i = v % n_lib;
                    for t in 0..pos {
                        let s = sign(&mut rng);
                        let row = (x * r + v) * pos + t;
                        for j in 0..d {
                            data[(row, j)] = s * qt[(i, j)];
                        }
                    }
                }
            }
            Batch::new(n, r, pos, data)
        }
        (np, Some(nh)) => {
            // Hidden sources: a signed sum over features, at one position (or at all, with signs
            // over positions too when both kinds are requested): the rows are S Q^T for a sign
            // matrix S (zero rows where the vector is at another position), one GEMM.
            let r = np.map(|p| p * nh).unwrap_or(nh * pos);
            let mut signs = Mat::zeros(n * r * pos, n_lib);
            for x in 0..n {
                let mut rng = rng(x);
                for v in 0..r {
                    for t in 0..pos {
                        if np.is_none() && v % pos != t {
                            continue;
                        }
                        let row = (x * r + v) * pos + t;
                        for i in 0..n_lib {
                            signs[(row, i)] = sign(&mut rng);
                        }
                    }
                }
            }
            Batch::new(n, r, pos, mm(signs.as_ref(), qt.as_ref()))
        }
    }
}
