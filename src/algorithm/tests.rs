//! Tests of the LIB algebra against independent computations: brute-force finite-difference
//! Jacobians, the closed-form shortcuts against the general VJP/JVP path, and the identities of
//! method.md section 4.

use super::*;
use crate::models::mlp::{Dense, MlpWeights};
use crate::models::{Activation, InputKind, Module};
use crate::tensor::linalg::{max_abs_diff, mm};
use crate::tensor::Batch;
use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// Inputs from a fixed matrix (features with bias), rows `(sample, position)`.
pub struct Fixed {
    pub x: Mat<f64>,
    /// Positions per sample.
    pub pos: usize,
}

impl Dataset for Fixed {
    fn len(&self) -> usize {
        self.x.nrows() / self.pos
    }
    fn inputs(&self, range: Range<usize>) -> Batch {
        let rows = self
            .x
            .subrows(range.start * self.pos, range.len() * self.pos);
        Batch::new(range.len(), 1, self.pos, rows.to_owned())
    }
    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        vec![0; range.len()]
    }
    fn describe(&self) -> String {
        "fixed".into()
    }
}

fn random_mat(rng: &mut ChaCha8Rng, r: usize, c: usize, scale: f64) -> Mat<f64> {
    Mat::from_fn(r, c, |_, _| scale * (rng.random::<f64>() * 2.0 - 1.0))
}

fn mlp(seed: u64, dims: &[usize], act: Activation) -> MlpWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    MlpWeights {
        layers: dims
            .windows(2)
            .map(|w| {
                let m = random_mat(&mut rng, w[0], w[1], 1.0 / (w[0] as f64).sqrt());
                let b = (0..w[1])
                    .map(|_| 0.3 * (rng.random::<f64>() - 0.5))
                    .collect();
                (m, b)
            })
            .collect(),
        act,
    }
}

/// Data with a few always-zero features (so truncation has something to drop) and a bias 1.
fn inputs(seed: u64, n: usize, d: usize) -> Fixed {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Fixed {
        pos: 1,
        x: Mat::from_fn(n, d + 1, |_, j| {
            if j == d {
                1.0
            } else if j % 5 == 4 {
                0.0
            } else {
                rng.random::<f64>() * 2.0 - 0.5 + 0.1 * j as f64
            }
        }),
    }
}

fn opaque(model: Model) -> Model {
    model.opaque()
}

fn config(layers: &[&str], formula: BasisFormula, center: bool) -> LibConfig {
    LibConfig {
        node_layers: layers.iter().map(|s| s.to_string()).collect(),
        basis_formula: formula,
        center,
        tau: 1e-12,
        batch_size: 7,
        ..Default::default()
    }
}

/// Jacobian of `f -> F(f) Q` at `f` by central differences, `(out, in)`.
fn fd_jacobian(model: &Model, from: usize, to: usize, f: &[f64], q: &Mat<f64>) -> Mat<f64> {
    let d = f.len();
    let eval = |v: &[f64]| {
        let x = Batch::new(1, 1, 1, Mat::from_fn(1, d, |_, j| v[j]));
        mm(model.run(x, from, to).data.as_ref(), q.as_ref())
    };
    let out = q.ncols();
    let h = 1e-6;
    let mut jac = Mat::zeros(out, d);
    for j in 0..d {
        let mut p = f.to_vec();
        let mut m = f.to_vec();
        p[j] += h;
        m[j] -= h;
        let (yp, ym) = (eval(&p), eval(&m));
        for i in 0..out {
            jac[(i, j)] = (yp[(0, i)] - ym[(0, i)]) / (2.0 * h);
        }
    }
    jac
}

fn rel_err(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let scale = b
        .col_iter()
        .flat_map(|c| c.iter().map(|v| v.abs()).collect::<Vec<_>>())
        .fold(0.0, f64::max);
    max_abs_diff(a.as_ref(), b.as_ref()) / scale.max(1e-300)
}

#[test]
fn folding_keeps_activations() {
    for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
        let w = mlp(1, &[6, 5, 4, 3], act);
        let model = w.into_model("t");
        let data = inputs(2, 9, 6);
        let folded = model.run(data.inputs(0..9), 0, model.modules.len());
        let unfolded = w.forward_unfolded(data.x.subcols(0, 6));
        assert!(
            max_abs_diff(folded.data.as_ref(), unfolded.as_ref()) < 1e-12,
            "{act:?}"
        );
        // Every hidden node layer ends with an exact 1.
        let h = model.run(data.inputs(0..9), 0, 2);
        assert!(h.data.col(h.features() - 1).iter().all(|&v| v == 1.0));
    }
}

