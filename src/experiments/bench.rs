//! `ibasis bench`: the reference jobs of reference.md timed end to end, each in a child process
//! so that its peak memory is its own, printed as a table beside the reference's figures.

use anyhow::Context;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Environment variable asking the process to print its peak resident memory on exit.
pub const PEAK_ENV: &str = "IBASIS_PRINT_PEAK_MEMORY";

/// Prints `peak-memory-kib N` to stderr when [`PEAK_ENV`] is set (Linux `VmHWM`).
pub fn report_peak_memory() {
    if std::env::var_os(PEAK_ENV).is_none() {
        return;
    }
    if let Some(bytes) = peak_resident_bytes() {
        eprintln!("peak-memory-kib {}", bytes / 1024);
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: String = line.chars().filter(|c| c.is_ascii_digit()).collect();
    kib.parse::<u64>().ok().map(|k| k * 1024)
}

struct Job {
    name: &'static str,
    args: &'static [&'static str],
    needs: &'static [&'static str],
    reference: &'static str,
    /// Wall-time target from the issues (seconds on the 2-core development machine).
    target: Option<f64>,
    /// MPI ranks (`mpirun -np RANKS`; 1: a plain process) and rayon threads per process
    /// (`None`: rayon's default, one per core).
    ranks: usize,
    threads: Option<usize>,
}

/// A plain job: one process, one rayon thread per core.
const fn job(
    name: &'static str,
    args: &'static [&'static str],
    needs: &'static [&'static str],
    reference: &'static str,
    target: Option<f64>,
) -> Job {
    Job {
        name,
        args,
        needs,
        reference,
        target,
        ranks: 1,
        threads: None,
    }
}

const MNIST_NEEDS: &[&str] = &[
    "../shared/reference/mnist-mlp/model_epoch_12.pt",
    "data/mnist/train-images-idx3-ubyte",
];
const MNIST_BUILD: &[&str] = &[
    "build",
    "configs/mnist-lib.toml",
    "--out",
    "out/bench/mnist-lib",
];
const SMOLLM2_NEEDS: &[&str] = &[
    "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "data/text/sotu",
];
const SMOLLM2_BUILD: &[&str] = &[
    "build",
    "configs/smollm2-lib.toml",
    "--out",
    "out/bench/smollm2-lib",
];

/// A build at `ranks` MPI ranks (1: a plain process) of `threads` rayon threads each.
const fn scaled(
    name: &'static str,
    args: &'static [&'static str],
    needs: &'static [&'static str],
    ranks: usize,
    threads: usize,
) -> Job {
    Job {
        ranks,
        threads: Some(threads),
        ..job(name, args, needs, "-", None)
    }
}

/// Scale-out rows: on a 2-core machine one process with 2 threads against 2 MPI ranks with
/// one thread each is the honest comparison (1 x 1 shows what either gains from the second
/// core).
const SCALE_OUT: &[Job] = &[
    scaled(
        "MNIST build, 1 process x 1 thread",
        MNIST_BUILD,
        MNIST_NEEDS,
        1,
        1,
    ),
    scaled(
        "MNIST build, 1 process x 2 threads",
        MNIST_BUILD,
        MNIST_NEEDS,
        1,
        2,
    ),
    scaled(
        "MNIST build, 2 MPI ranks x 1 thread",
        MNIST_BUILD,
        MNIST_NEEDS,
        2,
        1,
    ),
];

/// The 3-block SmolLM2 build at 1 and 2 ranks (`ibasis bench --language-models`: about half an
/// hour a row).
const SCALE_OUT_LM: &[Job] = &[
    scaled(
        "SmolLM2 3 blocks, 1 process x 2 threads",
        SMOLLM2_BUILD,
        SMOLLM2_NEEDS,
        1,
        2,
    ),
    scaled(
        "SmolLM2 3 blocks, 2 MPI ranks x 1 thread",
        SMOLLM2_BUILD,
        SMOLLM2_NEEDS,
        2,
        1,
    ),
];

