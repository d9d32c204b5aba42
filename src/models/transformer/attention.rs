//! `attn_out.k`: causal multi-head attention, forward, VJP and JVP side by side, with the
//! architecture variants of method.md section 9: grouped-query attention (Llama), a local
//! attention window (GPT-Neo) and rotary position embeddings (GPT-NeoX / Pythia, Llama).
//!
//! Positions mix only here. Per `(sample, head)` the score and value products of ALL the
//! sample's vectors are a few dense GEMMs (faer, `Par::Seq`: the caller parallelises over
//! samples): the vectors go in blocks whose tangents / cotangents are copied position-major,
//! rows `(position s, vector v)`, so that any range of positions of the whole block is one
//! evenly strided matrix. The queries go in causal chunks `[a, b)` that read the keys
//! `[first_key(a), b)` only, and per chunk every product is one GEMM over the block:
//! `dq K^T`, `dk Q^T` (added transposed), `dp V`, `P [dv_1 | dv_2 | ..]` for the JVP,
//! `gz V^T`, `P^T [gz_1 | gz_2 | ..]`, `ga K`, `ga^T Q` (transposed copy first) for the VJP.
//! Scratch (`Scratch`, at most `SCRATCH` doubles) is reused across blocks, heads and
//! samples; the output projection is one GEMM per block.

use super::modules::{cache, copy_cols_from_pos, copy_cols_to_pos, gemm, read_rows};
use crate::models::{Cache, Module};
use crate::tensor::linalg::{gemm_in, Real};
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

/// Positions a rotary table covers at most (the `[data] n_ctx` limit too).
pub const MAX_ROTARY_POSITIONS: usize = 1 << 16;