#[test]
fn dense_vjp_jvp_match_finite_differences() {
    for act in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Identity,
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let layer = Dense::fold(
            "l",
            random_mat(&mut rng, 4, 3, 1.0).as_ref(),
            &[0.1, -0.2, 0.3],
            act,
            false,
        );
        let (n, r, pos) = (2, 3, 2);
        let x = Batch::new(n, 1, pos, random_mat(&mut rng, n * pos, 5, 1.0));
        let (_, cache) = layer.forward(&x);
        let dx = Batch::new(n, r, pos, random_mat(&mut rng, n * r * pos, 5, 1.0));
        let dy = Batch::new(n, r, pos, random_mat(&mut rng, n * r * pos, 4, 1.0));
        let jv = layer.jvp(&cache, &dx);
        let vj = layer.vjp(&cache, &dy);
        let h = 1e-6;
        for xi in 0..n {
            for v in 0..r {
                for s in 0..pos {
                    let row = dx.row(xi, v, s);
                    let shifted = |sign: f64| {
                        let xs = Mat::from_fn(1, 5, |_, j| {
                            x.data[(xi * pos + s, j)] + sign * h * dx.data[(row, j)]
                        });
                        layer.forward(&Batch::new(1, 1, 1, xs)).0.data
                    };
                    let (p, m) = (shifted(1.0), shifted(-1.0));
                    for i in 0..4 {
                        let fd = (p[(0, i)] - m[(0, i)]) / (2.0 * h);
                        assert!((fd - jv.data[(row, i)]).abs() < 1e-6, "{act:?} jvp");
                    }
                    // <vjp(dy), dx> == <dy, jvp(dx)> for the same (sample, vector, position).
                    let lhs: f64 = (0..5).map(|j| vj.data[(row, j)] * dx.data[(row, j)]).sum();
                    let rhs: f64 = (0..4).map(|i| dy.data[(row, i)] * jv.data[(row, i)]).sum();
                    assert!((lhs - rhs).abs() < 1e-10, "{act:?} adjoint");
                }
            }
        }
    }
}

#[test]
fn metric_shortcuts_equal_brute_force_and_general_path() {
    // Gelu so that the integrated gradient differs from the plain gradient.
    let w = mlp(4, &[7, 6, 5, 3], Activation::Gelu);
    let data = inputs(5, 23, 7);
    let q = {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        random_mat(&mut rng, 7, 4, 1.0)
    };
    for (rule, n_int) in [
        (integration::Rule::Gradient, 0),
        (integration::Rule::GaussLegendre, 3),
    ] {
        let points = integration::points(rule, n_int).unwrap();
        let model = w.into_model("m");
        let cfg = config(
            &["layers.0", "layers.1", "output"],
            BasisFormula::Jacobian,
            false,
        );
        let layers = resolve_node_layers(&model, &cfg.node_layers).unwrap();
        let fast = basis::jacobian_metric(
            &model,
            &data,
            &cfg,
            &layers,
            0,
            &q,
            &points,
            BasisFormula::Jacobian,
        )
        .unwrap()
        .m;
        let general = opaque(w.into_model("m"));
        let slow = basis::jacobian_metric(
            &general,
            &data,
            &cfg,
            &layers,
            0,
            &q,
            &points,
            BasisFormula::Jacobian,
        )
        .unwrap()
        .m;
        assert!(rel_err(&fast, &slow) < 1e-12, "{rule:?}");
        // Brute force: integrated finite-difference Jacobians.
        let mut brute = Mat::<f64>::zeros(8, 8);
        for x in 0..23 {
            let f: Vec<f64> = (0..8).map(|j| data.x[(x, j)]).collect();
            let mut g = Mat::<f64>::zeros(4, 8);
            for &(a, wt) in &points {
                let fa: Vec<f64> = f.iter().map(|v| a * v).collect();
                g += faer::Scale(wt) * fd_jacobian(&model, 0, 1, &fa, &q);
            }
            brute += mm(g.transpose(), g.as_ref());
        }
        brute *= faer::Scale(1.0 / 23.0);
        assert!(rel_err(&fast, &brute) < 1e-7, "{rule:?} brute");
    }
}

