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
