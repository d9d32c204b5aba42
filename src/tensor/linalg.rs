//! Dense linear algebra on faer, f64: products, Gram accumulation and the symmetric
//! eigendecompositions of method.md section 2 (|eigenvalue| descending, eigenvectors as columns).

use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use std::sync::atomic::{AtomicU64, Ordering};

/// Floating-point operations of the matrix products so far (all threads): `ibasis plan` reads
/// it around a pilot run. One relaxed atomic add per product, nothing per element.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Matrix-product FLOPs counted so far (`2 m n k` per product, `m (m + 1) k` per lower Gram).
pub fn flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

fn count(f: usize) {
    FLOPS.fetch_add(f as u64, Ordering::Relaxed);
}

/// `dst (+)= a b` on the calling thread (callers parallelise over batches), counted.
pub fn gemm(dst: MatMut<'_, f64>, accum: Accum, a: MatRef<'_, f64>, b: MatRef<'_, f64>) {
    count(2 * a.nrows() * a.ncols() * b.ncols());
    faer::linalg::matmul::matmul(dst, accum, a, b, 1.0, Par::Seq);
}

/// `a b`.
pub fn mm(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    gemm(out.as_mut(), Accum::Replace, a, b);
    out
}

/// `a^T b`.
pub fn mm_tn(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    mm(a.transpose(), b)
}

/// `acc += alpha * x^T x` on the lower triangle (diagonal included) only: half the FLOPs of a
/// full product. Accumulate with this, then [`fill_upper`] once at the end.
pub fn gram_add_lower(acc: &mut Mat<f64>, x: MatRef<'_, f64>, alpha: f64) {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    count(x.ncols() * (x.ncols() + 1) * x.nrows());
    matmul(
        acc,
        BlockStructure::TriangularLower,
        Accum::Add,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        alpha,
        Par::Seq,
    );
}

/// Mirrors the lower triangle of a square matrix into its upper triangle.
pub fn fill_upper(m: &mut Mat<f64>) {
    for j in 0..m.ncols() {
        for i in 0..j {
            m[(i, j)] = m[(j, i)];
        }
    }
}

/// `acc += alpha * x^T x`.
pub fn gram_add(acc: &mut Mat<f64>, x: MatRef<'_, f64>, alpha: f64) {
    gram_add_lower(acc, x, alpha);
    fill_upper(acc);
}

/// Symmetric eigendecomposition of `m` (only its lower triangle is read after symmetrising):
/// eigenvalues replaced by their absolute values and sorted descending, eigenvectors as columns.
pub fn eigh_abs_desc(m: MatRef<'_, f64>) -> anyhow::Result<(Vec<f64>, Mat<f64>)> {
    let n = m.nrows();
    anyhow::ensure!(
        n == m.ncols(),
        "eigh of a non-square {}x{} matrix",
        n,
        m.ncols()
    );
    if n == 0 {
        return Ok((vec![], Mat::zeros(0, 0)));
    }
    anyhow::ensure!(
        m.col_iter().all(|c| c.iter().all(|v| v.is_finite())),
        "matrix to eigendecompose contains NaN or infinity"
    );
    let sym = Mat::from_fn(n, n, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let evd = sym
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| s[b].abs().total_cmp(&s[a].abs()));
    let values = order.iter().map(|&k| s[k].abs()).collect();
    let vectors = Mat::from_fn(n, n, |i, j| u[(i, order[j])]);
    Ok((values, vectors))
}

/// Eigendecomposition with the first `fixed` directions held fixed (method.md section 4.7):
/// `V` is the identity on them and their eigenvalue is `m`'s diagonal entry; only the trailing
/// block is decomposed.
pub fn eigh_masked(m: MatRef<'_, f64>, fixed: usize) -> anyhow::Result<(Vec<f64>, Mat<f64>)> {
    let n = m.nrows();
    anyhow::ensure!(fixed <= n, "cannot hold {fixed} of {n} directions fixed");
    let (rest_vals, rest_vecs) = eigh_abs_desc(m.submatrix(fixed, fixed, n - fixed, n - fixed))?;
    let mut v = Mat::zeros(n, n);
    let mut values = Vec::with_capacity(n);
    for k in 0..fixed {
        v[(k, k)] = 1.0;
        values.push(m[(k, k)]);
    }
    for j in 0..n - fixed {
        for i in 0..n - fixed {
            v[(fixed + i, fixed + j)] = rest_vecs[(i, j)];
        }
    }
    values.extend(rest_vals);
    Ok((values, v))
}

/// Columns `cols` of `m`, in that order.
pub fn select_cols(m: MatRef<'_, f64>, cols: &[usize]) -> Mat<f64> {
    Mat::from_fn(m.nrows(), cols.len(), |i, j| m[(i, cols[j])])
}

/// Largest absolute entry of `a - b`.
pub fn max_abs_diff(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    assert_eq!((a.nrows(), a.ncols()), (b.nrows(), b.ncols()));
    let mut m: f64 = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            m = m.max((a[(i, j)] - b[(i, j)]).abs());
        }
    }
    m
}

/// A precision the Jacobian and tangent products may run in (`[lib] compute_dtype`, f64 by
/// default): the sums they feed (Grams, `M'`, edges) and every eigendecomposition stay f64.
pub trait Real:
    faer::traits::RealField + faer::traits::Conjugate<Canonical = Self> + Copy + Send + Sync
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// `xs` in this precision: borrowed as it is for f64, rounded into a copy otherwise.
    fn slice_of(xs: &[f64]) -> std::borrow::Cow<'_, [Self]> {
        std::borrow::Cow::Owned(xs.iter().map(|&x| Self::of(x)).collect())
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn slice_of(xs: &[f64]) -> std::borrow::Cow<'_, [Self]> {
        std::borrow::Cow::Borrowed(xs)
    }
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

/// [`gemm`] in precision `T`, counted.
pub fn gemm_in<T: Real>(dst: MatMut<'_, T>, accum: Accum, a: MatRef<'_, T>, b: MatRef<'_, T>) {
    count(2 * a.nrows() * a.ncols() * b.ncols());
    faer::linalg::matmul::matmul(dst, accum, a, b, T::of(1.0), Par::Seq);
}

/// `m` rounded to precision `T`.
pub fn cast<T: Real>(m: MatRef<'_, f64>) -> Mat<T> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| T::of(m[(i, j)]))
}

/// `dst = a b32` with `a` rounded to f32 and the product in f32, stored back in f64: the
/// `compute_dtype = "f32"` product of a block of tangents and a projection rounded once.
pub fn gemm_f32(mut dst: MatMut<'_, f64>, a: MatRef<'_, f64>, b32: MatRef<'_, f32>) {
    let a32 = cast::<f32>(a);
    let mut out = Mat::<f32>::zeros(a.nrows(), b32.ncols());
    gemm_in(out.as_mut(), Accum::Replace, a32.as_ref(), b32);
    for j in 0..out.ncols() {
        for i in 0..out.nrows() {
            dst[(i, j)] = out[(i, j)] as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matches_the_plain_product() {
        let x = Mat::from_fn(37, 9, |i, j| ((i * 7 + j * 3) % 11) as f64 - 4.5);
        let mut acc = Mat::from_fn(9, 9, |i, j| (i + j) as f64);
        let want = &acc + mm_tn(x.as_ref(), x.as_ref()) * faer::Scale(0.5);
        gram_add(&mut acc, x.as_ref(), 0.5);
        assert!(max_abs_diff(acc.as_ref(), want.as_ref()) < 1e-12);
    }
}
