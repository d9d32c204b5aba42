//! Fourier labels for modular-arithmetic features (method.md section 10): each feature's
//! activation over all `p^2` pairs `(a, b)`, its 2-D discrete Fourier power spectrum, and the
//! split of that power into the constant, pure-`a`, pure-`b` and cross terms.

use crate::algorithm::NodeBasis;
use crate::data::modadd::{ModOp, ModularArithmetic, Split};
use crate::data::Dataset;
use crate::models::Model;
use crate::tensor::linalg::mm;
use anyhow::Context;
use faer::{Mat, MatRef};
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
    /// The reference's labels (see [`rib_terms`]): up to 7 `(term, fraction of power)`,
    /// strongest first.
    pub terms: Vec<(String, f64)>,
}

impl FourierLabel {
    /// The reference's CSV cell: `99% cos(15x) + cos(15y)|1% const` (`x` = a, `y` = b).
    pub fn rib_label(&self) -> String {
        self.terms
            .iter()
            .map(|(t, v)| format!("{:.0}% {t}", v * 100.0))
            .collect::<Vec<_>>()
            .join("|")
    }
}

/// The reference's Fourier labels (rib's modular-arithmetic label script), from the power
/// `P = |F(k_a, k_b)|^2` of a feature over the `p x p` pairs, `x` = a and `y` = b:
/// - `const`: `P(0, 0)`;
/// - per `k = 1..=p/2`: `cos(kx)` = `P(k, 0) + P(-k, 0)` and `cos(ky)` likewise, merged into
///   `cos(kx) + cos(ky)` when the two differ by less than 0.01 of the total;
/// - cross terms for `i, j = 1..=p/2`, in the convention that separates them best: either
///   `cos(ix + jy)` = `2 P(i, j)` and `cos(ix - jy)` = `2 P(i, -j)`, or, with the magnitudes
///   `A+ = |F(i, j)|`, `A- = |F(i, -j)|`, `cos(ix) * cos(jy)` = `(A+ + A-)^2` and
///   `sin(ix) * sin(jy)` = `(A+ - A-)^2` (the reference's magnitude heuristic, kept as is); the
///   first is chosen when `sum 2P(i,j) / sum 2P(i,-j) > sum (A+ + A-)^2 / sum (A+ - A-)^2`.
///
/// All as fractions of the total power (they sum to 1 for a real feature). Then sorted
/// (stably, in the order above), kept until they hold more than 99.5% or one falls below 0.5%
/// (that one included), at most 7. Needs odd `p`.
pub fn rib_terms(power: &Mat<f64>) -> Vec<(String, f64)> {
    let p = power.nrows();
    let h = p / 2;
    let total: f64 = power
        .col_iter()
        .map(|c| c.iter().sum::<f64>())
        .sum::<f64>()
        .max(1e-300);
    let mut terms: Vec<(String, f64)> = vec![("const".into(), power[(0, 0)] / total)];
    for k in 1..=h {
        let x = (power[(k, 0)] + power[(p - k, 0)]) / total;
        let y = (power[(0, k)] + power[(0, p - k)]) / total;
        if (x - y).abs() < 0.01 {
            terms.push((format!("cos({k}x) + cos({k}y)"), x + y));
        } else {
            terms.push((format!("cos({k}x)"), x));
            terms.push((format!("cos({k}y)"), y));
        }
    }
    let plus = |i: usize, j: usize| power[(i, j)];
    let minus = |i: usize, j: usize| power[(i, p - j)];
    let (mut s_plus, mut s_minus, mut s_cc, mut s_ss) = (0.0, 0.0, 0.0, 0.0);
    for i in 1..=h {
        for j in 1..=h {
            let (a, b) = (plus(i, j).sqrt(), minus(i, j).sqrt());
            s_plus += 2.0 * plus(i, j);
            s_minus += 2.0 * minus(i, j);
            s_cc += (a + b).powi(2);
            s_ss += (a - b).powi(2);
        }
    }
    // As the reference: a 0/0 ratio is NaN and loses the comparison.
    let sum_convention = s_plus / s_minus > s_cc / s_ss;
    for i in 1..=h {
        for j in 1..=h {
            if sum_convention {
                terms.push((format!("cos({i}x + {j}y)"), 2.0 * plus(i, j) / total));
                terms.push((format!("cos({i}x - {j}y)"), 2.0 * minus(i, j) / total));
            } else {
                let (a, b) = (plus(i, j).sqrt(), minus(i, j).sqrt());
                terms.push((format!("cos({i}x) * cos({j}y)"), (a + b).powi(2) / total));
                terms.push((format!("sin({i}x) * sin({j}y)"), (a - b).powi(2) / total));
            }
        }
    }
    // Stable: equal fractions keep the order above.
    terms.sort_by(|a, b| b.1.total_cmp(&a.1));
    let sum: f64 = terms.iter().map(|t| t.1).sum();
    let mut kept = Vec::new();
    let mut acc = 0.0;
    for (t, v) in terms {
        acc += v;
        let small = v / sum < 0.005;
        kept.push((t, v));
        if acc / sum > 0.995 || small {
            break;
        }
    }
    kept.truncate(7);
    kept
}

