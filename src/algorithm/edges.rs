//! Edges between the features of adjacent node layers (method.md section 5).
//!
//! With `module_hat(fhat) = F(fhat C_pinv^l) C^{l+1}` and `fhat = f C^l`, the squared edge
//! `E_ij = 1/(N P_in) sum_x sum_t [ sum_s fhat_{s,j} sum_p w_p d module_hat_{t,i}(a_p fhat) / d(a_p fhat)_{s,j} ]^2`.
//! The bracket is a Jacobian-vector product with tangent `fhat_{., j} e_j` (section 11): one
//! batched JVP per input feature gives every output feature and position at once.

use super::attention::{attention_section, AttentionSection};
use super::pass::data_positions;
use super::pass::{activations_at, fold, sample_rng};
use super::section::{
    classify, norm_attention, norm_mlp, NormAttention, NormPrefix, PartialAct, Shape,
};
use super::{ComputeDtype, EdgeFormula, LibConfig, NodeBasis, NodeLayer};
use crate::data::Dataset;
use crate::models::transformer::attention::Tangents;
use crate::models::{Activation, Model, Module, Section, Structure};
use crate::tensor::linalg::{cast, gemm, gemm_f32, gemm_in, mm, Real};
use crate::tensor::simd::add_squared_product;
use crate::tensor::Batch;
use faer::{Mat, MatRef};
use rand::Rng;

/// Numbers in one block of tangents pushed through a section together (32 MB of f64).
const TANGENT_NUMBERS: usize = 1 << 22;

/// Edges `(d_lib[l + 1], d_lib[l])` between `layers[l]` and `layers[l + 1]`, accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn edges(
    model: &Model,
    data: &dyn Dataset,
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    basis_in: &NodeBasis,
    basis_out: &NodeBasis,
    points: &[(f64, f64)],
) -> anyhow::Result<Mat<f64>> {
    let (from, to) = (layers[l].index, layers[l + 1].index);
    let d_in = basis_in.d_orig;
    let ctx = EdgeSection {
        model,
        data,
        cfg,
        l,
        from,
        to,
        name: &layers[l].name,
        c: basis_in
            .c
            .clone()
            .unwrap_or_else(|| Mat::identity(d_in, d_in)),
        c_pinv: basis_in
            .c_pinv
            .clone()
            .unwrap_or_else(|| Mat::identity(d_in, d_in)),
        q: basis_out
            .c
            .clone()
            .unwrap_or_else(|| Mat::identity(basis_out.d_orig, basis_out.d_orig)),
        points,
    };
    Ok(match edge_method(model, cfg, from, to, ctx.q.ncols()) {
        EdgeMethod::Attention(att) => att.edges(
            model,
            data,
            from,
            &ctx.c,
            &ctx.c_pinv,
            &ctx.q,
            points,
            cfg.batch_size,
            &ctx.label(),
        ),
        EdgeMethod::Norm(norm) => norm_edges(&ctx, norm),
        EdgeMethod::Linear(w) => linear_edges(&ctx, &w),
        EdgeMethod::Pairs { w1, act, w2 } => dense_edges(&ctx, &w1, act, &w2),
        EdgeMethod::PerRow { w1, act, w2, gated } => per_row_edges(&ctx, &w1, act, &w2, gated),
        EdgeMethod::NormPerRow {
            norm,
            w1,
            act,
            w2,
            gated,
        } => norm_mlp_edges(&ctx, norm, &w1, act, &w2, gated),
        EdgeMethod::NormAttention(na) => norm_attention_edges(&ctx, &na),
        EdgeMethod::Jvp => jvp_edges(&ctx),
    })
}

/// One section's edge computation: the section `from -> to` (node layers `l` and `l + 1`),
/// the data and settings, and the bases either side: `c` / `c_pinv` of the input node layer
/// (identities where it has none) and `q`, the output node layer's `C`.
pub(crate) struct EdgeSection<'a> {
    model: &'a Model,
    data: &'a dyn Dataset,
    cfg: &'a LibConfig,
    l: usize,
    from: usize,
    to: usize,
    name: &'a str,
    c: Mat<f64>,
    c_pinv: Mat<f64>,
    q: Mat<f64>,
    points: &'a [(f64, f64)],
}

impl EdgeSection<'_> {
    /// The progress bar's label.
    fn label(&self) -> String {
        format!("edges from {}", self.name)
    }

    /// Activations at the input node layer of samples `range`.
    fn activations(&self, range: std::ops::Range<usize>) -> Batch {
        activations_at(self.model, self.data, self.from, range)
    }
}

/// How the edges of the section `from -> to` are computed (method.md sections 5 and 11): the
/// one recogniser behind [`edges`] and `ibasis plan`'s [`edge_path`].
pub(crate) enum EdgeMethod<'a> {
    /// Closed form of a single-query attention section (squared edges).
    Attention(AttentionSection<'a>),
    /// Closed form of a layer-norm half (squared edges).
    Norm(Norm),
    /// `x W`: no JVP.
    Linear(Mat<f64>),
    /// `act(x W1) W2` with few hidden units: pair statistics in one GEMM.
    Pairs {
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
    },
    /// `act(x W1) W2` with many hidden units, or a gated unit (SwiGLU): the Jacobian of each
    /// row (sample and position) as one product over the hidden units (over the active ones
    /// only for a ReLU).
    PerRow {
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
        gated: bool,
    },
    /// A norm, then `act(y W1) W2` or a gated unit: per-row Jacobians through the norm's
    /// rank-one structure.
    NormPerRow {
        norm: NormPrefix,
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
        gated: bool,
    },
    /// A norm, the q/k/v projection, causal attention over every query, then fixed linear
    /// maps: tangents built through the norm's rank-one form, `W_O'` folded into the next
    /// basis.
    NormAttention(NormAttention<'a>),
    /// The general path: one JVP per input feature.
    Jvp,
}

/// Recognises the section `from -> to` whose output keeps `n_out` directions.
pub(crate) fn edge_method<'a>(
    model: &'a Model,
    cfg: &LibConfig,
    from: usize,
    to: usize,
    n_out: usize,
) -> EdgeMethod<'a> {
    let modules = &model.modules[from..to];
    if cfg.edge_formula == EdgeFormula::Squared {
        if let Some(att) = attention_section(modules) {
            return EdgeMethod::Attention(att);
        }
        if let Some(norm) = norm_section(modules) {
            return EdgeMethod::Norm(norm);
        }
        match norm_mlp(modules) {
            Some((norm, Shape::Dense { w1, act, w2 })) => {
                return EdgeMethod::NormPerRow {
                    norm,
                    w1,
                    act,
                    w2,
                    gated: false,
                }
            }
            Some((norm, Shape::Gated { w1, act, w2 })) => {
                return EdgeMethod::NormPerRow {
                    norm,
                    w1,
                    act,
                    w2,
                    gated: true,
                }
            }
            _ => {}
        }
        if let Some(na) = norm_attention(modules) {
            return EdgeMethod::NormAttention(na);
        }
    }
    if !matches!(
        cfg.edge_formula,
        EdgeFormula::Squared | EdgeFormula::Stochastic
    ) {
        return EdgeMethod::Jvp;
    }
    match classify(modules) {
        Shape::Linear(w) => EdgeMethod::Linear(w),
        // The pair statistics cost K(K+1)/2 per input feature and sample in one GEMM, a JVP
        // K * d_out in several passes plus building the tangents: measured, the pairs win up to
        // K ~ 4 d_out (MNIST's layers.1 -> layers.2: K = 101, d_out = 28); a wide MLP beside
        // the residual stream (K = 642, d_out = 110) goes by JVP.
        Shape::Dense { w1, act, w2 } if w1.ncols() < 4 * n_out => EdgeMethod::Pairs { w1, act, w2 },
        // Per row (sample and position) the Jacobian is `F0 + A diag(dbar) B` (method.md
        // section 11): `2 n_in K n_out` FLOPs in one GEMM, against `2 n_in (K + carried)
        // n_out` and a pass through the modules for the JVPs; a ReLU needs only its active
        // units.
        // Per-row products give the exact squared sum; stochastic edges estimate it with
        // sign vectors over positions, as the reference does, through the JVPs (but for a
        // ReLU, whose per-row path they have always taken).
        Shape::Dense { act, .. } | Shape::Gated { act, .. }
            if cfg.edge_formula == EdgeFormula::Stochastic && act.act != Activation::Relu =>
        {
            EdgeMethod::Jvp
        }
        Shape::Gated { .. } if cfg.edge_formula == EdgeFormula::Stochastic => EdgeMethod::Jvp,
        Shape::Dense { w1, act, w2 } => EdgeMethod::PerRow {
            w1,
            act,
            w2,
            gated: false,
        },
        Shape::Gated { w1, act, w2 } => EdgeMethod::PerRow {
            w1,
            act,
            w2,
            gated: true,
        },
        Shape::General => EdgeMethod::Jvp,
    }
}

