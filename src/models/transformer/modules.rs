//! The transformer's modules (method.md section 9), each with its forward pass, batched VJP and
//! JVP side by side. Notation used throughout:
//!
//! - `R = d_model + 1`: the residual stream with its folded bias coordinate last (method.md
//!   section 8); `D = d_model` the non-bias coordinates.
//! - A batch has rows `(sample x, vector v, position s)`, row `(x * r + v) * pos + s`; a
//!   forward-pass cache has rows `(x, s)`, row `x * pos + s` ([`for_rows`] pairs them up).
//! - Per-position maps are one GEMM over all rows (`Par::Seq`: the caller parallelises over
//!   sample chunks); only attention mixes positions, in GEMMs per `(x, head)` over all vectors.
//!
//! Attention (`attn_out`) is in [`super::attention`]. The exact stream layout of every module's output is tabulated in the parent module's docs.

use crate::models::{Activation, Cache, Module, Structure};
use crate::tensor::Batch;
use faer::{Accum, Mat, MatMut, MatRef};

// ---------------------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------------------

/// `dst (+)= a b` on one core.
pub(super) fn gemm(dst: MatMut<'_, f64>, accum: Accum, a: MatRef<'_, f64>, b: MatRef<'_, f64>) {
    crate::tensor::linalg::gemm(dst, accum, a, b);
}

/// Calls `f(row, cache_row)` for every row `(x, v, s)` of an `(n, r, pos)` batch, where
/// `cache_row = x * pos + s` is the matching row of a forward-pass cache.
#[inline]
fn for_rows(n: usize, r: usize, pos: usize, mut f: impl FnMut(usize, usize)) {
    for x in 0..n {
        for v in 0..r {
            let base = (x * r + v) * pos;
            for s in 0..pos {
                f(base + s, x * pos + s);
            }
        }
    }
}

/// Rows per block of the blocked transposes below: the block's rows of a row-major buffer
/// (`BLOCK` cache lines) stay in L1 while its columns are walked.
const BLOCK: usize = 64;

/// Reads rows `row0 .. row0 + buf.len() / w`, columns `c0 .. c0 + w` of `m` into the
/// row-major `buf` (row `i` at `buf[i * w .. (i + 1) * w]`), in cache-friendly blocks.
pub(super) fn read_rows(m: &Mat<f64>, row0: usize, c0: usize, w: usize, buf: &mut [f64]) {
    for (b, block) in buf.chunks_mut(BLOCK * w).enumerate() {
        let r0 = row0 + b * BLOCK;
        for j in 0..w {
            let col = &m.col_as_slice(c0 + j)[r0..];
            for (row, v) in block.chunks_exact_mut(w).zip(col) {
                row[j] = *v;
            }
        }
    }
}

/// The inverse of [`read_rows`]: writes the row-major `buf` into rows `row0 ..`, columns
/// `c0 .. c0 + w` of `m`.
#[cfg(test)]
pub(super) fn write_rows(m: &mut Mat<f64>, row0: usize, c0: usize, w: usize, buf: &[f64]) {
    for (b, block) in buf.chunks(BLOCK * w).enumerate() {
        let r0 = row0 + b * BLOCK;
        for j in 0..w {
            let col = &mut m.col_as_slice_mut(c0 + j)[r0..];
            for (v, row) in col.iter_mut().zip(block.chunks_exact(w)) {
                *v = row[j];
            }
        }
    }
}

/// Copies columns `src_c0 .. src_c0 + w` of `src` into columns `dst_c0 ..` of `dst`.
fn copy_cols(dst: &mut Mat<f64>, dst_c0: usize, src: MatRef<'_, f64>, src_c0: usize, w: usize) {
    dst.as_mut()
        .subcols_mut(dst_c0, w)
        .copy_from(src.subcols(src_c0, w));
}

/// Copies columns `src_c0 .. src_c0 + w` of the rows `(x, v, s >= s0)` of `src` (an `(n, r, pos)`
/// batch) into the rows `(x, v, s - s0)` of `dst` (an `(n, r, pos - s0)` batch), columns
/// `dst_c0 ..`. With `s0 = 0` a plain column copy; with `s0 = pos - 1` the last position.
pub(super) fn copy_cols_from_pos(
    dst: &mut Mat<f64>,
    dst_c0: usize,
    src: &Mat<f64>,
    src_c0: usize,
    w: usize,
    pos: usize,
    s0: usize,
) {
    let pout = pos - s0;
    for j in 0..w {
        let sc = src.col_as_slice(src_c0 + j);
        let dc = dst.col_as_slice_mut(dst_c0 + j);
        if s0 == 0 {
            dc.copy_from_slice(sc);
            continue;
        }
        for (d, s) in dc.chunks_exact_mut(pout).zip(sc.chunks_exact(pos)) {
            d.copy_from_slice(&s[s0..]);
        }
    }
}

