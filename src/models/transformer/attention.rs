//! `attn_out.k`: causal multi-head attention, forward, VJP and JVP side by side.
//!
//! Positions mix only here, so the loops run per `(sample, vector, head)` on row-major copies
//! of one sample's rows at a time (a small scratch buffer reused across samples: faer's
//! matrices are column-major); the output projection is one GEMM over all rows.

use super::modules::{
    axpy, cache, copy_cols_from_pos, copy_cols_to_pos, dot, gemm, read_rows, write_rows,
};
use crate::models::{Cache, Module};
use crate::tensor::Batch;
use faer::{Accum, Mat, MatMut, MatRef};

/// `attn_out.k`: causal multi-head attention on `attn_in`'s streams. Input `(q, k, v, x)`:
/// `q`, `k` of `H d_head` features (head `h` at `h d_head ..`), `v` of `H (d_head + 1)` (head `h`
/// at `h (d_head + 1) ..`, its last coordinate the folded 1), then the residual `x` (`R`).
/// Output `(attn, x)` (`2R`), at every position, or at the last one only (`last_pos`).
///
/// Per sample, head `h`, query `t` and key `s <= t` (`s > t` are masked: score `-inf`, weight 0):
///
/// `a_ts = scale q_t . k_s`, `p_ts = softmax_s(a_ts)`, `z_t = sum_s p_ts v_s`,
/// `attn_t = sum_h z_{t,h} W_O'_h` — one GEMM of `z` (`rows x H (d_head + 1)`) with
/// `W_O'` (`H (d_head + 1) x R`: rows `W_O[h]`, then `b_O / H`; last column 0). Since
/// `sum_s p_ts = 1`, `z`'s last coordinate per head is 1 and the heads add exactly `b_O`.
///
/// JVP: `da_ts = scale (dq_t . k_s + q_t . dk_s)`, `dp_ts = p_ts (da_ts - sum_s' p_ts' da_ts')`,
/// `dz_t = sum_s dp_ts v_s + p_ts dv_s`, `dattn = dz W_O'`.
/// VJP: `gz = gattn W_O'^T`, `gp_ts = gz_t . v_s`, `gv_s = sum_t p_ts gz_t`,
/// `ga_ts = p_ts (gp_ts - sum_s' p_ts' gp_ts')`, `gq_t = scale sum_s ga_ts k_s`,
/// `gk_s = scale sum_t ga_ts q_t`.
pub struct AttnOut {
    pub id: String,
    pub heads: usize,
    pub d_head: usize,
    /// Multiplies `q . k` (default `1 / sqrt(d_head)`).
    pub scale: f64,
    /// `H (d_head + 1) x R`.
    pub w_o: Mat<f64>,
    /// `R`.
    pub resid: usize,
    /// Compute the last query position only (`last_pos_module_type`).
    pub last_pos: bool,
}

/// The forward point: `q, k, v` row-major (rows `(x, s)`, `fqkv` columns) and the attention
/// weights `p[((x H + h) pos + t) pos + s]` (0 for `s > t` and for queries not computed).
struct AttnCache {
    pos: usize,
    qkv: Vec<f64>,
    p: Vec<f64>,
}

impl AttnOut {
    /// `H d_head`: width of `q` and of `k`.
    fn fq(&self) -> usize {
        self.heads * self.d_head
    }
    /// `d_head + 1`: width of one head of `v` and `z`.
    fn dv(&self) -> usize {
        self.d_head + 1
    }
    /// Width of `(q, k, v)`.
    fn fqkv(&self) -> usize {
        2 * self.fq() + self.heads * self.dv()
    }
    /// The first query position computed.
    fn t0(&self, pos: usize) -> usize {
        if self.last_pos {
            pos - 1
        } else {
            0
        }
    }
    /// Offsets of head `h`'s `q`, `k` and `v` inside a row of `(q, k, v)`.
    fn offsets(&self, h: usize) -> (usize, usize, usize) {
        let (fq, dh) = (self.fq(), self.d_head);
        (h * dh, fq + h * dh, 2 * fq + h * self.dv())
    }
}

