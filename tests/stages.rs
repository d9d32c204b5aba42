//! Stage files, shards and MPI ranks through the command line (issue 11): one process, three
//! `--shard I/N` processes merged round by round, and `mpirun -np 2` give the same Lambdas and
//! edges; a build killed with SIGKILL mid-stage resumes to the same results; a stage file of
//! another config is refused, or reused with `--reuse-stages` where its inputs are unchanged.
//!
//! Tolerance 1e-10 relative (max |a - b| over max |a| per tensor): the shards and ranks add the
//! same f64 per-sample terms in another order (pieces summed separately, then added), which
//! changes a sum of n terms by about n * 1e-16 relative to its magnitude (n <= 10^4 here); the
//! eigendecompositions of the summed Grams and M' then see inputs that differ at 1e-12 and keep
//! well-separated eigenvalues (the ones the graph keeps, above tau) within the same order.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `ibasis args` from the repository root; `(success, stdout + stderr)`.
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ibasis"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run ibasis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = run(args);
    assert!(success, "ibasis {args:?} failed:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Lambda and edge tensors of a built graph.
fn graph(dir: &Path) -> ibasis::io::weights::Tensors {
    let mut t = ibasis::io::weights::load_safetensors(&dir.join("graph.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    t.retain(|k, _| k.starts_with("Lambda/") || k.starts_with("edges/"));
    assert!(
        t.keys().any(|k| k.starts_with("edges/")),
        "{}: no edges",
        dir.display()
    );
    t
}

/// Largest `max |a - b| / max |a|` over the tensors of two graphs (which must have the same
/// tensors of the same shapes).
fn graph_difference(a: &Path, b: &Path) -> f64 {
    let (ga, gb) = (graph(a), graph(b));
    assert_eq!(
        ga.keys().collect::<Vec<_>>(),
        gb.keys().collect::<Vec<_>>(),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let mut worst = 0.0f64;
    for (k, x) in &ga {
        let y = &gb[k];
        assert_eq!(x.shape, y.shape, "{k}: shapes differ");
        let scale = x.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = x
            .data
            .iter()
            .zip(&y.data)
            .fold(0.0f64, |m, (u, v)| m.max((u - v).abs()));
        assert!(scale > 0.0, "{k} is all zeros");
        worst = worst.max(diff / scale);
    }
    worst
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    let d = graph_difference(a, b);
    eprintln!("{what}: max relative difference {d:.2e}");
    assert!(
        d <= 1e-10,
        "{what}: Lambdas/edges differ by {d:.2e} relative"
    );
}

/// `count` shards then `ibasis merge`, round after round (one stage a round), until the
/// graph is written; the shards share one output folder, as a Slurm array would.
fn build_sharded(config: &Path, out: &Path, count: usize) {
    for _round in 0..32 {
        for i in 0..count {
            let shard = format!("{i}/{count}");
            ok(&["build", s(config), "--shard", &shard, "--out", s(out)]);
            assert!(
                !out.join("graph.json").exists(),
                "a shard must not write the graph"
            );
        }
        ok(&["merge", s(out)]);
        if out.join("graph.json").exists() {
            return;
        }
    }
    panic!("no graph after 32 rounds of shards");
}

/// One process, then three shards merged, on the same config: same graph.
fn shards_match_one_process(config: &Path, name: &str) {
    let one = tmp(&format!("{name}-one"));
    let text = ok(&["build", s(config), "--out", s(&one)]);
    eprintln!("{name}, one process:\n{text}");
    let sharded = tmp(&format!("{name}-shards"));
    build_sharded(config, &sharded, 3);
    assert_same(&one, &sharded, &format!("{name}: 3 shards + merge"));
    let _ = std::fs::remove_dir_all(&sharded);
    let _ = std::fs::remove_dir_all(&one);
}

const MODADD: &str = "configs/modadd-lib.toml";

#[test]
fn modadd_shards_match_one_process() {
    shards_match_one_process(&root().join(MODADD), "modadd");
}

/// A config of the published MNIST MLP on the first `n` training images (absolute paths, so
/// it can live in a temporary folder), with batches of 250 and `tau = 1e-10`.
fn mnist_config(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(root().join("configs/mnist-lib.toml"))
        .unwrap()
        .replace(
            "../shared/reference/mnist-mlp/model_epoch_12.pt",
            s(&root().join("../shared/reference/mnist-mlp/model_epoch_12.pt")),
        )
        .replace(
            "dir = \"data/mnist\"",
            &format!("dir = {:?}\nn_samples = {n}", s(&root().join("data/mnist"))),
        )
        .replace("batch_size = 2000", "batch_size = 250")
        // tau above the rounding floor: the published MLP has dead units, whose Gram and M'
        // eigenvalues are rounding noise (~1e-16..1e-14 of the largest; eigh's backward error
        // is ~d * eps * |G|). At tau = 1e-15 the cut falls inside that noise, so which of those
        // directions survive depends on the order of the sums (2 ranks kept 27 of layers.2
        // where one process kept 29), and no order-independent comparison is possible.
        .replace("tau = 1e-15", "tau = 1e-10");
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("mnist-subset.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
#[ignore = "needs data/mnist (scripts/fetch-data.sh mnist) and ../shared/reference"]
fn mnist_subset_shards_match_one_process() {
    require(&[
        "data/mnist",
        "../shared/reference/mnist-mlp/model_epoch_12.pt",
    ]);
    let dir = tmp("mnist-config");
    let config = mnist_config(&dir, 2900);
    shards_match_one_process(&config, "mnist");
    let _ = std::fs::remove_dir_all(dir);
}

/// The MPI tests (`--features mpi`; `cargo test --features mpi --test stages ranks`).
#[cfg(feature = "mpi")]
mod ranks {
    use super::*;

    #[test]
    fn modadd_ranks_match_one_process() {
        ranks_match_one_process(&root().join(MODADD), "modadd");
    }

    #[test]
    #[ignore = "needs data/mnist (scripts/fetch-data.sh mnist) and ../shared/reference"]
    fn mnist_subset_ranks_match_one_process() {
        require(&[
            "data/mnist",
            "../shared/reference/mnist-mlp/model_epoch_12.pt",
        ]);
        let dir = tmp("mnist-config-ranks");
        ranks_match_one_process(&mnist_config(&dir, 2900), "mnist");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn stochastic_sources_agree_across_ranks() {
        let dir = tmp("stochastic-ranks");
        ranks_match_one_process(&stochastic_config(&dir), "modadd-stochastic");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `mpirun -np 2 ibasis build`: the same graph as one process.
#[cfg(feature = "mpi")]
fn ranks_match_one_process(config: &Path, name: &str) {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED {name} with 2 MPI ranks: no mpirun (Debian: openmpi-bin)");
        return;
    }
    let one = tmp(&format!("{name}-one-process"));
    ok(&["build", s(config), "--out", s(&one)]);
    let ranked = tmp(&format!("{name}-ranks"));
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_ibasis"))
        .args(["build", s(config), "--out", s(&ranked)])
        .current_dir(root())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run mpirun");
    assert!(
        out.status.success(),
        "mpirun -np 2 failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&one, &ranked, &format!("{name}: 2 MPI ranks"));
    let _ = std::fs::remove_dir_all(ranked);
    let _ = std::fs::remove_dir_all(one);
}

/// The stage pieces (`NAME.samples-A-B.safetensors`) in `out/stages`.
fn pieces(out: &Path) -> Vec<String> {
    std::fs::read_dir(out.join("stages"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.contains(".samples-") && n.ends_with(".safetensors"))
                .collect()
        })
        .unwrap_or_default()
}

/// The modular-addition config with `[lib]` line `key = value` replaced, in `dir`.
fn modadd_with(dir: &Path, key: &str, value: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join(MODADD)).unwrap();
    let mut found = false;
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(found, "{MODADD} has no `{key}` line");
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("modadd-{key}.toml"));
    std::fs::write(&path, text + "\n").unwrap();
    path
}

#[test]
fn killed_build_resumes_to_the_same_graph() {
    let dir = tmp("kill");
    // Stages long enough to be checkpointed (the general path through the position-mixing
    // attention: several seconds), each piece written as it completes.
    let config = stochastic_config(&dir);
    let one = dir.join("one");
    ok(&["build", s(&config), "--out", s(&one)]);

    let out = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ibasis"))
        .args(["build", s(&config), "--out", s(&out)])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) once a piece of a metric stage is on disk: mid-build, mid-stage.
    let t = std::time::Instant::now();
    while !pieces(&out).iter().any(|p| p.starts_with("metric.")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build finished before a metric piece was seen; pieces: {:?}",
            pieces(&out)
        );
        assert!(t.elapsed().as_secs() < 300, "no metric piece after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("graph.json").exists(), "killed before the graph");
    assert!(!out.join("graph.safetensors").exists());

    let text = ok(&["build", s(&config), "--out", s(&out)]);
    eprintln!("restarted:\n{text}");
    assert!(
        text.contains("stage stats: reused"),
        "the statistics stage was complete before the kill:\n{text}"
    );
    assert!(
        text.contains("resuming from") || text.contains(": reused"),
        "the restarted build reused nothing:\n{text}"
    );
    assert_same(&one, &out, "modadd: killed and resumed");
    assert!(
        pieces(&out).is_empty(),
        "pieces are removed once their stage is complete: {:?}",
        pieces(&out)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stage_files_of_another_config_are_refused_or_reused_on_request() {
    let dir = tmp("mismatch");
    let out = dir.join("out");
    ok(&["build", MODADD, "--out", s(&out)]);

    // Another tau: every stage after the statistics depends on it; refused, naming the field.
    let tau = modadd_with(&dir, "tau", "1e-12");
    let (success, text) = run(&["build", s(&tau), "--out", s(&out)]);
    assert!(
        !success,
        "a stage file of another tau must be refused:\n{text}"
    );
    assert!(
        text.contains("[lib] tau"),
        "the error names the field:\n{text}"
    );

    // Another edge formula with --reuse-stages: the statistics and bases are kept, the edges
    // computed anew; the result equals a fresh build of that config.
    // (Two stochastic sources: the cheapest edges that differ from the squared ones.)
    let edges = modadd_with(
        &dir,
        "edge_formula",
        "\"stochastic\"\nn_stochastic_sources_edges = 2",
    );
    let text = ok(&["build", s(&edges), "--out", s(&out), "--reuse-stages"]);
    for stage in ["stats", "metric.unembed", "metric.ln2.0", "metric.ln1.0"] {
        assert!(
            text.contains(&format!("stage {stage}: reused")),
            "{stage} should be reused:\n{text}"
        );
    }
    for edges in ["edges.ln1.0", "edges.ln2.0", "edges.unembed"] {
        assert!(
            text.contains(&format!("stage {edges}: computed")),
            "{edges} should be computed anew:\n{text}"
        );
    }
    let fresh = dir.join("fresh");
    ok(&["build", s(&edges), "--out", s(&fresh)]);
    assert_same(&fresh, &out, "modadd: new edges on saved bases");

    // A corrupt stage file: refused with its path, not a panic.
    let stats = out.join("stages/stats.safetensors");
    let bytes = std::fs::read(&stats).unwrap();
    std::fs::write(&stats, &bytes[..bytes.len() / 2]).unwrap();
    let (success, text) = run(&["build", s(&edges), "--out", s(&out)]);
    assert!(!success, "a truncated stage file must be refused:\n{text}");
    assert!(
        text.contains("stats.safetensors") && !text.contains("panicked"),
        "the error names the file:\n{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Stochastic sign sources (method.md 5 and 7) seeded by global sample index: shards (and
/// ranks) draw the signs one process draws. The model keeps all three positions (no
/// `last_pos_module_type`), so the attention section ln1.0 -> ln2.0 mixes positions and its
/// `M'` and edges depend on the signs (another `[lib] seed` moves ln1.0's Lambdas and edge
/// total by ~1%; the per-position sections after it are exact whatever the signs).
#[test]
fn stochastic_sources_agree_across_shards() {
    let dir = tmp("stochastic");
    shards_match_one_process(&stochastic_config(&dir), "modadd-stochastic");
    let _ = std::fs::remove_dir_all(dir);
}

/// The shipped modular-addition model at all three positions, with sign sources for the
/// bases and the edges, on a 10% training split (1277 pairs: the general path of a
/// three-position section is ~20x the closed forms' cost).
fn stochastic_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join(MODADD))
        .unwrap()
        .replace("frac_train = 0.6", "frac_train = 0.1")
        .replace("last_pos_module_type = \"add_resid1\"\n", "")
        .replace(
            "node_layers = [\"ln1.0\", \"ln2.0\", \"unembed\", \"output\"]",
            "node_layers = [\"ln1.0\", \"ln2.0\", \"unembed\", \"output\"]\nn_stochastic_sources_pos = 2",
        )
        .replace(
            "edge_formula = \"squared\"",
            "edge_formula = \"stochastic\"\nn_stochastic_sources_edges = 2",
        );
    assert!(text.contains("n_stochastic_sources_pos") && text.contains("frac_train = 0.1"));
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("modadd-stochastic.toml");
    std::fs::write(&config, text).unwrap();
    config
}
