//! `ibasis build`: load a config's model and data, build the LIB graph, write
//! `graph.safetensors` + `graph.json`, and summarise it for a person.
//!
//! A build keeps its stages in `OUT/stages` ([`crate::algorithm::stages`]): run again on the
//! same folder, it resumes from them. `--shard I/N` sums one block of the samples for the next
//! stage and stops; `ibasis merge` ([`run_merge`]) adds the shards' pieces and, once every
//! stage is complete, assembles the graph. Under `mpirun` the ranks sum each stage together.

use super::config::{check_compatible, load_data, load_model, RunConfig};
use crate::algorithm::stages::{self, Collective, Distribution, Identity, Source, StageStore};
use crate::algorithm::{self, BuildOptions, Graph, Outcome, STAGE_TIMING};
use crate::data::Dataset;
use anyhow::{bail, Context};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How `ibasis build` runs beyond its config.
#[derive(Clone, Copy, Default)]
pub struct BuildRequest<'a> {
    /// Block `I` of `N` of the samples (`--shard I/N`, 0-based).
    pub shard: Option<(usize, usize)>,
    /// Reuse stage files whose own inputs are unchanged although the config changed
    /// (`--reuse-stages`; e.g. new edges on saved bases).
    pub reuse_stages: bool,
    /// MPI ranks summing the stages together.
    pub ranks: Option<&'a dyn Collective>,
}

/// What a staged build came to, and how each stage came about.
pub struct Built {
    pub outcome: Outcome,
    pub stages: Vec<(String, Source)>,
    /// Whether this process wrote the results (not an MPI rank other than 0).
    pub writes: bool,
}

impl Built {
    /// The graph, or an error naming the stages still pending (a shard's build).
    pub fn into_graph(self) -> anyhow::Result<Graph> {
        match self.outcome {
            Outcome::Graph(g) => Ok(g),
            Outcome::Pending(s) => bail!("stages {s:?} are pending"),
        }
    }
}

/// The file in `OUT/stages` that lets `ibasis merge` go on where the shards stopped: the
/// config as the shards ran it (model override applied) and the file it came from.
const BUILD_FILE: &str = "build.json";

/// Builds the graph a config describes (with `model` overriding the config's model file) into
/// `out`, resuming from and writing stage files in `out/stages`.
pub fn run_build(
    config_path: &Path,
    out: &Path,
    model: Option<&Path>,
    req: &BuildRequest,
) -> anyhow::Result<(Built, RunConfig)> {
    let mut cfg = RunConfig::load(config_path)?;
    if let Some(m) = model {
        cfg.set_model_path(m.to_path_buf());
    }
    let built = build_staged(&cfg, &config_path.display().to_string(), out, Some(req))?;
    Ok((built, cfg))
}

/// Builds the graph of an already loaded config (`source` names it in `graph.json`) in one
/// process, keeping no stage files (`ibasis run`'s graphs).
pub fn build_config(cfg: &RunConfig, source: &str, out: &Path) -> anyhow::Result<Graph> {
    build_staged(cfg, source, out, None)?.into_graph()
}

/// Builds like [`build_config`] into `work`, keeping stage files in `work/stages` and resuming
/// from them (`ibasis run`'s graphs: a run killed in an hour-long build goes on where it
/// stopped). As with `--reuse-stages`, a changed setting recomputes only the stages that
/// depend on it.
pub fn build_resumable(
    cfg: &RunConfig,
    source: &str,
    work: &Path,
) -> anyhow::Result<(Graph, Vec<(String, Source)>)> {
    let req = BuildRequest {
        reuse_stages: true,
        ..Default::default()
    };
    let built = build_staged(cfg, source, work, Some(&req))?;
    let stages = built.stages.clone();
    Ok((built.into_graph()?, stages))
}