const JOBS: &[Job] = &[
    job(
        "MNIST MLP, LIB + squared edges (60000 images)",
        MNIST_BUILD,
        MNIST_NEEDS,
        "14 min 23 s, 4.1 GB",
        None,
    ),
    job(
        "modular addition seed 0, LIB + squared edges",
        &[
            "build",
            "configs/published-modadd-lib.toml",
            "--out",
            "out/bench/modadd-lib",
        ],
        &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        "63 s",
        Some(0.6),
    ),
    job(
        "modular addition seed 0, PCA + squared edges",
        &[
            "build",
            "configs/published-modadd-pca.toml",
            "--out",
            "out/bench/modadd-pca",
        ],
        &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        "-",
        Some(0.6),
    ),
    job(
        "modular addition seed 0, whole pipeline (`ibasis run`)",
        &[
            "run",
            "configs/published-modadd-lib.toml",
            "--out",
            "out/bench/pipeline-seed0",
        ],
        &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        "-",
        Some(30.0),
    ),
    job(
        "shipped modular addition, whole pipeline (README main job)",
        &[
            "run",
            "configs/modadd-lib.toml",
            "--out",
            "out/bench/pipeline",
        ],
        &["assets/modadd/model.safetensors"],
        "-",
        Some(60.0),
    ),
];

/// Times every job (best of `repeat`) and prints the table; with `language_models`, also the
/// SmolLM2 scale-out rows.
pub fn run(repeat: usize, language_models: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the ibasis executable")?;
    println!("| job | wall (s) | peak memory (MiB) | target (s) | reference here |");
    println!("|---|---:|---:|---:|---|");
    let lm: &[Job] = if language_models { SCALE_OUT_LM } else { &[] };
    for job in JOBS.iter().chain(SCALE_OUT).chain(lm) {
        if let Some(why) = skip_reason(job) {
            println!("| {} | skipped: {why} | | | {} |", job.name, job.reference);
            continue;
        }
        let (best, peak) = time_job(&exe, job, repeat)?;
        let target = match job.target {
            Some(t) if best <= t => format!("{t} (met)"),
            Some(t) => format!("{t} (missed)"),
            None => "-".into(),
        };
        println!(
            "| {} | {best:.2} | {:.0} | {target} | {} |",
            job.name,
            peak as f64 / 1024.0,
            job.reference
        );
    }
    Ok(())
}

/// Why `job` cannot run here, if it cannot.
fn skip_reason(job: &Job) -> Option<String> {
    if let Some(missing) = job.needs.iter().find(|p| !Path::new(p).exists()) {
        return Some(format!("{missing} absent"));
    }
    if job.ranks > 1 {
        if !cfg!(feature = "mpi") {
            return Some("ibasis built without `--features mpi`".into());
        }
        if Command::new("mpirun").arg("--version").output().is_err() {
            return Some("no mpirun".into());
        }
    }
    None
}

/// Best wall time of `repeat` runs of `job` (each from an empty output folder, so no stage
/// file is reused) and the peak resident memory, KiB, summed over its ranks.
fn time_job(exe: &Path, job: &Job, repeat: usize) -> anyhow::Result<(f64, u64)> {
    let out_dir = job
        .args
        .iter()
        .position(|a| *a == "--out")
        .and_then(|i| job.args.get(i + 1));
    let mut best = f64::INFINITY;
    let mut peak = 0u64;
    for _ in 0..repeat.max(1) {
        if let Some(d) = out_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        let mut cmd = if job.ranks > 1 {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
                .arg(job.ranks.to_string())
                .args(["-x", "RAYON_NUM_THREADS", "-x", PEAK_ENV])
                .arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(job.args).env(PEAK_ENV, "1");
        if let Some(t) = job.threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
        let t = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        let wall = t.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "{} failed: {stderr}", job.name);
        best = best.min(wall);
        let ranks_kib: u64 = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("peak-memory-kib "))
            .map(|k| k.trim().parse::<u64>().unwrap_or(0))
            .sum();
        peak = peak.max(ranks_kib);
    }
    Ok((best, peak))
}