#[test]
fn lib_identities_hold() {
    let w = mlp(6, &[9, 8, 6, 4], Activation::Relu);
    let data = inputs(7, 40, 9);
    let model = w.into_model("m");
    let cfg = config(
        &["layers.0", "layers.1", "layers.2", "output"],
        BasisFormula::Jacobian,
        true,
    );
    let g = build(&model, &data, &cfg).unwrap();
    for b in &g.layers[..3] {
        let (c, cp) = (b.c.as_ref().unwrap(), b.c_pinv.as_ref().unwrap());
        let k = c.ncols();
        assert!(b.has_constant && b.n_masked == 1);
        // C_pinv C = I.
        assert!(
            max_abs_diff(
                mm(cp.as_ref(), c.as_ref()).as_ref(),
                Mat::<f64>::identity(k, k).as_ref()
            ) < 1e-9,
            "{}",
            b.name
        );
        // C^T E[f^T f] C = diag(Lambda): LIB features are uncorrelated with variance Lambda.
        let idx = model.node_index(&b.name).unwrap();
        let f = model.run(data.inputs(0..40), 0, idx).data;
        let fhat = mm(f.as_ref(), c.as_ref());
        let second = mm(fhat.transpose(), fhat.as_ref()) * faer::Scale(1.0 / 40.0);
        let diag = Mat::from_fn(k, k, |i, j| if i == j { b.lambda[i] } else { 0.0 });
        assert!(rel_err(&second, &diag) < 1e-9, "{}", b.name);
        // The first feature is the constant direction: fhat_0 is the same for every sample.
        let f0 = fhat.col(0);
        assert!(f0.iter().all(|v| (v - f0[0]).abs() < 1e-9 * f0[0].abs()));
    }
    // The input layer has 9 features of which 1 in 5 are always 0: truncation 1 drops them.
    assert!(g.layers[0].d_lib() <= 8);
    // Unrotated output after a linear section: sum_i E_ij = Lambda_j.
    let e = &g.edges[2];
    for j in 0..e.ncols() {
        let s: f64 = e.col(j).iter().sum();
        assert!(
            (s - g.layers[2].lambda[j]).abs() < 1e-9 * g.layers[2].lambda[0],
            "column {j}"
        );
    }
}

#[test]
fn edge_shortcuts_equal_general_path_and_brute_force() {
    let w = mlp(8, &[6, 7, 5, 3], Activation::Gelu);
    let data = inputs(9, 19, 6);
    for (rule, n_int) in [
        (integration::Rule::Gradient, 0),
        (integration::Rule::Trapezoidal, 2),
    ] {
        let mut cfg = config(
            &["layers.0", "layers.1", "layers.2", "output"],
            BasisFormula::Jacobian,
            true,
        );
        cfg.integration_rule = rule;
        cfg.n_intervals = n_int;
        let fast = build(&w.into_model("m"), &data, &cfg).unwrap();
        let slow = build(&opaque(w.into_model("m")), &data, &cfg).unwrap();
        for (a, b) in fast.edges.iter().zip(&slow.edges) {
            assert!(rel_err(a, b) < 1e-9, "{rule:?}: {}", rel_err(a, b));
        }
        // Brute force for layers.0 -> layers.1 with finite-difference Jacobians of module_hat.
        let model = w.into_model("m");
        let (b0, b1) = (&fast.layers[0], &fast.layers[1]);
        let (c0, cp0, c1) = (
            b0.c.as_ref().unwrap(),
            b0.c_pinv.as_ref().unwrap(),
            b1.c.as_ref().unwrap(),
        );
        let points = integration::points(rule, n_int).unwrap();
        let mut brute = Mat::<f64>::zeros(c1.ncols(), c0.ncols());
        for x in 0..19 {
            let f = data.x.subrows(x, 1);
            let fhat = mm(f, c0.as_ref());
            for &(a, wt) in &points {
                let _ = (a, wt);
            }
            let mut bracket = Mat::<f64>::zeros(c1.ncols(), c0.ncols());
            for &(a, wt) in &points {
                // d module_hat / d fhat at a*fhat = J_F(a fhat C_pinv) in LIB coordinates.
                let orig = mm(fhat.as_ref(), cp0.as_ref());
                let pt: Vec<f64> = (0..orig.ncols()).map(|j| a * orig[(0, j)]).collect();
                let jac = mm(fd_jacobian(&model, 0, 1, &pt, c1).as_ref(), cp0.transpose());
                for i in 0..c1.ncols() {
                    for j in 0..c0.ncols() {
                        bracket[(i, j)] += wt * fhat[(0, j)] * jac[(i, j)];
                    }
                }
            }
            for i in 0..c1.ncols() {
                for j in 0..c0.ncols() {
                    brute[(i, j)] += bracket[(i, j)].powi(2) / 19.0;
                }
            }
        }
        assert!(
            rel_err(&fast.edges[0], &brute) < 1e-6,
            "{rule:?} brute {}",
            rel_err(&fast.edges[0], &brute)
        );
    }
}

