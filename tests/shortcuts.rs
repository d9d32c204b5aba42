//! The closed forms of method.md section 11 on transformer sections (an MLP beside the residual
//! stream is `act(x W1) W2` with a partial activation) equal the general VJP/JVP path.

mod common;
use common::*;
use faer::Mat;
use ibasis::algorithm::{build, integration, BasisFormula, LibConfig};
use ibasis::data::modadd::{ModOp, ModularArithmetic, Split};
use ibasis::models::transformer::{transformer_from_tensors, TransformerOptions};
use ibasis::models::Model;

fn model(opaque: bool) -> Model {
    model_with(opaque, 10)
}

fn model_with(opaque: bool, d_mlp: usize) -> Model {
    let t = random_transformer(5, 7, 6, 2, 3, d_mlp);
    let opts = TransformerOptions {
        last_pos_module_type: Some("add_resid1".into()),
        ..Default::default()
    };
    let m = transformer_from_tensors(&t, &opts, "random").unwrap();
    if opaque {
        m.opaque()
    } else {
        m
    }
}

/// Attention (single query), the MLP beside the residual stream (pair statistics for a
/// narrow MLP, per-sample products over the active ReLU units for a wide one) and the
/// unembedding, against the general path.
#[test]
fn transformer_closed_forms_match_general_path() {
    let data = ModularArithmetic::new(7, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
    for (rule, n, d_mlp) in [
        (integration::Rule::Gradient, 0, 10),
        (integration::Rule::GaussLegendre, 2, 10),
        (integration::Rule::Gradient, 0, 40),
        (integration::Rule::GaussLegendre, 2, 40),
    ] {
        let cfg = LibConfig {
            node_layers: ["ln1.0", "ln2.0", "unembed", "output"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            basis_formula: BasisFormula::Jacobian,
            center: true,
            tau: 1e-12,
            integration_rule: rule,
            n_intervals: n,
            batch_size: 10,
            ..Default::default()
        };
        let fast = build(&model_with(false, d_mlp), &data, &cfg).unwrap();
        let slow = build(&model_with(true, d_mlp), &data, &cfg).unwrap();
        for (a, b) in fast.layers.iter().zip(&slow.layers) {
            for (x, y) in a.lambda.iter().zip(&b.lambda) {
                assert!(
                    (x - y).abs() <= 1e-9 * a.lambda[0],
                    "{}: {x} vs {y}",
                    a.name
                );
            }
        }
        for (a, b) in fast.edges.iter().zip(&slow.edges) {
            let d: Mat<f64> = a - b;
            assert!(d.norm_l2() <= 1e-9 * b.norm_l2());
        }
    }
}

#[test]
fn transformer_mlp_section_is_recognised() {
    use ibasis::algorithm::section::{classify, Shape};
    let m = model(false);
    let (from, to) = (
        m.node_index("ln2.0").unwrap(),
        m.node_index("unembed").unwrap(),
    );
    assert!(matches!(
        classify(&m.modules[from..to]),
        Shape::Dense { .. }
    ));
    let (from, to) = (
        m.node_index("unembed").unwrap(),
        m.node_index("output").unwrap(),
    );
    assert!(matches!(classify(&m.modules[from..to]), Shape::Linear(_)));
    // The attention section keeps its last query (last_pos_module_type = add_resid1).
    let (from, to) = (
        m.node_index("ln1.0").unwrap(),
        m.node_index("ln2.0").unwrap(),
    );
    assert!(ibasis::algorithm::attention::attention_section(&m.modules[from..to]).is_some());
    // Which edge path each MLP width takes.
    let cfg = LibConfig {
        node_layers: vec!["ln2.0".into(), "unembed".into()],
        ..Default::default()
    };
    for (d_mlp, path) in [(10, "pair statistics"), (40, "active ReLU units")] {
        let m = model_with(false, d_mlp);
        let layers = ibasis::algorithm::resolve_node_layers(&m, &cfg.node_layers).unwrap();
        let p = ibasis::algorithm::edges::edge_path(&m, &cfg, &layers, 0, 7, 7);
        assert!(p.contains(path), "d_mlp {d_mlp}: {p}");
    }
}

#[test]
fn layer_norm_variance_is_isolated() {
    let t = random_transformer(8, 7, 6, 2, 3, 10);
    let opts = TransformerOptions {
        normalization: ibasis::models::transformer::Normalization::LnPre,
        ..Default::default()
    };
    let m = transformer_from_tensors(&t, &opts, "random").unwrap();
    let data = ModularArithmetic::new(7, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
    let mut cfg = LibConfig {
        node_layers: ["ln1_out.0", "attn_in.0", "ln2.0", "output"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        basis_formula: BasisFormula::Jacobian,
        center: true,
        tau: 1e-12,
        batch_size: 10,
        ..Default::default()
    };
    let g = build(&m, &data, &cfg).unwrap();
    let b = &g.layers[0];
    // Constant direction and variance channel held fixed: V is the identity on both.
    assert_eq!(b.n_masked, 2);
    let v = b.v.as_ref().unwrap();
    assert!((v[(0, 0)] - 1.0).abs() < 1e-15 && (v[(1, 1)] - 1.0).abs() < 1e-15);
    // The variance direction is the variance coordinate alone (index 0 of the node layer).
    let w = b.w.as_ref().unwrap();
    assert!((w[(0, 1)] - 1.0).abs() < 1e-15 && (1..w.nrows() - 1).all(|i| w[(i, 1)] == 0.0));
    let (c, cp) = (b.c.as_ref().unwrap(), b.c_pinv.as_ref().unwrap());
    let k = c.ncols();
    let d: Mat<f64> = cp * c - Mat::<f64>::identity(k, k);
    assert!(d.norm_max() < 1e-9);
    cfg.isolate_ln_var = false;
    assert_eq!(build(&m, &data, &cfg).unwrap().layers[0].n_masked, 1);
}
