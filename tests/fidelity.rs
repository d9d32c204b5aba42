//! Settings that mean what the reference means: degenerate combinations refused through the
//! CLI with the reason, `center` on by default, `rotate_final_node_layer` for any last layer,
//! and `ibasis modularity`'s sweep table.

mod common;
use common::*;
use ibasis::algorithm::Graph;

/// The shipped modular-addition model on 30% of the pairs; `lib` is appended to `[lib]`.
fn modadd(lib: &str) -> String {
    modadd_config(
        "assets/modadd/model.safetensors",
        &["ln2.0", "unembed"],
        lib,
    )
}

/// Builds `config_text` into `dir/out`; returns (success, stderr).
fn build(dir: &std::path::Path, config_text: &str) -> (bool, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config_text).unwrap();
    let out = dir.join("out");
    let (ok, _, err) = ibasis(&[
        "build",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    (ok, err)
}

#[test]
fn degenerate_settings_fail_with_the_reason() {
    let cases = [
        ("basis_formula = \"(1-alpha)^2\"", "vanishes at alpha = 1"),
        ("edge_formula = \"functional\"", "every edge would be 0"),
        ("basis_formula = \"neuron\"", "never centres"),
        (
            "basis_formula = \"svd\"\nn_stochastic_sources_hidden = 4",
            "no Jacobian metric",
        ),
    ];
    for (i, (lib, why)) in cases.iter().enumerate() {
        let dir = tmp(&format!("degenerate-{i}"));
        let (ok, err) = build(&dir, &modadd(lib));
        assert!(!ok, "{lib}: should fail");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{lib}: one line expected, got {err:?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(why) && lines[0].contains("[lib]"),
            "{lib}: {err:?} lacks {why:?}"
        );
        assert!(!dir.join("out").exists(), "{lib}: no output may be left");
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn center_defaults_to_true_and_the_last_layer_stays_in_neurons_unless_rotated() {
    let cfg = ibasis::experiments::config::RunConfig::parse(&modadd("")).unwrap();
    assert!(cfg.lib.center, "the reference centres by default");

    let dir = tmp("rotate-final");
    let (ok, err) = build(&dir, &modadd(""));
    assert!(ok, "{err}");
    let (g, _) = Graph::load(&dir.join("out")).unwrap();
    assert!(
        g.layers[0].has_constant,
        "centred: the constant direction comes first"
    );
    let unembed = &g.layers[1];
    assert!(unembed.c.is_none() && unembed.lambda.is_empty());
    assert_eq!(g.edges[0].nrows(), unembed.d_orig);

    // Another folder: the first build's stage files are of another config (refused).
    let rotated = tmp("rotate-final-rotated");
    let (ok, err) = build(&rotated, &modadd("rotate_final_node_layer = true"));
    assert!(ok, "{err}");
    let (g, _) = Graph::load(&rotated.join("out")).unwrap();
    let unembed = &g.layers[1];
    let c = unembed.c.as_ref().expect("rotated: a PCA basis");
    assert_eq!(g.edges[0].nrows(), c.ncols());
    assert_eq!(unembed.lambda.len(), c.ncols());
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(rotated);
}

#[test]
fn modularity_sweeps_gamma_and_reports_newmans_q() {
    let dir = tmp("modularity");
    let (ok, err) = build(&dir, &modadd(""));
    assert!(ok, "{err}");
    let graph = dir.join("out");
    let json = dir.join("sweep.json");
    let (ok, out, err) = ibasis(&[
        "modularity",
        "--graph",
        graph.to_str().unwrap(),
        "--norm",
        "log:0.99",
        "--gamma",
        "0.5,1,2",
        "--nodes-per-layer",
        "30",
        "--out",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("| gamma | modules |"), "{out}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 3);
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    // Q_gamma = Q + (1 - gamma) sum_c (K_c / 2m)^2: above Newman's Q below gamma 1, equal at 1,
    // below it above 1.
    assert!(f(&rows[0], "objective") >= f(&rows[0], "q"));
    assert!((f(&rows[1], "objective") - f(&rows[1], "q")).abs() < 1e-12);
    assert!(f(&rows[2], "objective") <= f(&rows[2], "q"));
    // 29 non-constant features of ln2.0 (the first 30 with the constant), all of unembed's
    // first 30 neurons: every node is in some module.
    for r in &rows {
        assert!(r["n_modules"].as_u64().unwrap() >= 1);
        assert!(f(r, "q") <= 1.0 && f(r, "q") >= -0.5);
    }

    let (ok, _, err) = ibasis(&[
        "modularity",
        "--graph",
        graph.to_str().unwrap(),
        "--norm",
        "cube",
    ]);
    assert!(!ok && err.contains("unknown edge norm `cube`"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
