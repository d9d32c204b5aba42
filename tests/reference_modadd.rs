//! The published modular-addition model (seed 0) against the reference's numbers
//! (reference.md): means, Gram traces, PCA eigenvalues, LIB Lambdas, edge totals, accuracy.

mod common;
use common::*;
use ibasis::algorithm::Graph;
use ibasis::data::modadd::Split;
use ibasis::experiments::{build::run_build, config, eval};

const MODEL: &str = "../shared/reference/modadd/seed0/model_epoch_60000.pt";

fn total(e: &faer::Mat<f64>) -> f64 {
    e.col_iter().map(|c| c.iter().sum::<f64>()).sum()
}

fn check_leading(g: &Graph, layer: usize, want: &[f64], tol: f64) {
    let got = &g.layers[layer].lambda;
    for (k, w) in want.iter().enumerate() {
        // The reference numbers are printed to 6 significant digits: allow that rounding.
        let digits = 0.5 * 10f64.powf(w.abs().log10().floor() - 5.0) / w.abs();
        assert!(
            rel(got[k], *w) <= tol.max(digits),
            "{} Lambda[{k}] = {} vs {w}",
            g.layers[layer].name,
            got[k]
        );
    }
}

/// `ibasis build CONFIG --out OUT` in this process: the graph and the config.
fn build(config: &str, out: &std::path::Path) -> (ibasis::algorithm::Graph, config::RunConfig) {
    let (built, cfg) = run_build(config.as_ref(), out, None, &Default::default()).unwrap();
    (built.into_graph().unwrap(), cfg)
}

#[test]
#[ignore = "needs the published models in ../shared/reference"]
fn published_modadd_seed0_matches_reference() {
    require(&[MODEL]);
    chdir_root();
    let out = tmp("modadd-lib");
    let (lib, cfg) = build("configs/published-modadd-lib.toml", &out);
    let dims: Vec<(usize, usize)> = lib.layers.iter().map(|b| (b.d_orig, b.pos)).collect();
    assert_eq!(dims, vec![(129, 3), (129, 1), (129, 1), (114, 1)]);

    // Means and centred Gram traces (basis independent).
    for (b, (norm, trace)) in
        lib.layers
            .iter()
            .zip([(1.47444, 4.44201), (7.49957, 161.373), (138.904, 3878.11)])
    {
        let n: f64 = b.mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(rel(n, norm) < 5e-6, "{} |mu| = {n}", b.name);
        assert_eq!(*b.mean.last().unwrap(), 1.0);
        let t: f64 = (0..b.d_orig).map(|i| b.gram[(i, i)]).sum();
        assert!(rel(t, trace) < 5e-6, "{} trace = {t}", b.name);
    }

    // LIB leading Lambdas: <= 1e-4 at ln1.0, <= 1e-6 at ln2.0 and unembed.
    assert_eq!(lib.layers[0].d_lib(), 115);
    check_leading(
        &lib,
        0,
        &[116758.0, 18097.2, 4082.98, 3036.22, 1345.96, 1145.59],
        1e-4,
    );
    check_leading(
        &lib,
        1,
        &[295856.0, 16415.7, 5035.41, 4638.54, 4190.60, 3813.70],
        1e-6,
    );
    check_leading(
        &lib,
        2,
        &[217242.0, 9286.75, 5306.10, 1891.80, 1642.72, 1422.76],
        1e-6,
    );
    // Edge totals: <= 1e-4 (the reference accumulated edges in f32).
    for (e, want) in lib.edges.iter().zip([124812.0, 353214.0, 238980.0]) {
        assert!(
            rel(total(e), want) < 1e-4,
            "edge total {} vs {want}",
            total(e)
        );
    }

    // PCA: eigenvalues, constant-to-constant edges 1/3 and 1, same unembed -> output total.
    let pca_out = tmp("modadd-pca");
    let (pca, _) = build("configs/published-modadd-pca.toml", &pca_out);
    check_leading(&pca, 0, &[1.0, 2.41637, 0.145251, 0.121936, 0.114763], 1e-6);
    check_leading(&pca, 1, &[1.0, 34.2992, 24.4896, 23.3441, 20.015], 1e-6);
    check_leading(&pca, 2, &[1.0, 1104.15, 785.527, 501.439, 372.91], 1e-6);
    assert!(
        (pca.edges[0][(0, 0)] - 1.0 / 3.0).abs() < 1e-9,
        "{}",
        pca.edges[0][(0, 0)]
    );
    assert!(
        (pca.edges[1][(0, 0)] - 1.0).abs() < 1e-9,
        "{}",
        pca.edges[1][(0, 0)]
    );
    assert!(rel(total(&pca.edges[2]), total(&lib.edges[2])) < 1e-9);

    // The files round-trip.
    let (back, summary) = Graph::load(&out).unwrap();
    assert_eq!(back.layers[1].lambda, lib.layers[1].lambda);
    assert_eq!(summary.node_layers[0].d_lib, 115);

    // Unablated test accuracy on the 8939 test pairs.
    let model = config::load_model(&cfg.model).unwrap();
    let test = config::load_data(&cfg.with_split(Split::Test)).unwrap();
    assert_eq!(test.len(), 8939);
    let s = eval::evaluate(&model, test.as_ref(), None, 1024);
    assert!(
        (s.accuracy - 0.9995525).abs() < 1e-7,
        "accuracy {}",
        s.accuracy
    );
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(pca_out);
}
