//! Bad input through the command line: one clear line on stderr, a non-zero exit, no output.

mod common;
use common::*;

/// Runs a failing build and checks the error is one line mentioning `needle`, and no output.
fn fails(config_text: &str, extra: &[&str], needle: &str, name: &str) {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config_text).unwrap();
    let out = dir.join("out");
    let mut args = vec![
        "build",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = ibasis(&args);
    assert!(!ok, "{name}: should fail");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{name}: one line expected, got {err:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{name}: {err:?} lacks {needle:?}"
    );
    assert!(!out.exists(), "{name}: no output folder may be left");
    let _ = std::fs::remove_dir_all(dir);
}

const MODADD: &str = r#"
[model]
kind = "transformer"
path = "assets/modadd/model.safetensors"
[model.options]
last_pos_module_type = "add_resid1"
[data]
kind = "modular_arithmetic"
modulus = 113
frac_train = 0.6
[lib]
node_layers = ["ln2.0", "unembed", "output"]
center = true
"#;

#[test]
fn missing_model_file() {
    fails(
        &MODADD.replace("assets/modadd/model.safetensors", "no/such/model.pt"),
        &[],
        "no/such/model.pt",
        "missing",
    );
}

#[test]
fn truncated_checkpoint() {
    let dir = tmp("truncated-src");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("cut.safetensors");
    let bytes = std::fs::read(root().join("assets/modadd/model.safetensors")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &MODADD.replace("assets/modadd/model.safetensors", bad.to_str().unwrap()),
        &[],
        "cut.safetensors",
        "truncated",
    );
    if have(
        &["../shared/reference/mnist-mlp/model_epoch_12.pt"],
        "truncated_checkpoint (.pt part)",
    ) {
        let pt = dir.join("cut.pt");
        let bytes =
            std::fs::read(root().join("../shared/reference/mnist-mlp/model_epoch_12.pt")).unwrap();
        std::fs::write(&pt, &bytes[..bytes.len() - 1000]).unwrap();
        let cfg = std::fs::read_to_string(root().join("configs/mnist-lib.toml")).unwrap();
        fails(
            &cfg.replace(
                "../shared/reference/mnist-mlp/model_epoch_12.pt",
                pt.to_str().unwrap(),
            ),
            &[],
            "cut.pt",
            "truncated-pt",
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unknown_config_key() {
    fails(
        &MODADD.replace("center = true", "center = true\ncentre = false"),
        &[],
        "centre",
        "unknown-key",
    );
    fails(
        &MODADD.replace("modulus = 113", "modulus = 113\nmodulos = 3"),
        &[],
        "modulos",
        "unknown-key-data",
    );
}

#[test]
fn node_layer_that_does_not_exist() {
    fails(
        &MODADD.replace("\"ln2.0\"", "\"ln9.0\""),
        &[],
        "ln9.0",
        "bad-layer",
    );
    fails(
        &MODADD.replace("[\"ln2.0\", \"unembed\"", "[\"unembed\", \"ln2.0\""),
        &[],
        "order",
        "out-of-order",
    );
    fails(
        &MODADD.replace("\"ln2.0\"", "\"embed\""),
        &[],
        "embed",
        "token-layer",
    );
}

#[test]
fn model_data_shape_mismatch() {
    // Modulus 200 gives token ids beyond the model's vocabulary of 114.
    fails(
        &MODADD.replace("modulus = 113", "modulus = 200"),
        &[],
        "vocabulary",
        "mismatch",
    );
    // An MLP checkpoint given to a transformer config: a missing tensor, named.
    if have(
        &["../shared/reference/mnist-mlp/model_epoch_12.pt"],
        "model_data_shape_mismatch (.pt part)",
    ) {
        fails(
            MODADD,
            &["--model", "../shared/reference/mnist-mlp/model_epoch_12.pt"],
            "embed.W_E",
            "architecture",
        );
    }
}

#[test]
fn eval_prints_one_json_line() {
    let (ok, out, err) = ibasis(&["eval", "configs/modadd-lib.toml"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["accuracy"].as_f64().unwrap() > 0.99 && v["loss"].as_f64().unwrap() >= 0.0);
}

#[test]
fn plan_prints_a_step_per_basis_and_edge_matrix() {
    let dir = tmp("plan");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, MODADD).unwrap();
    let (ok, out, err) = ibasis(&["plan", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    for step in [
        "statistics",
        "basis ln2.0",
        "basis unembed",
        "edges ln2.0 -> unembed",
        "edges unembed -> output",
        "total",
        "peak memory",
    ] {
        assert!(out.contains(step), "{step:?} missing from {out}");
    }
    // The MLP section has the E[d d^T] closed form, the unembedding is linear.
    assert!(
        out.contains("closed form, E[d d^T]") && out.contains("linear section"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