impl Module for AttnOut {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.fqkv() + self.resid
    }
    fn out_features(&self) -> usize {
        2 * self.resid
    }
    fn out_pos(&self, in_pos: usize) -> usize {
        if self.last_pos {
            1
        } else {
            in_pos
        }
    }

    /// `p_t = softmax_{s<=t}(scale q_t . k_s)`, `z_t = sum_s p_ts v_s`, `attn = z W_O'`.
    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (n, pos, heads, dh, dv, f) =
            (x.n, x.pos, self.heads, self.d_head, self.dv(), self.fqkv());
        let (t0, pout, hz) = (self.t0(pos), self.out_pos(pos), heads * dv);
        let mut qkv = vec![0.0; n * pos * f];
        read_rows(&x.data, 0, 0, f, &mut qkv);
        let mut p = vec![0.0; n * heads * pos * pos];
        let mut z = vec![0.0; n * pout * hz];
        for xs in 0..n {
            let row = |s: usize| &qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
            for h in 0..heads {
                let (oq, ok, ov) = self.offsets(h);
                for t in t0..pos {
                    let q = &row(t)[oq..oq + dh];
                    let pt = &mut p[((xs * heads + h) * pos + t) * pos..][..=t];
                    let mut max = f64::NEG_INFINITY;
                    for (s, a) in pt.iter_mut().enumerate() {
                        *a = self.scale * dot(q, &row(s)[ok..ok + dh]);
                        max = max.max(*a);
                    }
                    let mut sum = 0.0;
                    for a in pt.iter_mut() {
                        *a = (*a - max).exp();
                        sum += *a;
                    }
                    let zt = &mut z[(xs * pout + t - t0) * hz + h * dv..][..dv];
                    for (s, a) in pt.iter_mut().enumerate() {
                        *a /= sum;
                        axpy(zt, *a, &row(s)[ov..ov + dv]);
                    }
                }
            }
        }
        let mut y = Mat::zeros(n * pout, 2 * self.resid);
        gemm(
            y.as_mut().subcols_mut(0, self.resid),
            Accum::Replace,
            MatRef::from_row_major_slice(&z, n * pout, hz),
            self.w_o.as_ref(),
        );
        copy_cols_from_pos(&mut y, self.resid, &x.data, f, self.resid, pos, t0);
        (
            Batch::new(n, 1, pout, y),
            Box::new(AttnCache { pos, qkv, p }),
        )
    }

    /// `gz = gattn W_O'^T`; per head `gp_ts = gz_t . v_s`, `gv_s = sum_t p_ts gz_t`,
    /// `ga_ts = p_ts (gp_ts - sum_s' p_ts' gp_ts')`, `gq_t = scale sum_s ga_ts k_s`,
    /// `gk_s = scale sum_t ga_ts q_t`; the residual's cotangent passes through.
    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        let c = cache::<AttnCache>(c, "attention");
        let (n, r, pout, heads, dh, dv, f) = (
            dy.n,
            dy.r,
            dy.pos,
            self.heads,
            self.d_head,
            self.dv(),
            self.fqkv(),
        );
        let (pos, hz) = (c.pos, heads * dv);
        let t0 = self.t0(pos);
        let mut gz = vec![0.0; n * r * pout * hz];
        gemm(
            MatMut::from_row_major_slice_mut(&mut gz, n * r * pout, hz),
            Accum::Replace,
            dy.data.as_ref().subcols(0, self.resid),
            self.w_o.transpose(),
        );
        let mut dx = Mat::zeros(n * r * pos, f + self.resid);
        // One sample's cotangents on (q, k, v), row-major, rows (v, s).
        let mut g = vec![0.0; r * pos * f];
        let (mut gp, mut gq) = (vec![0.0; pos], vec![0.0; dh]);
        for xs in 0..n {
            let row = |s: usize| &c.qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
            g.fill(0.0);
            for v in 0..r {
                for h in 0..heads {
                    let (oq, ok, ov) = self.offsets(h);
                    for t in t0..pos {
                        let pt = &c.p[((xs * heads + h) * pos + t) * pos..][..=t];
                        let gzt = &gz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                        let mut mean = 0.0;
                        for (s, &ps) in pt.iter().enumerate() {
                            gp[s] = dot(gzt, &row(s)[ov..ov + dv]);
                            mean += ps * gp[s];
                            axpy(&mut g[(v * pos + s) * f + ov..][..dv], ps, gzt);
                        }
                        gq.fill(0.0);
                        let q = &row(t)[oq..oq + dh];
                        for (s, &ps) in pt.iter().enumerate() {
                            let ga = self.scale * ps * (gp[s] - mean);
                            axpy(&mut gq, ga, &row(s)[ok..ok + dh]);
                            axpy(&mut g[(v * pos + s) * f + ok..][..dh], ga, q);
                        }
                        axpy(&mut g[(v * pos + t) * f + oq..][..dh], 1.0, &gq);
                    }
                }
            }
            write_rows(&mut dx, xs * r * pos, 0, f, &g);
        }
        copy_cols_to_pos(&mut dx, f, &dy.data, self.resid, self.resid, pos, t0);
        Batch::new(n, r, pos, dx)
    }

    /// Per head `da_ts = scale (dq_t . k_s + q_t . dk_s)`,
    /// `dp_ts = p_ts (da_ts - sum_s' p_ts' da_ts')`, `dz_t = sum_s dp_ts v_s + p_ts dv_s`;
    /// then `dattn = dz W_O'`; the residual's tangent passes through.
    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        let c = cache::<AttnCache>(c, "attention");
        let (n, r, pos, heads, dh, dv, f) = (
            dx.n,
            dx.r,
            dx.pos,
            self.heads,
            self.d_head,
            self.dv(),
            self.fqkv(),
        );
        let (t0, pout, hz) = (self.t0(pos), self.out_pos(pos), heads * dv);
        let mut dz = vec![0.0; n * r * pout * hz];
        // One sample's tangents on (q, k, v), row-major, rows (v, s).
        let mut tq = vec![0.0; r * pos * f];
        let mut da = vec![0.0; pos];
        for xs in 0..n {
            let row = |s: usize| &c.qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
            read_rows(&dx.data, xs * r * pos, 0, f, &mut tq);
            for v in 0..r {
                let trow = |s: usize| &tq[(v * pos + s) * f..(v * pos + s + 1) * f];
                for h in 0..heads {
                    let (oq, ok, ov) = self.offsets(h);
                    for t in t0..pos {
                        let pt = &c.p[((xs * heads + h) * pos + t) * pos..][..=t];
                        let (q, dq) = (&row(t)[oq..oq + dh], &trow(t)[oq..oq + dh]);
                        let mut mean = 0.0;
                        for (s, &ps) in pt.iter().enumerate() {
                            da[s] = self.scale
                                * (dot(dq, &row(s)[ok..ok + dh]) + dot(q, &trow(s)[ok..ok + dh]));
                            mean += ps * da[s];
                        }
                        let dzt = &mut dz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                        for (s, &ps) in pt.iter().enumerate() {
                            axpy(dzt, ps * (da[s] - mean), &row(s)[ov..ov + dv]);
                            axpy(dzt, ps, &trow(s)[ov..ov + dv]);
                        }
                    }
                }
            }
        }
        let mut t = Mat::zeros(n * r * pout, 2 * self.resid);
        gemm(
            t.as_mut().subcols_mut(0, self.resid),
            Accum::Replace,
            MatRef::from_row_major_slice(&dz, n * r * pout, hz),
            self.w_o.as_ref(),
        );
        copy_cols_from_pos(&mut t, self.resid, &dx.data, f, self.resid, pos, t0);
        Batch::new(n, r, pout, t)
    }
}
