//! Closed forms for a single-query attention section (method.md section 11): the Jacobian
//! metric `M'` of section 4.6 and the squared edges of section 5 without one VJP per output
//! direction or one JVP per input feature.
//!
//! The section is `f -> y = f W_pre -> attn_out (last query T only) -> (attn, x_T) W_post`,
//! with `W_pre` (`d_in x (fqkv + R)`) and `W_post` (`2R x d_out`) the fixed linear modules
//! around `attn_out` (identity layer norms, `attn_in`, `add_resid1`). With the projection `Q`
//! onto the next basis, `Gamma = W_post Q` (rows `Gamma_a` on `attn`, `Gamma_x` on `x`) and
//! `Psi_h = W_O'_h Gamma_a` (`dv x n_c`), the output is `yhat = sum_h z_h Psi_h + x_T Gamma_x`.
//! At integration point `(a_p, w_p)` (bias folded: `q, k, v` scale by `a_p`) head `h` has
//! `p_hs = softmax_s(a_p^2 scale q_h . k_hs)`, `z~_h = sum_s p_hs v_hs`, and the Jacobian of
//! `yhat` with respect to input position `s`, summed over the points, is (`d_in x n_c`)
//!
//! `Jbar_s = sum_h beta_hs B_h + [s = T] wsum B_X`
//! `       + sum_{h,p} (W_K,h kq_hp) omega_hps^T + [s = T] sum_{h,p,s'} (W_Q,h qk_hps') omega_hps'^T`
//!
//! with `B_h = W_V,h Psi_h`, `B_X = W_X Gamma_x`, `beta_hs = sum_p w_p p_hs`,
//! `wsum = sum_p w_p`, `u_hps = w_p a_p p_hs (v_hs - z~_h)` (`dv`), `omega_hps = Psi_h^T u_hps`,
//! `kq_hp = scale a_p q_h` and `qk_hps = scale a_p k_hs` (`d_head`): the value path is a
//! p-weighted sum of fixed matrices, the score path a few rank-one terms per head. Squaring
//! only needs per-sample products in `d_head`- and `dv`-sized spaces; the `d_in`-sized
//! products happen once at the end.

use super::pass::{activations_at, fold};
use crate::data::Dataset;
use crate::models::transformer::attention::AttnOut;
use crate::models::{Model, Module, Structure};
use crate::tensor::linalg::{gemm, mm};
use crate::tensor::simd::{add_product, add_square, axpy, dot, product};
use faer::{Accum, Mat, MatRef};

/// A section `fixed linear -> attn_out (last query, no rotary) -> fixed linear`.
pub struct AttentionSection<'a> {
    /// `W_pre`, `d_in x (fqkv + R)`.
    pre: Mat<f64>,
    attn: &'a AttnOut,
    /// `W_post`, `2R x d_out`.
    post: Mat<f64>,
}

/// Recognises an attention section: identities and fixed linear modules, one `attn_out`
/// without rotary embeddings whose last query alone is kept, then modules linear on that one
/// position.
pub fn attention_section(modules: &[Box<dyn Module>]) -> Option<AttentionSection<'_>> {
    let i = modules
        .iter()
        .position(|m| matches!(m.structure(), Structure::Attention(_)))?;
    let Structure::Attention(attn) = modules[i].structure() else {
        return None;
    };
    // One query: attention computes only the last (`last_pos`), or the next module keeps
    // only the last position (`last_pos_module_type = add_resid1`).
    let next = modules[i + 1..].iter().find(|m| !m.is_identity());
    let single = attn.last_pos || next.is_some_and(|m| m.out_pos(2) == 1);
    if !single || attn.rotary.is_some() {
        return None;
    }
    let chain = |ms: &[Box<dyn Module>], one_position: bool, width: usize| {
        let mut acc = Mat::<f64>::identity(width, width);
        for m in ms {
            if m.is_identity() {
                continue;
            }
            let linear = if one_position {
                m.fixed_linear_at_one_position()
            } else {
                m.fixed_linear()
            };
            if !linear {
                return None;
            }
            acc = mm(
                acc.as_ref(),
                super::section::materialise(m.as_ref()).as_ref(),
            );
        }
        Some(acc)
    };
    let d_in = modules[0].in_features();
    let pre = chain(&modules[..i], false, d_in)?;
    let post = chain(&modules[i + 1..], true, attn.out_features())?;
    Some(AttentionSection { pre, attn, post })
}

