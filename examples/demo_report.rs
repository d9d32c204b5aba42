//! Writes a demo report from synthetic, LIB-like data: four node layers of 100 features plus
//! a constant, edges in five modules of different sizes over a weak background, ablation
//! curves, spectra and edge-mass curves. Shows what the figures and the report look like.
//!
//! Run: `cargo run --example demo_report [OUT_DIR]` (default `out/demo-report`), then e.g.
//! `scripts/screenshot-report.sh out/demo-report/report.html out/demo-report/report.png`.

use faer::Mat;
use ibasis::experiments::figures::{
    draw_ablation_curves, draw_edge_mass, draw_interaction_graph, draw_spectra, Curve,
    GraphDrawOptions, GraphView, LayerView,
};
use ibasis::experiments::modularity::{cluster_graph, EdgeNorm, ModularityOptions};
use ibasis::experiments::report::{write_report, Figure, Report, ReportSection, Table};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

const D: usize = 100;
/// Module sizes; the remaining features belong to no module.
const MODULES: [usize; 5] = [24, 18, 14, 10, 8];

fn module_of(perm: &[usize], f: usize) -> Option<usize> {
    if f == 0 {
        return None;
    }
    let mut pos = perm[f - 1];
    for (m, &size) in MODULES.iter().enumerate() {
        if pos < size {
            return Some(m);
        }
        pos -= size;
    }
    None
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "out/demo-report".into()),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let names = ["embed", "mlp_in.0", "mlp_out.0", "unembed"];

    // Each layer shuffles which features belong to which module, as LIB orders by importance,
    // not by module.
    let perms: Vec<Vec<usize>> = (0..names.len())
        .map(|_| {
            let mut p: Vec<usize> = (0..D).collect();
            for i in (1..D).rev() {
                p.swap(i, rng.random_range(0..=i));
            }
            p
        })
        .collect();
    let layers: Vec<LayerView> = names
        .iter()
        .enumerate()
        .map(|(l, name)| {
            let mut importance: Vec<f64> = (0..=D)
                .map(|i| {
                    50.0 * (-(i as f64) / (18.0 + 6.0 * l as f64)).exp()
                        * rng.random_range(0.8..1.2)
                })
                .collect();
            importance[1..].sort_by(|a, b| b.total_cmp(a));
            importance[0] = 1.0;
            let labels = (l == 1).then(|| {
                (0..=D)
                    .map(|f| match module_of(&perms[l], f) {
                        None if f == 0 => "const".to_string(),
                        Some(m) => format!("({}, {})", 3 * m + 1, (7 * f) % 5),
                        None => format!("#{f}"),
                    })
                    .collect()
            });
            LayerView {
                name: name.to_string(),
                importance,
                has_constant: true,
                labels,
            }
        })
        .collect();
    let edges: Vec<Mat<f64>> = (0..names.len() - 1)
        .map(|l| {
            Mat::from_fn(D + 1, D + 1, |i, j| {
                let scale = layers[l + 1].importance[i].sqrt() * layers[l].importance[j].sqrt();
                let noise = (rng.random_range(-1.5f64..1.5)).exp();
                if i == 0 || j == 0 {
                    return 5.0 * scale * noise;
                }
                match (module_of(&perms[l + 1], i), module_of(&perms[l], j)) {
                    (Some(a), Some(b)) if a == b => scale * noise,
                    _ if rng.random::<f64>() < 0.05 => 0.05 * scale * noise,
                    _ => 1e-4 * scale * noise,
                }
            })
        })
        .collect();
    let view = GraphView { layers, edges };

    let opts = ModularityOptions {
        gamma: 1.0,
        seed: 0,
        norm: EdgeNorm::LogByLayer { mass: 0.99 },
    };
    let clusters = cluster_graph(&view, &opts)?;
    let sqrt_clusters = cluster_graph(
        &view,
        &ModularityOptions {
            norm: EdgeNorm::Sqrt,
            ..opts.clone()
        },
    )?;
    println!(
        "log norm: {} clusters, Q = {:.4}; sqrt norm: {} clusters, Q = {:.4}",
        clusters.n_clusters, clusters.q, sqrt_clusters.n_clusters, sqrt_clusters.q
    );

    let graph = draw_interaction_graph(
        &out.join("graph_clusters"),
        &view,
        Some(&clusters),
        &GraphDrawOptions::default(),
    )?;
    let plain = draw_interaction_graph(
        &out.join("graph_importance"),
        &view,
        None,
        &GraphDrawOptions {
            top_n: 30,
            title: Some("Interaction graph, top 30 features by importance".into()),
            ..Default::default()
        },
    )?;

    let schedule: Vec<usize> = (0..=20).chain([24, 32, 40, 48, 64, 80, 101]).collect();
    let curve = |label: &str, k: f64| Curve {
        label: label.into(),
        n_kept: schedule.clone(),
        score: schedule
            .iter()
            .map(|&n| 0.01 + 0.985 * (1.0 - (-(n as f64) / k).exp()))
            .collect(),
    };
    let ablation = draw_ablation_curves(
        &out.join("ablation_mlp_in"),
        "mlp_in.0",
        &[curve("LIB", 4.0), curve("PCA", 9.0), curve("neurons", 30.0)],
        0.995,
        "accuracy",
    )?;
    let spectra: Vec<(String, Vec<f64>)> = view
        .layers
        .iter()
        .map(|l| (l.name.clone(), l.importance[1..].to_vec()))
        .collect();
    let spectra_files = draw_spectra(&out.join("spectra"), &spectra)?;
    let mass: Vec<(String, Vec<f64>)> = view
        .edges
        .iter()
        .enumerate()
        .map(|(l, e)| {
            let name = format!("{} -> {}", view.layers[l].name, view.layers[l + 1].name);
            let values = (1..e.nrows())
                .flat_map(|i| (1..e.ncols()).map(move |j| e[(i, j)]))
                .collect();
            (name, values)
        })
        .collect();
    let mass_files = draw_edge_mass(&out.join("edge_mass"), &mass)?;

    let sizes = clusters.sizes();
    let cluster_rows = (0..clusters.n_clusters.min(8))
        .map(|c| {
            let per_layer: Vec<String> = (0..view.layers.len())
                .map(|l| {
                    let n = clusters
                        .nodes
                        .iter()
                        .zip(&clusters.assignment)
                        .filter(|(&(ll, _), &a)| ll == l && a == c)
                        .count();
                    n.to_string()
                })
                .collect();
            let mut row = vec![c.to_string(), sizes[c].to_string()];
            row.extend(per_layer);
            row
        })
        .collect();
    let mut header = vec!["cluster".to_string(), "features".to_string()];
    header.extend(view.layers.iter().map(|l| l.name.clone()));

    let report = Report {
        title: "ibasis demo report (synthetic data)".into(),
        sections: vec![
            ReportSection {
                heading: "Overview".into(),
                paragraphs: vec![
                    "Synthetic LIB-like data: four node layers of 100 features plus the constant feature, \
                     with five planted modules of 24, 18, 14, 10 and 8 features per layer over a weak background of edges."
                        .into(),
                    "Nothing here comes from a trained model; the report only shows the figures and layout.".into(),
                ],
                ..Default::default()
            },
            ReportSection {
                heading: "Modularity".into(),
                paragraphs: vec![format!(
                    "Leiden at resolution gamma = {} on the by-layer log-normalised graph (99% of each matrix's mass kept): \
                     {} clusters, modularity Q = {:.4}. With sqrt(E) weights: {} clusters, Q = {:.4}.",
                    clusters.gamma, clusters.n_clusters, clusters.q, sqrt_clusters.n_clusters, sqrt_clusters.q
                )],
                tables: vec![Table {
                    caption: "Largest clusters: features per node layer".into(),
                    header,
                    rows: cluster_rows,
                }],
                figures: vec![Figure::from_files(
                    "Interaction graph, top 40 features per layer grouped by cluster. Node size and opacity: importance; \
                     edge width and opacity: sqrt(E) relative to the matrix's largest edge.",
                    &graph,
                )],
            },
            ReportSection {
                heading: "Interaction graph by importance".into(),
                figures: vec![Figure::from_files("Top 30 features per layer by importance, no clusters.", &plain)],
                ..Default::default()
            },
            ReportSection {
                heading: "Ablations".into(),
                figures: vec![Figure::from_files("Accuracy after keeping the n most important features.", &ablation)],
                ..Default::default()
            },
            ReportSection {
                heading: "Spectra and edges".into(),
                figures: vec![
                    Figure::from_files("Importance (Lambda) spectra of the non-constant features.", &spectra_files),
                    Figure::from_files("Cumulative edge mass of the non-constant edges.", &mass_files),
                ],
                ..Default::default()
            },
        ],
    };
    let html = out.join("report.html");
    write_report(&html, &report)?;
    println!("{}", html.display());
    Ok(())
}
