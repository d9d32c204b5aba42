//! SmolLM2-135M end to end (when `scripts/fetch-data.sh smollm2` and `text` have run): the GGUF
//! loads, its tokenizer and our forward pass give the next-token cross-entropy that Hugging Face
//! transformers measured on the same file, and a LIB build runs on its blocks.

mod common;
use common::*;
use ibasis::experiments::config::{check_compatible, load_data, load_model, RunConfig};
use ibasis::experiments::eval::evaluate;

const GGUF: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SPEECH: &str = "data/text/sotu/2021_joseph_r_biden_d.txt";

/// reference.md: 3.336 nats (perplexity 28.1) with Hugging Face transformers on this GGUF,
/// dequantised to f32, on the first 64 chunks of 128 tokens of the 2021 address with BOS
/// prepended once. The reference is printed to 3 decimals, so agreement within 0.001 (half a
/// unit in the last digit plus the f32-vs-f64 difference, ~1e-6 here) is what can be asked.
#[test]
#[ignore = "needs data/smollm2 and data/text: scripts/fetch-data.sh smollm2; scripts/fetch-data.sh text"]
fn smollm2_cross_entropy_matches_hugging_face() {
    require(&[GGUF, SPEECH]);
    chdir_root();
    let cfg = RunConfig::load(&root().join("configs/smollm2-eval.toml")).unwrap();
    let model = load_model(&cfg.model).unwrap();
    let data = load_data(&cfg.data).unwrap();
    check_compatible(&model, data.as_ref()).unwrap();
    assert_eq!(data.len(), 64);
    let s = evaluate(&model, data.as_ref(), None, 64);
    eprintln!(
        "SmolLM2-135M on the 2021 address: cross-entropy {:.6} nats, top-1 {:.4}",
        s.loss, s.accuracy
    );
    assert!((s.loss - 3.336).abs() < 1e-3, "cross-entropy {}", s.loss);
    // A working language model: far below the uniform ln(49152) = 10.8.
    assert!(s.accuracy > 0.3);
}

/// A LIB build on two node layers of block 1 (layer norm variance and output) with stochastic
/// hidden sources runs and keeps the variance channel and constant direction fixed.
#[test]
#[ignore = "needs data/smollm2 and data/text: scripts/fetch-data.sh smollm2; scripts/fetch-data.sh text"]
fn smollm2_lib_builds_on_a_few_chunks() {
    require(&[GGUF, "data/text/sotu"]);
    chdir_root();
    let text = std::fs::read_to_string(root().join("configs/smollm2-lib.toml"))
        .unwrap()
        .replace("n_samples = 64", "n_samples = 2");
    let mut cfg = RunConfig::parse(&text).unwrap();
    cfg.lib.node_layers = ["ln1_out.1", "attn_in.1", "ln2.1"]
        .map(String::from)
        .to_vec();
    let model = load_model(&cfg.model).unwrap();
    let data = load_data(&cfg.data).unwrap();
    let g = ibasis::algorithm::build(&model, data.as_ref(), &cfg.lib).unwrap();
    assert_eq!(g.layers.len(), 3);
    assert_eq!(
        g.layers[0].n_masked, 2,
        "constant direction and variance channel"
    );
    assert!(g.layers[0].lambda.iter().all(|l| l.is_finite()));
    for e in &g.edges {
        assert!(e
            .col_iter()
            .all(|c| c.iter().all(|v| v.is_finite() && *v >= 0.0)));
    }
}