/// The inverse placement of [`copy_cols_from_pos`]: rows `(x, v, t)` of `src` (positions
/// `pos - s0`) go to rows `(x, v, s0 + t)` of `dst` (positions `pos`); other rows are untouched.
pub(super) fn copy_cols_to_pos(
    dst: &mut Mat<f64>,
    dst_c0: usize,
    src: &Mat<f64>,
    src_c0: usize,
    w: usize,
    pos: usize,
    s0: usize,
) {
    let pout = pos - s0;
    for j in 0..w {
        let sc = src.col_as_slice(src_c0 + j);
        let dc = dst.col_as_slice_mut(dst_c0 + j);
        if s0 == 0 {
            dc.copy_from_slice(sc);
            continue;
        }
        for (d, s) in dc.chunks_exact_mut(pos).zip(sc.chunks_exact(pout)) {
            d[s0..].copy_from_slice(s);
        }
    }
}

pub(super) fn cache<'a, T: 'static>(c: &'a Cache, what: &str) -> &'a T {
    c.downcast_ref::<T>()
        .unwrap_or_else(|| panic!("{what}: cache from another module"))
}

// ---------------------------------------------------------------------------------------------
// embed: token ids -> W_E'[token]   (W_E' = [W_E, 0], shape vocab x R)
// ---------------------------------------------------------------------------------------------

/// `embed`: input one column of token ids (as `f64`), output the folded token embedding
/// `W_E'[token] = [W_E[token], 0]` (`R` features; the bias coordinate is 0 here and becomes 1
/// when `add_embed` adds the position embedding).
///
/// Token ids are not differentiable: the VJP returns zeros (one column) and the JVP zeros, and
/// [`super::check_node_layer`] rejects `embed` as a node layer.
pub struct Embed {
    /// `vocab x R`.
    pub w_e: Mat<f64>,
}

impl Module for Embed {
    fn id(&self) -> &str {
        "embed"
    }
    fn in_features(&self) -> usize {
        1
    }
    fn out_features(&self) -> usize {
        self.w_e.ncols()
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let vocab = self.w_e.nrows();
        let tokens = x.data.col_as_slice(0);
        let ids: Vec<usize> = tokens
            .iter()
            .map(|&t| {
                assert!(
                    t >= 0.0 && t.fract() == 0.0 && (t as usize) < vocab,
                    "embed: token id {t} is not an integer in 0..{vocab}"
                );
                t as usize
            })
            .collect();
        let y = Mat::from_fn(x.rows(), self.w_e.ncols(), |i, j| self.w_e[(ids[i], j)]);
        (Batch::new(x.n, x.r, x.pos, y), Box::new(()))
    }

    /// Zero: token ids carry no derivative.
    fn vjp(&self, _: &Cache, dy: &Batch) -> Batch {
        Batch::zeros(dy.n, dy.r, dy.pos, 1)
    }

    /// Zero: token ids carry no derivative.
    fn jvp(&self, _: &Cache, dx: &Batch) -> Batch {
        Batch::zeros(dx.n, dx.r, dx.pos, self.w_e.ncols())
    }
}

// ---------------------------------------------------------------------------------------------
// pos_embed: e -> (e, W_pos'[s])   (W_pos' = [W_pos, 1], shape n_ctx x R)
// ---------------------------------------------------------------------------------------------

/// `pos_embed`: input the token embedding `e` (`R`), output `(e, W_pos'[s])` (`2R`) with
/// `W_pos' = [W_pos, 1]` and `s` the row's position. The second stream is constant, so
/// VJP: `de = dy[:, 0..R]`; JVP: `dy = (de, 0)`.
pub struct PosEmbed {
    /// `n_ctx x R`.
    pub w_pos: Mat<f64>,
}

impl Module for PosEmbed {
    fn id(&self) -> &str {
        "pos_embed"
    }
    fn max_positions(&self) -> Option<usize> {
        Some(self.w_pos.nrows())
    }
    fn in_features(&self) -> usize {
        self.w_pos.ncols()
    }
    fn out_features(&self) -> usize {
        2 * self.w_pos.ncols()
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let w = self.w_pos.ncols();
        assert!(
            x.pos <= self.w_pos.nrows(),
            "pos_embed: {} positions but the model's context is {}",
            x.pos,
            self.w_pos.nrows()
        );
        let mut y = Mat::zeros(x.rows(), 2 * w);
        copy_cols(&mut y, 0, x.data.as_ref(), 0, w);
        for j in 0..w {
            let col = y.col_as_slice_mut(w + j);
            for (row, c) in col.iter_mut().enumerate() {
                *c = self.w_pos[(row % x.pos, j)];
            }
        }
        (Batch::new(x.n, x.r, x.pos, y), Box::new(()))
    }

    fn vjp(&self, _: &Cache, dy: &Batch) -> Batch {
        let w = self.w_pos.ncols();
        Batch::new(dy.n, dy.r, dy.pos, dy.data.subcols(0, w).to_owned())
    }

    fn jvp(&self, _: &Cache, dx: &Batch) -> Batch {
        let w = self.w_pos.ncols();
        let mut t = Mat::zeros(dx.rows(), 2 * w);
        copy_cols(&mut t, 0, dx.data.as_ref(), 0, w);
        Batch::new(dx.n, dx.r, dx.pos, t)
    }
}

// ---------------------------------------------------------------------------------------------
// add_embed, add_resid1, add_resid2: (a, b) -> a + b
// ---------------------------------------------------------------------------------------------

/// Residual additions `add_embed`, `add_resid1.k`, `add_resid2.k`: input `(a, b)` (two streams
/// of `width = R` features), output `a + b`. Folded bias: `a` ends in 0 (`W_E'`'s, `W_O'`'s or
/// `W_out'`'s zero column) and `b` in 1, so the sum ends in exactly 1.
/// VJP: `(da, db) = (dy, dy)`; JVP: `dy = da + db`.
pub struct Add {
    pub id: String,
    pub width: usize,
}

impl Module for Add {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        2 * self.width
    }
    fn out_features(&self) -> usize {
        self.width
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        (self.sum(x), Box::new(()))
    }

    fn vjp(&self, _: &Cache, dy: &Batch) -> Batch {
        let w = self.width;
        let mut g = Mat::zeros(dy.rows(), 2 * w);
        copy_cols(&mut g, 0, dy.data.as_ref(), 0, w);
        copy_cols(&mut g, w, dy.data.as_ref(), 0, w);
        Batch::new(dy.n, dy.r, dy.pos, g)
    }

    fn jvp(&self, _: &Cache, dx: &Batch) -> Batch {
        self.sum(dx)
    }
    fn fixed_linear(&self) -> bool {
        true
    }
}