/// The build behind [`run_build`] and [`build_config`]: with `req`, stage files in
/// `out/stages` and the request's shard or ranks; without, neither.
fn build_staged(
    cfg: &RunConfig,
    source: &str,
    out: &Path,
    req: Option<&BuildRequest>,
) -> anyhow::Result<Built> {
    let t = Instant::now();
    let model = load_model(&cfg.model)?;
    let data = load_data(&cfg.data)?;
    check_compatible(&model, data.as_ref())?;
    let model_fingerprint = fingerprint_model(&cfg.model)?;
    // The build reads the modules up to its last node layer only: drop the rest (SmolLM2's
    // first three blocks leave 27 blocks and the 49152-way unembedding, ~0.9 GB of f64).
    let model = match cfg.lib.node_layers.last() {
        Some(last) => model.through(last),
        None => model,
    };
    let load_s = t.elapsed().as_secs_f64();
    // Refuse a bad config before the first file is written: no output folder for it.
    algorithm::resolve_node_layers(&model, &cfg.lib.node_layers)?;
    cfg.lib.check()?;
    let distribution = match req {
        Some(BuildRequest {
            ranks: Some(comm), ..
        }) => Distribution::Ranks(*comm),
        Some(BuildRequest {
            shard: Some((index, count)),
            ..
        }) => Distribution::Shard {
            index: *index,
            count: *count,
        },
        _ => Distribution::Whole,
    };
    let store = match req {
        Some(r) => {
            let identity = Identity::new(
                &cfg.lib,
                &model_fingerprint,
                &fingerprint_data(cfg, data.as_ref())?,
                data.len(),
            );
            let store = StageStore::new(out, identity, r.reuse_stages);
            if distribution.writes() {
                let record = serde_json::json!({"config_file": source, "config": cfg});
                crate::io::write_atomic(
                    &store.dir().join(BUILD_FILE),
                    serde_json::to_string_pretty(&record)?.as_bytes(),
                )?;
            }
            Some(store)
        }
        None => None,
    };
    let opts = BuildOptions {
        store: store.as_ref(),
        distribution,
        assemble_only: false,
    };
    let built = finish(cfg, source, out, &model, data.as_ref(), &opts, load_s)?;
    Ok(built)
}

/// Runs the staged build and, when it comes to a graph and this process writes, saves it.
fn finish(
    cfg: &RunConfig,
    source: &str,
    out: &Path,
    model: &crate::models::Model,
    data: &dyn Dataset,
    opts: &BuildOptions,
    load_s: f64,
) -> anyhow::Result<Built> {
    let (mut outcome, stages) = algorithm::build_staged(model, data, &cfg.lib, opts)?;
    let writes =
        opts.distribution.writes() && !matches!(opts.distribution, Distribution::Shard { .. });
    if let (Outcome::Graph(graph), true) = (&mut outcome, writes) {
        graph.timings.insert(0, ("load".to_string(), load_s));
        let mut json = serde_json::to_value(cfg)?;
        json["config_file"] = serde_json::Value::String(source.to_string());
        json["data_description"] = serde_json::Value::String(data.describe());
        graph
            .save(out, json)
            .with_context(|| format!("cannot write results into {}", out.display()))?;
    }
    Ok(Built {
        outcome,
        stages,
        writes,
    })
}

/// What `ibasis merge` did: the stages it completed, and what the build came to after.
pub struct Merged {
    pub stages: Vec<(String, usize)>,
    pub built: Built,
    pub out: PathBuf,
    pub config_file: String,
}

