//! Inputs from the hardening issue that used to panic, hang or blow up memory: each must now
//! give one error line naming the file or key, a non-zero exit and no output.

mod common;
#[path = "fuzz_gen/mod.rs"]
mod fuzz_gen;
use common::*;
use ibasis::io::weights::{load_safetensors, save_safetensors};
use ibasis::tensor::HostTensor;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SHIPPED: &str = "assets/modadd/model.safetensors";

fn config(model: &str, extra_lib: &str) -> String {
    modadd_config(model, &["ln2.0", "unembed", "output"], extra_lib)
}

/// Runs `ibasis build` on `config_text` (with a deadline: a hang fails the test) and checks the
/// error: one line, containing every `needle`, no output folder.
fn refused(dir: &Path, config_text: &str, needles: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config_text).unwrap();
    let out = dir.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ibasis"))
        .args([
            "build",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .current_dir(root())
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{needles:?}: ibasis hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{needles:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{err:?} lacks {n:?}");
    }
    assert!(!out.exists(), "no output may be left");
}

/// The shipped model with one tensor replaced.
fn altered(dir: &Path, name: &str, t: HostTensor) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = load_safetensors(&root().join(SHIPPED)).unwrap();
    w.insert(name.to_string(), t);
    let path = dir.join("model.safetensors");
    save_safetensors(&path, &w, false).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_position_table_shorter_than_the_data_is_named_with_both_sides() {
    let dir = tmp("hard-pos");
    let w = load_safetensors(&root().join(SHIPPED)).unwrap();
    let pos = &w["pos_embed.W_pos"];
    let model = altered(
        &dir,
        "pos_embed.W_pos",
        HostTensor::new(vec![2, pos.shape[1]], pos.data[..2 * pos.shape[1]].to_vec()),
    );
    refused(
        &dir,
        &config(&model, ""),
        &["pos_embed", "2 positions", "3 per sample"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unembedding_with_fewer_classes_than_the_labels_is_refused() {
    let dir = tmp("hard-classes");
    let w = load_safetensors(&root().join(SHIPPED)).unwrap();
    let u = &w["unembed.W_U"];
    let (d, k) = (u.shape[0], 50);
    let data: Vec<f64> = (0..d)
        .flat_map(|i| u.data[i * u.shape[1]..i * u.shape[1] + k].to_vec())
        .collect();
    let mut weights = w.clone();
    weights.insert("unembed.W_U".into(), HostTensor::new(vec![d, k], data));
    weights.insert(
        "unembed.b_U".into(),
        HostTensor::new(vec![k], w["unembed.b_U"].data[..k].to_vec()),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    save_safetensors(&path, &weights, false).unwrap();
    refused(
        &dir,
        &config(path.to_str().unwrap(), ""),
        &["label", "50 outputs"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_fifo_is_not_read() {
    let dir = tmp("hard-fifo");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("model.safetensors");
    let ok = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success());
    if !matches!(ok, Ok(true)) {
        panic!("mkfifo is needed for this test");
    }
    refused(
        &dir,
        &config(fifo.to_str().unwrap(), ""),
        &["not a regular file"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hanging_and_exploding_settings_are_refused_by_key() {
    let dir = tmp("hard-keys");
    for (extra, key) in [
        (
            "n_stochastic_sources_hidden = 1000000000",
            "[lib] n_stochastic_sources_hidden",
        ),
        ("batch_size = 0", "[lib] batch_size"),
    ] {
        refused(&dir, &config(SHIPPED, extra), &[key]);
    }
    let exp = format!(
        "{}\n[experiments]\nschedule_base = 1.0\n",
        config(SHIPPED, "")
    );
    refused(&dir, &exp, &["[experiments] schedule_base"]);
    for base in ["-2.0", "nan"] {
        refused(
            &dir,
            &exp.replace("schedule_base = 1.0", &format!("schedule_base = {base}")),
            &["[experiments] schedule_base"],
        );
    }
    let exp = format!(
        "{}\n[experiments]\nschedule_cutoff = 1000000000000\n",
        config(SHIPPED, "")
    );
    refused(&dir, &exp, &["[experiments] schedule_cutoff"]);
    refused(
        &dir,
        &config(SHIPPED, "").replace("modulus = 113", "modulus = 1000000"),
        &["[data] modulus"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The layer names `graph.json` lists and those `graph.safetensors`'s metadata lists.
fn pair_layers(out: &Path) -> (Vec<String>, Vec<String>) {
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("graph.json")).unwrap()).unwrap();
    let st = std::fs::read(out.join("graph.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["layers"].as_str().unwrap()).unwrap();
    (names(&json["node_layers"]), names(&meta))
}

#[test]
fn a_killed_build_leaves_the_old_pair_or_the_new_pair() {
    let dir = tmp("hard-build-kill");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let write = |name: &str, layers: &[&str]| {
        let p = dir.join(name);
        std::fs::write(&p, modadd_config(SHIPPED, layers, "")).unwrap();
        p
    };
    let old_cfg = write("old.toml", &["unembed", "output"]);
    let new_cfg = write("new.toml", &["ln2.0", "unembed", "output"]);
    // `--reuse-stages`: the two configs share one folder, whose stage files of the other config
    // are recomputed instead of refused (tests/stages.rs checks the refusal).
    let build = |cfg: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ibasis"))
            .args(["build", cfg.to_str().unwrap(), "--reuse-stages", "--out"])
            .arg(&out)
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let old = vec!["unembed".to_string(), "output".to_string()];
    let new = vec![
        "ln2.0".to_string(),
        "unembed".to_string(),
        "output".to_string(),
    ];
    // A complete build over the old pair replaces both files.
    assert!(build(&old_cfg).wait().unwrap().success());
    assert_eq!(pair_layers(&out), (old.clone(), old.clone()));
    let t = Instant::now();
    assert!(build(&new_cfg).wait().unwrap().success());
    let full = t.elapsed();
    assert_eq!(pair_layers(&out), (new.clone(), new.clone()));
    // Kills spread over a build's duration: each leaves one whole pair, old or new.
    let (mut olds, mut news) = (0, 0);
    for k in 1..=10u32 {
        assert!(build(&old_cfg).wait().unwrap().success());
        let mut child = build(&new_cfg);
        std::thread::sleep(full * k / 10);
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        // Killed between its two renames, the old pair is whole beside `out`.
        let at = if out.exists() {
            out.clone()
        } else {
            dir.join(format!("out.old-{pid}"))
        };
        let (json, st) = pair_layers(&at);
        if at != out {
            std::fs::rename(&at, &out).unwrap();
        }
        assert_eq!(
            json, st,
            "kill {k}: graph.json and graph.safetensors are from different builds"
        );
        if json == old {
            olds += 1;
        } else {
            assert_eq!(json, new);
            news += 1;
        }
    }
    eprintln!("killed builds: {olds} left the old pair, {news} the new one");
    let _ = std::fs::remove_dir_all(dir);
}

/// A config of a language model (`kind` gguf or hf at `path`) on a small text file, 4 tokens
/// per sample.
fn lm_config(dir: &Path, kind: &str, path: &Path) -> String {
    let text = dir.join("a.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    format!(
        r#"
[model]
kind = "{kind}"
path = {path:?}
[data]
kind = "text"
paths = [{text:?}]
tokenizer = "gpt2"
n_ctx = 4
[lib]
node_layers = ["output"]
"#
    )
}

#[test]
fn gguf_context_lengths_and_block_counts_are_checked() {
    use ibasis::io::gguf::GgufValue;
    let dir = tmp("hard-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    for (key, v, needles) in [
        (
            "llama.context_length",
            1u64,
            &["of model", "has 1 positions", "4 per sample"][..],
        ),
        (
            "llama.context_length",
            1 << 31,
            &["tiny.gguf", "`llama.context_length` = 2147483648"][..],
        ),
        (
            "llama.block_count",
            1 << 31,
            &["tiny.gguf", "`llama.block_count` = 2147483648", "1 blocks"][..],
        ),
    ] {
        std::fs::write(
            &model,
            fuzz_gen::tiny_llama_gguf(&[(key, GgufValue::U64(v))]),
        )
        .unwrap();
        refused(&dir, &lm_config(&dir, "gguf", &model), needles);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hf_max_position_embeddings_below_the_data_are_refused_up_front() {
    let dir = tmp("hard-hf-pos");
    let model = dir.join("llama");
    std::fs::create_dir_all(&model).unwrap();
    // The tiny GGUF llama in Hugging Face layout: a rotary model (Llama) of 1 block.
    let g = ibasis::io::gguf::parse_gguf(fuzz_gen::tiny_llama_gguf(&[]), "tiny.gguf").unwrap();
    let (mut config, tensors) = ibasis::io::gguf::llama_from_gguf(&g, "tiny.gguf").unwrap();
    save_safetensors(&model.join("model.safetensors"), &tensors, false).unwrap();
    for n in [1, 3] {
        config["max_position_embeddings"] = n.into();
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        refused(
            &dir,
            &lm_config(&dir, "hf", &model),
            &[&format!("has {n} positions"), "4 per sample"],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_mlp_with_an_extra_layer_to_one_output_is_refused_against_ten_classes() {
    let dir = tmp("hard-mlp-extra");
    let data = dir.join("mnist");
    std::fs::create_dir_all(&data).unwrap();
    // Three 2x3 images labelled 7, 0, 9 (IDX files written here).
    let mut img = vec![0, 0, 8, 3];
    for d in [3u32, 2, 3] {
        img.extend(d.to_be_bytes());
    }
    img.extend((0..18).map(|i| i as u8 * 10));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend(3u32.to_be_bytes());
    lab.extend([7, 0, 9]);
    std::fs::write(data.join("train-images-idx3-ubyte"), img).unwrap();
    std::fs::write(data.join("train-labels-idx1-ubyte"), lab).unwrap();
    // 6 -> 10 -> 1: consistent shapes, but one output for labels up to 9.
    let mut w = ibasis::io::weights::Tensors::new();
    let t = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        HostTensor::new(shape, (0..n).map(|i| (i % 5) as f64 / 10.0).collect())
    };
    w.insert("layers.0.W".into(), t(vec![6, 10]));
    w.insert("layers.0.b".into(), t(vec![10]));
    w.insert("layers.1.W".into(), t(vec![10, 1]));
    w.insert("layers.1.b".into(), t(vec![1]));
    let model = dir.join("mlp.safetensors");
    save_safetensors(&model, &w, false).unwrap();
    let cfg = format!(
        r#"
[model]
kind = "mlp"
path = {model:?}
[data]
kind = "mnist"
dir = {data:?}
[lib]
node_layers = ["layers.1", "output"]
"#
    );
    refused(&dir, &cfg, &["has label 7", "1 outputs"]);
    let _ = std::fs::remove_dir_all(dir);
}