/// The reference's label CSV: one row per node layer, one cell per feature
/// ([`FourierLabel::rib_label`]); layers without labels (`output`) get `NAME_k` per feature.
pub fn rib_csv(names: &[String], dims: &[usize], labels: &[Vec<FourierLabel>]) -> String {
    let mut out = String::new();
    for (l, name) in names.iter().enumerate() {
        let row: Vec<String> = match labels.get(l).filter(|v| !v.is_empty()) {
            Some(ls) => ls.iter().map(FourierLabel::rib_label).collect(),
            None => (0..dims[l]).map(|k| format!("{name}_{k}")).collect(),
        };
        out += &row.join(",");
        out.push('\n');
    }
    out
}

/// `cos` and `sin` of `2 pi t / p` for `t` in `0..p` (indexed by `k x mod p`).
fn twiddles(p: usize) -> (Vec<f64>, Vec<f64>) {
    (0..p)
        .map(|k| {
            let t = 2.0 * std::f64::consts::PI * k as f64 / p as f64;
            (t.cos(), t.sin())
        })
        .unzip()
}

/// 2-D DFT power `|F(k_a, k_b)|^2` of a `p x p` grid (rows `a`, columns `b`), written out as
/// two `O(p^3)` loops: the reference for [`power_spectra`].
#[cfg(test)]
pub fn power_spectrum(grid: &Mat<f64>) -> Mat<f64> {
    let p = grid.nrows();
    let (cos, sin) = twiddles(p);
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

/// Grids per block of [`power_spectra`] (a block's stacked grids are a few MB at `p = 113`).
const SPECTRA_BLOCK: usize = 8;

/// 2-D DFT powers `|F_j(k_a, k_b)|^2` of many `p x p` grids, as matrix products: `grids` has
/// one column per grid, row `a p + b` holding grid `j`'s `(a, b)`.
///
/// With `C_{kx} = cos(2 pi k x / p)` and `S` likewise, `F = (C - iS) G (C - iS)`. A real grid
/// has `F(k_a, k_b) = conj F(-k_a, -k_b)`, so only the columns `k_b <= p / 2` are computed:
/// `X = G [C_h | -S_h]` for the rows `(j, a)` of a block of grids (one product), then
/// `[[C, S], [-S, C]] [Re X; Im X]` for the columns `(j, k_b)` (another); the power at
/// `k_b > p / 2` is the one at `(-k_a, -k_b)`. `O(p^3)` per grid like the loops, at the speed
/// of a matrix product.
pub fn power_spectra(grids: MatRef<'_, f64>, p: usize) -> Vec<Mat<f64>> {
    assert_eq!(grids.nrows(), p * p, "grids must have p^2 rows");
    let (cos, sin) = twiddles(p);
    let h = p / 2 + 1;
    // [C_h | -S_h] (p x 2h): along b.
    let right = Mat::from_fn(p, 2 * h, |b, c| {
        let t = ((c % h) * b) % p;
        if c < h {
            cos[t]
        } else {
            -sin[t]
        }
    });
    // [[C, S], [-S, C]] (2p x 2p): along a, (Re; Im) to (Re; Im).
    let left = Mat::from_fn(2 * p, 2 * p, |r, c| {
        let t = ((r % p) * (c % p)) % p;
        match (r < p, c < p) {
            (true, true) | (false, false) => cos[t],
            (true, false) => sin[t],
            (false, true) => -sin[t],
        }
    });
    let n = grids.ncols();
    let starts: Vec<usize> = (0..n).step_by(SPECTRA_BLOCK).collect();
    starts
        .into_par_iter()
        .flat_map_iter(|j0| {
            let nb = SPECTRA_BLOCK.min(n - j0);
            // Rows (j, a), columns b.
            let g = Mat::from_fn(nb * p, p, |r, b| grids[((r % p) * p + b, j0 + r / p)]);
            let x = mm(g.as_ref(), right.as_ref());
            // Rows (Re a | Im a), columns (j, k_b).
            let z = Mat::from_fn(2 * p, nb * h, |r, c| {
                let (j, kb) = (c / h, c % h);
                x[(j * p + r % p, if r < p { kb } else { h + kb })]
            });
            let f = mm(left.as_ref(), z.as_ref());
            (0..nb)
                .map(|j| {
                    let power = |ka: usize, kb: usize| {
                        let (re, im) = (f[(ka, j * h + kb)], f[(p + ka, j * h + kb)]);
                        re * re + im * im
                    };
                    Mat::from_fn(p, p, |ka, kb| {
                        if kb < h {
                            power(ka, kb)
                        } else {
                            power((p - ka) % p, p - kb)
                        }
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
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
    // Power per folded frequency pair (x, y), x, y <= p / 2, row-major: the order in which
    // `dominant` lists equal powers.
    let h = p / 2 + 1;
    let mut merged = vec![0.0; h * h];
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
                merged[fold(ka) * h + fold(kb)] += v;
            }
        }
    }
    let constant = power[(0, 0)] / total;
    let mut dominant: Vec<(usize, usize, f64)> =
        (1..h * h).map(|i| (i / h, i % h, merged[i])).collect();
    // Strongest first. Powers equal to 1e-12 of the total are ties, broken by frequency
    // (`k_b`, then `k_a`: `a` before `b`): a feature symmetric in `a` and `b` (the first layer's,
    // summed over positions) has equal `a` and `b` powers, and which one rounding makes larger
    // depends on the order of the sums.
    let tie = |v: f64| (v * 1e12).round();
    dominant.sort_by(|x, y| {
        tie(y.2)
            .total_cmp(&tie(x.2))
            .then((x.1, x.0).cmp(&(y.1, y.0)))
    });
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
        terms: rib_terms(power),
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
    Ok(label_layers(model, &[basis], modulus, op)?.remove(0))
}

/// [`label_features`] of several node layers, from one forward pass over all pairs.
pub fn label_layers(
    model: &Model,
    bases: &[&NodeBasis],
    modulus: usize,
    op: ModOp,
) -> anyhow::Result<Vec<Vec<FourierLabel>>> {
    Ok(feature_grids(model, bases, modulus, op)?
        .iter()
        .map(|grids| {
            power_spectra(grids.as_ref(), modulus)
                .par_iter()
                .map(label_from_power)
                .collect()
        })
        .collect())
}

/// Each feature of each of `bases` over all `p^2` pairs, from one forward pass: per basis a
/// `p^2 x d_lib` matrix, row `a p + b`, column `j` the feature `(sum_s f_s) C_j` summed over
/// positions (the input of [`power_spectra`]).
pub fn feature_grids(
    model: &Model,
    bases: &[&NodeBasis],
    modulus: usize,
    op: ModOp,
) -> anyhow::Result<Vec<Mat<f64>>> {
    // (node index, position in `bases`), in model order; and each basis's C.
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(bases.len());
    let mut cs: Vec<Mat<f64>> = Vec::with_capacity(bases.len());
    for (l, b) in bases.iter().enumerate() {
        let index = model
            .node_index(&b.name)
            .with_context(|| format!("node layer `{}` is not in the model", b.name))?;
        let d = model.node_features(index);
        if let Some(c) = &b.c {
            anyhow::ensure!(
                c.nrows() == d,
                "node layer `{}` has {d} features in the model, C has {} rows",
                b.name,
                c.nrows()
            );
        }
        order.push((index, l));
        cs.push(b.c.clone().unwrap_or_else(|| Mat::identity(d, d)));
    }
    order.sort_unstable();
    let data = ModularArithmetic::new(modulus, op, Split::All, 1.0, 0, None)?;
    let p = modulus;
    // Per batch and layer, one column per feature, row a p + b (Split::All lists the pairs in
    // this order): the feature summed over positions, (sum_s f_s) C. Small batches: the model
    // runs several times faster on activations that stay in cache.
    let batches: Vec<Vec<Mat<f64>>> = crate::algorithm::pass::chunks(data.len(), 128)
        .into_par_iter()
        .map(|r| {
            let mut out = vec![Mat::zeros(0, 0); bases.len()];
            let (mut f, mut at) = (data.inputs(r), 0);
            for &(index, l) in &order {
                f = model.run(f, at, index);
                at = index;
                let pos = f.pos;
                let summed = Mat::from_fn(f.n, f.features(), |x, j| {
                    (0..pos).map(|s| f.data[(x * pos + s, j)]).sum::<f64>()
                });
                out[l] = mm(summed.as_ref(), cs[l].as_ref());
            }
            out
        })
        .collect();
    Ok((0..bases.len())
        .map(|l| {
            let mut grids = Mat::zeros(p * p, cs[l].ncols());
            let mut row = 0;
            for b in &batches {
                grids
                    .as_mut()
                    .subrows_mut(row, b[l].nrows())
                    .copy_from(&b[l]);
                row += b[l].nrows();
            }
            grids
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid `f(a, b)` at `p = 113`, labelled the reference's way.
    fn rib_of(f: impl Fn(f64, f64) -> f64) -> Vec<(String, f64)> {
        let p = 113;
        let w = 2.0 * std::f64::consts::PI / p as f64;
        let grid = Mat::from_fn(p, p, |a, b| f(w * a as f64, w * b as f64));
        rib_terms(&power_spectrum(&grid))
    }

    fn names(terms: &[(String, f64)]) -> Vec<&str> {
        terms.iter().map(|t| t.0.as_str()).collect()
    }

    #[test]
    fn rib_labels_of_pure_terms() {
        // The example: one label with all the power (ours splits it 50/50 into a, b).
        let t = rib_of(|a, b| (15.0 * a).cos() + (15.0 * b).cos());
        assert_eq!(names(&t), ["cos(15x) + cos(15y)"]);
        assert!((t[0].1 - 1.0).abs() < 1e-12);
        // A single plane wave: the sum convention; and a product of cosines: the product one.
        let t = rib_of(|a, b| (3.0 * a + 5.0 * b).cos());
        assert_eq!(names(&t), ["cos(3x + 5y)"]);
        // The reference's convention test compares ratios of sums: a lone difference wave
        // has plus/minus = 0 < coscos/sinsin = 1, so it reads as a product pair, which is the
        // same function (cos(u - v) = cos u cos v + sin u sin v).
        let t = rib_of(|a, b| (3.0 * a - 5.0 * b).cos());
        assert_eq!(names(&t), ["cos(3x) * cos(5y)", "sin(3x) * sin(5y)"]);
        assert!(t.iter().all(|x| (x.1 - 0.5).abs() < 1e-12), "{t:?}");
        // Mostly sum waves: the sum convention names a difference wave too.
        let t = rib_of(|a, b| (3.0 * a + 5.0 * b).cos() + 0.3 * (2.0 * a - b).cos());
        assert_eq!(names(&t), ["cos(3x + 5y)", "cos(2x - 1y)"]);
        let t = rib_of(|a, b| (3.0 * a).cos() * (5.0 * b).cos());
        assert_eq!(names(&t), ["cos(3x) * cos(5y)"]);
        // Unequal a and b powers stay apart, constant included, strongest first: powers
        // 4 : 1 : 1 / 4 (cos^2 averages 1/2 and cos(4b) has half of 1's amplitude).
        let t = rib_of(|a, b| 2.0 + 2.0 * (7.0 * a).cos() + (4.0 * b).sin() * 0.5f64.sqrt());
        assert_eq!(names(&t), ["const", "cos(7x)", "cos(4y)"]);
        let want = [4.0, 2.0, 0.25];
        let sum: f64 = want.iter().sum();
        for (got, w) in t.iter().zip(want) {
            assert!((got.1 - w / sum).abs() < 1e-12, "{t:?}");
        }
        let l = FourierLabel {
            terms: t,
            ..label_from_power(&Mat::from_fn(3, 3, |i, j| (i + j) as f64))
        };
        assert_eq!(l.rib_label(), "64% const|32% cos(7x)|4% cos(4y)");
    }

    #[test]
    fn rib_labels_stop_at_seven_and_at_small_terms() {
        // Ten equal plane waves: each holds 10%; seven are kept.
        let t = rib_of(|a, b| (1..=10).map(|k| (k as f64 * a + b).cos()).sum());
        assert_eq!(t.len(), 7);
        assert!(t.iter().all(|x| (x.1 - 0.1).abs() < 1e-12), "{t:?}");
        // One strong term (98.9%) and three under 0.5% each: the largest small one is listed,
        // then the list stops. Terms within 0.01 of each other in x and y merge, zeros too.
        let t = rib_of(|a, b| {
            (2.0 * a).cos()
                + 0.065 * (9.0 * b).cos()
                + 0.06 * (5.0 * b).cos()
                + 0.055 * (6.0 * b).cos()
        });
        assert_eq!(names(&t), ["cos(2x)", "cos(9x) + cos(9y)"]);
    }

    #[test]
    fn rib_csv_has_a_row_per_layer() {
        let l = label_from_power(&Mat::from_fn(5, 5, |i, j| {
            if (i, j) == (1, 0) {
                1.0
            } else {
                0.0
            }
        }));
        let csv = rib_csv(
            &["ln1.0".into(), "output".into()],
            &[2, 3],
            &[vec![l.clone(), l], vec![]],
        );
        assert_eq!(
            csv,
            "100% cos(1x),100% cos(1x)\noutput_0,output_1,output_2\n"
        );
    }

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

    /// `grids` as the columns of one matrix (row `a p + b`).
    fn stack(grids: &[Mat<f64>]) -> Mat<f64> {
        let p = grids[0].nrows();
        Mat::from_fn(p * p, grids.len(), |r, j| grids[j][(r / p, r % p)])
    }

    #[test]
    fn batched_spectra_match_the_loops() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // Odd, even and tiny moduli; a number of grids that is not a multiple of the block.
        for p in [1, 2, 3, 12, 13, 31] {
            let grids: Vec<Mat<f64>> = (0..2 * SPECTRA_BLOCK + 3)
                .map(|_| Mat::from_fn(p, p, |_, _| rng.random_range(-1.0..1.0)))
                .collect();
            let batched = power_spectra(stack(&grids).as_ref(), p);
            assert_eq!(batched.len(), grids.len());
            for (g, got) in grids.iter().zip(&batched) {
                let want = power_spectrum(g);
                let scale = want
                    .col_iter()
                    .flat_map(|c| c.iter().copied().collect::<Vec<_>>())
                    .fold(0.0, f64::max);
                for ka in 0..p {
                    for kb in 0..p {
                        // Sums of p^2 terms of order one, reassociated: ~1e-14 of the largest.
                        assert!(
                            (got[(ka, kb)] - want[(ka, kb)]).abs() <= 1e-12 * scale,
                            "p {p} ({ka}, {kb}): {} vs {}",
                            got[(ka, kb)],
                            want[(ka, kb)]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_pure_wave_has_all_its_power_at_its_frequency() {
        // cos(2 pi (ka a + kb b) / p + phi) = (e^{i..} + e^{-i..}) / 2: power (p^2 / 2)^2 at
        // (ka, kb) and at (-ka, -kb), none elsewhere; a constant c: (c p^2)^2 at (0, 0).
        let p = 13;
        let waves = [(0, 0), (3, 0), (0, 5), (2, 11), (6, 6), (7, 1)];
        let grids: Vec<Mat<f64>> = waves
            .iter()
            .map(|&(ka, kb)| {
                Mat::from_fn(p, p, |a, b| {
                    let t = 2.0 * std::f64::consts::PI * ((ka * a + kb * b) % p) as f64;
                    (t / p as f64 + 0.4).cos()
                })
            })
            .collect();
        let spectra = power_spectra(stack(&grids).as_ref(), p);
        let p4 = (p * p * p * p) as f64;
        for (&(ka, kb), s) in waves.iter().zip(&spectra) {
            let mirror = ((p - ka) % p, (p - kb) % p);
            for x in 0..p {
                for y in 0..p {
                    let want = match (ka, kb) {
                        (0, 0) if (x, y) == (0, 0) => p4 * 0.4f64.cos().powi(2),
                        (0, 0) => 0.0,
                        _ if (x, y) == (ka, kb) || (x, y) == mirror => p4 / 4.0,
                        _ => 0.0,
                    };
                    assert!(
                        (s[(x, y)] - want).abs() < 1e-12 * p4,
                        "wave ({ka}, {kb}) at ({x}, {y}): {} vs {want}",
                        s[(x, y)]
                    );
                }
            }
            if (ka, kb) != (0, 0) {
                let l = label_from_power(s);
                let fold = |k: usize| k.min(p - k);
                assert_eq!((l.dominant[0].0, l.dominant[0].1), (fold(ka), fold(kb)));
                assert!((l.dominant[0].2 - 1.0).abs() < 1e-12, "{l:?}");
            }
        }
    }

    #[test]
    fn ties_do_not_depend_on_rounding() {
        // Equal power at (5, 0) and (0, 5) (and their mirrors), up to rounding either way.
        let p = 13;
        for eps in [1e-16, -1e-16, 0.0] {
            let mut power = Mat::zeros(p, p);
            power[(5, 0)] = 1.0 + eps;
            power[(p - 5, 0)] = 1.0 + eps;
            power[(0, 5)] = 1.0;
            power[(0, p - 5)] = 1.0;
            power[(0, 0)] = 1e-3;
            power[(2, 3)] = 1e-20 * (1.0 + eps);
            power[(3, 2)] = 1e-20;
            let l = label_from_power(&power);
            assert_eq!(l.label, "a5", "{l:?}");
            let order: Vec<_> = l.dominant.iter().map(|d| (d.0, d.1)).collect();
            assert_eq!(order[..2], [(5, 0), (0, 5)]);
        }
    }

    #[test]
    fn layers_are_labelled_as_feature_by_feature() {
        use crate::models::transformer::{transformer_from_tensors, TransformerOptions};
        use rand::{Rng, SeedableRng};
        let p = 11;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let tensors = crate::experiments::eval::testing::random_transformer(&mut rng, p);
        let opts = TransformerOptions {
            last_pos_module_type: Some("add_resid1".into()),
            ..Default::default()
        };
        let model = transformer_from_tensors(&tensors, &opts, "random").unwrap();
        let basis = |name: &str, d_lib: Option<usize>, rng: &mut rand_chacha::ChaCha8Rng| {
            let d = model.node_features(model.node_index(name).unwrap());
            NodeBasis {
                c: d_lib.map(|k| Mat::from_fn(d, k, |_, _| rng.random_range(-1.0..1.0))),
                ..NodeBasis::neuron(name, d, 1)
            }
        };
        // Out of model order, and the neuron basis (no C).
        let bases = [
            basis("unembed", Some(6), &mut rng),
            basis("ln1.0", Some(5), &mut rng),
            basis("ln2.0", None, &mut rng),
        ];
        let refs: Vec<&NodeBasis> = bases.iter().collect();
        let labels = label_layers(&model, &refs, p, ModOp::Add).unwrap();
        let data = ModularArithmetic::new(p, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
        for (b, got) in bases.iter().zip(&labels) {
            // The reference: activations of all pairs at once, f C, each feature's grid
            // summed over positions, the loops.
            let f = model.run(data.inputs(0..p * p), 0, model.node_index(&b.name).unwrap());
            let c =
                b.c.clone()
                    .unwrap_or_else(|| Mat::identity(b.d_orig, b.d_orig));
            let fhat = mm(f.data.as_ref(), c.as_ref());
            assert_eq!(got.len(), c.ncols());
            for (j, got) in got.iter().enumerate() {
                let grid = Mat::from_fn(p, p, |a, x| {
                    (0..f.pos)
                        .map(|s| fhat[((a * p + x) * f.pos + s, j)])
                        .sum::<f64>()
                });
                let want = label_from_power(&power_spectrum(&grid));
                assert_eq!(got.label, want.label, "{} feature {j}", b.name);
                for (x, y) in [(got.a, want.a), (got.b, want.b), (got.cross, want.cross)] {
                    assert!((x - y).abs() < 1e-10, "{} feature {j}: {x} vs {y}", b.name);
                }
                for (x, y) in got.dominant.iter().zip(&want.dominant) {
                    assert_eq!((x.0, x.1), (y.0, y.1), "{} feature {j}", b.name);
                    assert!((x.2 - y.2).abs() < 1e-10);
                }
            }
        }
        let mut wrong = basis("ln1.0", Some(5), &mut rng);
        wrong.c = Some(Mat::zeros(wrong.d_orig + 1, 5));
        assert!(label_features(&model, &wrong, p, ModOp::Add).is_err());
        wrong.name = "nowhere".into();
        assert!(label_features(&model, &wrong, p, ModOp::Add).is_err());
        let one = label_features(&model, &bases[1], p, ModOp::Add).unwrap();
        assert_eq!(
            one.iter().map(|l| &l.label).collect::<Vec<_>>(),
            labels[1].iter().map(|l| &l.label).collect::<Vec<_>>()
        );
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