#[test]
fn bases_and_formulas_run() {
    let w = mlp(10, &[5, 6, 4, 3], Activation::Relu);
    let data = inputs(11, 30, 5);
    for formula in [
        BasisFormula::Svd,
        BasisFormula::Neuron,
        BasisFormula::OneZeroAlpha,
        BasisFormula::OneMinusAlphaSquared,
    ] {
        for center in [false, true] {
            let mut cfg = config(&["layers.0", "layers.1", "output"], formula, center);
            if formula == BasisFormula::Neuron && center {
                continue;
            }
            // Functional edges and (1-alpha)^2 vanish under the one-point gradient rule.
            cfg.edge_formula = EdgeFormula::Functional;
            cfg.integration_rule = crate::algorithm::integration::Rule::Trapezoidal;
            cfg.n_intervals = 2;
            let g = build(&w.into_model("m"), &data, &cfg).unwrap();
            let c = g.layers[0].c.as_ref().unwrap();
            let cp = g.layers[0].c_pinv.as_ref().unwrap();
            let k = c.ncols();
            assert!(
                max_abs_diff(
                    mm(cp.as_ref(), c.as_ref()).as_ref(),
                    Mat::<f64>::identity(k, k).as_ref()
                ) < 1e-9
            );
            assert!(g
                .edges
                .iter()
                .all(|e| e.col_iter().all(|c| c.iter().all(|v| v.is_finite()))));
        }
    }
}

#[test]
fn node_layer_validation() {
    let model = mlp(1, &[3, 2, 2], Activation::Relu).into_model("m");
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(resolve_node_layers(&model, &names(&["layers.0", "output"])).is_ok());
    let err = |v: &[&str]| {
        resolve_node_layers(&model, &names(v))
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["layers.0", "layers.9"]).contains("layers.9"));
    assert!(err(&["layers.1", "layers.0"]).contains("order"));
    assert!(err(&["layers.0", "layers.0"]).contains("twice"));
    assert!(err(&["layers.0"]).contains("at least two"));
    assert_eq!(model.input, InputKind::Features(4));
}

#[test]
fn functional_edges_match_brute_force() {
    // E_ij = -1/N sum_p w_p sum_x fhat_j d/d(a_p fhat)_j sum_t (mh_i(fhat) - mh_i(a_p fhat))^2,
    // with the derivative by central differences.
    let w = mlp(12, &[5, 6, 4, 3], Activation::Gelu);
    let data = inputs(13, 11, 5);
    let mut cfg = config(
        &["layers.0", "layers.1", "output"],
        BasisFormula::Jacobian,
        true,
    );
    cfg.edge_formula = EdgeFormula::Functional;
    cfg.integration_rule = integration::Rule::GaussLegendre;
    cfg.n_intervals = 2;
    let model = w.into_model("m");
    let g = build(&model, &data, &cfg).unwrap();
    let (c0, cp0, c1) = (
        g.layers[0].c.as_ref().unwrap(),
        g.layers[0].c_pinv.as_ref().unwrap(),
        g.layers[1].c.as_ref().unwrap(),
    );
    let mh = |fhat: &Mat<f64>| {
        let x = Batch::new(1, 1, 1, mm(fhat.as_ref(), cp0.as_ref()));
        mm(model.run(x, 0, 1).data.as_ref(), c1.as_ref())
    };
    let points = integration::points(integration::Rule::GaussLegendre, 2).unwrap();
    let (n_out, n_in) = (c1.ncols(), c0.ncols());
    let mut brute = Mat::<f64>::zeros(n_out, n_in);
    let h = 1e-6;
    for x in 0..11 {
        let fhat = mm(data.x.subrows(x, 1), c0.as_ref());
        let y = mh(&fhat);
        for &(a, wt) in &points {
            for j in 0..n_in {
                let loss = |delta: f64| {
                    let mut p = fhat.clone() * faer::Scale(a);
                    p[(0, j)] += delta;
                    let yp = mh(&p);
                    (0..n_out)
                        .map(|i| (y[(0, i)] - yp[(0, i)]).powi(2))
                        .collect::<Vec<_>>()
                };
                let (lp, lm) = (loss(h), loss(-h));
                for i in 0..n_out {
                    brute[(i, j)] -= wt * fhat[(0, j)] * (lp[i] - lm[i]) / (2.0 * h) / 11.0;
                }
            }
        }
    }
    assert!(
        rel_err(&g.edges[0], &brute) < 1e-6,
        "{}",
        rel_err(&g.edges[0], &brute)
    );
}