impl Add {
    fn sum(&self, x: &Batch) -> Batch {
        let w = self.width;
        let mut y = x.data.subcols(0, w).to_owned();
        for j in 0..w {
            let b = x.data.col_as_slice(w + j);
            for (y, b) in y.col_as_slice_mut(j).iter_mut().zip(b) {
                *y += b;
            }
        }
        Batch::new(x.n, x.r, x.pos, y)
    }
}

// ---------------------------------------------------------------------------------------------
// Identity (lnX / lnX_out without layer norm)
// ---------------------------------------------------------------------------------------------

/// The layer-norm modules of a model without normalization (`normalization = none`): the
/// identity on the residual stream (`R` features), so that node layers `lnX.k`, `lnX_out.k`
/// are the plain residual stream.
pub struct Identity {
    pub id: String,
    pub width: usize,
}

impl Module for Identity {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.width
    }
    fn out_features(&self) -> usize {
        self.width
    }
    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        (x.clone(), Box::new(()))
    }
    fn vjp(&self, _: &Cache, dy: &Batch) -> Batch {
        dy.clone()
    }
    fn jvp(&self, _: &Cache, dx: &Batch) -> Batch {
        dx.clone()
    }
    fn fixed_linear(&self) -> bool {
        true
    }
    fn is_identity(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// lnX (part 1): (c, x) -> (var, c, x)
// ---------------------------------------------------------------------------------------------

/// How a norm normalises the `D` non-bias coordinates of the residual `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// Layer norm: centre, then scale. Channel `var = 1/D sum_{i<D} (x_i - m)^2`,
    /// `m = 1/D sum_{i<D} x_i`.
    LayerNorm,
    /// RMS norm: scale only. Channel `var = 1/D sum_{i<D} x_i^2` (the mean square).
    Rms,
}

impl NormKind {
    fn centres(self) -> bool {
        self == NormKind::LayerNorm
    }
}

/// Per-row centred (layer norm) or raw (RMS norm) non-bias coordinates of the residual at
/// columns `c0 .. c0 + d` of `m`: `c_i = x_i - m` or `c_i = x_i` (`rows x d`).
fn centred(m: MatRef<'_, f64>, c0: usize, d: usize, kind: NormKind) -> Mat<f64> {
    let mut c = m.subcols(c0, d).to_owned();
    if kind.centres() {
        let mean = row_means(m, c0, d);
        for j in 0..d {
            for (v, mu) in c.col_as_slice_mut(j).iter_mut().zip(&mean) {
                *v -= mu;
            }
        }
    }
    c
}

