//! Trains the default modular-addition transformer (the committed `assets/modadd/model.safetensors`):
//! `cargo run --example train_modadd [-- CONFIG OUT]`, defaults `configs/modadd-train.toml` and
//! `assets/modadd/model.safetensors`. Prints the evaluation history.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "configs/modadd-train.toml".into()),
    );
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "assets/modadd/model.safetensors".into()),
    );
    let report = ibasis::experiments::train::train_from_config(&config, &out)?;
    for e in &report.history {
        println!(
            "step {:6}  train loss {:.4e} acc {:.4}  test loss {:.4e} acc {:.4}",
            e.step, e.train_loss, e.train_accuracy, e.test_loss, e.test_accuracy
        );
    }
    println!(
        "{} steps in {:.1} s; final train accuracy {:.4}, test accuracy {:.4}; wrote {} and {}",
        report.steps,
        report.seconds,
        report.train_accuracy,
        report.test_accuracy,
        out.display(),
        ibasis::experiments::train::report_path(&out).display()
    );
    Ok(())
}