#[test]
fn rotated_final_layer_uses_centred_pca() {
    let w = mlp(14, &[5, 6, 4], Activation::Relu);
    let data = inputs(15, 30, 5);
    let mut cfg = config(
        &["layers.0", "layers.1", "output"],
        BasisFormula::Jacobian,
        true,
    );
    cfg.rotate_final_node_layer = true;
    let g = build(&w.into_model("m"), &data, &cfg).unwrap();
    let out = &g.layers[2];
    let c = out.c.as_ref().expect("rotated output has a basis");
    // Unscaled orthonormal directions of the output covariance, variances descending.
    let k = c.ncols();
    assert!(
        max_abs_diff(
            mm(c.transpose(), c.as_ref()).as_ref(),
            Mat::<f64>::identity(k, k).as_ref()
        ) < 1e-12
    );
    assert!(out.lambda.windows(2).all(|p| p[0] >= p[1]));
    let unrotated = build(
        &w.into_model("m"),
        &data,
        &config(
            &["layers.0", "layers.1", "output"],
            BasisFormula::Jacobian,
            true,
        ),
    )
    .unwrap();
    assert!(unrotated.layers[2].c.is_none());
}

#[test]
fn prefix_cache_returns_the_model_activations() {
    let w = mlp(3, &[6, 5, 4, 3], Activation::Relu);
    let model = w.into_model("t");
    let data = inputs(4, 11, 6);
    // Node layers layers.1, layers.2, output: the first is not the raw input, so it is kept,
    // and the later ones are small enough to be kept too.
    let indices = [1, 2, model.modules.len()];
    let prefix = pass::Prefix::new(&model, &data, &indices, 4, PREFIX_BYTES).unwrap();
    // No memory for the later layers: they go to the scratch file, in batches of 3 samples.
    let spilled = pass::Prefix::with_budget(&model, &data, &indices, 3, PREFIX_BYTES, 0).unwrap();
    assert_eq!(prefix.start(), 1);
    for p in [&prefix, &spilled] {
        for &index in &indices {
            for range in [3..8, 0..11, 10..11] {
                let cached = p.cached(index, range.clone()).expect("cached");
                let direct = model.run(data.inputs(range.clone()), 0, index);
                assert_eq!(cached.data, direct.data, "layer {index} {range:?}");
                let through = pass::activations_at(&model, p, index, range.clone());
                assert_eq!(through.data, direct.data);
            }
        }
    }
    // Module 3 is the output here; index 0 (the raw input) is not kept.
    assert!(prefix.cached(0, 0..2).is_none());
    // Nothing to keep: the only node layer is the raw input.
    assert!(pass::Prefix::new(&model, &data, &[0], 4, PREFIX_BYTES).is_none());
}