/// How [`edges`] computes the edges `layers[l] -> layers[l + 1]` with `n_in` and `n_out`
/// directions kept (for `ibasis plan`).
pub fn edge_path(
    model: &Model,
    cfg: &LibConfig,
    layers: &[NodeLayer],
    l: usize,
    n_in: usize,
    n_out: usize,
) -> String {
    let (from, to) = (layers[l].index, layers[l + 1].index);
    match edge_method(model, cfg, from, to, n_out) {
        EdgeMethod::Attention(_) => "closed form, single-query attention".into(),
        EdgeMethod::Norm(_) => "closed form, layer-norm section".into(),
        EdgeMethod::Linear(_) => "closed form, linear section".into(),
        EdgeMethod::Pairs { .. } => "closed form, pair statistics".into(),
        EdgeMethod::PerRow { act, gated, .. } => {
            let what = match (gated, act.act) {
                (true, _) => "gated units",
                (false, Activation::Relu) => "active ReLU units",
                (false, _) => "hidden units",
            };
            format!("per-row Jacobian products over the {what}, {n_in} features")
        }
        EdgeMethod::NormPerRow { gated, .. } => {
            let what = if gated { "gated" } else { "dense" };
            format!("per-row Jacobian products through the norm's rank-one form, {what} MLP, {n_in} features")
        }
        EdgeMethod::NormAttention(_) => {
            format!("attention JVP of {n_in} tangents per sample through the norm's rank-one form")
        }
        EdgeMethod::Jvp => format!("JVP, {n_in} tangents per sample"),
    }
}

/// The half of a layer norm a section consists of (identities aside), if that is all it is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Norm {
    Var {
        carried: usize,
        width: usize,
        centre: bool,
    },
    Out {
        carried: usize,
        width: usize,
        centre: bool,
        eps: f64,
        keep_resid: bool,
    },
}

fn norm_section(modules: &[Box<dyn Module>]) -> Option<Norm> {
    let mut active = modules.iter().filter(|m| !m.is_identity());
    let m = active.next()?;
    if active.next().is_some() {
        return None;
    }
    match m.structure() {
        Structure::NormVar {
            carried,
            width,
            centre,
        } => Some(Norm::Var {
            carried,
            width,
            centre,
        }),
        Structure::NormOut {
            carried,
            width,
            centre,
            eps,
            keep_resid,
        } => Some(Norm::Out {
            carried,
            width,
            centre,
            eps,
            keep_resid,
        }),
        _ => None,
    }
}

