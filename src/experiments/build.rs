//! `ibasis build`: load a config's model and data, build the LIB graph, write
//! `graph.safetensors` + `graph.json`, and summarise it for a person.

use super::config::{check_compatible, load_data, load_model, RunConfig};
use crate::algorithm::{self, Graph};
use anyhow::Context;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// Builds the graph a config describes (with `model` overriding the config's model file) and
/// writes it into `out`.
pub fn run_build(
    config_path: &Path,
    out: &Path,
    model: Option<&Path>,
) -> anyhow::Result<(Graph, RunConfig)> {
    let mut cfg = RunConfig::load(config_path)?;
    if let Some(m) = model {
        cfg.set_model_path(m.to_path_buf());
    }
    let graph = build_config(&cfg, &config_path.display().to_string(), out)?;
    Ok((graph, cfg))
}

/// Builds the graph of an already loaded config (`source` names it in `graph.json`).
pub fn build_config(cfg: &RunConfig, source: &str, out: &Path) -> anyhow::Result<Graph> {
    let t = Instant::now();
    let model = load_model(&cfg.model)?;
    let data = load_data(&cfg.data)?;
    check_compatible(&model, data.as_ref())?;
    // The build reads the modules up to its last node layer only: drop the rest (SmolLM2's
    // first three blocks leave 27 blocks and the 49152-way unembedding, ~0.9 GB of f64).
    let model = match cfg.lib.node_layers.last() {
        Some(last) => model.through(last),
        None => model,
    };
    let load_s = t.elapsed().as_secs_f64();
    let mut graph = algorithm::build(&model, data.as_ref(), &cfg.lib)?;
    graph.timings.insert(0, ("load".to_string(), load_s));
    let mut json = serde_json::to_value(cfg)?;
    json["config_file"] = serde_json::Value::String(source.to_string());
    json["data_description"] = serde_json::Value::String(data.describe());
    graph
        .save(out, json)
        .with_context(|| format!("cannot write results into {}", out.display()))?;
    Ok(graph)
}

/// A short human summary: dimensions, leading importances, edge totals, time taken.
pub fn summarise(graph: &Graph, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{title}");
    for b in &graph.layers {
        let lead: Vec<String> = b.lambda.iter().take(5).map(|v| format!("{v:.6}")).collect();
        let _ = writeln!(
            s,
            "  {:<14} dims {:>4} -> {:>4}  (x{} pos)  leading Lambda [{}]",
            b.name,
            b.d_orig,
            b.d_lib(),
            b.pos,
            lead.join(", ")
        );
    }
    for (l, e) in graph.edges.iter().enumerate() {
        let total: f64 = e.col_iter().map(|c| c.iter().sum::<f64>()).sum();
        let _ = writeln!(
            s,
            "  edges {} -> {}: {}x{}, total {:.6}",
            graph.layers[l].name,
            graph.layers[l + 1].name,
            e.nrows(),
            e.ncols(),
            total
        );
    }
    let times: Vec<String> = graph
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    let _ = writeln!(s, "  time: {}", times.join(", "));
    s
}
