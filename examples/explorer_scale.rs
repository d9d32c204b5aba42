//! The explorer at SmolLM2-135M scale without the 30-minute build: a synthetic graph with the
//! node layers of `configs/smollm2-lib.toml` (three blocks, 19 node layers, ~21k features),
//! dense heavy-tailed edges, 12 modules, and token-context cards of the size a real run
//! writes (top 8 per feature, 64 chunks of 128 tokens). Prints the file size and the time to
//! write it; `tests/browser/check-explorer.js` measures the load time:
//!
//!     cargo run --release --example explorer_scale -- out/scale/explorer.html
//!     (cd tests/browser && node check-explorer.js --html ../../out/scale/explorer.html \
//!         --shot ../../out/scale/shot.png --expect "lib:mlp_in.0:5:LAMBDA")   # LAMBDA as printed

use faer::Mat;
use ibasis::algorithm::{Graph, NodeBasis};
use ibasis::experiments::explorer::{
    base64_of, explorer_data, prepare, render_html, ExplorerOptions,
};
use ibasis::experiments::modularity::Clusters;
use serde_json::json;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/scale/explorer.html".into());
    let mut state = 1u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    // Widths of one block's node layers (d_model 576, d_mlp 1536, bias and variance channels).
    let block = [
        ("ln1", 577),
        ("ln1_out", 578),
        ("attn_in", 1731),
        ("ln2", 577),
        ("ln2_out", 578),
        ("mlp_in", 3073),
    ];
    let mut layers = Vec::new();
    for k in 0..3 {
        for (name, d) in block {
            layers.push((format!("{name}.{k}"), d));
        }
    }
    layers.push(("ln1.3".into(), 577));
    let n_features: usize = layers.iter().map(|l| l.1).sum();
    let t = Instant::now();
    let bases: Vec<NodeBasis> = layers
        .iter()
        .map(|(name, d)| NodeBasis {
            lambda: (0..*d)
                .map(|j| (-(j as f64) / 150.0).exp() * (0.5 + uniform()))
                .collect(),
            n_masked: 2,
            has_constant: true,
            ..NodeBasis::neuron(name, *d, 128)
        })
        .collect();
    // Heavy-tailed edges: exp of a normal with sd 2 (Box-Muller), dense.
    let edges: Vec<Mat<f64>> = (0..bases.len() - 1)
        .map(|l| {
            Mat::from_fn(bases[l + 1].d_orig, bases[l].d_orig, |_, _| {
                let z =
                    (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos();
                (2.0 * z).exp()
            })
        })
        .collect();
    let graph = Graph {
        layers: bases,
        edges,
        timings: vec![],
    };
    let n_edges: usize = graph.edges.iter().map(|e| e.nrows() * e.ncols()).sum();
    eprintln!(
        "synthetic graph: {} node layers, {n_features} features, {n_edges} edges ({:.1}s)",
        graph.layers.len(),
        t.elapsed().as_secs_f64()
    );
    // 12 modules, round robin (Leiden on 20M edges is not what is measured here).
    let mut nodes = Vec::new();
    let mut by_layer = Vec::new();
    for (l, b) in graph.layers.iter().enumerate() {
        let mut v = vec![None];
        for j in 1..b.d_orig {
            nodes.push((l, j));
            v.push(Some((j * 7 + l) % 12));
        }
        by_layer.push(v);
    }
    let assignment = nodes
        .iter()
        .map(|&(l, j)| by_layer[l][j].unwrap())
        .collect();
    let clusters = Clusters {
        nodes,
        assignment,
        by_layer,
        n_clusters: 12,
        q: 0.0,
        objective: 0.0,
        gamma: 1.0,
    };
    let opts = ExplorerOptions::default();
    let t = Instant::now();
    let prepared = vec![prepare("lib", &graph, Some(clusters), &opts)?];
    let (mut data, _) = explorer_data(
        None,
        &prepared,
        "explorer at SmolLM2 scale (synthetic)",
        &opts,
    )?;
    // Token-context cards as a language-model run writes them.
    let (k, n_samples, n_ctx, vocab) = (opts.top_k, 64usize, 128usize, 8192u32);
    for (l, b) in graph.layers.iter().enumerate() {
        let n = b.d_orig * k;
        let value: Vec<u8> = (0..n)
            .flat_map(|_| (uniform() as f32).to_le_bytes())
            .collect();
        let row: Vec<u8> = (0..n)
            .flat_map(|_| ((uniform() * n_samples as f64) as i32).to_le_bytes())
            .collect();
        let pos: Vec<u8> = (0..n)
            .flat_map(|_| ((uniform() * n_ctx as f64) as i32).to_le_bytes())
            .collect();
        data["graphs"][0]["layers"][l]["top"] = json!({
            "k": k, "value": base64_of(&value), "row": base64_of(&row), "pos": base64_of(&pos),
        });
    }
    let ids: Vec<u8> = (0..n_samples * n_ctx)
        .flat_map(|_| ((uniform() * vocab as f64) as u32).to_le_bytes())
        .collect();
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (i.to_string(), json!(format!(" tok{i}"))))
        .collect();
    data["tokens"] = json!({
        "n_ctx": n_ctx,
        "samples": (0..n_samples).collect::<Vec<_>>(),
        "ids": base64_of(&ids),
        "vocab": words,
    });
    let page = render_html("explorer at SmolLM2 scale (synthetic)", &data)?;
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &page)?;
    let kept: usize = prepared[0].pruned.iter().map(|p| p.edges.len()).sum();
    let share: Vec<String> = prepared[0]
        .pruned
        .iter()
        .map(|p| format!("{:.3}", p.kept_share()))
        .collect();
    println!(
        "{out}: {:.1} MB, {kept} edges kept (shares {}), written in {:.1}s",
        page.len() as f64 / 1e6,
        share.join(" "),
        t.elapsed().as_secs_f64()
    );
    let b = &graph.layers[5];
    println!("expect: lib:{}:5:{}", b.name, b.lambda[5]);
    Ok(())
}