/// Squared edges of a layer-norm half in closed form (method.md section 11: the Jacobian per
/// position is a fixed map plus per-position scalars and a rank-one term, so the JVP per input
/// feature, and its projection onto the next basis, is never formed).
///
/// With `T_t = C_pinv J_t Q` (`n_in x n_out`) at position row `t`, `E_ij = 1/rows sum_t
/// fhat_tj^2 Tbar_t[j, i]^2`, `Tbar_t = sum_p w_p T_t(a_p fhat C_pinv)`:
///
/// - `lnX`, `(c, x) -> (var, c, x)`: `J_t = P + g_t e_var^T` (`P` passes every input on,
///   `g_t = 2 c_t / D` on the non-bias residual, `c_t` centred or raw), and `g` is linear in
///   the input, so `Tbar_t = A + kappa u_t w^T` with `A = C_pinv P Q`, `u_t = C_pinv g_t`,
///   `w = Q[var, :]`, `kappa = sum_p w_p a_p`.
/// - `lnX_out`, `(var, c, x) -> (y, c, x)`: `J_t = sigma_t K + P + e_var (beta_t c_t^T) E_y`
///   (`K` the centring map `I - 11^T / D` (or `I`) from `x` to `y`, `P` the bias and
///   pass-through), so `Tbar_t = s_t A1 + A0 + u vbar_t^T` with `A1 = C_pinv K Q`,
///   `A0 = C_pinv P Q`, `u = C_pinv[:, var]`, `s_t = sum_p w_p sigma(a_p var_t)`,
///   `vbar_t = (sum_p w_p a_p beta(a_p var_t)) Q_y^T c_t`.
///
/// Squaring and summing over `t` leaves per-feature sums and three `n_in x n_out` GEMMs.
fn norm_edges(ctx: &EdgeSection, norm: Norm) -> Mat<f64> {
    let (data, cfg) = (ctx.data, ctx.cfg);
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let (d_in, n_in, n_out) = (c.nrows(), c.ncols(), q.ncols());
    let kappa: f64 = points.iter().map(|&(a, w)| a * w).sum();
    // Columns of the residual's non-bias coordinates in the input, and of `y` in the output.
    let (x0, width) = match norm {
        Norm::Var { carried, width, .. } => (carried, width),
        Norm::Out { carried, width, .. } => (1 + carried, width),
    };
    let d = width - 1;
    let centre = match norm {
        Norm::Var { centre, .. } | Norm::Out { centre, .. } => centre,
    };
    // The pass-through map P (d_in x d_out) and, for lnX_out, the centring map K.
    let d_out = q.nrows();
    let mut pass = Mat::<f64>::zeros(d_in, d_out);
    let mut k_map = Mat::<f64>::zeros(d_in, d_out);
    match norm {
        Norm::Var { .. } => {
            for i in 0..d_in {
                pass[(i, 1 + i)] = 1.0;
            }
        }
        Norm::Out {
            carried,
            keep_resid,
            ..
        } => {
            pass[(x0 + d, d)] = 1.0;
            if keep_resid {
                for i in 0..carried + width {
                    pass[(1 + i, width + i)] = 1.0;
                }
            }
            let m = if centre { 1.0 / d as f64 } else { 0.0 };
            for i in 0..d {
                for j in 0..d {
                    k_map[(x0 + i, j)] = if i == j { 1.0 - m } else { -m };
                }
            }
        }
    }
    let a0 = mm(mm(c_pinv.as_ref(), pass.as_ref()).as_ref(), q.as_ref());
    let a1 = mm(mm(c_pinv.as_ref(), k_map.as_ref()).as_ref(), q.as_ref());
    // Var: w = Q[0, :]; Out: u = C_pinv[:, 0], Q_y = Q[0..d, :].
    let w_var: Vec<f64> = (0..n_out).map(|i| q[(0, i)]).collect();
    let u_var: Vec<f64> = (0..n_in).map(|j| c_pinv[(j, 0)]).collect();
    let c_pinv_x = c_pinv.subcols(x0, d).transpose().to_owned();
    let q_y = q.subrows(0, d).to_owned();

    // Per feature j: sums over rows of fhat^2 (s0), and for lnX of fhat^2 u (s1), fhat^2 u^2
    // (s2); for lnX_out of fhat^2 s (s1), fhat^2 s^2 (s2), and the GEMMs G0 = F2^T vbar,
    // G1 = (F2 s)^T vbar, G2 = F2^T vbar^2.
    type Acc = (Vec<f64>, Vec<f64>, Vec<f64>, [Mat<f64>; 3], f64);
    let init = || -> Acc {
        (
            vec![0.0; n_in],
            vec![0.0; n_in],
            vec![0.0; n_in],
            std::array::from_fn(|_| Mat::zeros(n_in, n_out)),
            0.0,
        )
    };
    let acc = fold(
        data,
        cfg.batch_size,
        &ctx.label(),
        init,
        |acc, _, range| {
            let f = ctx.activations(range);
            let rows = f.rows();
            let fhat = mm(f.data.as_ref(), c.as_ref());
            let proj = mm(fhat.as_ref(), c_pinv.as_ref());
            let f2 = squared(&fhat);
            // Centred (or raw) non-bias residual coordinates of the evaluation point.
            let mut cx = proj.subcols(x0, d).to_owned();
            if centre {
                for r in 0..rows {
                    let m = (0..d).map(|i| cx[(r, i)]).sum::<f64>() / d as f64;
                    for i in 0..d {
                        cx[(r, i)] -= m;
                    }
                }
            }
            match norm {
                Norm::Var { .. } => {
                    // u_t = C_pinv g_t with g_t = 2 c_t / D.
                    let u = mm(cx.as_ref(), c_pinv_x.as_ref()) * faer::Scale(2.0 / d as f64);
                    for j in 0..n_in {
                        let (fj, uj) = (f2.col_as_slice(j), u.col_as_slice(j));
                        for (fv, uv) in fj.iter().zip(uj) {
                            acc.0[j] += fv;
                            acc.1[j] += fv * uv;
                            acc.2[j] += fv * uv * uv;
                        }
                    }
                }
                Norm::Out { eps, .. } => {
                    let var = proj.col_as_slice(0);
                    let (mut s, mut b) = (vec![0.0; rows], vec![0.0; rows]);
                    for r in 0..rows {
                        for &(a, w) in points {
                            let v = a * var[r];
                            let sigma = 1.0 / (v.max(0.0) + eps).sqrt();
                            s[r] += w * sigma;
                            if v >= 0.0 {
                                b[r] += w * a * (-0.5 * sigma * sigma * sigma);
                            }
                        }
                    }
                    let mut vbar = mm(cx.as_ref(), q_y.as_ref());
                    for i in 0..n_out {
                        for (v, br) in vbar.col_as_slice_mut(i).iter_mut().zip(&b) {
                            *v *= br;
                        }
                    }
                    let mut f2s = f2.clone();
                    for j in 0..n_in {
                        let (fj, gj) = (f2.col_as_slice(j), f2s.col_as_slice_mut(j));
                        for ((fv, gv), sv) in fj.iter().zip(gj.iter_mut()).zip(&s) {
                            acc.0[j] += fv;
                            acc.1[j] += fv * sv;
                            acc.2[j] += fv * sv * sv;
                            *gv = fv * sv;
                        }
                    }
                    let vbar2 = Mat::from_fn(rows, n_out, |r, i| vbar[(r, i)] * vbar[(r, i)]);
                    let add = faer::Accum::Add;
                    gemm(acc.3[0].as_mut(), add, f2.transpose(), vbar.as_ref());
                    gemm(acc.3[1].as_mut(), add, f2s.transpose(), vbar.as_ref());
                    gemm(acc.3[2].as_mut(), add, f2.transpose(), vbar2.as_ref());
                }
            }
            acc.4 += rows as f64;
        },
        |mut a, b| {
            for k in 0..n_in {
                a.0[k] += b.0[k];
                a.1[k] += b.1[k];
                a.2[k] += b.2[k];
            }
            for (x, y) in a.3.iter_mut().zip(&b.3) {
                *x += y;
            }
            a.4 += b.4;
            a
        },
    );
    let (s0, s1, s2, g, rows) = acc;
    Mat::from_fn(n_out, n_in, |i, j| {
        let e = match norm {
            Norm::Var { .. } => {
                let (a, w) = (a0[(j, i)], kappa * w_var[i]);
                a * a * s0[j] + 2.0 * a * w * s1[j] + w * w * s2[j]
            }
            Norm::Out { .. } => {
                let (p, r, u) = (a1[(j, i)], a0[(j, i)], u_var[j]);
                p * p * s2[j]
                    + r * r * s0[j]
                    + 2.0 * p * r * s1[j]
                    + u * u * g[2][(j, i)]
                    + 2.0 * p * u * g[1][(j, i)]
                    + 2.0 * r * u * g[0][(j, i)]
            }
        };
        e / rows
    })
}

/// `fhat^2` entrywise: the weight of each row's edges (squared edges scale with `fhat_j^2`).
fn squared(fhat: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(fhat.nrows(), fhat.ncols(), |r, j| {
        fhat[(r, j)] * fhat[(r, j)]
    })
}

/// Sum over rows of `fhat^2`, per feature, and the row count.
fn feature_power(ctx: &EdgeSection) -> (Vec<f64>, f64) {
    let c = &ctx.c;
    fold(
        ctx.data,
        ctx.cfg.batch_size,
        &ctx.label(),
        || (vec![0.0; c.ncols()], 0.0),
        |acc, _, range| {
            let f = ctx.activations(range);
            let fhat = mm(f.data.as_ref(), c.as_ref());
            for j in 0..fhat.ncols() {
                acc.0[j] += fhat.col(j).iter().map(|v| v * v).sum::<f64>();
            }
            acc.1 += f.rows() as f64;
        },
        |mut a, b| {
            for (x, y) in a.0.iter_mut().zip(&b.0) {
                *x += y;
            }
            (a.0, a.1 + b.1)
        },
    )
}

/// A linear section has a constant Jacobian `T = C_pinv W Q`: `E_ij = E[fhat_j^2] T_ji^2`.
fn linear_edges(ctx: &EdgeSection, w: &Mat<f64>) -> Mat<f64> {
    let (c, c_pinv, q) = (&ctx.c, &ctx.c_pinv, &ctx.q);
    let t = mm(mm(c_pinv.as_ref(), w.as_ref()).as_ref(), q.as_ref());
    let (power, rows) = feature_power(ctx);
    Mat::from_fn(q.ncols(), c.ncols(), |i, j| {
        power[j] / rows * t[(j, i)] * t[(j, i)]
    })
}

