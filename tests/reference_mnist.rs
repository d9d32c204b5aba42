//! The published MNIST MLP against the reference's numbers (reference.md): leading Lambdas to
//! 1e-3 relative (the reference ran in f32) and edge sums to 1e-3.

mod common;
use common::*;

#[test]
#[ignore = "needs ../shared/reference and data/mnist: scripts/fetch-data.sh mnist"]
fn published_mnist_mlp_matches_reference() {
    require(&[
        "../shared/reference/mnist-mlp/model_epoch_12.pt",
        "data/mnist/train-images-idx3-ubyte",
    ]);
    chdir_root();
    let out = tmp("mnist-lib");
    let (built, _) = ibasis::experiments::build::run_build(
        "configs/mnist-lib.toml".as_ref(),
        &out,
        None,
        &Default::default(),
    )
    .unwrap();
    let g = built.into_graph().unwrap();
    let expected: [(&str, [f64; 5]); 3] = [
        ("layers.0", [378.05, 246.54, 212.38, 127.32, 114.69]),
        ("layers.1", [419.15, 243.67, 186.55, 102.96, 92.52]),
        ("layers.2", [628.60, 259.70, 199.10, 163.59, 100.87]),
    ];
    for (layer, (name, lambdas)) in g.layers.iter().zip(expected) {
        assert_eq!(layer.name, name);
        for (k, want) in lambdas.iter().enumerate() {
            // The reference numbers carry 5 significant digits: allow their rounding too.
            assert!(
                rel(layer.lambda[k], *want) < 1e-3,
                "{name} Lambda[{k}] = {} vs {want}",
                layer.lambda[k]
            );
        }
    }
    for (e, want) in g.edges.iter().zip([1247.4, 1207.4, 1487.2]) {
        let total: f64 = e.col_iter().map(|c| c.iter().sum::<f64>()).sum();
        assert!(rel(total, want) < 1e-3, "edge total {total} vs {want}");
    }
    assert!(out.join("graph.safetensors").exists() && out.join("graph.json").exists());
    let _ = std::fs::remove_dir_all(out);
}