/// `ln1.k`, `ln2.k`, `ln_final`, the variance half of a layer norm or RMS norm (method.md
/// section 4.1, layer-norm isolation): input `(c, x)` — `carried` features of side streams
/// `c` (the parallel-residual attention output in `ln2.k`, else none), then the residual `x`
/// (`R`) — output `(var, c, x)` (`1 + carried + R`), with no epsilon (as the reference):
///
/// `var = 1/D sum_{i<D} c_i^2`, where `c_i = x_i - m` ([`NormKind::LayerNorm`]) or `c_i = x_i`
/// ([`NormKind::Rms`]).
///
/// Since `d var / d x_i = 2 c_i / D` (`i < D`; 0 for the bias coordinate; the centring drops
/// out because `sum_i c_i = 0`):
/// VJP: `dx_i = dres_i + dvar * 2 c_i / D`, `dc = dc'`; JVP: `dvar = sum_{i<D} 2 c_i / D * dx_i`,
/// the rest passes through.
pub struct LnVar {
    pub id: String,
    /// `R`.
    pub width: usize,
    /// Side-stream features before the residual, carried through unchanged.
    pub carried: usize,
    pub kind: NormKind,
}

/// `2 c / D` per row `(x, s)` (`n * pos x D`).
struct LnVarCache {
    grad: Mat<f64>,
}

impl Module for LnVar {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.carried + self.width
    }
    fn out_features(&self) -> usize {
        1 + self.in_features()
    }
    fn structure(&self) -> Structure<'_> {
        Structure::NormVar {
            carried: self.carried,
            width: self.width,
            centre: self.kind.centres(),
        }
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (d, rows, fin) = (self.width - 1, x.rows(), self.in_features());
        let mut grad = centred(x.data.as_ref(), self.carried, d, self.kind);
        let mut y = Mat::zeros(rows, 1 + fin);
        copy_cols(&mut y, 1, x.data.as_ref(), 0, fin);
        let var = y.col_as_slice_mut(0);
        for j in 0..d {
            for (v, c) in var.iter_mut().zip(grad.col_as_slice_mut(j)) {
                *v += *c * *c / d as f64;
                *c *= 2.0 / d as f64;
            }
        }
        (
            Batch::new(x.n, x.r, x.pos, y),
            Box::new(LnVarCache { grad }),
        )
    }

    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        let c = cache::<LnVarCache>(c, "ln var");
        let mut dx = dy.data.subcols(1, self.in_features()).to_owned();
        let dvar = dy.data.col_as_slice(0);
        for j in 0..self.width - 1 {
            let g = c.grad.col_as_slice(j);
            let out = dx.col_as_slice_mut(self.carried + j);
            for_rows(dy.n, dy.r, dy.pos, |row, cr| out[row] += dvar[row] * g[cr]);
        }
        Batch::new(dy.n, dy.r, dy.pos, dx)
    }

    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        let c = cache::<LnVarCache>(c, "ln var");
        let fin = self.in_features();
        let mut t = Mat::zeros(dx.rows(), 1 + fin);
        copy_cols(&mut t, 1, dx.data.as_ref(), 0, fin);
        let dvar = t.col_as_slice_mut(0);
        for j in 0..self.width - 1 {
            let g = c.grad.col_as_slice(j);
            let d = dx.data.col_as_slice(self.carried + j);
            for_rows(dx.n, dx.r, dx.pos, |row, cr| dvar[row] += g[cr] * d[row]);
        }
        Batch::new(dx.n, dx.r, dx.pos, t)
    }
}

/// Per-row means of columns `c0 .. c0 + w`.
fn row_means(m: MatRef<'_, f64>, c0: usize, w: usize) -> Vec<f64> {
    let mut mean = vec![0.0; m.nrows()];
    for j in c0..c0 + w {
        let col = m.col(j);
        for (i, acc) in mean.iter_mut().enumerate() {
            *acc += col[i];
        }
    }
    mean.iter_mut().for_each(|v| *v /= w as f64);
    mean
}

// ---------------------------------------------------------------------------------------------
// lnX_out (part 2): (var, c, x) -> (y, c, x)   or   (y) for ln_final_out
// ---------------------------------------------------------------------------------------------