/// `ibasis merge DIR...`: adds the shards' piece files into complete stages in `dirs[0]`, then
/// goes on with the build from its stage files alone (no pass over the data): the graph in
/// `dirs[0]` when every stage is complete, else the stages the shards compute next.
pub fn run_merge(dirs: &[PathBuf]) -> anyhow::Result<Merged> {
    let merged = stages::merge_stage_dirs(dirs)?;
    let out = dirs[0].clone();
    let record_path = out.join("stages").join(BUILD_FILE);
    let record: serde_json::Value = serde_json::from_str(&crate::io::read_text(&record_path)?)
        .with_context(|| format!("{} is not a build record", record_path.display()))?;
    let config_file = record["config_file"].as_str().unwrap_or("?").to_string();
    let cfg: RunConfig = serde_json::from_value(record["config"].clone())
        .with_context(|| format!("{}: invalid config", record_path.display()))?;
    cfg.validate()
        .with_context(|| format!("{}: invalid config", record_path.display()))?;
    let t = Instant::now();
    let model = load_model(&cfg.model)?;
    let data = load_data(&cfg.data)?;
    check_compatible(&model, data.as_ref())?;
    let identity = Identity::new(
        &cfg.lib,
        &fingerprint_model(&cfg.model)?,
        &fingerprint_data(&cfg, data.as_ref())?,
        data.len(),
    );
    let model = match cfg.lib.node_layers.last() {
        Some(last) => model.through(last),
        None => model,
    };
    let store = StageStore::new(&out, identity, false);
    let opts = BuildOptions {
        store: Some(&store),
        distribution: Distribution::Whole,
        assemble_only: true,
    };
    let load_s = t.elapsed().as_secs_f64();
    let built = finish(
        &cfg,
        &config_file,
        &out,
        &model,
        data.as_ref(),
        &opts,
        load_s,
    )?;
    Ok(Merged {
        stages: merged,
        built,
        out,
        config_file,
    })
}

/// The model's fingerprint in stage files: CRC-32 and length of its file (or of every file
/// of its folder, by name).
fn fingerprint_model(cfg: &super::config::ModelConfig) -> anyhow::Result<String> {
    use super::config::ModelConfig;
    let path = match cfg {
        ModelConfig::Mlp { path, .. }
        | ModelConfig::Transformer { path, .. }
        | ModelConfig::Hf { path, .. }
        | ModelConfig::Gguf { path, .. } => path,
    };
    let mut files = vec![path.clone()];
    if path.is_dir() {
        files = std::fs::read_dir(path)
            .with_context(|| format!("cannot read folder {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
    }
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0u64;
    // Streamed: SmolLM2's 270 MB file never sits in memory twice.
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        crate::io::check_regular(f)?;
        let mut file =
            std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
        loop {
            let k = std::io::Read::read(&mut file, &mut buf)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if k == 0 {
                break;
            }
            bytes += k as u64;
            crc.update(&buf[..k]);
        }
    }
    Ok(format!("crc32 {:08x}, {bytes} bytes", crc.finalize()))
}

/// The data selection's fingerprint: its config, its description, and a CRC-32 of the inputs
/// of its first and last samples (a data file replaced under the same name changes them).
fn fingerprint_data(cfg: &RunConfig, data: &dyn Dataset) -> anyhow::Result<String> {
    let n = data.len();
    let mut crc = crc32fast::Hasher::new();
    for r in [0..n.min(16), n.saturating_sub(16)..n] {
        for v in data
            .inputs(r)
            .data
            .col_iter()
            .flat_map(|c| c.iter().copied().collect::<Vec<_>>())
        {
            crc.update(&v.to_le_bytes());
        }
    }
    Ok(format!(
        "{} ({}; inputs crc32 {:08x})",
        serde_json::to_string(&cfg.data)?,
        data.describe(),
        crc.finalize()
    ))
}

/// One line per stage: reused from its file, or computed (and from how many saved pieces).
pub fn describe_stages(stages: &[(String, Source)]) -> String {
    let mut s = String::new();
    for (name, source) in stages {
        let _ = match source {
            Source::Reused => writeln!(s, "  stage {name}: reused"),
            Source::Computed {
                pieces_reused: 0,
                seconds,
            } => writeln!(s, "  stage {name}: computed in {seconds:.1} s"),
            Source::Computed {
                pieces_reused,
                seconds,
            } => writeln!(
                s,
                "  stage {name}: computed in {seconds:.1} s, resuming from {pieces_reused} saved pieces"
            ),
        };
    }
    s
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
        .filter(|(k, _)| !k.starts_with(STAGE_TIMING))
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    let _ = writeln!(s, "  time: {}", times.join(", "));
    s
}
