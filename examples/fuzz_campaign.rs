//! The fuzz campaign of issue 10: the generators of the CI fuzz suite (`tests/fuzz_gen`) at
//! more offsets and several seeds, every input loaded under a counting allocator, outcomes
//! counted per format and printed as a table (ok / clean one-line error / multi-line error /
//! panic / over the memory bound of 64 x input + 16 MiB). Exits non-zero unless every input was
//! ok or a clean error.
//!
//! ```text
//! cargo run --release --example fuzz_campaign [-- SCALE SEEDS]   (defaults 2 and 3)
//! ```

#[path = "../tests/fuzz_gen/mod.rs"]
mod fuzz_gen;

use fuzz_gen::{cases, tmpdir, Outcome, FORMATS};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default)]
struct Row {
    inputs: usize,
    ok: usize,
    error: usize,
    multiline: usize,
    panic: usize,
    over_memory: usize,
    max_peak: usize,
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: fuzz_campaign [SCALE [SEEDS]]"))
        .collect();
    let scale = args.first().copied().unwrap_or(2);
    let seeds = args.get(1).copied().unwrap_or(3) as u64;
    // Panics are counted, not printed.
    std::panic::set_hook(Box::new(|_| {}));
    let dir = tmpdir("campaign");
    let t = Instant::now();
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut bad = Vec::new();
    for seed in 0..seeds {
        // Seed 0 repeats the CI suite's inputs; later seeds flip other bytes (the fixed
        // truncations and header mutations are counted once).
        for c in cases(scale, seed * 1000) {
            if seed > 0 && !c.what.contains("flip") {
                continue;
            }
            let (outcome, peak) = c.run(&dir);
            let row = rows.entry(c.format).or_default();
            row.inputs += 1;
            row.max_peak = row.max_peak.max(peak);
            if peak > c.cap() {
                row.over_memory += 1;
                bad.push(format!("{} `{}`: peak {peak} bytes", c.format, c.what));
            }
            match outcome {
                Outcome::Ok => row.ok += 1,
                Outcome::Error(e) if e.contains('\n') => {
                    row.multiline += 1;
                    bad.push(format!("{} `{}`: multi-line error {e:?}", c.format, c.what));
                }
                Outcome::Error(_) => row.error += 1,
                Outcome::Panic(p) => {
                    row.panic += 1;
                    bad.push(format!("{} `{}`: panic {p}", c.format, c.what));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "fuzz campaign: scale {scale}, {seeds} flip seeds, {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!("| format | inputs | ok | clean error | multi-line error | panic | over memory | max peak |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut total = Row::default();
    for f in FORMATS {
        let Some(r) = rows.get(f) else { continue };
        println!(
            "| {f} | {} | {} | {} | {} | {} | {} | {:.1} MiB |",
            r.inputs,
            r.ok,
            r.error,
            r.multiline,
            r.panic,
            r.over_memory,
            r.max_peak as f64 / (1 << 20) as f64
        );
        total.inputs += r.inputs;
        total.ok += r.ok;
        total.error += r.error;
        total.multiline += r.multiline;
        total.panic += r.panic;
        total.over_memory += r.over_memory;
    }
    println!(
        "| total | {} | {} | {} | {} | {} | {} | |",
        total.inputs, total.ok, total.error, total.multiline, total.panic, total.over_memory
    );
    for b in bad.iter().take(50) {
        println!("  {b}");
    }
    if !bad.is_empty() {
        std::process::exit(1);
    }
}
