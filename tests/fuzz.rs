//! Fuzz suite (issue 10): for each input format (pt, safetensors, GGUF, Hugging Face
//! `config.json`, IDX, CIFAR, text, TOML run config) a small valid input generated in
//! `fuzz_gen` is truncated at many offsets, hit by seeded byte flips and by structured header
//! mutations; every variant must load or fail with a one-line error, never panic, and never
//! allocate more than `FACTOR` times its size plus `SLACK` (a counting global allocator).
//! The larger campaign over the same generators is `examples/fuzz_campaign.rs`.

mod fuzz_gen;

use fuzz_gen::{cases, tmpdir, Case, Outcome};
use std::sync::Mutex;

/// Loads run one at a time, so that peaks are not mixed between test threads.
static LOCK: Mutex<()> = Mutex::new(());

/// Runs every case of `format`; returns the error texts by case description.
fn campaign(format: &str) -> Vec<(String, Option<String>)> {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir(&format.replace(' ', "-"));
    let all: Vec<Case> = cases(1, 0)
        .into_iter()
        .filter(|c| c.format == format)
        .collect();
    assert!(all.len() > 100, "{format}: only {} inputs", all.len());
    let mut out = Vec::new();
    let (mut ok, mut err, mut max_peak) = (0, 0, 0);
    for c in &all {
        let (outcome, peak) = c.run(&dir);
        max_peak = max_peak.max(peak);
        let text = match outcome {
            Outcome::Panic(msg) => panic!("{format}: input `{}` panicked: {msg}", c.what),
            Outcome::Ok => {
                ok += 1;
                None
            }
            Outcome::Error(e) => {
                assert!(
                    !e.contains('\n'),
                    "{format}: input `{}`: multi-line error {e:?}",
                    c.what
                );
                err += 1;
                Some(e)
            }
        };
        assert!(
            peak <= c.cap(),
            "{format}: input `{}` of {} bytes allocated {peak} bytes at its peak (cap {}): {text:?}",
            c.what,
            c.input.len(),
            c.cap()
        );
        out.push((c.what.clone(), text));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "fuzz {format}: {} inputs, {ok} ok, {err} clean errors, 0 panics, peak {max_peak} bytes",
        all.len()
    );
    // The allocator does count (a loader that allocates nothing would make the bound vacuous).
    assert!(max_peak > 0, "{format}: no allocation seen");
    assert!(
        out[0].1.is_none(),
        "{format}: the valid seed input fails: {:?}",
        out[0].1
    );
    out
}

/// The error text of case `what`.
fn error_of<'a>(results: &'a [(String, Option<String>)], what: &str) -> &'a str {
    let (_, e) = results
        .iter()
        .find(|(w, _)| w == what)
        .unwrap_or_else(|| panic!("no case {what}"));
    e.as_deref().unwrap_or_else(|| panic!("case {what} loaded"))
}

#[test]
fn fuzz_pt() {
    let r = campaign("pt");
    assert!(error_of(&r, "1M nested tuples").contains("nested more than 256 deep"));
    assert!(error_of(&r, "memo billion laughs").contains("would build more than"));
    assert!(error_of(&r, "view [1000000000] stride [0]").contains("refused"));
    assert!(error_of(&r, "deflate size 4 GB").contains("claims"));
}

#[test]
fn fuzz_safetensors() {
    campaign("safetensors");
}

#[test]
fn fuzz_gguf() {
    let r = campaign("gguf");
    assert!(error_of(&r, "llama.block_count = 2147483648").contains("llama.block_count"));
    assert!(error_of(&r, "llama.context_length = 2147483648").contains("llama.context_length"));
    // A context of 1 is a valid model (refused against longer data by `check_compatible`).
    assert!(r
        .iter()
        .any(|(w, e)| w == "llama.context_length = 1" && e.is_none()));
}

#[test]
fn fuzz_hf_config() {
    let r = campaign("hf config.json");
    assert!(error_of(&r, "gpt2 n_layer = 2147483648").contains("n_layer"));
}

#[test]
fn fuzz_idx() {
    campaign("idx");
}

#[test]
fn fuzz_cifar() {
    campaign("cifar");
}

#[test]
fn fuzz_text() {
    campaign("text");
}

#[test]
fn fuzz_toml() {
    let r = campaign("toml");
    for (_, to, key) in fuzz_gen::TOML_REFUSED {
        assert!(error_of(&r, to).contains(key), "{to}: {}", error_of(&r, to));
    }
}