/// The affine weights of a norm, `y_i = n_i * weight_i + bias_i` (RMS norms: bias 0), when they
/// are kept in `lnX_out` (`fold_norms = false`) instead of being folded into the next linear
/// map.
#[derive(Clone, Debug, PartialEq)]
pub struct NormAffine {
    /// `D`.
    pub weight: Vec<f64>,
    /// `D`.
    pub bias: Vec<f64>,
}

/// `ln1_out.k`, `ln2_out.k`, `ln_final_out`, the normalising half of a layer norm or RMS norm:
/// input `(var, c, x)` (`lnX`'s output: `1 + carried + R`), output `(y, c, x)`
/// (`R + carried + R`), or `y` alone (`R`) for `ln_final_out` (`keep_resid = false`: nothing
/// after it needs the residual), where, with `sigma = (relu(var) + eps)^{-1/2}` (relu as the
/// reference: only ablations can make the variance channel negative), `c_i = x_i - m`
/// (layer norm) or `x_i` (RMS norm), and the affine weights `g = 1`, `b = 0` unless kept:
///
/// `y_i = g_i c_i sigma + b_i` (`i < D`), `y_D = x_D` (the bias coordinate, re-appended).
///
/// Derivatives (`var` is an input of its own, so only the centring acts on `x`):
/// `d y_i / d x_j = g_i sigma (delta_ij - [centre] 1/D)`, `d y_i / d var = g_i c_i beta`,
/// `beta = -sigma^3 / 2` (0 where `var < 0`).
/// JVP: `dy_i = g_i (sigma (dx_i - [centre] mean_{j<D} dx_j) + c_i beta dvar)`, `dy_D = dx_D`,
/// `(dc, dres) = (dc', dx)`.
/// VJP, with `gy'_i = g_i gy_i`: `dx_i = sigma (gy'_i - [centre] mean_{j<D} gy'_j) + gres_i`,
/// `dx_D = gy_D + gres_D`, `dvar = beta sum_{i<D} c_i gy'_i`, `dc' = dc`.
pub struct LnOut {
    pub id: String,
    /// `R`.
    pub width: usize,
    /// Side-stream features between `var` and the residual, carried through unchanged.
    pub carried: usize,
    pub eps: f64,
    pub kind: NormKind,
    pub keep_resid: bool,
    /// Affine weights applied here (`None`: folded into the next linear map, or none at all).
    pub affine: Option<NormAffine>,
}

/// Per row `(x, s)`: centred `c` (`n * pos x D`), `sigma` and `beta`.
struct LnOutCache {
    c: Mat<f64>,
    sigma: Vec<f64>,
    beta: Vec<f64>,
}

impl LnOut {
    /// `g_j`, 1 without affine weights.
    #[inline]
    fn gain(&self, j: usize) -> f64 {
        self.affine.as_ref().map_or(1.0, |a| a.weight[j])
    }
    /// Width of `(c, x)`, carried to the output when `keep_resid`.
    fn passed(&self) -> usize {
        self.carried + self.width
    }
}

