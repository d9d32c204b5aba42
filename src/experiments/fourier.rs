//! Fourier labels for modular-arithmetic features (method.md section 10): each feature's
//! activation over all `p^2` pairs `(a, b)`, its 2-D discrete Fourier power spectrum, and the
//! split of that power into the constant, pure-`a`, pure-`b` and cross terms.

use crate::algorithm::NodeBasis;
use crate::data::modadd::{ModOp, ModularArithmetic, Split};
use crate::data::Dataset;
use crate::models::Model;
use crate::tensor::linalg::mm;
use anyhow::Context;
use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FourierLabel {
    /// Fraction of power in the constant term `(0, 0)`.
    pub constant: f64,
    /// In `cos/sin(k a)` (`k_b = 0`).
    pub a: f64,
    /// In `cos/sin(k b)` (`k_a = 0`).
    pub b: f64,
    /// In the cross terms (`k_a, k_b != 0`).
    pub cross: f64,
    /// The strongest non-constant frequencies `(k_a, k_b, fraction)`, with `k` and `p - k`
    /// merged (reported as `min(k, p - k)`), strongest first.
    pub dominant: Vec<(usize, usize, f64)>,
    /// A short label such as `a7`, `b7`, `a7b7` or `const`.
    pub label: String,
}

/// 2-D DFT power `|F(k_a, k_b)|^2` of a `p x p` grid (rows `a`, columns `b`), written by hand:
/// `p` is small (113) and prime, which no FFT crate here specialises for, and `O(p^3)` is
/// ~1.4 M operations per feature.
pub fn power_spectrum(grid: &Mat<f64>) -> Mat<f64> {
    let p = grid.nrows();
    let (cos, sin): (Vec<f64>, Vec<f64>) = (0..p)
        .map(|k| {
            let t = 2.0 * std::f64::consts::PI * k as f64 / p as f64;
            (t.cos(), t.sin())
        })
        .unzip();
    // Transform along b for each a, then along a.
    let mut re = Mat::<f64>::zeros(p, p);
    let mut im = Mat::<f64>::zeros(p, p);
    for a in 0..p {
        for kb in 0..p {
            let (mut r, mut i) = (0.0, 0.0);
            for b in 0..p {
                let idx = (kb * b) % p;
                r += grid[(a, b)] * cos[idx];
                i -= grid[(a, b)] * sin[idx];
            }
            re[(a, kb)] = r;
            im[(a, kb)] = i;
        }
    }
    let mut power = Mat::<f64>::zeros(p, p);
    for ka in 0..p {
        for kb in 0..p {
            let (mut r, mut i) = (0.0, 0.0);
            for a in 0..p {
                let idx = (ka * a) % p;
                let (c, s) = (cos[idx], -sin[idx]);
                r += re[(a, kb)] * c - im[(a, kb)] * s;
                i += re[(a, kb)] * s + im[(a, kb)] * c;
            }
            power[(ka, kb)] = r * r + i * i;
        }
    }
    power
}

/// Labels a feature from its power spectrum.
pub fn label_from_power(power: &Mat<f64>) -> FourierLabel {
    let p = power.nrows();
    let total: f64 = power
        .col_iter()
        .map(|c| c.iter().sum::<f64>())
        .sum::<f64>()
        .max(1e-300);
    let mut a = 0.0;
    let mut b = 0.0;
    let mut cross = 0.0;
    let fold = |k: usize| k.min(p - k);
    let mut merged = std::collections::BTreeMap::new();
    for ka in 0..p {
        for kb in 0..p {
            let v = power[(ka, kb)] / total;
            match (ka == 0, kb == 0) {
                (true, true) => {}
                (false, true) => a += v,
                (true, false) => b += v,
                (false, false) => cross += v,
            }
            if ka != 0 || kb != 0 {
                *merged.entry((fold(ka), fold(kb))).or_insert(0.0) += v;
            }
        }
    }
    let constant = power[(0, 0)] / total;
    let mut dominant: Vec<(usize, usize, f64)> =
        merged.into_iter().map(|((x, y), v)| (x, y, v)).collect();
    dominant.sort_by(|x, y| y.2.total_cmp(&x.2));
    dominant.truncate(5);
    let label = if constant > 0.5 {
        "const".to_string()
    } else {
        let (ka, kb, _) = dominant[0];
        match (ka, kb) {
            (k, 0) => format!("a{k}"),
            (0, k) => format!("b{k}"),
            (x, y) => format!("a{x}b{y}"),
        }
    };
    FourierLabel {
        constant,
        a,
        b,
        cross,
        dominant,
        label,
    }
}

/// Fourier labels of every feature of `basis` (a node layer of a modular-arithmetic model).
/// Sequence layers use the feature summed over positions.
pub fn label_features(
    model: &Model,
    basis: &NodeBasis,
    modulus: usize,
    op: ModOp,
) -> anyhow::Result<Vec<FourierLabel>> {
    let index = model
        .node_index(&basis.name)
        .with_context(|| format!("node layer `{}` is not in the model", basis.name))?;
    let data = ModularArithmetic::new(modulus, op, Split::All, 1.0, 0, None)?;
    let f = model.run(data.inputs(0..data.len()), 0, index);
    let d = basis.d_orig;
    let c = basis.c.clone().unwrap_or_else(|| Mat::identity(d, d));
    let fhat = mm(f.data.as_ref(), c.as_ref());
    let pos = f.pos;
    let p = modulus;
    Ok((0..fhat.ncols())
        .into_par_iter()
        .map(|j| {
            // Pair index a * p + b is sample index: Split::All lists pairs in order.
            let grid = Mat::from_fn(p, p, |a, b| {
                (0..pos)
                    .map(|s| fhat[((a * p + b) * pos + s, j)])
                    .sum::<f64>()
            });
            label_from_power(&power_spectrum(&grid))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pure_frequencies_are_recognised() {
        let p = 13;
        let w = |k: usize, x: usize| (2.0 * std::f64::consts::PI * (k * x) as f64 / p as f64).cos();
        let only_a = Mat::from_fn(p, p, |a, _| w(3, a));
        let l = label_from_power(&power_spectrum(&only_a));
        assert!((l.a - 1.0).abs() < 1e-12 && l.label == "a3", "{l:?}");
        let sum = Mat::from_fn(p, p, |a, b| w(5, a + b) + 2.0);
        let l = label_from_power(&power_spectrum(&sum));
        assert!(l.cross > 0.0 && l.label == "const", "{l:?}");
        let sum = Mat::from_fn(p, p, |a, b| w(5, a + b));
        let l = label_from_power(&power_spectrum(&sum));
        assert!((l.cross - 1.0).abs() < 1e-12 && l.label == "a5b5", "{l:?}");
        assert!((l.dominant[0].2 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn parseval_holds() {
        let p = 11;
        let g = Mat::from_fn(p, p, |a, b| ((a * 7 + b * 3) % 5) as f64 - 1.3);
        let power = power_spectrum(&g);
        let energy: f64 = g
            .col_iter()
            .map(|c| c.iter().map(|v| v * v).sum::<f64>())
            .sum();
        let spectral: f64 =
            power.col_iter().map(|c| c.iter().sum::<f64>()).sum::<f64>() / (p * p) as f64;
        assert!((energy - spectral).abs() < 1e-9 * energy);
    }
}
