//! The closed forms of method.md section 11 on transformer sections (an MLP beside the residual
//! stream is `act(x W1) W2` with a partial activation) equal the general VJP/JVP path.

mod common;
use common::*;
use faer::Mat;
use ibasis::algorithm::{build, integration, BasisFormula, EdgeFormula, LibConfig};
use ibasis::data::modadd::{ModOp, ModularArithmetic, Split};
use ibasis::models::transformer::{transformer_from_tensors, TransformerOptions};
use ibasis::models::{Cache, Model, Module, Structure};
use ibasis::tensor::Batch;

/// Hides a module's structure so the general path is taken.
struct Opaque(Box<dyn Module>);

impl Module for Opaque {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn out_pos(&self, p: usize) -> usize {
        self.0.out_pos(p)
    }
    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        self.0.forward(x)
    }
    fn vjp(&self, c: &Cache, dy: &Batch) -> Batch {
        self.0.vjp(c, dy)
    }
    fn jvp(&self, c: &Cache, dx: &Batch) -> Batch {
        self.0.jvp(c, dx)
    }
    fn structure(&self) -> Structure<'_> {
        Structure::General
    }
}

fn model(opaque: bool) -> Model {
    let t = random_transformer(5, 7, 6, 2, 3, 10);
    let opts = TransformerOptions {
        last_pos_module_type: Some("add_resid1".into()),
        ..Default::default()
    };
    let mut m = transformer_from_tensors(&t, &opts, "random").unwrap();
    if opaque {
        m.modules = m
            .modules
            .into_iter()
            .map(|m| Box::new(Opaque(m)) as Box<dyn Module>)
            .collect();
    }
    m
}

#[test]
fn mlp_beside_residual_matches_general_path() {
    let data = ModularArithmetic::new(7, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
    for (rule, n) in [
        (integration::Rule::Gradient, 0),
        (integration::Rule::GaussLegendre, 2),
    ] {
        let cfg = LibConfig {
            node_layers: ["ln2.0", "unembed", "output"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            basis_formula: BasisFormula::Jacobian,
            center: true,
            isolate_ln_var: true,
            tau: 1e-12,
            integration_rule: rule,
            n_intervals: n,
            rotate_final_node_layer: false,
            edge_formula: EdgeFormula::Squared,
            n_stochastic_sources_edges: 1,
            n_stochastic_sources_pos: None,
            n_stochastic_sources_hidden: None,
            batch_size: 10,
            seed: 0,
        };
        let fast = build(&model(false), &data, &cfg).unwrap();
        let slow = build(&model(true), &data, &cfg).unwrap();
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
        isolate_ln_var: true,
        tau: 1e-12,
        integration_rule: integration::Rule::Gradient,
        n_intervals: 0,
        rotate_final_node_layer: false,
        edge_formula: EdgeFormula::Squared,
        n_stochastic_sources_edges: 1,
        n_stochastic_sources_pos: None,
        n_stochastic_sources_hidden: None,
        batch_size: 10,
        seed: 0,
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
