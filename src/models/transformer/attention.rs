//! `attn_out.k`: causal multi-head attention, forward, VJP and JVP side by side, with the
//! architecture variants of method.md section 9: grouped-query attention (Llama), a local
//! attention window (GPT-Neo) and rotary position embeddings (GPT-NeoX / Pythia, Llama).
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
use std::sync::Arc;

/// Rotary position embedding (RoPE) on the first `dims` coordinates of every query and key
/// head, in Hugging Face's `rotate_half` convention (GPT-NeoX, Llama): with `half = dims / 2`
/// and `theta_{s,i} = s base^{-2i / dims}` at position `s`, for `i < half`
///
/// `q'_i = q_i cos theta_{s,i} - q_{i+half} sin theta_{s,i}`,
/// `q'_{i+half} = q_{i+half} cos theta_{s,i} + q_i sin theta_{s,i}`,
///
/// the coordinates from `dims` on unchanged. A fixed rotation per position: tangents rotate the
/// same way, cotangents by the transpose (the inverse rotation).
pub struct Rotary {
    /// Rotated coordinates per head (even).
    pub dims: usize,
    pub base: f64,
    /// Positions tabulated.
    n_ctx: usize,
    /// `cos theta_{s,i}`, `sin theta_{s,i}` at `s * half + i`.
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl Rotary {
    /// The rotation tables for positions `0 .. n_ctx`. `dims` must be even and positive.
    pub fn new(dims: usize, base: f64, n_ctx: usize) -> Self {
        assert!(
            dims > 0 && dims.is_multiple_of(2),
            "rotary dims {dims} must be even"
        );
        let half = dims / 2;
        let (mut cos, mut sin) = (vec![0.0; n_ctx * half], vec![0.0; n_ctx * half]);
        for s in 0..n_ctx {
            for i in 0..half {
                let theta = s as f64 * base.powf(-2.0 * i as f64 / dims as f64);
                (sin[s * half + i], cos[s * half + i]) = theta.sin_cos();
            }
        }
        Self {
            dims,
            base,
            n_ctx,
            cos,
            sin,
        }
    }

    /// Rotates one head's vector `v` by position `s`'s angles, or by minus them (`inverse`).
    #[inline]
    fn rotate(&self, v: &mut [f64], s: usize, inverse: bool) {
        let half = self.dims / 2;
        let (cos, sin) = (&self.cos[s * half..][..half], &self.sin[s * half..][..half]);
        let (lo, hi) = v[..self.dims].split_at_mut(half);
        for i in 0..half {
            let (c, sn) = (cos[i], if inverse { -sin[i] } else { sin[i] });
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * c - b * sn;
            hi[i] = b * c + a * sn;
        }
    }
}

/// `attn_out.k`: causal multi-head attention on `attn_in`'s streams. Input `(q, k, v, x)`:
/// `q` of `H d_head` features (head `h` at `h d_head ..`), `k` of `H_kv d_head` (kv head `g` at
/// `g d_head ..`), `v` of `H_kv (d_head + 1)` (kv head `g` at `g (d_head + 1) ..`, its last
/// coordinate the folded 1), then the residual `x` (`R`). Query head `h` reads kv head
/// `g(h) = h / (H / H_kv)` (grouped-query attention; `H_kv = H`: plain multi-head).
/// Output `(attn, x)` (`2R`), at every position, or at the last one only (`last_pos`).
///
/// With rotary embeddings, `q_t` and `k_s` below are the rotated `Rot_t q_t`, `Rot_s k_s`
/// ([`Rotary`]). Per sample, head `h`, query `t` and key `s` in the window `K(t)`
/// (`s <= t`, and `s > t - window` for local attention; other keys are masked: weight 0):
///
/// `a_ts = scale q_t . k_s`, `p_ts = softmax_{s in K(t)}(a_ts)`, `z_t = sum_s p_ts v_s`,
/// `attn_t = sum_h z_{t,h} W_O'_h` — one GEMM of `z` (`rows x H (d_head + 1)`) with
/// `W_O'` (`H (d_head + 1) x R`: rows `W_O[h]`, then `b_O / H`; last column 0). Since
/// `sum_s p_ts = 1`, `z`'s last coordinate per head is 1 and the heads add exactly `b_O`.
///
/// JVP: `da_ts = scale (dq_t . k_s + q_t . dk_s)`, `dp_ts = p_ts (da_ts - sum_s' p_ts' da_ts')`,
/// `dz_t = sum_s dp_ts v_s + p_ts dv_s`, `dattn = dz W_O'` (tangents `dq_t`, `dk_s` rotated
/// first).
/// VJP: `gz = gattn W_O'^T`, `gp_ts = gz_t . v_s`, `gv_s = sum_t p_ts gz_t`,
/// `ga_ts = p_ts (gp_ts - sum_s' p_ts' gp_ts')`, `gq_t = scale sum_s ga_ts k_s`,
/// `gk_s = scale sum_t ga_ts q_t` (summed over the query heads sharing kv head `g`; then
/// rotated back, `Rot^T`).
pub struct AttnOut {
    pub id: String,
    /// `H`, query heads.
    pub heads: usize,
    /// `H_kv`, key / value heads (divides `H`).
    pub kv_heads: usize,
    pub d_head: usize,
    /// Multiplies `q . k` (default `1 / sqrt(d_head)`).
    pub scale: f64,
    /// `H (d_head + 1) x R`.
    pub w_o: Mat<f64>,
    /// `R`.
    pub resid: usize,
    /// Compute the last query position only (`last_pos_module_type`).
    pub last_pos: bool,
    /// Local attention: query `t` sees keys `t - window < s <= t` (`None`: all `s <= t`).
    pub window: Option<usize>,
    /// Rotary position embeddings of `q` and `k` (shared by all layers).
    pub rotary: Option<Arc<Rotary>>,
}

/// The forward point: `q, k, v` row-major (rows `(x, s)`, `fqkv` columns; `q`, `k` rotated)
/// and the attention weights `p[((x H + h) pos + t) pos + s]` (0 for masked keys and for
/// queries not computed).
struct AttnCache {
    pos: usize,
    qkv: Vec<f64>,
    p: Vec<f64>,
}

impl AttnOut {
    /// `H d_head`: width of `q`.
    fn fq(&self) -> usize {
        self.heads * self.d_head
    }
    /// `H_kv d_head`: width of `k`.
    fn fk(&self) -> usize {
        self.kv_heads * self.d_head
    }
    /// `d_head + 1`: width of one head of `v` and `z`.
    fn dv(&self) -> usize {
        self.d_head + 1
    }
    /// Width of `(q, k, v)`.
    fn fqkv(&self) -> usize {
        self.fq() + self.fk() + self.kv_heads * self.dv()
    }
    /// The first query position computed.
    fn t0(&self, pos: usize) -> usize {
        if self.last_pos {
            pos - 1
        } else {
            0
        }
    }
    /// The first key query `t` attends to.
    #[inline]
    fn first_key(&self, t: usize) -> usize {
        self.window.map_or(0, |w| (t + 1).saturating_sub(w))
    }
    /// Offsets of query head `h`'s `q`, and of its kv head's `k` and `v`, inside a row of
    /// `(q, k, v)`.
    fn offsets(&self, h: usize) -> (usize, usize, usize) {
        let (fq, dh) = (self.fq(), self.d_head);
        let g = h / (self.heads / self.kv_heads);
        (h * dh, fq + g * dh, fq + self.fk() + g * self.dv())
    }
    /// Applies the rotary embedding of position `s` to every query and key head of one row of
    /// `(q, k, v)` (`inverse`: its transpose).
    fn rotate_row(&self, row: &mut [f64], s: usize, inverse: bool) {
        if let Some(rot) = &self.rotary {
            let dh = self.d_head;
            for head in row[..self.fq() + self.fk()].chunks_exact_mut(dh) {
                rot.rotate(head, s, inverse);
            }
        }
    }
    /// [`Self::rotate_row`] on every row of a row-major buffer of rows `(v, s)`.
    fn rotate_rows(&self, buf: &mut [f64], pos: usize, inverse: bool) {
        if self.rotary.is_some() {
            for (i, row) in buf.chunks_exact_mut(self.fqkv()).enumerate() {
                self.rotate_row(row, i % pos, inverse);
            }
        }
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

    /// `p_t = softmax_{s in K(t)}(scale q_t . k_s)`, `z_t = sum_s p_ts v_s`, `attn = z W_O'`.
    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (n, pos, heads, dh, dv, f) =
            (x.n, x.pos, self.heads, self.d_head, self.dv(), self.fqkv());
        let (t0, pout, hz) = (self.t0(pos), self.out_pos(pos), heads * dv);
        if let Some(rot) = &self.rotary {
            assert!(
                pos <= rot.n_ctx,
                "{}: {pos} positions but the model's context is {}",
                self.id,
                rot.n_ctx
            );
        }
        let mut qkv = vec![0.0; n * pos * f];
        read_rows(&x.data, 0, 0, f, &mut qkv);
        self.rotate_rows(&mut qkv, pos, false);
        let mut p = vec![0.0; n * heads * pos * pos];
        let mut z = vec![0.0; n * pout * hz];
        for xs in 0..n {
            let row = |s: usize| &qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
            for h in 0..heads {
                let (oq, ok, ov) = self.offsets(h);
                for t in t0..pos {
                    let s0 = self.first_key(t);
                    let q = &row(t)[oq..oq + dh];
                    let pt = &mut p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                    let mut max = f64::NEG_INFINITY;
                    for (s, a) in (s0..).zip(pt.iter_mut()) {
                        *a = self.scale * dot(q, &row(s)[ok..ok + dh]);
                        max = max.max(*a);
                    }
                    let mut sum = 0.0;
                    for a in pt.iter_mut() {
                        *a = (*a - max).exp();
                        sum += *a;
                    }
                    let zt = &mut z[(xs * pout + t - t0) * hz + h * dv..][..dv];
                    for (s, a) in (s0..).zip(pt.iter_mut()) {
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
    /// `gk_s = scale sum_t ga_ts q_t`, then `gq`, `gk` rotated back; the residual's cotangent
    /// passes through.
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
                        let s0 = self.first_key(t);
                        let pt = &c.p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                        let gzt = &gz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                        let mut mean = 0.0;
                        for (s, &ps) in (s0..).zip(pt) {
                            gp[s] = dot(gzt, &row(s)[ov..ov + dv]);
                            mean += ps * gp[s];
                            axpy(&mut g[(v * pos + s) * f + ov..][..dv], ps, gzt);
                        }
                        gq.fill(0.0);
                        let q = &row(t)[oq..oq + dh];
                        for (s, &ps) in (s0..).zip(pt) {
                            let ga = self.scale * ps * (gp[s] - mean);
                            axpy(&mut gq, ga, &row(s)[ok..ok + dh]);
                            axpy(&mut g[(v * pos + s) * f + ok..][..dh], ga, q);
                        }
                        axpy(&mut g[(v * pos + t) * f + oq..][..dh], 1.0, &gq);
                    }
                }
            }
            self.rotate_rows(&mut g, pos, true);
            write_rows(&mut dx, xs * r * pos, 0, f, &g);
        }
        copy_cols_to_pos(&mut dx, f, &dy.data, self.resid, self.resid, pos, t0);
        Batch::new(n, r, pos, dx)
    }

    /// Tangents `dq`, `dk` rotated first; per head `da_ts = scale (dq_t . k_s + q_t . dk_s)`,
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
            self.rotate_rows(&mut tq, pos, false);
            for v in 0..r {
                let trow = |s: usize| &tq[(v * pos + s) * f..(v * pos + s + 1) * f];
                for h in 0..heads {
                    let (oq, ok, ov) = self.offsets(h);
                    for t in t0..pos {
                        let s0 = self.first_key(t);
                        let pt = &c.p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                        let (q, dq) = (&row(t)[oq..oq + dh], &trow(t)[oq..oq + dh]);
                        let mut mean = 0.0;
                        for (s, &ps) in (s0..).zip(pt) {
                            da[s] = self.scale
                                * (dot(dq, &row(s)[ok..ok + dh]) + dot(q, &trow(s)[ok..ok + dh]));
                            mean += ps * da[s];
                        }
                        let dzt = &mut dz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                        for (s, &ps) in (s0..).zip(pt) {
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