/// The attention at the last query of every sample of a batch, at every integration point:
/// the per-sample coefficients of `Jbar_s` (module docs).
struct Local {
    pos: usize,
    points: usize,
    /// `beta[(x H + h) pos + s]`.
    beta: Vec<f64>,
    /// Per head, `dv x (n P pos)`: column `(x P + p) pos + s` is `u_hps`.
    u: Vec<Mat<f64>>,
    /// Per head, `d_head x (n P)`: column `x P + p` is `kq_hp`.
    kq: Vec<Mat<f64>>,
    /// Per head, `d_head x (n P pos)`: column `(x P + p) pos + s` is `qk_hps`.
    qk: Vec<Mat<f64>>,
}

impl Local {
    fn col(&self, x: usize, p: usize, s: usize) -> usize {
        (x * self.points + p) * self.pos + s
    }
}

impl AttentionSection<'_> {
    fn heads(&self) -> usize {
        self.attn.heads
    }
    fn resid(&self) -> usize {
        self.attn.resid
    }
    /// Column blocks of `W_pre`: head `h`'s query, its kv head's key and value, the residual.
    fn w_q(&self, h: usize) -> MatRef<'_, f64> {
        self.pre.subcols(self.attn.offsets(h).0, self.attn.d_head)
    }
    fn w_k(&self, h: usize) -> MatRef<'_, f64> {
        self.pre.subcols(self.attn.offsets(h).1, self.attn.d_head)
    }
    fn w_v(&self, h: usize) -> MatRef<'_, f64> {
        self.pre.subcols(self.attn.offsets(h).2, self.attn.dv())
    }
    fn w_x(&self) -> MatRef<'_, f64> {
        self.pre.subcols(self.attn.fqkv(), self.resid())
    }
    /// Block `b` of the score path: `W_K,b` for `b < H`, `W_Q,b-H` after.
    fn w_score(&self, b: usize) -> MatRef<'_, f64> {
        let h = self.heads();
        if b < h {
            self.w_k(b)
        } else {
            self.w_q(b - h)
        }
    }

    /// `Psi_h = W_O'_h Gamma_a` per head and `Gamma_x`, for the projection `q` (`d_out x n_c`).
    fn psi(&self, q: &Mat<f64>) -> (Vec<Mat<f64>>, Mat<f64>) {
        let gamma = mm(self.post.as_ref(), q.as_ref());
        let (r, dv) = (self.resid(), self.attn.dv());
        let psi = (0..self.heads())
            .map(|h| mm(self.attn.w_o.subrows(h * dv, dv), gamma.subrows(0, r)))
            .collect();
        (psi, gamma.subrows(r, r).to_owned())
    }

    /// `B_h = W_V,h Psi_h` per head, then `B_X = W_X Gamma_x` (`d_in x n_c`).
    fn value_maps(&self, psi: &[Mat<f64>], gamma_x: &Mat<f64>) -> Vec<Mat<f64>> {
        let mut b: Vec<Mat<f64>> = (0..self.heads())
            .map(|h| mm(self.w_v(h), psi[h].as_ref()))
            .collect();
        b.push(mm(self.w_x(), gamma_x.as_ref()));
        b
    }

    /// [`Local`] of the batch whose prefix outputs `(q, k, v)` are `y` (rows `(x, s)`).
    // Positions index the logits, weights and rows together.
    #[allow(clippy::needless_range_loop)]
    fn local(&self, y: &Mat<f64>, n: usize, pos: usize, points: &[(f64, f64)]) -> Local {
        let a = self.attn;
        let (heads, dh, dv, np) = (a.heads, a.d_head, a.dv(), points.len());
        let t = pos - 1;
        let s0 = a.first_key(t);
        // Row-major prefix outputs: column r of yt is row r of y.
        let yt = y.transpose().to_owned();
        let mut local = Local {
            pos,
            points: np,
            beta: vec![0.0; n * heads * pos],
            u: (0..heads).map(|_| Mat::zeros(dv, n * np * pos)).collect(),
            kq: (0..heads).map(|_| Mat::zeros(dh, n * np)).collect(),
            qk: (0..heads).map(|_| Mat::zeros(dh, n * np * pos)).collect(),
        };
        let mut logits = vec![0.0; pos];
        let mut prob = vec![0.0; pos];
        let mut z = vec![0.0; dv];
        for x in 0..n {
            let row = |s: usize| yt.col_as_slice(x * pos + s);
            for h in 0..heads {
                let (oq, ok, ov) = a.offsets(h);
                let q = &row(t)[oq..oq + dh];
                for s in s0..=t {
                    logits[s] = dot(q, &row(s)[ok..ok + dh]);
                }
                for (p, &(ap, wp)) in points.iter().enumerate() {
                    // p_hs = softmax(a_p^2 scale q . k_s) over the window.
                    let c = ap * ap * a.scale;
                    let max = (s0..=t).map(|s| c * logits[s]).fold(f64::MIN, f64::max);
                    let mut sum = 0.0;
                    for s in s0..=t {
                        prob[s] = (c * logits[s] - max).exp();
                        sum += prob[s];
                    }
                    z.fill(0.0);
                    for s in s0..=t {
                        prob[s] /= sum;
                        local.beta[(x * heads + h) * pos + s] += wp * prob[s];
                        for (zi, vi) in z.iter_mut().zip(&row(s)[ov..ov + dv]) {
                            *zi += prob[s] * vi;
                        }
                    }
                    for s in s0..=t {
                        let col = local.col(x, p, s);
                        let coef = wp * ap * prob[s];
                        let v = &row(s)[ov..ov + dv];
                        for ((ui, vi), zi) in
                            local.u[h].col_as_slice_mut(col).iter_mut().zip(v).zip(&z)
                        {
                            *ui = coef * (vi - zi);
                        }
                    }
                    let sa = a.scale * ap;
                    for (o, qi) in local.kq[h].col_as_slice_mut(x * np + p).iter_mut().zip(q) {
                        *o = sa * qi;
                    }
                    for s in 0..pos {
                        let col = local.col(x, p, s);
                        let k = &row(s)[ok..ok + dh];
                        for (o, ki) in local.qk[h].col_as_slice_mut(col).iter_mut().zip(k) {
                            *o = sa * ki;
                        }
                    }
                }
            }
        }
        local
    }

    /// Samples per batch: at most `batch`, and a batch's per-sample buffers (`per_sample`
    /// numbers each, growing with the positions) within [`super::CHUNK_NUMBERS`] x 32.
    fn batch(batch: usize, per_sample: usize) -> usize {
        ((32 * super::CHUNK_NUMBERS) / per_sample.max(1)).clamp(1, batch.max(1))
    }

    /// `beta_ms` for `m` over the heads, then `X` (`wsum` at the last position).
    fn betas(&self, local: &Local, x: usize, s: usize, wsum: f64, out: &mut [f64]) {
        let (heads, pos) = (self.heads(), local.pos);
        for (h, o) in out[..heads].iter_mut().enumerate() {
            *o = local.beta[(x * heads + h) * pos + s];
        }
        out[heads] = if s == pos - 1 { wsum } else { 0.0 };
    }

    /// `M' = 1/(N P_in) sum_x sum_s Jbar_s Jbar_s^T` (method.md section 4.6) for the next
    /// layer's projection `q`:
    ///
    /// `N P_in M' = sum_{m,m'} S_mm' B_m B_m'^T + sum_{m,b} (Y_mb A_mb W_b^T + transpose)
    ///            + sum_{b,b'} W_b C_bb' W_b'^T`
    ///
    /// over value maps `m` (heads, then `X`) and score blocks `b` (`K_h`, then `Q_h`), with
    /// `S_mm' = sum beta_ms beta_m's`, `Y_mb = B_m Psi_h(b)^T`, `A_mb = sum beta_ms u_r kappa_r^T`
    /// and `C_bb' = sum (omega_r . omega_r') kappa_r kappa_r'^T` over the rank-one terms `r`
    /// (in block `b`, with vectors `kappa_r = kq` or `qk`) and `r'` (in `b'`) at the same `s`.
    ///
    /// The key terms of a head share `kappa = kq_hp` at every `s`, so a sample has one key term
    /// per `(h, p)` (its `u` and `v` summed over `s`) and `P pos` query terms per head. Per
    /// block `b` the terms of a batch are the columns of `L_b` (`kappa_r`) and of `R_b`
    /// (`sum_m beta u_r` per `m`, then `v_r = sum_r' (omega_r . omega_r') kappa_r'` placed in
    /// block `b(r')`), and `[A_.b^T | C_b.] += L_b R_b^T` is one GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn metric(
        &self,
        model: &Model,
        data: &dyn Dataset,
        from: usize,
        q: &Mat<f64>,
        points: &[(f64, f64)],
        batch: usize,
        label: &str,
    ) -> Mat<f64> {
        let (heads, dh, dv) = (self.heads(), self.attn.d_head, self.attn.dv());
        let nm = heads + 1;
        let nb = 2 * heads;
        let width = nm * dv + nb * dh;
        let wsum: f64 = points.iter().map(|p| p.1).sum();
        let (psi, gamma_x) = self.psi(q);
        let pre = &self.pre;
        let per_sample = |pos: usize, np: usize| {
            nb * (dh + width) * np * pos + (q.ncols() + dv) * heads * np * pos + pre.ncols() * pos
        };
        let pos = super::pass::data_positions(model, data, from);
        let batch = Self::batch(batch, per_sample(pos, points.len()));
        // S (nm x nm); rows (b, dh) of [A_.b^T | C_b.] (`nb dh x width`).
        type Acc = (Mat<f64>, Mat<f64>, f64);
        let (s_acc, ac_acc, count) = fold(
            data,
            batch,
            label,
            || -> Acc { (Mat::zeros(nm, nm), Mat::zeros(nb * dh, width), 0.0) },
            |acc, _, range| {
                let f = activations_at(model, data, from, range);
                let (n, pos) = (f.n, f.pos);
                let t = pos - 1;
                let y = mm(f.data.as_ref(), pre.subcols(0, self.attn.fqkv()));
                let local = self.local(&y, n, pos, points);
                let np = local.points;
                let omega: Vec<Mat<f64>> = (0..heads)
                    .map(|h| mm(psi[h].transpose(), local.u[h].as_ref()))
                    .collect();
                // Term columns per block: key blocks n P, query blocks n P pos.
                let cols = |b: usize| if b < heads { n * np } else { n * np * pos };
                let mut l_mats: Vec<Mat<f64>> = (0..nb).map(|b| Mat::zeros(dh, cols(b))).collect();
                let mut r_mats: Vec<Mat<f64>> =
                    (0..nb).map(|b| Mat::zeros(width, cols(b))).collect();
                // Gram of a sample's omega_hps, index (h P + p) pos + s.
                let nt = heads * np * pos;
                let mut gram = vec![0.0; nt * nt];
                let mut beta = vec![0.0; nm * pos];
                for x in 0..n {
                    let om = |i: usize| {
                        let (hp, s) = (i / pos, i % pos);
                        omega[hp / np].col_as_slice(local.col(x, hp % np, s))
                    };
                    for i in 0..nt {
                        for j in 0..=i {
                            let g = dot(om(i), om(j));
                            gram[i * nt + j] = g;
                            gram[j * nt + i] = g;
                        }
                    }
                    for s in 0..pos {
                        self.betas(&local, x, s, wsum, &mut beta[s * nm..(s + 1) * nm]);
                        let b = &beta[s * nm..(s + 1) * nm];
                        for i in 0..nm {
                            for j in 0..nm {
                                acc.0[(i, j)] += b[i] * b[j];
                            }
                        }
                    }
                    let idx = |h: usize, p: usize, s: usize| (h * np + p) * pos + s;
                    // v += sum over the terms at s of gram(i, .) kappa, placed by block.
                    let add_v = |v: &mut [f64], i: usize, s: usize| {
                        for h2 in 0..heads {
                            for p2 in 0..np {
                                let c = gram[i * nt + idx(h2, p2, s)];
                                let k = local.kq[h2].col_as_slice(x * np + p2);
                                axpy(&mut v[h2 * dh..(h2 + 1) * dh], c, k);
                                if s == t {
                                    for s2 in 0..pos {
                                        let c = gram[i * nt + idx(h2, p2, s2)];
                                        let k = local.qk[h2].col_as_slice(local.col(x, p2, s2));
                                        let o = (heads + h2) * dh;
                                        axpy(&mut v[o..o + dh], c, k);
                                    }
                                }
                            }
                        }
                    };
                    for h in 0..heads {
                        for p in 0..np {
                            // Key term (h, p): kappa kq_hp, u summed over s with beta_ms.
                            let col = x * np + p;
                            l_mats[h]
                                .col_as_slice_mut(col)
                                .copy_from_slice(local.kq[h].col_as_slice(col));
                            let r = r_mats[h].col_as_slice_mut(col);
                            for s in 0..pos {
                                let u = local.u[h].col_as_slice(local.col(x, p, s));
                                for m in 0..nm {
                                    axpy(&mut r[m * dv..(m + 1) * dv], beta[s * nm + m], u);
                                }
                                add_v(&mut r[nm * dv..], idx(h, p, s), s);
                            }
                            // Query terms (h, p, s'), at s = T only.
                            for s2 in 0..pos {
                                let col = local.col(x, p, s2);
                                let (lq, rq) = (&mut l_mats[heads + h], &mut r_mats[heads + h]);
                                lq.col_as_slice_mut(col)
                                    .copy_from_slice(local.qk[h].col_as_slice(col));
                                let r = rq.col_as_slice_mut(col);
                                let u = local.u[h].col_as_slice(col);
                                for m in 0..nm {
                                    axpy(&mut r[m * dv..(m + 1) * dv], beta[t * nm + m], u);
                                }
                                add_v(&mut r[nm * dv..], idx(h, p, s2), t);
                            }
                        }
                    }
                }
                for b in 0..nb {
                    gemm(
                        acc.1.as_mut().subrows_mut(b * dh, dh),
                        Accum::Add,
                        l_mats[b].as_ref(),
                        r_mats[b].transpose(),
                    );
                }
                acc.2 += f.rows() as f64;
            },
            |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2),
        );
        let a_acc = |m: usize, b: usize| ac_acc.submatrix(b * dh, m * dv, dh, dv).transpose();
        let c_acc = ac_acc.subcols(nm * dv, nb * dh);
        // Assemble in d_in space.
        let b = self.value_maps(&psi, &gamma_x);
        let d_in = pre.nrows();
        let mut m = Mat::<f64>::zeros(d_in, d_in);
        for (i, bi) in b.iter().enumerate() {
            let mut bbar = Mat::<f64>::zeros(d_in, bi.ncols());
            for (j, bj) in b.iter().enumerate() {
                bbar += faer::Scale(s_acc[(i, j)]) * bj;
            }
            gemm(m.as_mut(), Accum::Add, bi.as_ref(), bbar.transpose());
        }
        let mut cross = Mat::<f64>::zeros(d_in, d_in);
        for (i, bi) in b.iter().enumerate() {
            for blk in 0..nb {
                let y = mm(bi.as_ref(), psi[blk % heads].transpose());
                let ya = mm(y.as_ref(), a_acc(i, blk));
                gemm(
                    cross.as_mut(),
                    Accum::Add,
                    ya.as_ref(),
                    self.w_score(blk).transpose(),
                );
            }
        }
        m += &cross + cross.transpose();
        let w_all = {
            let mut w = Mat::<f64>::zeros(d_in, nb * dh);
            for blk in 0..nb {
                w.subcols_mut(blk * dh, dh).copy_from(self.w_score(blk));
            }
            w
        };
        let wc = mm(w_all.as_ref(), c_acc);
        gemm(m.as_mut(), Accum::Add, wc.as_ref(), w_all.transpose());
        m * faer::Scale(1.0 / count)
    }

    /// Squared edges (method.md section 5), `(n_out, n_in)`: per sample the bracket
    /// `sum_s diag(fhat_s) C_pinv Jbar_s` (`n_in x n_out`, `Jbar` evaluated at `fhat C_pinv`) is
    /// `sum_m diag(sum_s beta_ms fhat_s) F_m` (`F_m = C_pinv B_m`) plus one GEMM of rank
    /// `H P pos`: columns `fhat_s o (C_pinv W_K,h kq_hp) + fhat_T o (C_pinv W_Q,h qk_hps)` (the
    /// key term at `s` and the query term from key `s`) against rows `omega_hps`.
    #[allow(clippy::too_many_arguments)]
    pub fn edges(
        &self,
        model: &Model,
        data: &dyn Dataset,
        from: usize,
        c: &Mat<f64>,
        c_pinv: &Mat<f64>,
        q: &Mat<f64>,
        points: &[(f64, f64)],
        batch: usize,
        label: &str,
    ) -> Mat<f64> {
        let heads = self.heads();
        let (n_in, n_out) = (c.ncols(), q.ncols());
        let nm = heads + 1;
        let wsum: f64 = points.iter().map(|p| p.1).sum();
        let (psi, gamma_x) = self.psi(q);
        let f_maps: Vec<Mat<f64>> = self
            .value_maps(&psi, &gamma_x)
            .iter()
            .map(|b| mm(c_pinv.as_ref(), b.as_ref()))
            .collect();
        let pre_qkv = mm(c_pinv.as_ref(), self.pre.subcols(0, self.attn.fqkv()));
        // C_pinv W_K,h and C_pinv W_Q,h: column blocks of the same product.
        let (dh, offsets) = (self.attn.d_head, |h| self.attn.offsets(h));
        let pk = |h: usize| pre_qkv.subcols(offsets(h).1, dh);
        let pq = |h: usize| pre_qkv.subcols(offsets(h).0, dh);
        let pre = &self.pre;
        let (pos, np) = (super::pass::data_positions(model, data, from), points.len());
        let per_sample =
            (2 * n_in + n_out + self.attn.dv()) * heads * np * pos + (n_in + pre.ncols()) * pos;
        let batch = Self::batch(batch, per_sample);
        let (et, count) = fold(
            data,
            batch,
            label,
            || (Mat::<f64>::zeros(n_in, n_out), 0.0f64),
            |acc, _, range| {
                let f = activations_at(model, data, from, range);
                let (n, pos) = (f.n, f.pos);
                let t = pos - 1;
                let fhat = mm(f.data.as_ref(), c.as_ref());
                // (q, k, v) at the projection fhat C_pinv: fhat (C_pinv W_pre).
                let y = mm(fhat.as_ref(), pre_qkv.as_ref());
                let local = self.local(&y, n, pos, points);
                let np = local.points;
                let omega: Vec<Mat<f64>> = (0..heads)
                    .map(|h| mm(psi[h].transpose(), local.u[h].as_ref()))
                    .collect();
                let khat: Vec<Mat<f64>> = (0..heads)
                    .map(|h| mm(pk(h), local.kq[h].as_ref()))
                    .collect();
                let qhat: Vec<Mat<f64>> = (0..heads)
                    .map(|h| mm(pq(h), local.qk[h].as_ref()))
                    .collect();
                let fhat_t = fhat.transpose().to_owned();
                // The key term at s and the query term from s share omega_hps: one column each.
                let rank = heads * np * pos;
                let mut lhs = Mat::<f64>::zeros(n_in, rank);
                let mut rhs = Mat::<f64>::zeros(n_out, rank);
                let mut bracket = Mat::<f64>::zeros(n_in, n_out);
                let mut beta = vec![0.0; nm];
                let mut w = Mat::<f64>::zeros(n_in, nm);
                for x in 0..n {
                    let fs = |s: usize| fhat_t.col_as_slice(x * pos + s);
                    w.fill(0.0);
                    for s in 0..pos {
                        self.betas(&local, x, s, wsum, &mut beta);
                        for (m, b) in beta.iter().enumerate() {
                            axpy(w.col_as_slice_mut(m), *b, fs(s));
                        }
                    }
                    for h in 0..heads {
                        for p in 0..np {
                            let kh = khat[h].col_as_slice(x * np + p);
                            for s in 0..pos {
                                let col = local.col(x, p, s);
                                let qh = qhat[h].col_as_slice(col);
                                let r = (h * np + p) * pos + s;
                                let dst = lhs.col_as_slice_mut(r);
                                product(dst, fs(s), kh);
                                add_product(dst, fs(t), qh);
                                rhs.col_as_slice_mut(r)
                                    .copy_from_slice(omega[h].col_as_slice(col));
                            }
                        }
                    }
                    gemm(
                        bracket.as_mut(),
                        Accum::Replace,
                        lhs.as_ref(),
                        rhs.transpose(),
                    );
                    // Per output column (in cache): the value and residual terms, then square.
                    for i in 0..n_out {
                        let col = bracket.col_as_slice_mut(i);
                        for (m, fm) in f_maps.iter().enumerate() {
                            add_product(col, fm.col_as_slice(i), w.col_as_slice(m));
                        }
                        add_square(acc.0.col_as_slice_mut(i), col);
                    }
                }
                acc.1 += f.rows() as f64;
            },
            |a, b| (a.0 + b.0, a.1 + b.1),
        );
        et.transpose().to_owned() * faer::Scale(1.0 / count)
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