impl Module for LnOut {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        1 + self.passed()
    }
    fn out_features(&self) -> usize {
        if self.keep_resid {
            self.width + self.passed()
        } else {
            self.width
        }
    }
    fn structure(&self) -> Structure<'_> {
        match self.affine {
            Some(_) => Structure::General,
            None => Structure::NormOut {
                carried: self.carried,
                width: self.width,
                centre: self.kind.centres(),
                eps: self.eps,
                keep_resid: self.keep_resid,
            },
        }
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (w, d, rows) = (self.width, self.width - 1, x.rows());
        let x0 = 1 + self.carried;
        let var = x.data.col_as_slice(0);
        let sigma: Vec<f64> = var
            .iter()
            .map(|&v| 1.0 / (v.max(0.0) + self.eps).sqrt())
            .collect();
        let beta: Vec<f64> = var
            .iter()
            .zip(&sigma)
            .map(|(&v, &s)| if v < 0.0 { 0.0 } else { -0.5 * s * s * s })
            .collect();
        let c = centred(x.data.as_ref(), x0, d, self.kind);
        let mut y = Mat::zeros(rows, self.out_features());
        for j in 0..d {
            let (g, b) = match &self.affine {
                Some(a) => (a.weight[j], a.bias[j]),
                None => (1.0, 0.0),
            };
            let (yj, cj) = (y.col_as_slice_mut(j), c.col_as_slice(j));
            for i in 0..rows {
                yj[i] = g * cj[i] * sigma[i] + b;
            }
        }
        copy_cols(&mut y, d, x.data.as_ref(), x0 + d, 1);
        if self.keep_resid {
            copy_cols(&mut y, w, x.data.as_ref(), 1, self.passed());
        }
        let cache = LnOutCache { c, sigma, beta };
        (Batch::new(x.n, x.r, x.pos, y), Box::new(cache))
    }

    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        let c = cache::<LnOutCache>(c, "ln out");
        let (w, d, rows) = (self.width, self.width - 1, dy.rows());
        let x0 = 1 + self.carried;
        let mut dx = Mat::zeros(rows, self.in_features());
        if self.keep_resid {
            copy_cols(&mut dx, 1, dy.data.as_ref(), w, self.passed());
        }
        // gy' = g gy, and its row means when centring.
        let mut gmean = vec![0.0; rows];
        if self.kind.centres() {
            for j in 0..d {
                let g = self.gain(j) / d as f64;
                for (m, v) in gmean.iter_mut().zip(dy.data.col_as_slice(j)) {
                    *m += g * v;
                }
            }
        }
        let mut dvar = vec![0.0; rows];
        for j in 0..d {
            let (gain, gy) = (self.gain(j), dy.data.col_as_slice(j));
            let cj = c.c.col_as_slice(j);
            let out = dx.col_as_slice_mut(x0 + j);
            for_rows(dy.n, dy.r, dy.pos, |row, cr| {
                let g = gain * gy[row];
                out[row] += c.sigma[cr] * (g - gmean[row]);
                dvar[row] += cj[cr] * g;
            });
        }
        for (o, g) in dx
            .col_as_slice_mut(x0 + d)
            .iter_mut()
            .zip(dy.data.col_as_slice(d))
        {
            *o += g;
        }
        let out = dx.col_as_slice_mut(0);
        for_rows(dy.n, dy.r, dy.pos, |row, cr| {
            out[row] = c.beta[cr] * dvar[row]
        });
        Batch::new(dy.n, dy.r, dy.pos, dx)
    }

    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        let c = cache::<LnOutCache>(c, "ln out");
        let (w, d, rows) = (self.width, self.width - 1, dx.rows());
        let x0 = 1 + self.carried;
        let mut t = Mat::zeros(rows, self.out_features());
        let dmean = if self.kind.centres() {
            row_means(dx.data.as_ref(), x0, d)
        } else {
            vec![0.0; rows]
        };
        let dvar = dx.data.col_as_slice(0);
        for j in 0..d {
            let (gain, dxj) = (self.gain(j), dx.data.col_as_slice(x0 + j));
            let cj = c.c.col_as_slice(j);
            let out = t.col_as_slice_mut(j);
            for_rows(dx.n, dx.r, dx.pos, |row, cr| {
                out[row] = gain
                    * (c.sigma[cr] * (dxj[row] - dmean[row]) + cj[cr] * c.beta[cr] * dvar[row]);
            });
        }
        copy_cols(&mut t, d, dx.data.as_ref(), x0 + d, 1);
        if self.keep_resid {
            copy_cols(&mut t, w, dx.data.as_ref(), 1, self.passed());
        }
        Batch::new(dx.n, dx.r, dx.pos, t)
    }
}

// ---------------------------------------------------------------------------------------------
// attn_in, mlp_in, mlp_out: (u, ..., x) -> (u W', x)   (parallel mlp_in: (u, a, x) -> (u W', a + x))
// ---------------------------------------------------------------------------------------------

/// A folded linear map of the first input stream with the residual carried alongside:
/// input `(u, ..., x)` with `u` the first `w.nrows()` features and, as the last
/// `resid_streams * resid` features, `resid_streams` streams of width `resid` whose sum is
/// carried on (1: the residual `x` alone; 2: `(a, x)`, the parallel residual's attention
/// output `a` joining the residual in `mlp_in`). Output `(u W', sum)`. `u` and `x` may
/// coincide (no layer norm: `attn_in`/`mlp_in` read the residual itself). Used for
/// - `attn_in.k`: `u` = LN(resid) (or resid), `W' = [W_Q' | W_K' | W_V']` (`R x (H d_head +
///   H_kv d_head + H_kv (d_head + 1))`), output `(q, k, v, resid)`;
/// - `mlp_in.k`: `W' = W_in'` (`R x (d_mlp + 1)`, bias row, column `[0, .., 0, r]`, `act(r) = 1`)
///   or, gated, `[W_gate' | W_up']` (`R x 2 (d_mlp + 1)`), output `(pre, resid)` or
///   `(gate, up, resid)`;
/// - `mlp_out.k`: `u` = post-activation, `W' = W_out'` (`(d_mlp + 1) x R`, bias row, zero
///   column), output `(mlp, resid)`.
///
/// VJP: `du = dz W'^T`, every summed stream gets `dres` (added where `u` and `x` coincide);
/// JVP: `(du W', sum of the streams' tangents)`.
pub struct Project {
    pub id: String,
    pub w: Mat<f64>,
    pub in_features: usize,
    pub resid: usize,
    /// Number of `resid`-wide streams at the end of the input summed into the carried residual.
    pub resid_streams: usize,
}