/// `act(x W1) W2`: the bracket is `fhat_j sum_k A_jk dbar_k B_ki` with `A = C_pinv W1`,
/// `B = W2 Q`, `dbar = sum_p w_p act'(a_p z)`. Squaring and summing over samples,
/// `E_ij = sum_{k,k'} A_jk A_jk' B_ki B_k'i S_j[k,k']` with `S_j = E[fhat_j^2 dbar dbar^T]`,
/// accumulated as one GEMM per batch: half the FLOPs of a JVP per feature.
fn dense_edges(ctx: &EdgeSection, w1: &Mat<f64>, act: PartialAct, w2: &Mat<f64>) -> Mat<f64> {
    let (data, cfg) = (ctx.data, ctx.cfg);
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let k = w1.ncols();
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|a| (a..k).map(move |b| (a, b))).collect();
    let n_lib = c.ncols();
    // Evaluate at the projection fhat C_pinv of f onto the kept directions.
    let proj_w1 = mm(c_pinv.as_ref(), w1.as_ref());
    // Keep the pair-product matrix of a batch near 32 MB.
    let batch = (4_000_000 / pairs.len().max(1)).min(cfg.batch_size).max(1);
    let (s, rows) = fold(
        data,
        batch,
        &ctx.label(),
        || (Mat::<f64>::zeros(n_lib, pairs.len()), 0.0f64),
        |acc, _, range| {
            let f = ctx.activations(range);
            let fhat = mm(f.data.as_ref(), c.as_ref());
            let z = mm(fhat.as_ref(), proj_w1.as_ref());
            let dbar = act.integrated_derivative(&z, points);
            let mut p = Mat::<f64>::zeros(z.nrows(), pairs.len());
            for (m, &(k1, k2)) in pairs.iter().enumerate() {
                let (a, b) = (dbar.col_as_slice(k1), dbar.col_as_slice(k2));
                for ((out, x), y) in p.col_as_slice_mut(m).iter_mut().zip(a).zip(b) {
                    *out = x * y;
                }
            }
            let f2 = squared(&fhat);
            gemm(acc.0.as_mut(), faer::Accum::Add, f2.transpose(), p.as_ref());
            acc.1 += f.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    let a = proj_w1;
    let b = mm(w2.as_ref(), q.as_ref());
    let n_out = q.ncols();
    let mut e = Mat::zeros(n_out, n_lib);
    let mut x = Mat::zeros(k, k);
    for j in 0..n_lib {
        for (m, &(k1, k2)) in pairs.iter().enumerate() {
            let v = s[(j, m)] * a[(j, k1)] * a[(j, k2)] / rows;
            x[(k1, k2)] = v;
            x[(k2, k1)] = v;
        }
        let xb = mm(x.as_ref(), b.as_ref());
        for i in 0..n_out {
            e[(i, j)] = (0..k).map(|kk| b[(kk, i)] * xb[(kk, i)]).sum::<f64>();
        }
    }
    e
}

/// Squared edges of `act(x W1) W2` or a gated unit from each row's Jacobian (method.md
/// section 11). The section acts on each position alone, so per row (sample and position) the
/// bracket is `fhat_j Tbar_ji` with `Tbar = F0 + A_t B`, `F0 = A_L B_L` over the carried
/// features `L`, `B = W2 Q` over the hidden units, and
/// - `act(x W1)`: `A_t = A diag(dbar_t)`, `A = C_pinv W1`, `dbar = sum_p w_p act'(a_p z)`;
///   for a ReLU only the units with `dbar != 0` (or, when more than half are active and all
///   active ones equal `sum_p w_p`, the inactive ones subtracted from the full product);
/// - gated, `h = act(g) u`: `A_t = A_g diag(alpha_t) + A_u diag(beta_t)` with
///   `alpha = sum_p w_p act'(a_p g) a_p u` and `beta = sum_p w_p act(a_p g)`: the JVP
///   `dh = act'(g) u dg + act(g) du` summed over the integration points.
///
/// FLOPs per row: one `n_in x |S| x n_out` GEMM (`|S|` the units multiplied), against
/// `n_in (|S| + |L|) n_out` for the JVPs plus their pass through the modules. For SmolLM2's
/// `mlp_in -> ln1` (`n_in` 1153, 1536 units, `n_out` 577): 2.0 GFLOP per row, 16.7 TFLOP for
/// 64 x 128 tokens. `compute_dtype = "f32"` runs the GEMM in f32 and sums its squares in f64.
fn per_row_edges(
    ctx: &EdgeSection,
    w1: &Mat<f64>,
    act: PartialAct,
    w2: &Mat<f64>,
    gated: bool,
) -> Mat<f64> {
    match ctx.cfg.compute_dtype {
        ComputeDtype::F64 => per_row_edges_in::<f64>(ctx, w1, act, w2, gated),
        ComputeDtype::F32 => per_row_edges_in::<f32>(ctx, w1, act, w2, gated),
    }
}

fn per_row_edges_in<T: Real>(
    ctx: &EdgeSection,
    w1: &Mat<f64>,
    act: PartialAct,
    w2: &Mat<f64>,
    gated: bool,
) -> Mat<f64> {
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let (n_in, n_out) = (c.ncols(), q.ncols());
    // Units with a nonlinearity, and the columns of `W1` they read (gates and ups when gated).
    let width = act.width.min(w2.nrows());
    let pre = if gated { 2 * width } else { width };
    let a = mm(c_pinv.as_ref(), w1.as_ref());
    let bt = mm(w2.as_ref(), q.as_ref()).transpose().to_owned();
    let carried = w2.nrows() - width;
    let f0 = mm(
        a.subcols(pre, carried),
        bt.subcols(width, carried).transpose(),
    );
    let relu = !gated && act.act == Activation::Relu;
    // With every nonzero dbar equal (ReLU at positive integration points: dbar = sum_p w_p
    // on the active units), a row with more than half its units active is cheaper as
    // `wsum (A B)_act-part minus the inactive units`: `F1 = F0 + wsum A_act B_act`.
    let wsum: f64 = points.iter().map(|p| p.1).sum();
    let f1 = relu.then(|| {
        let mut f1 = f0.clone();
        gemm(
            f1.as_mut(),
            faer::Accum::Add,
            a.subcols(0, width),
            (bt.subcols(0, width) * faer::Scale(wsum)).transpose(),
        );
        cast::<T>(f1.as_ref())
    });
    let (a_t, bt_t, f0_t) = (
        cast::<T>(a.as_ref()),
        cast::<T>(bt.as_ref()),
        cast::<T>(f0.as_ref()),
    );
    let pos = data_positions(ctx.model, ctx.data, ctx.from);
    let batch = per_row_batch(ctx, pos);
    let (et, rows) = fold(
        ctx.data,
        batch,
        &ctx.label(),
        || (Mat::<f64>::zeros(n_in, n_out), 0.0f64),
        |acc, _, range| {
            let f = ctx.activations(range);
            let fhat = mm(f.data.as_ref(), c.as_ref());
            let z = mm(fhat.as_ref(), a.subcols(0, pre));
            // Per row, each unit's coefficient (gated: alpha for A_g, then beta for A_u).
            let coef = if gated {
                gated_coefficients(&z, act, points)
            } else {
                act.integrated_derivative(&z, points)
            };
            let coef_t = coef.transpose().to_owned();
            let fhat_t = fhat.transpose().to_owned();
            let mut a_s = Mat::<T>::zeros(n_in, width);
            let mut b_s = Mat::<T>::zeros(n_out, width);
            let mut h = Mat::<T>::zeros(n_in, n_out);
            let mut h64 = vec![0.0; n_in];
            for row in 0..fhat.nrows() {
                let d = coef_t.col_as_slice(row);
                let mut m = 0;
                let mut complement = false;
                if gated {
                    for unit in 0..width {
                        let (al, be) = (T::of(d[unit]), T::of(d[width + unit]));
                        let (ag, au) = (a_t.col(unit), a_t.col(width + unit));
                        let out = a_s.col_mut(unit);
                        for ((o, &g), &u) in out.iter_mut().zip(ag.iter()).zip(au.iter()) {
                            *o = al * g + be * u;
                        }
                    }
                    m = width;
                } else {
                    let active = d.iter().filter(|&&v| v != 0.0).count();
                    let uniform = d.iter().all(|&v| v == 0.0 || v == wsum);
                    // Units to multiply, each with its coefficient: the active ones (dbar), or
                    // the inactive ones (-wsum) from F1.
                    complement = relu && uniform && 2 * active > width;
                    for (unit, &dv) in d.iter().enumerate() {
                        let coef = match (complement, dv != 0.0) {
                            (false, true) => dv,
                            (true, false) => -wsum,
                            _ => continue,
                        };
                        let coef = T::of(coef);
                        let out = a_s.col_mut(m);
                        for (o, &v) in out.iter_mut().zip(a_t.col(unit).iter()) {
                            *o = coef * v;
                        }
                        b_s.col_mut(m).copy_from(bt_t.col(unit));
                        m += 1;
                    }
                }
                let b_units = if gated {
                    bt_t.subcols(0, width)
                } else {
                    b_s.subcols(0, m)
                };
                h.copy_from(match (&f1, complement) {
                    (Some(f1), true) => f1,
                    _ => &f0_t,
                });
                gemm_in(
                    h.as_mut(),
                    faer::Accum::Add,
                    a_s.subcols(0, m),
                    b_units.transpose(),
                );
                add_squared_row(&mut acc.0, &h, fhat_t.col_as_slice(row), &mut h64);
            }
            acc.1 += f.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    et.transpose().to_owned() * faer::Scale(1.0 / rows)
}

/// The tangent rows of a norm followed by a fixed linear map `W` (method.md section 9), in
/// the input basis: at a row evaluated at `a x`, `C_pinv J(a) W = G0 + sigma(a) G1 +
/// gamma(a) a^2 a_t b_t^T` (see [`norm_mlp_edges`]), with the fixed `G0 = C_pinv P0 W`,
/// `G1 = C_pinv K W`, and per row `a_t = C_pinv_x c_t`, `b_t = c_t^T W_y`.
struct NormTangents {
    norm: NormPrefix,
    g0: Mat<f64>,
    g1: Mat<f64>,
    /// `C_pinv_x^T` (`d x n_in`) and `W_y` (`d x cols`): `a_t` and `b_t` for a batch's rows.
    c_pinv_xt: Mat<f64>,
    w_y: Mat<f64>,
}

/// A batch's rows for [`NormTangents`]: the centred (or raw) residual `c_t` at `a = 1`, its
/// variance, and `a_t`, `b_t` as rows.
struct NormRows {
    cx: Mat<f64>,
    var: Vec<f64>,
    a: Mat<f64>,
    b: Mat<f64>,
}

impl NormTangents {
    fn new(norm: NormPrefix, c_pinv: &Mat<f64>, w: MatRef<'_, f64>) -> Self {
        let NormPrefix {
            carried,
            width: r,
            centre,
            ..
        } = norm;
        let (d, x0, cols) = (r - 1, carried, w.ncols());
        // P0 W: each input (c, x) feeds its pass-through row of W, the bias coordinate also y_D.
        let p0w = Mat::from_fn(carried + r, cols, |i, j| {
            let bias = if i == x0 + d { w[(d, j)] } else { 0.0 };
            w[(r + i, j)] + bias
        });
        // K W: x_i (i < D) feeds y_i minus the mean over y (centring).
        let mean_y: Vec<f64> = (0..cols)
            .map(|j| (0..d).map(|i| w[(i, j)]).sum::<f64>() / d as f64)
            .collect();
        let kw = Mat::from_fn(carried + r, cols, |i, j| {
            if i >= x0 && i < x0 + d {
                w[(i - x0, j)] - if centre { mean_y[j] } else { 0.0 }
            } else {
                0.0
            }
        });
        Self {
            norm,
            g0: mm(c_pinv.as_ref(), p0w.as_ref()),
            g1: mm(c_pinv.as_ref(), kw.as_ref()),
            c_pinv_xt: c_pinv.subcols(x0, d).transpose().to_owned(),
            w_y: w.subrows(0, d).to_owned(),
        }
    }

    /// The rows of a batch whose inputs, projected onto the basis, are `proj` (`b_t` on the
    /// first `cols` columns of `W`).
    fn rows(&self, proj: &Mat<f64>, cols: usize) -> NormRows {
        let (d, x0) = (self.norm.width - 1, self.norm.carried);
        let mut cx = proj.subcols(x0, d).to_owned();
        if self.norm.centre {
            for row in 0..cx.nrows() {
                let m = (0..d).map(|i| cx[(row, i)]).sum::<f64>() / d as f64;
                for i in 0..d {
                    cx[(row, i)] -= m;
                }
            }
        }
        let var = (0..cx.nrows())
            .map(|row| (0..d).map(|i| cx[(row, i)].powi(2)).sum::<f64>() / d as f64)
            .collect();
        NormRows {
            a: mm(cx.as_ref(), self.c_pinv_xt.as_ref()),
            b: mm(cx.as_ref(), self.w_y.subcols(0, cols)),
            cx,
            var,
        }
    }

    /// Per row at the point `a`: `sigma(a)` and the rank-one coefficient `gamma(a) a^2`.
    fn point(&self, var: &[f64], a: f64) -> (Vec<f64>, Vec<f64>) {
        let (d, eps) = ((self.norm.width - 1) as f64, self.norm.eps);
        let sigma: Vec<f64> = var
            .iter()
            .map(|&v| 1.0 / ((a * a * v).max(0.0) + eps).sqrt())
            .collect();
        let rank1 = sigma
            .iter()
            .zip(var)
            .map(|(&s, &v)| {
                let beta = if a * a * v < 0.0 {
                    0.0
                } else {
                    -0.5 * s * s * s
                };
                2.0 * beta / d * a * a
            })
            .collect();
        (sigma, rank1)
    }
}

/// Squared edges of `norm -> MLP` sections (`ln2.k -> ln1.{k+1}`: the norm halves, then a dense
/// or gated MLP beside the residual) from each row's Jacobian, without a JVP per feature.
///
/// The norm's Jacobian at a row evaluated at `a x` is fixed but for two scalars and a rank-one
/// term (method.md section 9): from the input `(c, x)` to `(y, c, x)`,
/// `J(a) = P0 + sigma(a) K + gamma(a) a^2 u u'^T`, with `P0` the pass-through (and the bias
/// coordinate), `K` the centring map `I - [centre] 11^T / D` from `x` to `y`, `u` the centred
/// (or raw) residual `c_t` on `x` and `u'` the same on `y`, `sigma(a) = (a^2 var + eps)^-1/2`,
/// `gamma(a) = 2 beta(a) / D`, `beta = -sigma^3 / 2`. So the tangent rows `C_pinv J W1` are
/// `G0 + sigma G1 + gamma a^2 a_t b_t^T` with `G0 = C_pinv P0 W1`, `G1 = C_pinv K W1` fixed,
/// `a_t = C_pinv_x c_t` and `b_t = c_t^T W1_y` (one GEMM per batch each). The MLP then scales
/// each unit's column by its coefficient at `z(a)` as in [`per_row_edges`], and the points'
/// sum `Abar_t` goes through one GEMM with `B = W2 Q`: `Tbar_t = F0 + Abar_t B`.
///
/// FLOPs per row: `2 n_in K n_out` in the GEMM plus `~6 n_in K` per integration point,
/// against `n_in (2 d K' + 2 (K + R) n_out)` for the JVPs (`K'` pre-activations). SmolLM2's
/// `ln2 -> ln1` (`n_in` 577, `d` 576, 1536 units): 1.0 GFLOP per row against 3.3.
fn norm_mlp_edges(
    ctx: &EdgeSection,
    norm: NormPrefix,
    w1: &Mat<f64>,
    act: PartialAct,
    w2: &Mat<f64>,
    gated: bool,
) -> Mat<f64> {
    match ctx.cfg.compute_dtype {
        ComputeDtype::F64 => norm_mlp_edges_in::<f64>(ctx, norm, w1, act, w2, gated),
        ComputeDtype::F32 => norm_mlp_edges_in::<f32>(ctx, norm, w1, act, w2, gated),
    }
}

/// Per integration point of a batch: its weight, `sigma` and the rank-one coefficient per row,
/// and the units' coefficients (one column per row).
type PointTerms = (f64, Vec<f64>, Vec<f64>, Mat<f64>);

fn norm_mlp_edges_in<T: Real>(
    ctx: &EdgeSection,
    norm: NormPrefix,
    w1: &Mat<f64>,
    act: PartialAct,
    w2: &Mat<f64>,
    gated: bool,
) -> Mat<f64> {
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let (n_in, n_out) = (c.ncols(), q.ncols());
    let (r, x0) = (norm.width, norm.carried);
    let d = r - 1;
    let units = act.width.min(w2.nrows());
    let pre = if gated { 2 * units } else { units };
    let nt = NormTangents::new(norm, c_pinv, w1.as_ref());
    let bt = mm(w2.as_ref(), q.as_ref()).transpose().to_owned();
    let carried_out = w2.nrows() - units;
    // The carried columns of the tangent rows are G0's alone (`norm_mlp` checked that `y`
    // feeds no carried column, so K W1 and b_t vanish there): one fixed F0.
    let f0 = mm(
        nt.g0.subcols(pre, carried_out),
        bt.subcols(units, carried_out).transpose(),
    );
    let w1_u = w1.subrows(0, r).subcols(0, pre).to_owned();
    let (g0_t, g1_t, f0_t) = (
        cast::<T>(nt.g0.subcols(0, pre)),
        cast::<T>(nt.g1.subcols(0, pre)),
        cast::<T>(f0.as_ref()),
    );
    let bh_t = cast::<T>(bt.subcols(0, units));
    let pos = data_positions(ctx.model, ctx.data, ctx.from);
    let batch = per_row_batch(ctx, pos);
    let (et, rows) = fold(
        ctx.data,
        batch,
        &ctx.label(),
        || (Mat::<f64>::zeros(n_in, n_out), 0.0f64),
        |acc, _, range| {
            let f = ctx.activations(range);
            let fhat = mm(f.data.as_ref(), c.as_ref());
            let proj = mm(fhat.as_ref(), c_pinv.as_ref());
            let n_rows = proj.nrows();
            let NormRows { cx, var, a, b } = nt.rows(&proj, pre);
            // `a` transposed, so that a row's coefficients are one contiguous column (the
            // loop below read them strided and did not vectorise: 18% of the stage).
            let (a_cols, b_rows) = (cast::<T>(a.transpose()), cast::<T>(b.as_ref()));
            // Per point: sigma, the rank-one coefficient, and the units' coefficients at z(a).
            let per_point: Vec<PointTerms> = points
                .iter()
                .map(|&(a, w)| {
                    let (sigma, rank1) = nt.point(&var, a);
                    // y(a) = (a c sigma(a), a x_D), z(a) = y(a) W1_u.
                    let y = Mat::from_fn(n_rows, r, |row, i| {
                        if i < d {
                            a * cx[(row, i)] * sigma[row]
                        } else {
                            a * proj[(row, x0 + d)]
                        }
                    });
                    let z = mm(y.as_ref(), w1_u.as_ref());
                    let one = PartialAct {
                        act: act.act,
                        width: units,
                    };
                    let coef = if gated {
                        gated_coefficients(&z, one, &[(1.0, 1.0)])
                    } else {
                        one.integrated_derivative(&z, &[(1.0, 1.0)])
                    };
                    (w, sigma, rank1, coef.transpose().to_owned())
                })
                .collect();
            let fhat_t = fhat.transpose().to_owned();
            let mut a_bar = Mat::<T>::zeros(n_in, units);
            let mut h = Mat::<T>::zeros(n_in, n_out);
            let mut h64 = vec![0.0; n_in];
            for row in 0..n_rows {
                let ar = a_cols.col_as_slice(row);
                // Column k of the tangent rows is `G0_k + s G1_k + g b_k a` (s = sigma,
                // g = the rank-one coefficient); the units' JVP coefficients are applied to
                // it as it is formed, so the `n_in x pre` tangent block is never stored
                // (it is 7 MB at SmolLM2's sizes and made two passes through memory).
                for (p, (w, sigma, rank1, coef)) in per_point.iter().enumerate() {
                    let (s, g) = (T::of(sigma[row]), T::of(rank1[row]));
                    let (cr, wt) = (coef.col_as_slice(row), T::of(*w));
                    for k in 0..units {
                        let out = a_bar.col_as_slice_mut(k);
                        let (g0, g1) = (g0_t.col_as_slice(k), g1_t.col_as_slice(k));
                        let al = wt * T::of(cr[k]);
                        let ka = al * g * b_rows[(row, k)];
                        if gated {
                            let be = wt * T::of(cr[units + k]);
                            let (u0, u1) =
                                (g0_t.col_as_slice(units + k), g1_t.col_as_slice(units + k));
                            let ka = ka + be * g * b_rows[(row, units + k)];
                            let (als, bes) = (al * s, be * s);
                            let terms = g0.iter().zip(g1).zip(u0.iter().zip(u1)).zip(ar);
                            for (o, (((&x0, &x1), (&y0, &y1)), &av)) in out.iter_mut().zip(terms) {
                                let v = al * x0 + be * y0 + als * x1 + bes * y1 + ka * av;
                                *o = if p == 0 { v } else { *o + v };
                            }
                        } else {
                            let als = al * s;
                            let terms = g0.iter().zip(g1).zip(ar);
                            for (o, ((&x0, &x1), &av)) in out.iter_mut().zip(terms) {
                                let v = al * x0 + als * x1 + ka * av;
                                *o = if p == 0 { v } else { *o + v };
                            }
                        }
                    }
                }
                h.copy_from(&f0_t);
                gemm_in(
                    h.as_mut(),
                    faer::Accum::Add,
                    a_bar.as_ref(),
                    bh_t.transpose(),
                );
                add_squared_row(&mut acc.0, &h, fhat_t.col_as_slice(row), &mut h64);
            }
            acc.1 += f.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    et.transpose().to_owned() * faer::Scale(1.0 / rows)
}

/// Samples per task of the per-row paths. A row costs ~2 n_in width n_out FLOPs: about a
/// thousand rows per task, and at least 8 tasks per call, so that a stage's piece (an eighth
/// of 64 language-model samples of 128 positions: one batch of a thousand rows) still keeps
/// every core busy (one task per piece ran the 30-block build's MLP edges on one core).
/// Depends on the data alone, not the threads: builds stay bitwise equal on any number.
fn per_row_batch(ctx: &EdgeSection, pos: usize) -> usize {
    let rows = ctx.cfg.batch_size.min((1024 / pos.max(1)).max(1));
    rows.min(ctx.data.len().div_ceil(8)).max(1)
}

/// `acc_ji += (fhat_j h_ji)^2` for one row's bracket `h` (`n_in x n_out`, in the compute
/// precision), summed in f64 (`h64` a column of scratch).
fn add_squared_row<T: Real>(acc: &mut Mat<f64>, h: &Mat<T>, fhat_row: &[f64], h64: &mut [f64]) {
    for i in 0..h.ncols() {
        for (o, v) in h64.iter_mut().zip(h.col(i).iter()) {
            *o = v.f64();
        }
        add_squared_product(acc.col_as_slice_mut(i), h64, fhat_row);
    }
}

/// Per row of the gated unit's pre-activations `z = (g, u, ..)`, the integrated coefficients
/// `(alpha, beta)` of its JVP (see [`per_row_edges`]).
fn gated_coefficients(z: &Mat<f64>, act: PartialAct, points: &[(f64, f64)]) -> Mat<f64> {
    let width = act.width;
    let mut coef = Mat::<f64>::zeros(z.nrows(), 2 * width);
    for k in 0..width {
        let (g, u) = (z.col_as_slice(k), z.col_as_slice(width + k));
        for r in 0..z.nrows() {
            let (mut alpha, mut beta) = (0.0, 0.0);
            for &(a, w) in points {
                alpha += w * act.act.derivative(a * g[r]) * a * u[r];
                beta += w * act.act.apply(a * g[r]);
            }
            coef[(r, k)] = alpha;
            coef[(r, width + k)] = beta;
        }
    }
    coef
}

/// Squared edges of `norm -> attention` sections (`ln1.k -> ln2.k`: the norm halves, the
/// q/k/v projection `W`, causal attention over every query, the residual add), with the
/// general path's tangents (feature `j`: `fhat_{s,j} C_pinv_j` at every position `s`, method.md
/// section 11) but two products fewer per tangent:
/// - through the norm and `W` the tangent rows are `fhat_{s,j} (G0 + sigma_s G1 + gamma_s
///   a_{s,j} b_s)_j` ([`NormTangents`]): assembled elementwise, not multiplied by `W` row by row;
/// - attention's `dz` goes to the next basis through `M_z = W_O' S_attn Q` in one GEMM (`S`
///   the fixed linear suffix), and the residual's pass-through adds `fhat_{t,j} (G0_x S_x Q)_ji`.
///
/// FLOPs per tangent row at SmolLM2's sizes (R 577, q/k/v 963 wide, 9 heads of 65, 577 kept
/// after): ~0.4 M in the score and value products (as before, causal chunks) and 0.68 M for
/// `dz M_z`, against 1.1 M (`W`) + 0.4 M + 0.68 M (`W_O'`) + 1.33 M (`(attn, x) S Q`) on the
/// general path: 3.2x fewer, 12 TFLOP fewer per section at 64 x 128 tokens.
fn norm_attention_edges(ctx: &EdgeSection, na: &NormAttention) -> Mat<f64> {
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let (n_in, n_out) = (c.ncols(), q.ncols());
    let attn = na.attn;
    let (f, resid) = (attn.fqkv(), attn.resid);
    let nt = NormTangents::new(na.norm, c_pinv, na.w.as_ref());
    // (attn, x) -> next basis: M_z = W_O' S_attn Q, and the pass-through's G0_x S_x Q.
    let sq = mm(na.suffix.as_ref(), q.as_ref());
    let m_z = mm(attn.w_o.as_ref(), sq.subrows(0, resid));
    let m_x = mm(nt.g0.subcols(f, resid), sq.subrows(resid, resid));
    // `dz M_z` is ~60% of the FLOPs: in f32 with `compute_dtype = "f32"` (bracket in f64).
    let m_z32 = (ctx.cfg.compute_dtype == ComputeDtype::F32).then(|| cast::<f32>(m_z.as_ref()));
    let wsum: f64 = points.iter().map(|p| p.1).sum();
    let section = ctx.model.section(ctx.from, ctx.to);
    let (head, _) = section.split_at(na.at + 1);
    let pos = data_positions(ctx.model, ctx.data, ctx.from);
    // One sample's tangents for every feature are `n_in P fqkv` numbers (SmolLM2: 0.6 GB):
    // blocks of features of at most TANGENT_NUMBERS.
    let block = (TANGENT_NUMBERS / (pos * f.max(n_out)).max(1)).clamp(1, n_in.max(1));
    let (e, rows) = fold(
        ctx.data,
        1,
        &ctx.label(),
        || (Mat::<f64>::zeros(n_out, n_in), 0.0f64),
        |acc, _, range| {
            let fr = ctx.activations(range);
            let n = fr.n;
            let fhat = mm(fr.data.as_ref(), c.as_ref());
            let proj = mm(fhat.as_ref(), c_pinv.as_ref());
            let NormRows { var, a, b, .. } = nt.rows(&proj, f);
            // Per point: its weight, the attention's cache at `a proj`, sigma and gamma a^2.
            let per_point: Vec<_> = points
                .iter()
                .map(|&(pt, w)| {
                    let (_, mut caches) =
                        head.forward(&Batch::new(n, 1, pos, faer::Scale(pt) * &proj));
                    let cache = caches.swap_remove(na.at);
                    let (sigma, rank1) = nt.point(&var, pt);
                    (w, cache, sigma, rank1)
                })
                .collect();
            // Rows of G0, G1 and b contiguous for the tangent rows below.
            let (g0_t, g1_t) = (
                nt.g0.subcols(0, f).transpose().to_owned(),
                nt.g1.subcols(0, f).transpose().to_owned(),
            );
            let b_t = b.transpose().to_owned();
            for j0 in (0..n_in).step_by(block) {
                let nb = block.min(n_in - j0);
                let mut bracket: Option<Mat<f64>> = None;
                for (w, cache, sigma, rank1) in &per_point {
                    // Tangent j at position s of sample x, on (q, k, v): `fhat_sj (G0_j +
                    // sigma_s G1_j + gamma_s a_sj b_s)`, written straight into the attention's
                    // scratch (a 33 MB f64 batch and its gather to the scratch layout were
                    // ~17% of the stage).
                    let row = |x: usize, v: usize, s: usize, out: &mut [f64]| {
                        let (i, j) = (x * pos + s, j0 + v);
                        let fv = fhat[(i, j)];
                        let (k1, k2) = (fv * sigma[i], fv * rank1[i] * a[(i, j)]);
                        let (c0, c1) = (g0_t.col_as_slice(j), g1_t.col_as_slice(j));
                        let terms = c0.iter().zip(c1).zip(b_t.col_as_slice(i));
                        for (o, ((&x0, &x1), &bv)) in out.iter_mut().zip(terms) {
                            *o = fv * x0 + k1 * x1 + k2 * bv;
                        }
                    };
                    let tangents = Tangents::Rows {
                        n,
                        r: nb,
                        pos,
                        row: &row,
                    };
                    let w32 = m_z32.as_ref().map(|m| m.as_ref());
                    let mut out = attn.jvp_projected(cache, &tangents, m_z.as_ref(), w32);
                    match bracket.as_mut() {
                        None => {
                            if *w != 1.0 {
                                out *= faer::Scale(*w);
                            }
                            bracket = Some(out);
                        }
                        Some(br) => *br += faer::Scale(*w) * &out,
                    }
                }
                let mut bracket = bracket.unwrap_or_else(|| Mat::zeros(n * nb * pos, n_out));
                // The residual's pass-through: the same at every point.
                for i in 0..n_out {
                    let col = bracket.col_as_slice_mut(i);
                    for j in 0..nb {
                        let mx = wsum * m_x[(j0 + j, i)];
                        for x in 0..n {
                            let fj = &fhat.col_as_slice(j0 + j)[x * pos..][..pos];
                            for (o, &fv) in col[(x * nb + j) * pos..][..pos].iter_mut().zip(fj) {
                                *o += fv * mx;
                            }
                        }
                    }
                }
                for i in 0..n_out {
                    let col = bracket.col_as_slice(i);
                    for (j, chunk) in col.chunks_exact(pos).enumerate() {
                        acc.0[(i, j0 + j % nb)] += chunk.iter().map(|v| v * v).sum::<f64>();
                    }
                }
            }
            acc.1 += fr.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    e * faer::Scale(1.0 / rows)
}

/// The general path: one batched JVP per input feature at every integration point.
fn jvp_edges(ctx: &EdgeSection) -> Mat<f64> {
    let (model, data, cfg, l) = (ctx.model, ctx.data, ctx.cfg, ctx.l);
    let (c, c_pinv, q, points) = (&ctx.c, &ctx.c_pinv, &ctx.q, ctx.points);
    let (from, to) = (ctx.from, ctx.to);
    let section = model.section(from, to);
    let d_in = c.nrows();
    let n_lib = c.ncols();
    let n_out = q.ncols();
    let pos_in = data_positions(model, data, from);
    let pos_out = section.out_pos(pos_in);
    let d_out = q.nrows();
    let budget = super::CHUNK_NUMBERS / (n_lib * pos_in.max(pos_out) * d_in.max(d_out)).max(1);
    let batch = budget.clamp(1, cfg.batch_size);
    let n_signs = cfg.n_stochastic_sources_edges.max(1);
    let seed = cfg.seed ^ 0x5eed_ed9e_u64.wrapping_mul(l as u64 + 1);
    // The tangents are C_pinv's rows scaled per sample and position: push the rows through the
    // section's fixed linear prefix once instead of once per sample.
    let k = section.fixed_linear_prefix();
    let (head, tail) = section.split_at(k);
    let dirs = head
        .jvp(
            &Section::no_caches(k),
            &Batch::new(1, n_lib, 1, c_pinv.clone()),
        )
        .data;
    // Likewise the fixed linear suffix (an MLP's output projection and residual add) is one
    // matrix, folded into the projection onto the next basis: `sq = W_suffix Q`.
    let m = tail.modules.len() - tail.fixed_linear_suffix().min(tail.modules.len());
    let (mid, suffix) = tail.split_at(m);
    let sq = if suffix.modules.is_empty() {
        q.clone()
    } else {
        let d_mid = suffix.modules[0].in_features();
        let w = suffix.jvp(
            &Section::no_caches(suffix.modules.len()),
            &Batch::new(1, d_mid, 1, Mat::identity(d_mid, d_mid)),
        );
        mm(w.data.as_ref(), q.as_ref())
    };
    // The projection of the JVPs onto the next basis is most of this path's FLOPs (SmolLM2's
    // attention: 2 x 1153 x 577 per tangent row against ~600 in the attention's own JVP):
    // in f32 with `compute_dtype = "f32"`, the bracket still summed and squared in f64.
    let sq32 = (cfg.compute_dtype == ComputeDtype::F32).then(|| cast::<f32>(sq.as_ref()));
    let project = |t: &Mat<f64>| -> Mat<f64> {
        match &sq32 {
            None => mm(t.as_ref(), sq.as_ref()),
            Some(sq32) => {
                let mut out = Mat::zeros(t.nrows(), sq32.ncols());
                gemm_f32(out.as_mut(), t.as_ref(), sq32.as_ref());
                out
            }
        }
    };
    // Tangents per block: one sample's tangents for every input feature can be far too many
    // for memory (SmolLM2: 1154 features x 128 positions x 3651 features = 4 GB), so they go
    // through the section in blocks of at most TANGENT_NUMBERS numbers.
    let width = dirs.ncols().max(d_out).max(d_in);
    let block = (TANGENT_NUMBERS / (pos_in.max(pos_out) * width).max(1)).clamp(1, n_lib.max(1));
    let (e, rows) = fold(
        data,
        batch,
        &ctx.label(),
        || (Mat::<f64>::zeros(n_out, n_lib), 0.0f64),
        |acc, _, range| {
            let first = data.first_sample() + range.start;
            let f = ctx.activations(range);
            let n = f.n;
            let fhat = mm(f.data.as_ref(), c.as_ref());
            let proj = mm(fhat.as_ref(), c_pinv.as_ref());
            let y_full = (cfg.edge_formula == EdgeFormula::Functional).then(|| {
                let (y, _) = section.forward(&Batch::new(n, 1, pos_in, proj.clone()));
                mm(y.data.as_ref(), q.as_ref())
            });
            // Sign vectors of the stochastic edges, per sample (seeded by its index in the whole
            // dataset), shared by every feature block.
            let stochastic = cfg.edge_formula == EdgeFormula::Stochastic;
            let phis: Vec<Vec<f64>> = (0..if stochastic { n } else { 0 })
                .flat_map(|x| {
                    let mut rng = sample_rng(seed, first + x);
                    (0..n_signs)
                        .map(|_| {
                            (0..pos_out)
                                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                                .collect::<Vec<f64>>()
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let forwards: Vec<(f64, Batch, Vec<crate::models::Cache>)> = points
                .iter()
                .map(|&(a, w)| {
                    let x = Batch::new(n, 1, pos_in, faer::Scale(a) * &proj);
                    let (y, caches) = section.forward(&x);
                    (w, y, caches)
                })
                .collect();
            for j0 in (0..n_lib).step_by(block) {
                let nb = block.min(n_lib - j0);
                // Tangents after the fixed linear prefix:
                // row (x, j, s) = fhat[(x, s), j0 + j] * (C_pinv[j0 + j, :] through the prefix).
                let mut tangent = Mat::zeros(n * nb * pos_in, dirs.ncols());
                for col in 0..dirs.ncols() {
                    let dst = tangent.col_as_slice_mut(col);
                    for j in 0..nb {
                        let (fj, dj) = (fhat.col_as_slice(j0 + j), dirs[(j0 + j, col)]);
                        for x in 0..n {
                            let out = &mut dst[(x * nb + j) * pos_in..][..pos_in];
                            for (o, f) in out.iter_mut().zip(&fj[x * pos_in..][..pos_in]) {
                                *o = f * dj;
                            }
                        }
                    }
                }
                let tangent = Batch::new(n, nb, pos_in, tangent);
                let mut bracket = Mat::<f64>::zeros(n * nb * pos_out, n_out);
                for (w, y, caches) in &forwards {
                    let t = mid.jvp(&caches[k..k + m], &tangent);
                    let out = project(&t.data);
                    match &y_full {
                        None => bracket += faer::Scale(*w) * &out,
                        Some(yf) => {
                            // Functional: 2 w_p sum_t (y - mh(a_p fhat))_{t,i} * jvp_{t,i}.
                            let yp = mm(y.data.as_ref(), q.as_ref());
                            for x in 0..n {
                                for j in 0..nb {
                                    for t in 0..pos_out {
                                        let row = (x * nb + j) * pos_out + t;
                                        for i in 0..n_out {
                                            let diff =
                                                yf[(x * pos_out + t, i)] - yp[(x * pos_out + t, i)];
                                            acc.0[(i, j0 + j)] += 2.0 * w * diff * out[(row, i)];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                match cfg.edge_formula {
                    EdgeFormula::Functional => {}
                    EdgeFormula::Stochastic => {
                        // Sum over output positions replaced by random sign combinations.
                        for x in 0..n {
                            for phi in &phis[x * n_signs..(x + 1) * n_signs] {
                                for j in 0..nb {
                                    for i in 0..n_out {
                                        let mut s = 0.0;
                                        for (t, p) in phi.iter().enumerate() {
                                            s += p * bracket[((x * nb + j) * pos_out + t, i)];
                                        }
                                        acc.0[(i, j0 + j)] += s * s / n_signs as f64;
                                    }
                                }
                            }
                        }
                    }
                    _ => {
                        // Rows (x, j, t): sum the squares per j down each (contiguous) column.
                        let mut sums = vec![0.0; nb];
                        for i in 0..n_out {
                            sums.fill(0.0);
                            let col = bracket.col_as_slice(i);
                            for block in col.chunks_exact(nb * pos_out) {
                                for (s, b) in sums.iter_mut().zip(block.chunks_exact(pos_out)) {
                                    *s += b.iter().map(|v| v * v).sum::<f64>();
                                }
                            }
                            for (j, s) in sums.iter().enumerate() {
                                acc.0[(i, j0 + j)] += s;
                            }
                        }
                    }
                }
            }
            acc.1 += f.rows() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    e * faer::Scale(1.0 / rows)
}
