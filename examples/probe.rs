use ibasis::algorithm::pass::activations_at;
use ibasis::experiments::config::{load_data, load_model, RunConfig};
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let cfg = RunConfig::load(std::path::Path::new(&path))?;
    let model = load_model(&cfg.model)?;
    let data = load_data(&cfg.data)?;
    let idx = model.node_index("mlp_act.0").unwrap();
    let f = activations_at(&model, data.as_ref(), idx, 0..data.len());
    let z = &f.data;
    let width = 512.min(z.ncols());
    let mut pos = 0usize;
    let mut tot = 0usize;
    for j in 0..width {
        for v in z.col_as_slice(j) {
            tot += 1;
            if *v > 0.0 {
                pos += 1;
            }
        }
    }
    println!(
        "cols {} rows {} active fraction {:.4}",
        z.ncols(),
        z.nrows(),
        pos as f64 / tot as f64
    );
    Ok(())
}