impl Rotary {
    /// The rotation tables for positions `0 .. n_ctx` (at most [`MAX_ROTARY_POSITIONS`]: a
    /// config may claim any context length, the tables are what is allocated). `dims` must be
    /// even and positive.
    pub fn new(dims: usize, base: f64, n_ctx: usize) -> Self {
        assert!(
            dims > 0 && dims.is_multiple_of(2),
            "rotary dims {dims} must be even"
        );
        let n_ctx = n_ctx.min(MAX_ROTARY_POSITIONS);
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
    fn rotate<T: Real>(&self, v: &mut [T], s: usize, inverse: bool) {
        let half = self.dims / 2;
        let (cos, sin) = (&self.cos[s * half..][..half], &self.sin[s * half..][..half]);
        let (lo, hi) = v[..self.dims].split_at_mut(half);
        for i in 0..half {
            let (c, sn) = (cos[i], if inverse { -sin[i] } else { sin[i] });
            let (c, sn) = (T::of(c), T::of(sn));
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
    pub fn dv(&self) -> usize {
        self.d_head + 1
    }
    /// Width of `(q, k, v)`.
    pub fn fqkv(&self) -> usize {
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
    pub fn first_key(&self, t: usize) -> usize {
        self.window.map_or(0, |w| (t + 1).saturating_sub(w))
    }
    /// Offsets of query head `h`'s `q`, and of its kv head's `k` and `v`, inside a row of
    /// `(q, k, v)`.
    pub fn offsets(&self, h: usize) -> (usize, usize, usize) {
        let (fq, dh) = (self.fq(), self.d_head);
        let g = h / (self.heads / self.kv_heads);
        (h * dh, fq + g * dh, fq + self.fk() + g * self.dv())
    }
    /// Applies the rotary embedding of position `s` to every query and key head of one row of
    /// `(q, k, v)` (`inverse`: its transpose).
    fn rotate_row<T: Real>(&self, row: &mut [T], s: usize, inverse: bool) {
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

/// Where the JVP's `dz` goes: `dz w` (in f32 with `w32`), then the residual's tangent with
/// `resid`.
struct OutProjection<'a> {
    w: MatRef<'a, f64>,
    w32: Option<MatRef<'a, f32>>,
    resid: bool,
}

/// `row(x, v, s, out)` of [`Tangents::Rows`].
pub type TangentRow<'a> = dyn Fn(usize, usize, usize, &mut [f64]) + Sync + 'a;

/// The tangents on `(q, k, v)` a JVP reads: a batch, gathered into the scratch layout block
/// by block, or rows written straight into it by a callback (an edge computation that builds
/// its tangents elementwise saves the batch's write and the gather's strided read).
pub enum Tangents<'a> {
    Batch(&'a Batch),
    /// `n` samples of `r` tangents at `pos` positions: `row(x, v, s, out)` writes tangent `v`
    /// of sample `x` at position `s` (`fqkv` numbers, in f64; rounded to the JVP's precision
    /// as they are copied in).
    Rows {
        n: usize,
        r: usize,
        pos: usize,
        row: &'a TangentRow<'a>,
    },
}

impl Tangents<'_> {
    /// `(n, r, pos)`.
    fn shape(&self) -> (usize, usize, usize) {
        match self {
            Tangents::Batch(b) => (b.n, b.r, b.pos),
            Tangents::Rows { n, r, pos, .. } => (*n, *r, *pos),
        }
    }
}

/// Scratch budget of the VJP / JVP (doubles, 8 MB): vectors per block [`AttnOut::block`].
const SCRATCH: usize = 1 << 20;

/// Queries per causal chunk: chunk `[a, b)` reads the keys `[first_key(a), b)` only, which
/// skips most of the masked upper triangle (about `1/2 - CHUNK/(2T)` of the score FLOPs).
const CHUNK: usize = 32;

/// The row-major `nrows x ncols` matrix at `buf[off..]`, rows `stride` apart.
#[inline]
fn rm<T>(buf: &[T], off: usize, nrows: usize, ncols: usize, stride: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice_with_stride(&buf[off..], nrows, ncols, stride)
}

/// [`rm`], mutable. (Not faer 0.24's `from_row_major_slice_with_stride_mut`: it builds the
/// column-major view.)
#[inline]
fn rm_mut<T>(
    buf: &mut [T],
    off: usize,
    nrows: usize,
    ncols: usize,
    stride: usize,
) -> MatMut<'_, T> {
    MatMut::from_column_major_slice_with_stride_mut(&mut buf[off..], ncols, nrows, stride)
        .transpose_mut()
}

/// `dst[(j, i)] = src[(i, j)]` for every vector `v < nb`, with `src` rows `(i, v)` and `dst`
/// rows `(j, v)` (both row-major, `ni x nj` and `nj x ni` per vector).
fn transpose_per_vector(src: &[f64], dst: &mut [f64], ni: usize, nj: usize, nb: usize) {
    for i in 0..ni {
        for v in 0..nb {
            let row = &src[(i * nb + v) * nj..][..nj];
            for (j, &x) in row.iter().enumerate() {
                dst[(j * nb + v) * ni + i] = x;
            }
        }
    }
}

/// Columns per tile of [`gather`] / [`scatter`].
const TILE: usize = 16;

/// `dst[(s nb + v) stride + j] = m[(row0 + v pos + s, c0 + j)]` for `v < nb`, `s < pos`,
/// `j < w`: rows `(v, s)` of a column-major batch into position-major rows `(s, v)`, in tiles
/// of [`TILE`] columns (the writes run through `dst` in order, the reads stay in cache),
/// rounded to `T`.
#[allow(clippy::too_many_arguments)]
fn gather<T: Real>(
    m: &Mat<f64>,
    row0: usize,
    nb: usize,
    pos: usize,
    c0: usize,
    w: usize,
    dst: &mut [T],
    stride: usize,
) {
    for jb in (0..w).step_by(TILE) {
        let cols: Vec<&[f64]> = (jb..w.min(jb + TILE))
            .map(|j| &m.col_as_slice(c0 + j)[row0..row0 + nb * pos])
            .collect();
        for s in 0..pos {
            for v in 0..nb {
                let d = &mut dst[(s * nb + v) * stride + jb..][..cols.len()];
                for (x, col) in d.iter_mut().zip(&cols) {
                    *x = T::of(col[v * pos + s]);
                }
            }
        }
    }
}

/// The inverse of [`gather`]: `m[(row0 + v pos + s, c0 + j)] = src[(s nb + v) stride + j]`.
#[allow(clippy::too_many_arguments)]
fn scatter(
    m: &mut Mat<f64>,
    row0: usize,
    nb: usize,
    pos: usize,
    c0: usize,
    w: usize,
    src: &[f64],
    stride: usize,
) {
    for jb in (0..w).step_by(TILE) {
        let jn = TILE.min(w - jb);
        let mut cols: Vec<&mut [f64]> = m
            .as_mut()
            .subrows_mut(row0, nb * pos)
            .subcols_mut(c0 + jb, jn)
            .col_iter_mut()
            .map(|c| c.try_as_col_major_mut().unwrap().as_slice_mut())
            .collect();
        for s in 0..pos {
            for v in 0..nb {
                let d = &src[(s * nb + v) * stride + jb..][..jn];
                for (x, col) in d.iter().zip(cols.iter_mut()) {
                    col[v * pos + s] = *x;
                }
            }
        }
    }
}

/// Scratch of one block of `nb` vectors, position-major: rows `(s, v)` (row `s nb + v`), so a
/// range of positions of all the block's vectors is one contiguous, evenly strided matrix.
struct Scratch<T> {
    /// Tangents (cotangents) on `q, k`, rotated: rows `(s, v)`, `H d_head + H_kv d_head` wide.
    qk: Vec<T>,
    /// On `v`: kv head `g`, position `s`, vector `v` at `((g pos + s) nb + v) (d_head + 1)`, so
    /// that `[dv_1 | dv_2 | ..]` of one kv head is a `pos x nb (d_head + 1)` matrix.
    v: Vec<T>,
    /// Scores of one chunk: rows `(t, v)`, one column per key of the chunk.
    sc: Vec<T>,
    /// The same transposed per vector: rows `(s, v)`, one column per query of the chunk.
    tr: Vec<T>,
    /// One head's `dz` (`gz`): rows `(t, v)`, `d_head + 1` wide.
    zh: Vec<T>,
    /// All heads' `dz` (`gz`) in the output's order: rows `(v, t)`, `H (d_head + 1)` wide.
    z: Vec<T>,
}

impl AttnOut {
    /// Doubles of [`Scratch`] per vector.
    fn scratch_per_vector(&self, pos: usize) -> usize {
        let pout = self.out_pos(pos);
        pos * self.fqkv()
            + 2 * CHUNK.min(pout) * pos
            + pout * self.dv()
            + pout * self.heads * self.dv()
    }

    /// Vectors per block of the VJP / JVP: [`Scratch`] within [`SCRATCH`], at least 1, at
    /// most `r`.
    fn block(&self, r: usize, pos: usize) -> usize {
        (SCRATCH / self.scratch_per_vector(pos).max(1)).clamp(1, r.max(1))
    }

    fn scratch<T: Real>(&self, nb: usize, pos: usize, cq: usize) -> Scratch<T> {
        let (pout, dv, wqk) = (self.out_pos(pos), self.dv(), self.fq() + self.fk());
        let cq = cq.min(pout);
        let zero = T::of(0.0);
        Scratch {
            qk: vec![zero; nb * pos * wqk],
            v: vec![zero; nb * pos * self.kv_heads * dv],
            sc: vec![zero; nb * cq * pos],
            tr: vec![zero; nb * cq * pos],
            zh: vec![zero; nb * pout * dv],
            z: vec![zero; nb * pout * self.heads * dv],
        }
    }

    /// The causal query chunks `(a, b, lo)`: queries `[a, b)` (at most `cq`), keys `[lo, b)`.
    fn chunks(&self, pos: usize, cq: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (self.t0(pos)..pos)
            .step_by(cq.max(1))
            .map(move |a| (a, (a + cq.max(1)).min(pos), self.first_key(a)))
    }

    /// Turns the scores `sc` of chunk `(a, b, lo)` (rows `(t, v)`, keys `lo .. b`) into
    /// `scale p_ts (sc_ts - sum_s' p_ts' sc_ts')` on the window `K(t)`, 0 elsewhere (the
    /// softmax's JVP, and its VJP: the Jacobian is symmetric). `ph`: head `h`'s weights, rows
    /// `t` of `pos`.
    fn softmax_diff<T: Real>(
        &self,
        sc: &mut [T],
        ph: &[T],
        pos: usize,
        (a, b, lo): (usize, usize, usize),
        nb: usize,
    ) {
        for (i, row) in sc.chunks_exact_mut(b - lo).enumerate() {
            let t = a + i / nb;
            let (s0, s1) = (self.first_key(t) - lo, t + 1 - lo);
            let pt = &ph[t * pos + lo..][s0..s1];
            let mean = pt
                .iter()
                .zip(&row[s0..s1])
                .fold(T::of(0.0), |acc, (&p, &x)| acc + p * x);
            let scale = T::of(self.scale);
            for (x, &p) in row[s0..s1].iter_mut().zip(pt) {
                *x = scale * p * (*x - mean);
            }
            row[..s0].fill(T::of(0.0));
            row[s1..].fill(T::of(0.0));
        }
    }

    /// [`Module::vjp`] in blocks of `rb` cotangents and causal chunks of `cq` queries.
    fn vjp_blocked(&self, c: &AttnCache, dy: &Batch, rb: usize, cq: usize) -> Batch {
        let (n, r, pout, heads, dh, dv, f) = (
            dy.n,
            dy.r,
            dy.pos,
            self.heads,
            self.d_head,
            self.dv(),
            self.fqkv(),
        );
        let (pos, hz, wqk) = (c.pos, heads * dv, self.fq() + self.fk());
        let t0 = self.t0(pos);
        assert_eq!(pout, pos - t0, "{}: cotangent positions", self.id);
        let mut dx = Mat::zeros(n * r * pos, f + self.resid);
        let (rb, cq) = (rb.clamp(1, r.max(1)), cq.max(1));
        let mut sb = self.scratch(rb, pos, cq);
        for xs in 0..n {
            let qkv = &c.qkv[xs * pos * f..(xs + 1) * pos * f];
            for v0 in (0..r).step_by(rb) {
                let nb = rb.min(r - v0);
                let Scratch {
                    qk: gqk,
                    v: gv,
                    sc,
                    tr,
                    zh,
                    z: gz,
                } = &mut sb;
                let (gqk, gv) = (
                    &mut gqk[..nb * pos * wqk],
                    &mut gv[..nb * pos * self.kv_heads * dv],
                );
                let (zh, gz) = (&mut zh[..nb * pout * dv], &mut gz[..nb * pout * hz]);
                // gz = gattn W_O'^T, rows (v, t).
                gemm(
                    rm_mut(gz, 0, nb * pout, hz, hz),
                    Accum::Replace,
                    dy.data
                        .as_ref()
                        .subrows((xs * r + v0) * pout, nb * pout)
                        .subcols(0, self.resid),
                    self.w_o.transpose(),
                );
                gqk.fill(0.0);
                gv.fill(0.0);
                for h in 0..heads {
                    let (oq, ok, ov) = self.offsets(h);
                    let og = (ov - wqk) / dv * pos * nb * dv;
                    // This head's gz, rows (t, v).
                    for t in 0..pout {
                        for v in 0..nb {
                            zh[(t * nb + v) * dv..][..dv]
                                .copy_from_slice(&gz[(v * pout + t) * hz + h * dv..][..dv]);
                        }
                    }
                    let ph = &c.p[(xs * heads + h) * pos * pos..][..pos * pos];
                    for ch in self.chunks(pos, cq) {
                        let (a, b, lo) = ch;
                        let (m, ns) = (b - a, b - lo);
                        let (sc, tr) = (&mut sc[..m * nb * ns], &mut tr[..m * nb * ns]);
                        let zc = (a - t0) * nb * dv;
                        // gp = gz V^T.
                        gemm(
                            rm_mut(sc, 0, m * nb, ns, ns),
                            Accum::Replace,
                            rm(zh, zc, m * nb, dv, dv),
                            rm(qkv, lo * f + ov, ns, dv, f).transpose(),
                        );
                        // [gv_1 | gv_2 | ..] += P^T [gz_1 | gz_2 | ..].
                        gemm(
                            rm_mut(gv, og + lo * nb * dv, ns, nb * dv, nb * dv),
                            Accum::Add,
                            rm(ph, a * pos + lo, m, ns, pos).transpose(),
                            rm(zh, zc, m, nb * dv, nb * dv),
                        );
                        self.softmax_diff(sc, ph, pos, ch, nb);
                        // gq = ga K (query head h owns these columns).
                        gemm(
                            rm_mut(gqk, a * nb * wqk + oq, m * nb, dh, wqk),
                            Accum::Replace,
                            rm(sc, 0, m * nb, ns, ns),
                            rm(qkv, lo * f + ok, ns, dh, f),
                        );
                        // gk += ga^T Q (rows (s, v)).
                        transpose_per_vector(sc, tr, m, ns, nb);
                        gemm(
                            rm_mut(gqk, lo * nb * wqk + ok, ns * nb, dh, wqk),
                            Accum::Add,
                            rm(tr, 0, ns * nb, m, m),
                            rm(qkv, a * f + oq, m, dh, f),
                        );
                    }
                }
                if self.rotary.is_some() {
                    for (i, row) in gqk.chunks_exact_mut(wqk).enumerate() {
                        self.rotate_row(row, i / nb, true);
                    }
                }
                let row0 = (xs * r + v0) * pos;
                scatter(&mut dx, row0, nb, pos, 0, wqk, gqk, wqk);
                for g in 0..self.kv_heads {
                    let src = &gv[g * pos * nb * dv..];
                    scatter(&mut dx, row0, nb, pos, wqk + g * dv, dv, src, dv);
                }
            }
        }
        copy_cols_to_pos(&mut dx, f, &dy.data, self.resid, self.resid, pos, t0);
        Batch::new(n, r, pos, dx)
    }

    /// [`Module::jvp`]'s attention part with `w` (`H (d_head + 1) x k`) in place of `W_O'` and
    /// no residual: rows `(sample, tangent, position)` of `dz w`, from tangents on `(q, k, v)`
    /// alone (`dx` is `fqkv` wide). An edge computation folds `W_O'` into the next node
    /// layer's basis this way: one GEMM of `dz` where the module and a projection made two.
    /// With `w32` (`w` rounded to f32), `dz w` is one f32 GEMM (`compute_dtype = "f32"`).
    pub fn jvp_projected(
        &self,
        c: &Cache,
        dx: &Tangents,
        w: MatRef<'_, f64>,
        w32: Option<MatRef<'_, f32>>,
    ) -> Mat<f64> {
        let c = cache::<AttnCache>(c, "attention");
        assert_eq!(w.nrows(), self.heads * self.dv(), "{}: projection", self.id);
        let out = OutProjection {
            w,
            w32,
            resid: false,
        };
        let (_, r, pos) = dx.shape();
        self.jvp_blocked(c, dx, self.block(r, pos), CHUNK, &out)
            .data
    }

    /// [`Module::jvp`] in blocks of `rb` tangents and causal chunks of `cq` queries, `dz`
    /// projected by `out` (`W_O'` and the residual's tangent for the module's own JVP). With
    /// `out.w32` every product runs in f32 (tangents, `q k v` and `p` rounded once per sample),
    /// with twice the block of vectors in the same scratch bytes: at SmolLM2's sizes the score
    /// and value products are ~0.4 MFLOP per tangent row, ~40% of a `norm -> attention`
    /// section's FLOPs, and f64's small GEMMs ran at half the f32 rate.
    fn jvp_blocked(
        &self,
        c: &AttnCache,
        dx: &Tangents,
        rb: usize,
        cq: usize,
        out_proj: &OutProjection,
    ) -> Batch {
        let width = if out_proj.resid {
            2 * self.resid
        } else {
            out_proj.w.ncols()
        };
        let mut out = match out_proj.w32 {
            None => self.jvp_core(c, dx, rb, cq, out_proj.w, width),
            Some(w32) => self.jvp_core(c, dx, 2 * rb, cq, w32, width),
        };
        let (f, (n, r, pos)) = (self.fqkv(), dx.shape());
        if out_proj.resid {
            let Tangents::Batch(dx) = dx else {
                panic!("{}: the residual's tangent needs a batch", self.id)
            };
            let t0 = self.t0(pos);
            copy_cols_from_pos(&mut out, self.resid, &dx.data, f, self.resid, pos, t0);
        }
        Batch::new(n, r, self.out_pos(pos), out)
    }

    /// [`Self::jvp_blocked`] in precision `T`: `dz w_out` in the first `w_out.ncols()` of
    /// `width` columns (the rest, zeros, for the residual's tangent).
    fn jvp_core<T: Real>(
        &self,
        c: &AttnCache,
        dx: &Tangents,
        rb: usize,
        cq: usize,
        w_out: MatRef<'_, T>,
        width: usize,
    ) -> Mat<f64> {
        let ((n, r, pos), heads, dh, dv, f) =
            (dx.shape(), self.heads, self.d_head, self.dv(), self.fqkv());
        assert_eq!(pos, c.pos, "{}: tangent positions", self.id);
        let (t0, pout, hz, wqk) = (
            self.t0(pos),
            self.out_pos(pos),
            heads * dv,
            self.fq() + self.fk(),
        );
        let mut out = Mat::zeros(n * r * pout, width);
        let (rb, cq) = (rb.clamp(1, r.max(1)), cq.max(1));
        let mut sb = self.scratch::<T>(rb, pos, cq);
        let mut proj = Mat::<T>::zeros(rb * pout, w_out.ncols());
        let mut row_buf = vec![0.0; f];
        for xs in 0..n {
            // This sample's forward point in `T` (no copy in f64).
            let qkv = T::slice_of(&c.qkv[xs * pos * f..][..pos * f]);
            let p_x = T::slice_of(&c.p[xs * heads * pos * pos..][..heads * pos * pos]);
            let qkv = &qkv[..];
            for v0 in (0..r).step_by(rb) {
                let nb = rb.min(r - v0);
                let Scratch {
                    qk: tqk,
                    v: tv,
                    sc,
                    tr,
                    zh,
                    z: dz,
                } = &mut sb;
                let (tqk, tv) = (
                    &mut tqk[..nb * pos * wqk],
                    &mut tv[..nb * pos * self.kv_heads * dv],
                );
                let (zh, dz) = (&mut zh[..nb * pout * dv], &mut dz[..nb * pout * hz]);
                // The block's tangents, rows (s, v); q, k rotated.
                match dx {
                    Tangents::Batch(dx) => {
                        let row0 = (xs * r + v0) * pos;
                        gather(&dx.data, row0, nb, pos, 0, wqk, tqk, wqk);
                        for g in 0..self.kv_heads {
                            let dst = &mut tv[g * pos * nb * dv..];
                            gather(&dx.data, row0, nb, pos, wqk + g * dv, dv, dst, dv);
                        }
                    }
                    Tangents::Rows { row, .. } => {
                        for s in 0..pos {
                            for v in 0..nb {
                                row(xs, v0 + v, s, &mut row_buf);
                                let i = s * nb + v;
                                let dst = &mut tqk[i * wqk..][..wqk];
                                for (d, &x) in dst.iter_mut().zip(&row_buf[..wqk]) {
                                    *d = T::of(x);
                                }
                                for g in 0..self.kv_heads {
                                    let dst = &mut tv[(g * pos * nb + i) * dv..][..dv];
                                    for (d, &x) in dst.iter_mut().zip(&row_buf[wqk + g * dv..]) {
                                        *d = T::of(x);
                                    }
                                }
                            }
                        }
                    }
                }
                if self.rotary.is_some() {
                    for (i, row) in tqk.chunks_exact_mut(wqk).enumerate() {
                        self.rotate_row(row, i / nb, false);
                    }
                }
                let (tqk, tv) = (&*tqk, &*tv);
                for h in 0..heads {
                    let (oq, ok, ov) = self.offsets(h);
                    let og = (ov - wqk) / dv * pos * nb * dv;
                    let ph = &p_x[h * pos * pos..][..pos * pos];
                    for ch in self.chunks(pos, cq) {
                        let (a, b, lo) = ch;
                        let (m, ns) = (b - a, b - lo);
                        let (sc, tr) = (&mut sc[..m * nb * ns], &mut tr[..m * nb * ns]);
                        let zc = (a - t0) * nb * dv;
                        // da = dq K^T + (dk Q^T)^T.
                        gemm_in(
                            rm_mut(sc, 0, m * nb, ns, ns),
                            Accum::Replace,
                            rm(tqk, a * nb * wqk + oq, m * nb, dh, wqk),
                            rm(qkv, lo * f + ok, ns, dh, f).transpose(),
                        );
                        gemm_in(
                            rm_mut(tr, 0, ns * nb, m, m),
                            Accum::Replace,
                            rm(tqk, lo * nb * wqk + ok, ns * nb, dh, wqk),
                            rm(qkv, a * f + oq, m, dh, f).transpose(),
                        );
                        for t in 0..m {
                            let (s0, s1) = (self.first_key(a + t) - lo, a + t + 1 - lo);
                            for v in 0..nb {
                                let row = &mut sc[(t * nb + v) * ns..][s0..s1];
                                for (s, x) in (s0..).zip(row) {
                                    *x += tr[(s * nb + v) * m + t];
                                }
                            }
                        }
                        self.softmax_diff(sc, ph, pos, ch, nb);
                        // dz = dp V, then [dz_1 | dz_2 | ..] += P [dv_1 | dv_2 | ..].
                        gemm_in(
                            rm_mut(zh, zc, m * nb, dv, dv),
                            Accum::Replace,
                            rm(sc, 0, m * nb, ns, ns),
                            rm(qkv, lo * f + ov, ns, dv, f),
                        );
                        gemm_in(
                            rm_mut(zh, zc, m, nb * dv, nb * dv),
                            Accum::Add,
                            rm(ph, a * pos + lo, m, ns, pos),
                            rm(tv, og + lo * nb * dv, ns, nb * dv, nb * dv),
                        );
                    }
                    // Into the output's order, rows (v, t).
                    for t in 0..pout {
                        for v in 0..nb {
                            dz[(v * pout + t) * hz + h * dv..][..dv]
                                .copy_from_slice(&zh[(t * nb + v) * dv..][..dv]);
                        }
                    }
                }
                gemm_in(
                    proj.as_mut().subrows_mut(0, nb * pout),
                    Accum::Replace,
                    rm(dz, 0, nb * pout, hz, hz),
                    w_out,
                );
                let row0 = (xs * r + v0) * pout;
                for j in 0..w_out.ncols() {
                    let dst = &mut out.col_as_slice_mut(j)[row0..][..nb * pout];
                    for (d, &p) in dst.iter_mut().zip(proj.col(j).subrows(0, nb * pout).iter()) {
                        *d = p.f64();
                    }
                }
            }
        }
        out
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
    fn max_positions(&self) -> Option<usize> {
        self.rotary.as_ref().map(|r| r.n_ctx)
    }
    fn structure(&self) -> crate::models::Structure<'_> {
        crate::models::Structure::Attention(self)
    }

    /// `p_t = softmax_{s in K(t)}(scale q_t . k_s)`, `z_t = sum_s p_ts v_s`, `attn = z W_O'`:
    /// per `(sample, head)` the GEMMs `Q K^T` and `P V`.
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
            let qkv = &qkv[xs * pos * f..(xs + 1) * pos * f];
            for h in 0..heads {
                let (oq, ok, ov) = self.offsets(h);
                let ph = &mut p[((xs * heads + h) * pos + t0) * pos..][..pout * pos];
                gemm(
                    rm_mut(ph, 0, pout, pos, pos),
                    Accum::Replace,
                    rm(qkv, t0 * f + oq, pout, dh, f),
                    rm(qkv, ok, pos, dh, f).transpose(),
                );
                for (i, row) in ph.chunks_exact_mut(pos).enumerate() {
                    let t = t0 + i;
                    let s0 = self.first_key(t);
                    let pt = &mut row[s0..=t];
                    let mut max = f64::NEG_INFINITY;
                    for a in pt.iter_mut() {
                        *a *= self.scale;
                        max = max.max(*a);
                    }
                    let mut sum = 0.0;
                    for a in pt.iter_mut() {
                        *a = (*a - max).exp();
                        sum += *a;
                    }
                    for a in pt.iter_mut() {
                        *a /= sum;
                    }
                    row[..s0].fill(0.0);
                    row[t + 1..].fill(0.0);
                }
                gemm(
                    rm_mut(&mut z, xs * pout * hz + h * dv, pout, dv, hz),
                    Accum::Replace,
                    rm(ph, 0, pout, pos, pos),
                    rm(qkv, ov, pos, dv, f),
                );
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
        self.vjp_blocked(c, dy, self.block(dy.r, c.pos), CHUNK)
    }

    /// Tangents `dq`, `dk` rotated first; per head `da_ts = scale (dq_t . k_s + q_t . dk_s)`,
    /// `dp_ts = p_ts (da_ts - sum_s' p_ts' da_ts')`, `dz_t = sum_s dp_ts v_s + p_ts dv_s`;
    /// then `dattn = dz W_O'`; the residual's tangent passes through.
    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        let c = cache::<AttnCache>(c, "attention");
        let out = OutProjection {
            w: self.w_o.as_ref(),
            w32: None,
            resid: true,
        };
        let block = self.block(dx.r, dx.pos);
        self.jvp_blocked(c, &Tangents::Batch(dx), block, CHUNK, &out)
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