impl Project {
    /// Column of the first summed stream.
    fn streams_at(&self) -> usize {
        self.in_features - self.resid_streams * self.resid
    }

    fn apply(&self, x: &Batch) -> Batch {
        let (k, m) = (self.w.nrows(), self.w.ncols());
        let mut y = Mat::zeros(x.rows(), m + self.resid);
        gemm(
            y.as_mut().subcols_mut(0, m),
            Accum::Replace,
            x.data.as_ref().subcols(0, k),
            self.w.as_ref(),
        );
        let c0 = self.streams_at();
        copy_cols(&mut y, m, x.data.as_ref(), c0, self.resid);
        for stream in 1..self.resid_streams {
            for j in 0..self.resid {
                let src = x.data.col_as_slice(c0 + stream * self.resid + j);
                for (y, s) in y.col_as_slice_mut(m + j).iter_mut().zip(src) {
                    *y += s;
                }
            }
        }
        Batch::new(x.n, x.r, x.pos, y)
    }
}

impl Module for Project {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.w.ncols() + self.resid
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        (self.apply(x), Box::new(()))
    }

    fn vjp(&self, _: &Cache, dy: &Batch) -> Batch {
        let (k, m) = (self.w.nrows(), self.w.ncols());
        let mut dx = Mat::zeros(dy.rows(), self.in_features);
        for stream in 0..self.resid_streams {
            let c0 = self.streams_at() + stream * self.resid;
            copy_cols(&mut dx, c0, dy.data.as_ref(), m, self.resid);
        }
        gemm(
            dx.as_mut().subcols_mut(0, k),
            Accum::Add,
            dy.data.as_ref().subcols(0, m),
            self.w.transpose(),
        );
        Batch::new(dy.n, dy.r, dy.pos, dx)
    }

    fn jvp(&self, _: &Cache, dx: &Batch) -> Batch {
        self.apply(dx)
    }
    fn fixed_linear(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// mlp_act: (z, x) -> (act(z), x)   or, gated, (g, u, x) -> (act(g) * u, x)
// ---------------------------------------------------------------------------------------------

/// `mlp_act.k`, elementwise: input `(z, x)` (`M = d_mlp + 1` pre-activations, the last one `r`
/// with `act(r) = 1`, then the residual), output `(act(z), x)`.
/// VJP: `dz = dh * act'(z)`, `dx = dres`; JVP: `dh = act'(z) * dz`, `dres = dx`.
///
/// Gated (SwiGLU, `gated = true`): input `(g, u, x)` (`M` gate and `M` up pre-activations: the
/// folded bias puts `r` with `act(r) = 1` last in `g` and 1 last in `u`, so the output's last
/// coordinate is 1 and scaling the input by `a -> 0` sends both to 0), output
/// `(h, x) = (act(g) * u, x)`.
/// JVP: `dh = act'(g) u dg + act(g) du`; VJP: `dg = gh act'(g) u`, `du = gh act(g)`;
/// the residual passes through.
pub struct MlpAct {
    pub id: String,
    pub act: Activation,
    /// `M = d_mlp + 1`.
    pub width: usize,
    pub resid: usize,
    pub gated: bool,
}

/// Per row `(x, s)`: `act'(z)`, or, gated, `act'(g) u` and `act(g)` side by side (`2M` columns).
struct MlpActCache {
    d: Mat<f64>,
}

impl MlpAct {
    /// Width of the pre-activations, `M` or `2M` (gate and up).
    fn pre_width(&self) -> usize {
        if self.gated {
            2 * self.width
        } else {
            self.width
        }
    }

    /// The elementwise case's VJP and JVP (the same diagonal map): `g * act'(z)`.
    fn scale(&self, c: &Cache, g: &Batch) -> Batch {
        let c = cache::<MlpActCache>(c, "mlp act");
        let mut out = g.data.clone();
        for j in 0..self.width {
            let d = c.d.col_as_slice(j);
            let o = out.col_as_slice_mut(j);
            for_rows(g.n, g.r, g.pos, |row, cr| o[row] *= d[cr]);
        }
        Batch::new(g.n, g.r, g.pos, out)
    }
}

impl Module for MlpAct {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.pre_width() + self.resid
    }
    fn out_features(&self) -> usize {
        self.width + self.resid
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (m, rows) = (self.width, x.rows());
        let mut y = Mat::zeros(rows, m + self.resid);
        copy_cols(&mut y, m, x.data.as_ref(), self.pre_width(), self.resid);
        let mut d = Mat::zeros(rows, self.pre_width());
        for j in 0..m {
            let z = x.data.col_as_slice(j);
            let (yj, dj) = (y.col_as_slice_mut(j), d.col_as_slice_mut(j));
            for i in 0..rows {
                yj[i] = self.act.apply(z[i]);
                dj[i] = self.act.derivative(z[i]);
            }
            if self.gated {
                // h = act(g) u; d = (act'(g) u, act(g)).
                let u = x.data.col_as_slice(m + j);
                for i in 0..rows {
                    dj[i] *= u[i];
                }
                d.col_as_slice_mut(m + j).copy_from_slice(yj);
                for i in 0..rows {
                    yj[i] *= u[i];
                }
            }
        }
        (Batch::new(x.n, x.r, x.pos, y), Box::new(MlpActCache { d }))
    }

    fn structure(&self) -> Structure<'_> {
        if self.gated {
            Structure::Gated {
                act: self.act,
                width: self.width,
            }
        } else {
            Structure::Elementwise {
                act: self.act,
                width: self.width,
            }
        }
    }

    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        if !self.gated {
            return self.scale(c, dy);
        }
        let c = cache::<MlpActCache>(c, "mlp act");
        let m = self.width;
        let mut dx = Mat::zeros(dy.rows(), self.in_features());
        copy_cols(&mut dx, 2 * m, dy.data.as_ref(), m, self.resid);
        for j in 0..2 * m {
            let (d, gh) = (c.d.col_as_slice(j), dy.data.col_as_slice(j % m));
            let out = dx.col_as_slice_mut(j);
            for_rows(dy.n, dy.r, dy.pos, |row, cr| out[row] = gh[row] * d[cr]);
        }
        Batch::new(dy.n, dy.r, dy.pos, dx)
    }

    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        if !self.gated {
            return self.scale(c, dx);
        }
        let c = cache::<MlpActCache>(c, "mlp act");
        let m = self.width;
        let mut t = Mat::zeros(dx.rows(), self.out_features());
        copy_cols(&mut t, m, dx.data.as_ref(), 2 * m, self.resid);
        for j in 0..m {
            let (dg, du) = (c.d.col_as_slice(j), c.d.col_as_slice(m + j));
            let (tg, tu) = (dx.data.col_as_slice(j), dx.data.col_as_slice(m + j));
            let out = t.col_as_slice_mut(j);
            for_rows(dx.n, dx.r, dx.pos, |row, cr| {
                out[row] = dg[cr] * tg[row] + du[cr] * tu[row]
            });
        }
        Batch::new(dx.n, dx.r, dx.pos, t)
    }
}