#[test]
fn degenerate_settings_are_refused_with_the_reason() {
    use crate::algorithm::integration::Rule;
    let w = mlp(10, &[5, 6, 4, 3], Activation::Relu);
    let model = w.into_model("m");
    let data = inputs(11, 30, 5);
    let base = config(
        &["layers.0", "layers.1", "output"],
        BasisFormula::Jacobian,
        true,
    );
    let cases: Vec<(LibConfig, &str)> = vec![
        (
            LibConfig {
                basis_formula: BasisFormula::OneMinusAlphaSquared,
                ..base.clone()
            },
            "vanishes at alpha = 1",
        ),
        (
            LibConfig {
                edge_formula: EdgeFormula::Functional,
                ..base.clone()
            },
            "every edge would be 0",
        ),
        (
            LibConfig {
                basis_formula: BasisFormula::Neuron,
                ..base.clone()
            },
            "never centres",
        ),
        (
            LibConfig {
                basis_formula: BasisFormula::Svd,
                n_stochastic_sources_hidden: Some(4),
                ..base.clone()
            },
            "no Jacobian metric",
        ),
        (
            LibConfig {
                tau: f64::NAN,
                ..base.clone()
            },
            "tau",
        ),
    ];
    for (cfg, why) in cases {
        let e = format!("{:#}", build(&model, &data, &cfg).unwrap_err());
        assert!(e.contains(why), "expected `{why}` in: {e}");
    }
    // The same settings with a multi-point rule are fine.
    let ok = LibConfig {
        basis_formula: BasisFormula::OneMinusAlphaSquared,
        edge_formula: EdgeFormula::Functional,
        integration_rule: Rule::GaussLegendre,
        n_intervals: 2,
        ..base
    };
    let g = build(&model, &data, &ok).unwrap();
    assert!(g.layers[0].d_lib() > 0);
    assert!(g.edges[0].col_iter().any(|c| c.iter().any(|v| *v != 0.0)));
}

#[test]
fn rotate_final_node_layer_applies_to_any_last_layer() {
    let w = mlp(12, &[5, 6, 4, 3], Activation::Relu);
    let model = w.into_model("m");
    let data = inputs(13, 40, 5);
    for last in ["layers.2", "output"] {
        let mut cfg = config(
            &["layers.0", "layers.1", last],
            BasisFormula::Jacobian,
            true,
        );
        let kept = build(&model, &data, &cfg).unwrap();
        let b = &kept.layers[2];
        // Neuron coordinates: no basis, and no Gram matrix accumulated.
        assert!(b.c.is_none() && b.lambda.is_empty(), "{last}");
        assert_eq!(b.gram.nrows(), 0, "{last}");
        assert_eq!(
            kept.edges[1].nrows(),
            model.node_features(model.node_index(last).unwrap())
        );
        cfg.rotate_final_node_layer = true;
        let rotated = build(&model, &data, &cfg).unwrap();
        let b = &rotated.layers[2];
        assert!(b.c.is_some() && !b.lambda.is_empty(), "{last}");
        assert_eq!(b.gram.nrows(), b.d_orig);
    }
}

#[test]
fn matrices_that_cannot_fit_are_refused_before_they_are_allocated() {
    // A 200k-way output: its Gram would be 320 GB per copy.
    let w = mlp(14, &[5, 6, 200_000], Activation::Relu);
    let model = w.into_model("m");
    let data = inputs(15, 8, 5);
    let mut cfg = config(&["layers.0", "output"], BasisFormula::Jacobian, true);
    cfg.edge_formula = EdgeFormula::None;
    cfg.rotate_final_node_layer = true;
    let e = format!("{:#}", build(&model, &data, &cfg).unwrap_err());
    assert!(e.contains("Gram matrix of node layer `output`"), "{e}");
    // Unrotated, it needs no Gram, but it is still the dense identity Q of layers.0's metric.
    cfg.rotate_final_node_layer = false;
    let e = format!("{:#}", build(&model, &data, &cfg).unwrap_err());
    assert!(
        e.contains("identity projection Q of node layer `output`"),
        "{e}"
    );
}

#[test]
fn builds_are_bitwise_equal_on_any_number_of_threads() {
    let w = mlp(16, &[5, 9, 7, 4], Activation::Relu);
    let model = w.into_model("m");
    let data = inputs(17, 61, 5);
    let cfg = config(
        &["layers.0", "layers.1", "layers.2", "output"],
        BasisFormula::Jacobian,
        true,
    );
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| build(&model, &data, &cfg).unwrap())
    };
    let bits = |g: &crate::algorithm::Graph| -> Vec<u64> {
        let mut v: Vec<u64> = g
            .layers
            .iter()
            .flat_map(|b| b.lambda.iter().map(|x| x.to_bits()))
            .collect();
        for e in &g.edges {
            v.extend(
                e.col_iter()
                    .flat_map(|c| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
            );
        }
        v
    };
    let one = bits(&on(1));
    for threads in [2, 3, 5] {
        assert_eq!(bits(&on(threads)), one, "{threads} threads");
    }
}

