//! `ibasis run --out DIR` replaces DIR as one unit: a failed or killed run leaves the previous
//! run as it was (what is unfinished sits in a `DIR.partial-PID` folder, the builds' stage files
//! in `DIR.stages`, from which the next run resumes), a finished one leaves no file of the
//! previous run behind.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped model, two node layers, a few test pairs: a quick whole pipeline.
fn config() -> String {
    modadd_config(
        "assets/modadd/model.safetensors",
        &["unembed", "output"],
        "",
    ) + "[experiments]\neval_samples = 300\n"
}

/// A folder `name` holding `config.toml` (`config_text`) and an old run in `out/`: returns
/// (folder, config, out).
fn with_old_run(name: &str, config_text: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tmp(name);
    let out = dir.join("out");
    std::fs::create_dir_all(out.join("lib")).unwrap();
    std::fs::write(out.join("OLD-RUN"), "the previous run").unwrap();
    std::fs::write(out.join("lib/graph.json"), "{}").unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config_text).unwrap();
    (dir, cfg, out)
}

fn leftovers(dir: &Path, out: &Path) -> Vec<String> {
    let stem = out.file_name().unwrap().to_string_lossy().to_string();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("{stem}.")))
        .collect()
}

fn ibasis_run(cfg: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ibasis"));
    c.args(["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_finished_run_replaces_the_old_one_whole() {
    let (dir, cfg, out) = with_old_run("run-folder-ok", &config());
    let o = ibasis_run(&cfg, &out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !out.join("OLD-RUN").exists(),
        "a file of the old run survived"
    );
    for f in [
        "summary.json",
        "report.html",
        "explorer.html",
        "lib/graph.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    for f in ["summary.json", "report.html", "explorer.html"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(!text.contains(".partial-"), "{f} names the staging folder");
    }
    assert!(
        leftovers(&dir, &out).is_empty(),
        "{:?}",
        leftovers(&dir, &out)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_run_leaves_the_old_one_as_it_was() {
    // Refused once the staging folder exists: a node layer to ablate that the graph lacks.
    let text = config().replace(
        "eval_samples = 300",
        "eval_samples = 300\nablate_node_layers = [\"ln9.9\"]",
    );
    let (dir, cfg, out) = with_old_run("run-folder-fail", &text);
    let o = ibasis_run(&cfg, &out).output().unwrap();
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("OLD-RUN")).unwrap(),
        "the previous run"
    );
    assert!(!out.join("summary.json").exists());
    assert!(
        leftovers(&dir, &out).is_empty(),
        "{:?}",
        leftovers(&dir, &out)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_killed_run_leaves_the_old_one_and_a_marked_partial_folder() {
    let (dir, cfg, out) = with_old_run("run-folder-kill", &config());
    let mut child = ibasis_run(&cfg, &out).spawn().unwrap();
    let partial = dir.join(format!("out.partial-{}", child.id()));
    // Kill it once the new run has written its first graph.
    let start = Instant::now();
    while !partial.join("lib/graph.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run never started writing"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        std::fs::read_to_string(out.join("OLD-RUN")).unwrap(),
        "the previous run"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("lib/graph.json")).unwrap(),
        "{}"
    );
    assert!(
        !out.join("summary.json").exists(),
        "new files mixed into the old run"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_killed_run_resumes_from_its_stage_files() {
    let (dir, cfg, out) = with_old_run("run-folder-resume", &config());
    let mut child = ibasis_run(&cfg, &out).spawn().unwrap();
    let stats = dir.join("out.stages/lib/stages/stats.safetensors");
    let start = Instant::now();
    while !stats.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run never wrote a stage file"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first stage file"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = format!("out.partial-{}", child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(!out.join("summary.json").exists(), "killed, yet a summary");
    let o = ibasis_run(&cfg, &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("build lib: resumed from"),
        "the rerun did not resume: {stderr}"
    );
    assert!(out.join("summary.json").exists());
    // The killed run's staging folder is its own to explain; the stage files are gone.
    assert_eq!(leftovers(&dir, &out), vec![killed]);
    let _ = std::fs::remove_dir_all(dir);
}