// ---------------------------------------------------------------------------------------------
// Last position only (last_pos_module_type)
// ---------------------------------------------------------------------------------------------

/// Wraps a per-position module so that it keeps only the last position
/// (`last_pos_module_type`, method.md section 9): forward and JVP select the rows
/// `(x, v, pos - 1)` and apply the module there (`out_pos = 1`); the VJP applies the module's
/// VJP and places the result at the last position, zero elsewhere.
pub struct LastPos(pub Box<dyn Module>);

struct LastPosCache {
    inner: Cache,
    pos: usize,
}

/// The rows `(x, v, pos - 1)` of `b`.
fn last_rows(b: &Batch) -> Batch {
    let mut m = Mat::zeros(b.n * b.r, b.features());
    copy_cols_from_pos(&mut m, 0, &b.data, 0, b.features(), b.pos, b.pos - 1);
    Batch::new(b.n, b.r, 1, m)
}

impl Module for LastPos {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn max_positions(&self) -> Option<usize> {
        self.0.max_positions()
    }
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn out_pos(&self, _: usize) -> usize {
        1
    }
    fn fixed_linear_at_one_position(&self) -> bool {
        self.0.fixed_linear()
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let (y, inner) = self.0.forward(&last_rows(x));
        (y, Box::new(LastPosCache { inner, pos: x.pos }))
    }

    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        let c = cache::<LastPosCache>(c, "last position");
        let g = self.0.vjp(&c.inner, dy);
        let mut dx = Mat::zeros(dy.n * dy.r * c.pos, g.features());
        copy_cols_to_pos(&mut dx, 0, &g.data, 0, g.features(), c.pos, c.pos - 1);
        Batch::new(dy.n, dy.r, c.pos, dx)
    }

    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        let c = cache::<LastPosCache>(c, "last position");
        self.0.jvp(&c.inner, &last_rows(dx))
    }
}
