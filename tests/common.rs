//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (tests run from it; configs use paths relative to it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tests that read fetched data or the reference models (absent from a fresh clone) are
/// `#[ignore = "needs ..."]`, so `cargo test` lists them as ignored with the reason; `cargo test
/// -- --ignored --skip timing_` runs them (CI does, after fetching). Each calls [`require`]:
/// panics, naming what is missing and how to get it, unless every path exists: for tests that
/// are `#[ignore]`d for their data, so that asking for them without it fails instead of passing.
pub fn require(paths: &[&str]) {
    for p in paths {
        assert!(
            root().join(p).exists(),
            "{p} is absent: reference models live in ../shared/reference; data/ comes from scripts/fetch-data.sh mnist|fashion-mnist|text|smollm2"
        );
    }
}

/// `true` if every path exists; otherwise prints why this part of a test is skipped.
pub fn have(paths: &[&str], test: &str) -> bool {
    for p in paths {
        if !root().join(p).exists() {
            eprintln!("SKIPPED {test}: {p} is absent (reference models live in ../shared/reference; data/ comes from scripts/fetch-data.sh: mnist, text, smollm2)");
            return false;
        }
    }
    true
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ibasis-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn chdir_root() {
    std::env::set_current_dir(root()).expect("chdir to the repository root");
}

/// Random TransformerLens-named weights for a small one-layer model (vocab `p + 1`).
pub fn random_transformer(
    seed: u64,
    p: usize,
    d_model: usize,
    heads: usize,
    d_head: usize,
    d_mlp: usize,
) -> ibasis::io::weights::Tensors {
    use ibasis::tensor::HostTensor;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut t = ibasis::io::weights::Tensors::new();
    let mut put = |name: &str, shape: Vec<usize>, scale: f64| {
        let n = shape.iter().product();
        t.insert(
            name.to_string(),
            HostTensor::new(shape, (0..n).map(|_| scale * next()).collect()),
        );
    };
    let v = p + 1;
    put("embed.W_E", vec![v, d_model], 1.0);
    put("pos_embed.W_pos", vec![3, d_model], 0.5);
    for w in ["W_Q", "W_K", "W_V"] {
        put(
            &format!("blocks.0.attn.{w}"),
            vec![heads, d_model, d_head],
            0.5,
        );
    }
    for b in ["b_Q", "b_K", "b_V"] {
        put(&format!("blocks.0.attn.{b}"), vec![heads, d_head], 0.1);
    }
    put("blocks.0.attn.W_O", vec![heads, d_head, d_model], 0.5);
    put("blocks.0.attn.b_O", vec![d_model], 0.1);
    put("blocks.0.mlp.W_in", vec![d_model, d_mlp], 0.5);
    put("blocks.0.mlp.b_in", vec![d_mlp], 0.1);
    put("blocks.0.mlp.W_out", vec![d_mlp, d_model], 0.5);
    put("blocks.0.mlp.b_out", vec![d_model], 0.1);
    put("unembed.W_U", vec![d_model, p], 0.5);
    put("unembed.b_U", vec![p], 0.1);
    t
}

/// Runs the `ibasis` binary from the repository root: (success, stdout, stderr).
pub fn ibasis(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ibasis"))
        .args(args)
        .current_dir(root())
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run ibasis");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A config of the modular-addition model at `model` (the shipped one:
/// `assets/modadd/model.safetensors`) on its default data, with `node_layers` and further
/// `[lib]` lines `lib`.
pub fn modadd_config(model: &str, node_layers: &[&str], lib: &str) -> String {
    let layers: Vec<String> = node_layers.iter().map(|l| format!("{l:?}")).collect();
    format!(
        r#"
[model]
kind = "transformer"
path = "{model}"
[model.options]
last_pos_module_type = "add_resid1"
[data]
kind = "modular_arithmetic"
modulus = 113
[lib]
node_layers = [{}]
{lib}
"#,
        layers.join(", ")
    )
}
