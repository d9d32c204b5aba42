//! Streaming statistics of a node layer (method.md section 3): the mean `mu = E[f]` and the Gram
//! matrix `E[f^T f]` (or its centred version), averaged over samples and positions, accumulated
//! in f64 over batches so memory never grows with the dataset.

use crate::tensor::linalg::{fill_upper, gram_add_lower};
use faer::{Mat, MatRef};

/// Sums of a node layer's rows, shifted by a fixed reference point `k` (the first batch's mean,
/// with bias coordinate 0) so that the centred Gram matrix does not lose digits to cancellation
/// when the mean is large (`||mu||` is ~139 at modular addition's `unembed`).
#[derive(Clone, Debug)]
pub struct Moments {
    pub shift: Vec<f64>,
    pub rows: f64,
    pub sum: Vec<f64>,
    /// Lower triangle of `sum (f - shift)^T (f - shift)`; `0 x 0` when only the mean is kept.
    pub outer: Mat<f64>,
}

impl Moments {
    /// Empty accumulator with reference point `shift` (use [`Moments::shift_for`]).
    pub fn new(shift: Vec<f64>) -> Self {
        let d = shift.len();
        Self {
            shift,
            rows: 0.0,
            sum: vec![0.0; d],
            outer: Mat::zeros(d, d),
        }
    }

    /// Accumulates the mean only: for a node layer that keeps neuron coordinates, whose
    /// `d x d` Gram matrix nothing reads (at a language model's `output`, `d = d_vocab`).
    pub fn mean_only(shift: Vec<f64>) -> Self {
        let d = shift.len();
        Self {
            shift,
            rows: 0.0,
            sum: vec![0.0; d],
            outer: Mat::zeros(0, 0),
        }
    }

    /// Whether the Gram matrix is accumulated.
    pub fn has_gram(&self) -> bool {
        self.outer.nrows() == self.shift.len()
    }

    /// The reference point for a layer: the mean of `rows` with the bias coordinate set to 0.
    pub fn shift_for(rows: MatRef<'_, f64>) -> Vec<f64> {
        let n = rows.nrows().max(1) as f64;
        let d = rows.ncols();
        let mut k: Vec<f64> = (0..d)
            .map(|j| rows.col(j).iter().sum::<f64>() / n)
            .collect();
        if let Some(last) = k.last_mut() {
            *last = 0.0;
        }
        k
    }

    /// Adds rows `f` (one row per sample and position).
    pub fn add(&mut self, f: MatRef<'_, f64>) {
        self.rows += f.nrows() as f64;
        if !self.has_gram() {
            for (j, s) in self.sum.iter_mut().enumerate() {
                *s += f.col(j).iter().map(|v| v - self.shift[j]).sum::<f64>();
            }
            return;
        }
        let g = Mat::from_fn(f.nrows(), f.ncols(), |i, j| f[(i, j)] - self.shift[j]);
        for j in 0..g.ncols() {
            self.sum[j] += g.col(j).iter().sum::<f64>();
        }
        // Lower triangle only; `gram` mirrors it.
        gram_add_lower(&mut self.outer, g.as_ref(), 1.0);
    }

    pub fn merge(mut self, other: Self) -> Self {
        self.rows += other.rows;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        self.outer += &other.outer;
        self
    }

    /// `mu = E[f]`.
    pub fn mean(&self) -> Vec<f64> {
        self.shift
            .iter()
            .zip(&self.sum)
            .map(|(k, s)| k + s / self.rows)
            .collect()
    }

    /// `E[f^T f]`, or with `center` the Gram matrix of `f - mu~` where `mu~` is `mu` with its
    /// bias coordinate set to 0 (the bias coordinate stays 1). `0 x 0` for [`Moments::mean_only`].
    pub fn gram(&self, center: bool) -> Mat<f64> {
        if !self.has_gram() {
            return Mat::zeros(0, 0);
        }
        let d = self.shift.len();
        let mut outer = self.outer.clone();
        fill_upper(&mut outer);
        let eg: Vec<f64> = self.sum.iter().map(|s| s / self.rows).collect();
        // f - c = g - delta with g = f - shift: E[(g - delta)^T (g - delta)].
        let delta: Vec<f64> = if center {
            let mut m: Vec<f64> = eg.clone(); // mu~ - shift = E[g] off the bias coordinate
            if let Some(last) = m.last_mut() {
                *last = 0.0;
            }
            m
        } else {
            self.shift.iter().map(|k| -k).collect()
        };
        Mat::from_fn(d, d, |i, j| {
            outer[(i, j)] / self.rows - eg[i] * delta[j] - delta[i] * eg[j] + delta[i] * delta[j]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Mat<f64> {
        // 7 rows, 3 features + bias; large offset to exercise the shift.
        Mat::from_fn(7, 4, |i, j| {
            if j == 3 {
                1.0
            } else {
                100.0 + ((i * 3 + j * 5) % 7) as f64 * 0.5 + j as f64
            }
        })
    }

    #[test]
    fn matches_direct_computation_in_any_batching() {
        let f = data();
        let mut m = Moments::new(Moments::shift_for(f.subrows(0, 2)));
        m.add(f.subrows(0, 3));
        let mut m2 = Moments::new(m.shift.clone());
        m2.add(f.subrows(3, 4));
        let m = m.merge(m2);
        let n = 7.0;
        let mu: Vec<f64> = (0..4).map(|j| f.col(j).iter().sum::<f64>() / n).collect();
        assert_eq!(mu[3], 1.0);
        for (a, b) in m.mean().iter().zip(&mu) {
            assert!((a - b).abs() < 1e-12);
        }
        let g = m.gram(false);
        let gc = m.gram(true);
        for i in 0..4 {
            for j in 0..4 {
                let direct: f64 = (0..7).map(|r| f[(r, i)] * f[(r, j)]).sum::<f64>() / n;
                assert!((g[(i, j)] - direct).abs() < 1e-9 * direct.abs().max(1.0));
                let c = |r: usize, k: usize| if k == 3 { 1.0 } else { f[(r, k)] - mu[k] };
                let direct_c: f64 = (0..7).map(|r| c(r, i) * c(r, j)).sum::<f64>() / n;
                assert!((gc[(i, j)] - direct_c).abs() < 1e-12, "{i} {j}");
            }
        }
        assert!((gc[(3, 3)] - 1.0).abs() < 1e-15);
    }
}
