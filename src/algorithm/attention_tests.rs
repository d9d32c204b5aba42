//! The attention closed forms against the general path (batched VJPs for `M'`, JVPs for the
//! edges, themselves checked against finite differences in `models::transformer`), on sections
//! with several heads, grouped-query heads, a local window and integration points.

use super::*;
use crate::algorithm::tests::Fixed;
use crate::algorithm::{
    basis, edges, integration, resolve_node_layers, BasisFormula, LibConfig, NodeBasis,
};
use crate::models::transformer::attention::AttnOut;
use crate::models::transformer::modules::{Add, LastPos, Project};
use crate::models::{InputKind, Model};
use crate::tensor::linalg::max_abs_diff;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, r: usize, c: usize, scale: f64) -> Mat<f64> {
    Mat::from_fn(r, c, |_, _| scale * (rng.random::<f64>() * 2.0 - 1.0))
}

struct Setup {
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    /// `attn_out` computes the last query itself (else `add_resid1` keeps the last position).
    attn_last: bool,
}

/// `attn_in -> attn_out -> add_resid1 -> extra` (a linear map, so that the second node layer
/// is not the output), residual width `r`, `d_head` 3.
fn model(seed: u64, s: &Setup, r: usize, opaque: bool) -> Model {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dh = 3;
    let fqkv = s.heads * dh + s.kv_heads * (2 * dh + 1);
    let attn_in = Project {
        id: "attn_in.0".into(),
        w: random(&mut rng, r, fqkv, 0.8),
        in_features: r,
        resid: r,
        resid_streams: 1,
    };
    let attn = AttnOut {
        id: "attn_out.0".into(),
        heads: s.heads,
        kv_heads: s.kv_heads,
        d_head: dh,
        scale: 0.7,
        w_o: random(&mut rng, s.heads * (dh + 1), r, 0.6),
        resid: r,
        last_pos: s.attn_last,
        window: s.window,
        rotary: None,
    };
    let add = Add {
        id: "add_resid1.0".into(),
        width: r,
    };
    let add: Box<dyn Module> = if s.attn_last {
        Box::new(add)
    } else {
        Box::new(LastPos(Box::new(add)))
    };
    let extra = Project {
        id: "extra".into(),
        w: random(&mut rng, r, r + 2, 0.5),
        in_features: r,
        resid: 0,
        resid_streams: 0,
    };
    let m = Model {
        name: "attention".into(),
        input: InputKind::Features(r),
        modules: vec![Box::new(attn_in), Box::new(attn), add, Box::new(extra)],
    };
    if opaque {
        m.opaque()
    } else {
        m
    }
}

fn rel_err(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let scale = b
        .col_iter()
        .flat_map(|c| c.iter().map(|v| v.abs()).collect::<Vec<_>>())
        .fold(0.0, f64::max);
    max_abs_diff(a.as_ref(), b.as_ref()) / scale
}

fn node(name: &str, c: Mat<f64>, c_pinv: Mat<f64>) -> NodeBasis {
    let d = c.nrows();
    NodeBasis {
        name: name.into(),
        d_orig: d,
        pos: 1,
        mean: vec![0.0; d],
        gram: Mat::zeros(d, d),
        lambda: vec![1.0; c.ncols()],
        c: Some(c),
        c_pinv: Some(c_pinv),
        w: None,
        w_pinv: None,
        v: None,
        n_masked: 0,
        has_constant: false,
    }
}

#[test]
fn metric_and_edges_equal_the_general_path() {
    let r = 6;
    let setups = [
        Setup {
            heads: 2,
            kv_heads: 2,
            window: None,
            attn_last: false,
        },
        Setup {
            heads: 4,
            kv_heads: 2,
            window: Some(3),
            attn_last: true,
        },
        Setup {
            heads: 3,
            kv_heads: 1,
            window: Some(2),
            attn_last: false,
        },
    ];
    for (k, setup) in setups.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
        let (n, pos) = (9, 5);
        let mut x = random(&mut rng, n * pos, r, 1.2);
        for row in 0..n * pos {
            x[(row, r - 1)] = 1.0;
        }
        let data = Fixed { x, pos };
        let (fast, slow) = (
            model(k as u64, setup, r, false),
            model(k as u64, setup, r, true),
        );
        assert!(attention_section(&fast.modules[0..3]).is_some());
        assert!(attention_section(&slow.modules[0..3]).is_none());
        for (rule, n_int) in [
            (integration::Rule::Gradient, 0),
            (integration::Rule::GaussLegendre, 2),
        ] {
            let points = integration::points(rule, n_int).unwrap();
            let cfg = LibConfig {
                node_layers: vec!["attn_in.0".into(), "extra".into(), "output".into()],
                integration_rule: rule,
                n_intervals: n_int,
                batch_size: 4,
                ..Default::default()
            };
            let layers = resolve_node_layers(&fast, &cfg.node_layers).unwrap();
            // The next layer's projection keeps 4 of its 6 directions.
            let q = random(&mut rng, r, 4, 1.0);
            let metric = |m: &Model| {
                basis::jacobian_metric(
                    m,
                    &data,
                    &cfg,
                    &layers,
                    0,
                    &q,
                    &points,
                    BasisFormula::Jacobian,
                )
                .unwrap()
                .m
            };
            let (a, b) = (metric(&fast), metric(&slow));
            let e = rel_err(&a, &b);
            assert!(e < 1e-12, "setup {k} {rule:?}: metric {e}");

            let (c, c_pinv) = (random(&mut rng, r, 5, 1.0), random(&mut rng, 5, r, 1.0));
            let b_in = node("attn_in.0", c, c_pinv);
            let b_out = node("extra", q.clone(), q.transpose().to_owned());
            let edge = |m: &Model| {
                edges::edges(m, &data, &cfg, &layers, 0, &b_in, &b_out, &points).unwrap()
            };
            let (a, b) = (edge(&fast), edge(&slow));
            assert_eq!((a.nrows(), a.ncols()), (4, 5));
            let e = rel_err(&a, &b);
            assert!(e < 1e-12, "setup {k} {rule:?}: edges {e}");
        }
    }
}

#[test]
fn recognises_single_query_sections_only() {
    let setup = Setup {
        heads: 2,
        kv_heads: 2,
        window: None,
        attn_last: false,
    };
    let m = model(0, &setup, 6, false);
    // Without the last-position module every query is an output.
    assert!(attention_section(&m.modules[0..2]).is_none());
    assert!(attention_section(&m.modules[0..3]).is_some());
    // Starting at attn_out itself: no prefix.
    assert!(attention_section(&m.modules[1..3]).is_some());
}
