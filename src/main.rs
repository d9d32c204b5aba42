//! The `ibasis` command line: a thin layer over the library's experiments.

use clap::{Parser, Subcommand};
use ibasis::algorithm::{self, stages::Collective};
use ibasis::experiments::{
    ablate, bench, build, clustering, config, eval, explorer, pipeline, plan, ranks, train,
};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc keeps freed pages for reuse: the per-batch buffers of the streaming passes would
/// otherwise be fresh `mmap`s, each page faulted in and zeroed by the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ibasis",
    version,
    about = "Local Interaction Basis (LIB) and interaction graphs of neural networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole experiment on one model: LIB, PCA and neuron graphs, ablations, modules,
    /// Fourier labels, figures, an HTML report and the interactive explorer (DIR/explorer.html)
    /// (default: the shipped modular-addition model).
    Run {
        #[arg(default_value = "configs/modadd-lib.toml")]
        config: PathBuf,
        #[arg(long, default_value = "out/modadd")]
        out: PathBuf,
        /// Accuracy tolerance of the "fewest features / edges" counts.
        #[arg(long, default_value_t = 0.001)]
        delta: f64,
        /// Leiden resolution.
        #[arg(long, default_value_t = 1.0)]
        gamma: f64,
        /// Model file to use instead of the config's.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Build the LIB (or PCA / neuron) graph a config describes: OUT/graph.safetensors + graph.json.
    /// Stages are kept in OUT/stages; a build on a folder with stage files resumes from them.
    /// Under `mpirun -np N` (built with `--features mpi`) the ranks share every stage.
    Build {
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Model file to use instead of the config's.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Sum block I (0-based) of N contiguous blocks of the samples for the next stage,
        /// write its pieces to OUT/stages and stop; `ibasis merge` adds the shards' pieces.
        #[arg(long, value_name = "I/N", value_parser = parse_shard)]
        shard: Option<(usize, usize)>,
        /// Reuse stage files whose own inputs are unchanged although the config changed (e.g.
        /// new edges on saved bases: the statistics and bases are kept).
        #[arg(long)]
        reuse_stages: bool,
    },
    /// Add the stage pieces of `ibasis build --shard` runs (in one folder or several) into
    /// DIR[0]/stages, then go on: the graph when every stage is complete, else the stage the
    /// shards compute next.
    Merge {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Estimate a build's FLOPs, peak memory and time from a pilot run on a few samples.
    Plan {
        config: PathBuf,
        /// Model file to use instead of the config's.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Train a model (MLP on MNIST, or the modular-addition transformer).
    Train {
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate a config's model on its data; prints {"accuracy": .., "loss": ..}.
    Eval {
        config: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Node or edge ablation of a built graph: OUT/ablation.json.
    Ablate {
        config: PathBuf,
        #[arg(long)]
        graph: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// A self-contained HTML report of built graphs (the first one is clustered and drawn).
    Report {
        #[arg(long = "graph", required = true)]
        graphs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        gamma: f64,
        /// Tolerance of the "fewest features within delta" table (as `ibasis run --delta`).
        #[arg(long, default_value_t = 0.001)]
        delta: f64,
    },
    /// The interactive explorer of built graphs: one self-contained HTML file (no network),
    /// plus each pruned graph as circuit-tracer JSON beside it (FILE-<graph>.json).
    Explore {
        #[arg(long = "graph", required = true)]
        graphs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Share of each output feature's incoming edge mass kept in the file.
        #[arg(long, default_value_t = 0.95)]
        edge_mass: f64,
        /// At most this many incoming edges per output feature.
        #[arg(long, default_value_t = 64)]
        max_in_edges: usize,
        /// Leiden resolution of the modules shown.
        #[arg(long, default_value_t = 1.0)]
        gamma: f64,
    },
    /// Leiden modules of a built graph under one of the reference's edge norms, at several
    /// resolutions (a table of modules and Newman's Q per gamma) or at a target module count.
    Modularity {
        #[arg(long)]
        graph: PathBuf,
        /// identity, sqrt, abs, max, log:MASS, log-eps:E1,E2,.. (one per edge matrix) or
        /// log-bisect:ABLATION_JSON (epsilon = smallest edge an edge bisection kept).
        #[arg(long, default_value = "sqrt")]
        norm: clustering::NormSpec,
        /// Resolutions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        gamma: Vec<f64>,
        /// Find the resolution giving this many modules of 2+ features instead of sweeping.
        #[arg(long)]
        target_n_clusters: Option<usize>,
        /// Use only the first N features of each node layer (by Lambda, constant included).
        #[arg(long)]
        nodes_per_layer: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the rows as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Time the reference builds (MNIST, modular addition) and print a table.
    Bench {
        /// Repetitions per job (the table shows the fastest).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Also the 3-block SmolLM2 build at 1 and 2 ranks (about half an hour a row).
        #[arg(long)]
        language_models: bool,
    },
}

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not I/N (e.g. 0/4)"))?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("`{i}` is not a shard index"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a shard count"))?;
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: the index must be 0..{n} (0-based)"));
    }
    Ok((i, n))
}

/// What to run after a shard stopped.
fn next_shards(out: &std::path::Path, shard: Option<(usize, usize)>) -> String {
    format!(
        "once all {} shards are done, `ibasis merge {}`",
        shard.map_or(1, |s| s.1),
        out.display()
    )
}

fn describe_outcome(outcome: &algorithm::Outcome, title: &str, next: &str) {
    match outcome {
        algorithm::Outcome::Graph(graph) => print!("{}", build::summarise(graph, title)),
        algorithm::Outcome::Pending(stages) => {
            println!("{title}: stages {} pending; {next}", stages.join(", "))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = run(cli.command);
    bench::report_peak_memory();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            out,
            delta,
            gamma,
            model,
        } => {
            let s = pipeline::run_pipeline(&config, &out, model.as_deref(), delta, gamma)?;
            println!("{}", pipeline::describe(&s));
        }
        Command::Build {
            config,
            out,
            model,
            shard,
            reuse_stages,
        } => {
            let ranks = ranks::init()?;
            if ranks.is_some() && shard.is_some() {
                anyhow::bail!("--shard and MPI ranks do not mix: use one or the other");
            }
            let req = build::BuildRequest {
                shard,
                reuse_stages,
                ranks: ranks.as_ref().map(|r| r as &dyn Collective),
            };
            let (built, _) = build::run_build(&config, &out, model.as_deref(), &req)?;
            if built.writes {
                let title = format!("{} -> {}", config.display(), out.display());
                print!("{}", build::describe_stages(&built.stages));
                describe_outcome(&built.outcome, &title, &next_shards(&out, shard));
            }
        }
        Command::Merge { dirs } => {
            let m = build::run_merge(&dirs)?;
            for (stage, pieces) in &m.stages {
                println!("  stage {stage}: merged {pieces} pieces");
            }
            let title = format!("{} -> {}", m.config_file, m.out.display());
            let next = format!(
                "run the shards again (`ibasis build {} --shard I/N --out {}`), then `ibasis merge` again",
                m.config_file,
                m.out.display()
            );
            describe_outcome(&m.built.outcome, &title, &next);
        }
        Command::Plan { config, model } => {
            let p = plan::run_plan(&config, model.as_deref())?;
            print!(
                "{}",
                plan::describe(&p, &format!("plan for {}", config.display()))
            );
        }
        Command::Train { config, out } => {
            let r = train::train_from_config(&config, &out)?;
            println!(
                "trained {:?} in {:.1}s: train accuracy {:.4}, test accuracy {:.4} -> {}",
                r.kind,
                r.seconds,
                r.train_accuracy,
                r.test_accuracy,
                out.display()
            );
        }
        Command::Eval { config, model } => {
            let mut cfg = config::RunConfig::load(&config)?;
            if let Some(m) = model {
                cfg.set_model_path(m);
            }
            let model = config::load_model(&cfg.model)?;
            let data = config::load_data(&cfg.data)?;
            config::check_compatible(&model, data.as_ref())?;
            let s = eval::evaluate(&model, data.as_ref(), None, 1024);
            println!("{}", serde_json::to_string(&s)?);
        }
        Command::Ablate {
            config,
            graph,
            out,
            model,
        } => {
            let r = ablate::run_ablate(&config, &graph, &out, model.as_deref())?;
            println!("baseline {:.6}", r.baseline);
            for (k, n) in r.features_required.iter().chain(&r.edges_required) {
                println!("  {k}: {n}");
            }
            println!("-> {}", out.join("ablation.json").display());
        }
        Command::Report {
            graphs,
            out,
            gamma,
            delta,
        } => {
            pipeline::report_from_dirs(&graphs, &out, gamma, delta)?;
            println!("-> {}", out.display());
        }
        Command::Modularity {
            graph,
            norm,
            gamma,
            target_n_clusters,
            nodes_per_layer,
            seed,
            out,
        } => {
            let req = clustering::ClusteringRequest {
                norm,
                gammas: gamma,
                target_n_clusters,
                nodes_per_layer,
                seed,
            };
            let rows = clustering::run_clustering(&graph, &req)?;
            print!("{}", clustering::sweep_table(&rows));
            if let Some(out) = out {
                ibasis::io::write_atomic(&out, serde_json::to_string_pretty(&rows)?.as_bytes())?;
                println!("-> {}", out.display());
            }
        }
        Command::Explore {
            graphs,
            out,
            edge_mass,
            max_in_edges,
            gamma,
        } => {
            let opts = explorer::ExplorerOptions {
                edge_mass,
                max_in_edges,
                gamma,
                ..Default::default()
            };
            let f = explorer::explore_from_dirs(&graphs, &out, &opts)?;
            println!(
                "-> {} ({:.1} MB)",
                f.html.display(),
                f.html_bytes as f64 / 1e6
            );
            for j in &f.json {
                println!("-> {}", j.display());
            }
        }
        Command::Bench {
            repeat,
            language_models,
        } => bench::run(repeat, language_models)?,
    }
    Ok(())
}
