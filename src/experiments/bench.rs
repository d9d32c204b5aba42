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
}

const JOBS: &[Job] = &[
    Job {
        name: "MNIST MLP, LIB + squared edges (60000 images)",
        args: &[
            "build",
            "configs/mnist-lib.toml",
            "--out",
            "out/bench/mnist-lib",
        ],
        needs: &[
            "../shared/reference/mnist-mlp/model_epoch_12.pt",
            "data/mnist/train-images-idx3-ubyte",
        ],
        reference: "14 min 23 s, 4.1 GB",
        target: None,
    },
    Job {
        name: "modular addition seed 0, LIB + squared edges",
        args: &[
            "build",
            "configs/published-modadd-lib.toml",
            "--out",
            "out/bench/modadd-lib",
        ],
        needs: &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        reference: "63 s",
        target: Some(0.6),
    },
    Job {
        name: "modular addition seed 0, PCA + squared edges",
        args: &[
            "build",
            "configs/published-modadd-pca.toml",
            "--out",
            "out/bench/modadd-pca",
        ],
        needs: &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        reference: "-",
        target: Some(0.6),
    },
    Job {
        name: "modular addition seed 0, whole pipeline (`ibasis run`)",
        args: &[
            "run",
            "configs/published-modadd-lib.toml",
            "--out",
            "out/bench/pipeline-seed0",
        ],
        needs: &["../shared/reference/modadd/seed0/model_epoch_60000.pt"],
        reference: "-",
        target: Some(30.0),
    },
    Job {
        name: "shipped modular addition, whole pipeline (README main job)",
        args: &[
            "run",
            "configs/modadd-lib.toml",
            "--out",
            "out/bench/pipeline",
        ],
        needs: &["assets/modadd/model.safetensors"],
        reference: "-",
        target: Some(60.0),
    },
];

pub fn run(repeat: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the ibasis executable")?;
    println!("| job | wall (s) | peak memory (MiB) | target (s) | reference here |");
    println!("|---|---:|---:|---:|---|");
    for job in JOBS {
        if let Some(missing) = job.needs.iter().find(|p| !Path::new(p).exists()) {
            println!(
                "| {} | skipped: {missing} absent | | | {} |",
                job.name, job.reference
            );
            continue;
        }
        let mut best = f64::INFINITY;
        let mut peak = 0u64;
        for _ in 0..repeat.max(1) {
            let t = Instant::now();
            let out = Command::new(&exe)
                .args(job.args)
                .env(PEAK_ENV, "1")
                .output()
                .with_context(|| format!("cannot run {}", exe.display()))?;
            let wall = t.elapsed().as_secs_f64();
            let stderr = String::from_utf8_lossy(&out.stderr);
            anyhow::ensure!(out.status.success(), "{} failed: {stderr}", job.name);
            best = best.min(wall);
            if let Some(kib) = stderr
                .lines()
                .find_map(|l| l.strip_prefix("peak-memory-kib "))
            {
                peak = peak.max(kib.trim().parse().unwrap_or(0));
            }
        }
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
