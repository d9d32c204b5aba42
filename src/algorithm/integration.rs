//! Integration points `(a_p, w_p)` for integrated gradients (method.md section 6). The path
//! scales the whole node-layer vector, bias coordinate included, from 0 to `f`.

use anyhow::bail;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// One point `a = 1, w = 1`: the plain gradient.
    #[default]
    Gradient,
    GaussLegendre,
    Trapezoidal,
}

/// Returns the points `a_p` and weights `w_p` (weights sum to 1).
pub fn points(rule: Rule, n_intervals: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    Ok(match rule {
        Rule::Gradient => {
            if n_intervals != 0 {
                bail!("integration rule `gradient` requires n_intervals = 0, got {n_intervals}");
            }
            vec![(1.0, 1.0)]
        }
        Rule::GaussLegendre => {
            let (x, w) = gauss_legendre(n_intervals + 1);
            x.iter()
                .zip(&w)
                .map(|(&x, &w)| ((x + 1.0) / 2.0, w / 2.0))
                .collect()
        }
        Rule::Trapezoidal => {
            if n_intervals == 0 {
                vec![(0.5, 1.0)]
            } else {
                let eps = 1e-3 / (n_intervals as f64 + 1.0);
                let step = (1.0 - 2.0 * eps) / n_intervals as f64;
                (0..=n_intervals)
                    .map(|k| {
                        let w =
                            if k == 0 || k == n_intervals { 0.5 } else { 1.0 } / n_intervals as f64;
                        (eps + k as f64 * step, w)
                    })
                    .collect()
            }
        }
    })
}

/// Gauss-Legendre nodes and weights on `[-1, 1]` for `n` points: Newton's method on the
/// Legendre polynomial from Chebyshev starting guesses (Numerical Recipes `gauleg`).
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut x = vec![0.0; n];
    let mut w = vec![0.0; n];
    for i in 0..n.div_ceil(2) {
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 0.0;
        for _ in 0..100 {
            // Recurrence for P_n(z) and its derivative.
            let (mut p0, mut p1) = (1.0, 0.0);
            for j in 0..n {
                let p2 = p1;
                p1 = p0;
                p0 = ((2 * j + 1) as f64 * z * p1 - j as f64 * p2) / (j + 1) as f64;
            }
            dp = n as f64 * (z * p0 - p1) / (z * z - 1.0);
            let dz = p0 / dp;
            z -= dz;
            if dz.abs() < 1e-15 {
                break;
            }
        }
        x[i] = -z;
        x[n - 1 - i] = z;
        w[i] = 2.0 / ((1.0 - z * z) * dp * dp);
        w[n - 1 - i] = w[i];
    }
    (x, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_closed_forms() {
        let (x, w) = gauss_legendre(1);
        assert!((x[0]).abs() < 1e-15 && (w[0] - 2.0).abs() < 1e-15);
        let (x, w) = gauss_legendre(2);
        let r = 1.0 / 3f64.sqrt();
        assert!((x[0] + r).abs() < 1e-15 && (x[1] - r).abs() < 1e-15);
        assert!((w[0] - 1.0).abs() < 1e-14 && (w[1] - 1.0).abs() < 1e-14);
        let (x, w) = gauss_legendre(3);
        let r = (3.0f64 / 5.0).sqrt();
        assert!((x[0] + r).abs() < 1e-15 && x[1].abs() < 1e-15 && (x[2] - r).abs() < 1e-15);
        assert!((w[0] - 5.0 / 9.0).abs() < 1e-14 && (w[1] - 8.0 / 9.0).abs() < 1e-14);
    }

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        // n points integrate degree 2n-1 exactly: check x^(2n-2) and x^(2n-1) on [0, 1].
        for n in 1..8 {
            let pts = points(Rule::GaussLegendre, n - 1).unwrap();
            let wsum: f64 = pts.iter().map(|p| p.1).sum();
            assert!((wsum - 1.0).abs() < 1e-14);
            for deg in [2 * n - 2, 2 * n - 1] {
                let integral: f64 = pts.iter().map(|&(a, w)| w * a.powi(deg as i32)).sum();
                assert!(
                    (integral - 1.0 / (deg as f64 + 1.0)).abs() < 1e-13,
                    "n={n} deg={deg}"
                );
            }
        }
    }

    #[test]
    fn trapezoid_closed_form() {
        assert_eq!(points(Rule::Trapezoidal, 0).unwrap(), vec![(0.5, 1.0)]);
        let pts = points(Rule::Trapezoidal, 4).unwrap();
        let eps = 1e-3 / 5.0;
        assert_eq!(pts.len(), 5);
        assert!((pts[0].0 - eps).abs() < 1e-16 && (pts[4].0 - (1.0 - eps)).abs() < 1e-15);
        assert!((pts[2].0 - 0.5).abs() < 1e-15);
        let w: Vec<f64> = pts.iter().map(|p| p.1).collect();
        assert_eq!(w, vec![0.125, 0.25, 0.25, 0.25, 0.125]);
    }

    #[test]
    fn gradient_rejects_intervals() {
        assert_eq!(points(Rule::Gradient, 0).unwrap(), vec![(1.0, 1.0)]);
        assert!(points(Rule::Gradient, 3).is_err());
    }
}
