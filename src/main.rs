//! The `ibasis` command line: a thin layer over the library's experiments.

use clap::{Parser, Subcommand};
use ibasis::experiments::{build, config::RunConfig, eval};
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
    /// Build the LIB (or PCA / neuron) graph a config describes: OUT/graph.safetensors + graph.json.
    Build {
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Model file to use instead of the config's.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Evaluate a config's model on its data; prints {"accuracy": .., "loss": ..}.
    Eval {
        config: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Build { config, out, model } => {
            let (graph, _) = build::run_build(&config, &out, model.as_deref())?;
            print!(
                "{}",
                build::summarise(
                    &graph,
                    &format!("{} -> {}", config.display(), out.display())
                )
            );
        }
        Command::Eval { config, model } => {
            let mut cfg = RunConfig::load(&config)?;
            if let Some(m) = model {
                cfg.set_model_path(m);
            }
            let model = ibasis::experiments::config::load_model(&cfg.model)?;
            let data = ibasis::experiments::config::load_data(&cfg.data)?;
            ibasis::experiments::config::check_compatible(&model, data.as_ref())?;
            let s = eval::evaluate(&model, data.as_ref(), None, 1024);
            println!("{}", serde_json::to_string(&s)?);
        }
    }
    Ok(())
}