/// `mlp_in -> mlp_act -> mlp_out -> add_resid2 -> extra` beside a carried residual of `r`
/// features (bias last), with `k` hidden units, gated (SwiGLU layout `(g, u, x)`) or not.
fn mlp_block(seed: u64, r: usize, k: usize, act: Activation, gated: bool) -> Model {
    use crate::models::transformer::modules::{Add, MlpAct, Project};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pre = if gated { 2 * k } else { k };
    let scale = 1.5 / (r as f64).sqrt();
    let modules: Vec<Box<dyn Module>> = vec![
        Box::new(Project {
            id: "mlp_in.0".into(),
            w: random_mat(&mut rng, r, pre, scale),
            in_features: r,
            resid: r,
            resid_streams: 1,
        }),
        Box::new(MlpAct {
            id: "mlp_act.0".into(),
            act,
            width: k,
            resid: r,
            gated,
        }),
        Box::new(Project {
            id: "mlp_out.0".into(),
            w: random_mat(&mut rng, k, r, 1.0 / (k as f64).sqrt()),
            in_features: k + r,
            resid: r,
            resid_streams: 1,
        }),
        Box::new(Add {
            id: "add_resid2.0".into(),
            width: r,
        }),
        Box::new(Project {
            id: "extra".into(),
            w: random_mat(&mut rng, r, r + 1, 0.5),
            in_features: r,
            resid: 0,
            resid_streams: 0,
        }),
    ];
    Model {
        name: "mlp block".into(),
        input: InputKind::Features(r),
        modules,
    }
}

/// The per-row Jacobian edges of MLP sections (dense with any activation, ReLU with its
/// active-unit trick, gated SwiGLU) against the general JVP path at 1e-9, under two integration
/// rules, and `compute_dtype = "f32"` against f64 within 1e-4 (f32 rounds each product to
/// ~6e-8 relative; sums of ~100 such products stay far inside 1e-4).
#[test]
fn per_row_mlp_edges_equal_the_general_path_and_f32_stays_close() {
    let (r, k) = (6, 30);
    let data = inputs(12, 23, r - 1);
    let layers = ["mlp_in.0", "extra"];
    for (act, gated) in [
        (Activation::Gelu, false),
        (Activation::GeluTanh, false),
        (Activation::Relu, false),
        (Activation::Silu, true),
    ] {
        for (rule, n_int) in [
            (integration::Rule::Gradient, 0),
            (integration::Rule::GaussLegendre, 2),
        ] {
            let model = mlp_block(5, r, k, act, gated);
            let mut cfg = config(&layers, BasisFormula::Jacobian, true);
            cfg.integration_rule = rule;
            cfg.n_intervals = n_int;
            let resolved = resolve_node_layers(&model, &cfg.node_layers).unwrap();
            let path = edges::edge_path(&model, &cfg, &resolved, 0, r, r);
            assert!(path.starts_with("per-row"), "{act:?}: {path}");
            let fast = build(&model, &data, &cfg).unwrap();
            let slow = build(&mlp_block(5, r, k, act, gated).opaque(), &data, &cfg).unwrap();
            let err = rel_err(&fast.edges[0], &slow.edges[0]);
            assert!(err < 1e-9, "{act:?} {rule:?}: per-row vs JVP {err:e}");
            cfg.compute_dtype = ComputeDtype::F32;
            let low = build(&model, &data, &cfg).unwrap();
            let err = rel_err(&low.edges[0], &fast.edges[0]);
            assert!(
                err < 1e-4 && err > 0.0,
                "{act:?} {rule:?}: f32 vs f64 {err:e}"
            );
            assert_eq!(low.layers[0].lambda, fast.layers[0].lambda);
        }
    }
}

/// `ibasis build` drops the modules after the last node layer: the graph is the same bits.
#[test]
fn dropping_modules_after_the_last_node_layer_changes_nothing() {
    let data = inputs(3, 17, 5);
    let cfg = config(&["mlp_in.0", "add_resid2.0"], BasisFormula::Jacobian, true);
    let model = mlp_block(2, 6, 8, Activation::Gelu, false);
    let full = build(&model, &data, &cfg).unwrap();
    let cut = model.through("add_resid2.0");
    assert_eq!(cut.modules.len(), 4);
    let short = build(&cut, &data, &cfg).unwrap();
    assert_eq!(full.edges[0].as_ref(), short.edges[0].as_ref());
    for (a, b) in full.layers.iter().zip(&short.layers) {
        assert_eq!(a.lambda, b.lambda);
        assert_eq!(a.c, b.c);
    }
}
