//! The whole experiment of method.md section 10 on one model: LIB, PCA and neuron bases, node
//! ablation curves, edge bisection, Leiden modules, Fourier labels, figures, an HTML report and
//! the interactive explorer (`explorer.html`, see [`super::explorer`]).

use super::ablate::{
    edge_ablation, node_ablation, AblationResult, AblationSettings, Metric, Schedule,
};
use super::build::build_resumable;
use super::config::{limit, load_data, load_model, DataConfig, RunConfig};
use super::figures::{self, Curve, GraphDrawOptions, GraphView, LayerView};
use super::fourier::{label_layers, rib_csv, FourierLabel};
use super::modularity::{cluster_graph, Clusters, EdgeNorm, ModularityOptions};
use super::report::{write_report, Figure, Report, ReportSection, Table};
use crate::algorithm::stages::Source;
use crate::algorithm::{BasisFormula, EdgeFormula, Graph};
use crate::data::modadd::Split;
use crate::io::write_atomic;
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Per row (node layer or edge matrix): a count per basis.
pub type CountsByBasis<T> = Vec<(String, Vec<(String, T)>)>;

/// What `ibasis run` writes to `summary.json` (and prints).
#[derive(Serialize)]
pub struct PipelineSummary {
    pub model: String,
    pub baseline: f64,
    pub metric: String,
    /// Per node layer: fewest features within `delta` of the baseline, per basis.
    pub features_required: CountsByBasis<Option<usize>>,
    /// Per edge matrix: fewest edges within `delta`, per basis.
    pub edges_required: CountsByBasis<usize>,
    pub n_modules: usize,
    pub modularity_q: f64,
    /// Per node layer: the distinct dominant Fourier frequencies `min(k, p - k)` of its 20 most
    /// important LIB features (modular arithmetic only), most frequent first.
    pub frequencies: Vec<(String, Vec<usize>)>,
    pub timings: Vec<(String, f64)>,
    pub report: PathBuf,
    /// The interactive explorer (`explorer.html`).
    pub explorer: PathBuf,
}

/// Held-out chunks scored per language-model evaluation in the pipeline's ablations.
const LM_EVAL_CHUNKS: usize = 16;

/// Runs everything for `config` (a LIB build config) into `out`, as one unit: the run is
/// written into a fresh sibling folder `OUT.partial-PID` and renamed over `out` only when
/// complete (an older run there is moved aside first and removed after), so after a kill `out`
/// is the old complete run or the new one, and anything unfinished is a `.partial-*` folder.
/// The builds' stage files stay in `OUT.stages` until the run is complete: a rerun after a
/// kill or a failure resumes from them.
pub fn run_pipeline(
    config: &Path,
    out: &Path,
    model: Option<&Path>,
    delta: f64,
    gamma: f64,
) -> anyhow::Result<PipelineSummary> {
    let staging = crate::io::fresh_staging(out)?;
    match run_into(config, &staging, out, model, delta, gamma) {
        Ok(summary) => {
            crate::io::replace_dir(&staging, out)?;
            let work = stages_folder(out)?;
            if work.exists() {
                std::fs::remove_dir_all(&work)
                    .with_context(|| format!("cannot remove {}", work.display()))?;
            }
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// `OUT.stages`: where a run's builds keep their stage files until the run is complete.
fn stages_folder(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} has no folder name", out.display()))?;
    let mut name = name.to_os_string();
    name.push(".stages");
    Ok(out.with_file_name(name))
}

/// The pipeline, writing into `out` (a staging folder) and naming files as they will be at
/// `final_out`.
fn run_into(
    config: &Path,
    out: &Path,
    final_out: &Path,
    model: Option<&Path>,
    delta: f64,
    gamma: f64,
) -> anyhow::Result<PipelineSummary> {
    let t0 = Instant::now();
    let mut timings = Vec::new();
    let mut lib_cfg = RunConfig::load(config)?;
    if let Some(m) = model {
        lib_cfg.set_model_path(m.to_path_buf());
    }
    let variant = |formula: BasisFormula, center: bool, edges: EdgeFormula| {
        let mut c = lib_cfg.clone();
        c.lib.basis_formula = formula;
        c.lib.center = center;
        c.lib.edge_formula = edges;
        // PCA and neurons have no Jacobian metric for the basis's sign sources to estimate.
        c.lib.n_stochastic_sources_pos = None;
        c.lib.n_stochastic_sources_hidden = None;
        c
    };
    // Language models: held-out text scored by next-token cross-entropy on a few chunks (each
    // evaluation runs the whole model), no neuron graph, no edge bisection.
    let test = load_data(&lib_cfg.with_split(Split::Test))?;
    let lm = test.next_token_targets();
    let exp = lib_cfg.experiments.clone().unwrap_or_default();
    for name in exp.ablate_node_layers.iter().flatten() {
        anyhow::ensure!(
            lib_cfg.lib.node_layers.contains(name),
            "{}: [experiments] ablate_node_layers names `{name}`, which is not one of [lib] node_layers {:?}",
            config.display(),
            lib_cfg.lib.node_layers
        );
    }
    let eval_samples = exp.eval_samples.or(lm.then_some(LM_EVAL_CHUNKS));
    let test = limit(test, eval_samples);
    let mut runs = vec![
        ("lib", lib_cfg.clone()),
        // Language models: PCA edges would cost as much as LIB's and nothing uses them.
        (
            "pca",
            variant(
                BasisFormula::Svd,
                true,
                if lm {
                    EdgeFormula::None
                } else {
                    lib_cfg.lib.edge_formula
                },
            ),
        ),
    ];
    if !lm {
        runs.push((
            "neuron",
            variant(BasisFormula::Neuron, false, EdgeFormula::None),
        ));
    }
    let source = config.display().to_string();
    let mut graphs = Vec::new();
    // Each build keeps its stage files outside the staging folder, in `OUT.stages/NAME`, so a
    // run killed during a long build (SmolLM2's 30 blocks: about an hour) resumes there; the
    // folder is removed once the run is complete.
    let work = stages_folder(final_out)?;
    for (name, cfg) in &runs {
        let t = Instant::now();
        let dir = work.join(name);
        let (g, stages) = build_resumable(cfg, &format!("{source} ({name})"), &dir)?;
        let reused: Vec<&str> = stages
            .iter()
            .filter(|(_, s)| {
                !matches!(
                    s,
                    Source::Computed {
                        pieces_reused: 0,
                        ..
                    }
                )
            })
            .map(|(n, _)| n.as_str())
            .collect();
        if !reused.is_empty() {
            eprintln!(
                "build {name}: resumed from {} ({} stages reused in whole or part)",
                dir.join("stages").display(),
                reused.len()
            );
        }
        std::fs::create_dir_all(out.join(name))?;
        for file in ["graph.safetensors", "graph.json"] {
            std::fs::copy(dir.join(file), out.join(name).join(file))
                .with_context(|| format!("cannot copy {}", dir.join(file).display()))?;
        }
        timings.push((format!("build {name}"), t.elapsed().as_secs_f64()));
        graphs.push(g);
    }

    let model = load_model(&lib_cfg.model)?;
    let metric = if lm { Metric::Loss } else { Metric::Accuracy };
    let node_settings = AblationSettings {
        kind: super::ablate::AblationKind::Node,
        schedule: Schedule::Exponential,
        cutoff: exp.schedule_cutoff.unwrap_or(20),
        base: exp.schedule_base.unwrap_or(2.0),
        step: 1,
        delta,
        split: Split::Test,
        metric,
        node_layers: exp.ablate_node_layers.clone(),
        batch_size: 1024,
    };
    let mut node_results = Vec::new();
    for ((name, _), g) in runs.iter().zip(&graphs) {
        let t = Instant::now();
        let r = node_ablation(&model, test.as_ref(), g, &node_settings)?;
        save_ablation(&out.join(name).join("ablation-nodes"), &r, name)?;
        timings.push((format!("node ablation {name}"), t.elapsed().as_secs_f64()));
        node_results.push(r);
    }
    let edge_settings = AblationSettings {
        kind: super::ablate::AblationKind::Edge,
        schedule: Schedule::Bisect,
        ..node_settings.clone()
    };
    let mut edge_results = Vec::new();
    for ((name, _), g) in runs.iter().zip(&graphs).take(if lm { 0 } else { 2 }) {
        let t = Instant::now();
        let r = edge_ablation(&model, test.as_ref(), g, &edge_settings)?;
        save_ablation(&out.join(name).join("ablation-edges"), &r, name)?;
        timings.push((format!("edge bisection {name}"), t.elapsed().as_secs_f64()));
        edge_results.push(r);
    }

    let t = Instant::now();
    let fourier = fourier_labels(&lib_cfg, &model, &graphs[0])?;
    // The reference's label CSV for LIB and PCA, to compare how interpretable each basis is.
    if fourier.is_some() {
        for ((name, _), g) in runs.iter().zip(&graphs).take(2) {
            let labels = match *name {
                "lib" => fourier.clone(),
                _ => fourier_labels(&lib_cfg, &model, g)?,
            };
            write_rib_csv(
                &out.join(name).join("fourier_labels.csv"),
                g,
                &labels.unwrap_or_default(),
            )?;
        }
    }
    timings.push(("Fourier labels".into(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let html = out.join("report.html");
    let titled: Vec<(&str, &Graph)> = ["LIB", "PCA", "neurons"].into_iter().zip(&graphs).collect();
    let clusters = write_full_report(
        &html,
        &lib_cfg,
        &titled,
        &node_results,
        &edge_results,
        fourier.as_deref(),
        gamma,
        delta,
        &out.join("figures"),
    )?;
    timings.push((
        "clustering, figures, report".into(),
        t.elapsed().as_secs_f64(),
    ));
    let t = Instant::now();
    let named: Vec<(&str, &Graph)> = runs.iter().map(|(n, _)| *n).zip(&graphs).collect();
    let explorer = super::explorer::write_explorer(
        &out.join("explorer.html"),
        &lib_cfg,
        &model,
        &named,
        Some(&clusters),
        &format!("ibasis explorer: {}", lib_cfg.model_path().display()),
        &super::explorer::ExplorerOptions {
            gamma,
            ..Default::default()
        },
    )?;
    timings.push(("explorer".into(), t.elapsed().as_secs_f64()));
    timings.push(("total".into(), t0.elapsed().as_secs_f64()));

    let baseline = node_results[0].baseline;
    let features_required = graphs[0]
        .layers
        .iter()
        .filter(|b| b.name != crate::models::OUTPUT)
        .map(|b| {
            let per: Vec<(String, Option<usize>)> = runs
                .iter()
                .zip(&node_results)
                .map(|((name, _), r)| (name.to_string(), fewest_within(r, &b.name, delta)))
                .collect();
            (b.name.clone(), per)
        })
        .collect();
    let edges_required = edge_results
        .first()
        .map(|r| r.edges_required.clone())
        .unwrap_or_default()
        .keys()
        .map(|k| {
            let per = runs
                .iter()
                .zip(&edge_results)
                .map(|((name, _), r)| {
                    (
                        name.to_string(),
                        r.edges_required.get(k).copied().unwrap_or(0),
                    )
                })
                .collect();
            (k.clone(), per)
        })
        .collect();
    let summary = PipelineSummary {
        model: lib_cfg.model_path().display().to_string(),
        baseline,
        metric: if lm { "loss" } else { "accuracy" }.into(),
        features_required,
        edges_required,
        frequencies: dominant_frequencies(&graphs[0], fourier.as_deref()),
        n_modules: clusters.n_clusters,
        modularity_q: clusters.q,
        timings,
        report: final_out.join("report.html"),
        explorer: final_out.join(explorer.html.file_name().expect("a file")),
    };
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// The key frequencies of each layer: dominant non-zero `k` of the leading features.
fn dominant_frequencies(
    g: &Graph,
    labels: Option<&[Vec<FourierLabel>]>,
) -> Vec<(String, Vec<usize>)> {
    let Some(labels) = labels else { return vec![] };
    g.layers
        .iter()
        .zip(labels)
        .filter(|(_, l)| !l.is_empty())
        .map(|(b, ls)| {
            let mut count = std::collections::BTreeMap::<usize, usize>::new();
            for f in ls.iter().take(20).filter(|f| f.constant < 0.5) {
                if let Some(&(ka, kb, _)) = f.dominant.first() {
                    *count.entry(ka.max(kb)).or_default() += 1;
                }
            }
            let mut v: Vec<(usize, usize)> = count.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            (b.name.clone(), v.into_iter().map(|(k, _)| k).collect())
        })
        .collect()
}

fn save_ablation(dir: &Path, r: &AblationResult, basis: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut r = r.clone();
    r.basis = basis.to_string();
    write_atomic(
        &dir.join("ablation.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )
}

/// Smallest kept count on a curve whose score is within `delta` of the baseline (and stays so
/// for every larger count measured).
pub fn fewest_within(r: &AblationResult, layer: &str, delta: f64) -> Option<usize> {
    let c = r.node_layers.get(layer)?;
    let lower_is_better = r.metric == "loss";
    let ok: Vec<bool> = c
        .score
        .iter()
        .map(|s| {
            if lower_is_better {
                *s <= r.baseline + delta
            } else {
                *s >= r.baseline - delta
            }
        })
        .collect();
    (0..ok.len())
        .find(|&i| ok[i..].iter().all(|&b| b))
        .map(|i| c.n_kept[i])
}

/// Writes `g`'s labels as the reference's CSV (a row per node layer).
fn write_rib_csv(path: &Path, g: &Graph, labels: &[Vec<FourierLabel>]) -> anyhow::Result<()> {
    let names: Vec<String> = g.layers.iter().map(|b| b.name.clone()).collect();
    let dims: Vec<usize> = g.layers.iter().map(|b| b.d_lib()).collect();
    crate::io::write_atomic(path, rib_csv(&names, &dims, labels).as_bytes())
}

/// Fourier labels of every LIB feature when the data is modular arithmetic.
pub fn fourier_labels(
    cfg: &RunConfig,
    model: &crate::models::Model,
    g: &Graph,
) -> anyhow::Result<Option<Vec<Vec<FourierLabel>>>> {
    let DataConfig::ModularArithmetic { modulus, op, .. } = &cfg.data else {
        return Ok(None);
    };
    let labelled: Vec<&crate::algorithm::NodeBasis> = g
        .layers
        .iter()
        .filter(|b| b.name != crate::models::OUTPUT)
        .collect();
    let mut labels = label_layers(model, &labelled, *modulus, *op)?.into_iter();
    Ok(Some(
        g.layers
            .iter()
            .map(|b| {
                if b.name == crate::models::OUTPUT {
                    Vec::new()
                } else {
                    labels.next().unwrap_or_default()
                }
            })
            .collect(),
    ))
}

/// The figures' and clustering's view of a graph: Lambda as importance, optional labels.
pub(crate) fn graph_view(g: &Graph, labels: Option<&[Vec<FourierLabel>]>) -> GraphView {
    GraphView {
        layers: g
            .layers
            .iter()
            .enumerate()
            .map(|(l, b)| LayerView {
                name: b.name.clone(),
                importance: if b.lambda.is_empty() {
                    vec![1.0; b.d_lib()]
                } else {
                    b.lambda.clone()
                },
                has_constant: b.has_constant,
                labels: labels
                    .and_then(|ls| ls.get(l))
                    .filter(|v| !v.is_empty())
                    .map(|v| v.iter().map(|f| f.label.clone()).collect()),
            })
            .collect(),
        edges: g.edges.clone(),
    }
}

/// Clusters the first graph, draws every figure into `fig_dir` and writes the report.
#[allow(clippy::too_many_arguments)]
pub fn write_full_report(
    html: &Path,
    cfg: &RunConfig,
    graphs: &[(&str, &Graph)],
    node_results: &[AblationResult],
    edge_results: &[AblationResult],
    fourier: Option<&[Vec<FourierLabel>]>,
    gamma: f64,
    delta: f64,
    fig_dir: &Path,
) -> anyhow::Result<Clusters> {
    std::fs::create_dir_all(fig_dir)
        .with_context(|| format!("cannot create {}", fig_dir.display()))?;
    let (lib_name, lib) = graphs[0];
    let lib_view = graph_view(lib, fourier);
    let clusters = cluster_graph(
        &lib_view,
        &ModularityOptions {
            gamma,
            seed: 0,
            norm: EdgeNorm::Sqrt,
        },
    )?;
    let mut sections = Vec::new();

    // Overview: dimensions and timings.
    let mut dims = Table {
        caption: "Node layers: original and kept dimensions per basis".into(),
        header: vec!["node layer".into(), "positions".into(), "original".into()],
        rows: vec![],
    };
    for (name, _) in graphs {
        dims.header.push(format!("{name} kept"));
    }
    for (l, b) in lib.layers.iter().enumerate() {
        let mut row = vec![b.name.clone(), b.pos.to_string(), b.d_orig.to_string()];
        for (_, g) in graphs {
            row.push(g.layers[l].d_lib().to_string());
        }
        dims.rows.push(row);
    }
    let timing = Table {
        caption: format!("Build time of the {lib_name} graph (seconds)"),
        header: vec!["stage".into(), "seconds".into()],
        rows: lib
            .timings
            .iter()
            .map(|(k, v)| vec![k.clone(), format!("{v:.3}")])
            .collect(),
    };
    sections.push(ReportSection {
        heading: "Run".into(),
        paragraphs: vec![
            format!("Model: {}.", cfg.model_path().display()),
            format!("Node layers: {}.", cfg.lib.node_layers.join(", ")),
            format!(
                "Basis formula {:?}, centring {}, tau {:e}, integration {:?}, edges {:?}.",
                cfg.lib.basis_formula,
                cfg.lib.center,
                cfg.lib.tau,
                cfg.lib.integration_rule,
                cfg.lib.edge_formula
            ),
        ],
        tables: vec![dims, timing],
        figures: vec![],
    });

    // Interaction graph.
    let title = format!(
        "{lib_name} interaction graph: {} modules, Q = {:.3}",
        clusters.n_clusters, clusters.q
    );
    let files = figures::draw_interaction_graph(
        &fig_dir.join("graph-lib"),
        &lib_view,
        Some(&clusters),
        &GraphDrawOptions {
            title: Some(title.clone()),
            group_by_cluster: true,
            ..Default::default()
        },
    )?;
    let sizes = clusters.sizes();
    sections.push(ReportSection {
        heading: "Interaction graph and modules".into(),
        paragraphs: vec![format!(
            "Leiden communities (resolution {gamma}, sqrt-normalised edges, constant feature excluded): {} modules, modularity Q = {:.4}. Module sizes: {:?}.",
            clusters.n_clusters,
            clusters.q,
            &sizes[..sizes.len().min(12)]
        )],
        tables: vec![],
        figures: vec![Figure::from_files(title, &files)],
    });

    // Ablation curves.
    if !node_results.is_empty() {
        let metric = node_results[0].metric.as_str();
        let mut figs = Vec::new();
        let mut table = Table {
            caption: format!("Fewest features within delta = {delta} of the unablated {metric}"),
            header: vec!["node layer".into()],
            rows: vec![],
        };
        for (name, _) in graphs.iter().take(node_results.len()) {
            table.header.push(name.to_string());
        }
        for b in lib
            .layers
            .iter()
            .filter(|b| b.name != crate::models::OUTPUT)
        {
            let curves: Vec<Curve> = graphs
                .iter()
                .zip(node_results)
                .filter_map(|((name, _), r)| {
                    r.node_layers.get(&b.name).map(|c| Curve {
                        label: name.to_string(),
                        n_kept: c.n_kept.clone(),
                        score: c.score.clone(),
                    })
                })
                .collect();
            if curves.is_empty() {
                // Not ablated (`ablate_node_layers` chose other layers).
                continue;
            }
            let stem = fig_dir.join(format!("ablation-{}", b.name.replace(['/', '.'], "_")));
            let f = figures::draw_ablation_curves(
                &stem,
                &b.name,
                &curves,
                node_results[0].baseline,
                metric,
            )?;
            figs.push(Figure::from_files(
                format!("Node ablation at {}", b.name),
                &f,
            ));
            let mut row = vec![b.name.clone()];
            for r in node_results {
                row.push(
                    fewest_within(r, &b.name, delta)
                        .map(|n| n.to_string())
                        .unwrap_or("-".into()),
                );
            }
            table.rows.push(row);
        }
        sections.push(ReportSection {
            heading: "Node ablation".into(),
            paragraphs: vec![format!(
                "Keep the n most important features of each basis at one node layer, run the rest of the model, measure test accuracy (unablated: {:.6}).",
                node_results[0].baseline
            )],
            tables: vec![table],
            figures: figs,
        });
    }
    if !edge_results.is_empty() {
        let mut table = Table {
            caption: "Fewest edges within delta of the unablated accuracy (bisection; edges from the constant feature always kept, not counted)".into(),
            header: vec!["edge matrix".into(), "total edges".into()],
            rows: vec![],
        };
        for (name, _) in graphs.iter().take(edge_results.len()) {
            table.header.push(name.to_string());
        }
        for (l, e) in lib.edges.iter().enumerate() {
            let key = format!("{}/{}", lib.layers[l].name, lib.layers[l + 1].name);
            let mut row = vec![key.clone(), (e.nrows() * e.ncols()).to_string()];
            for r in edge_results {
                row.push(
                    r.edges_required
                        .get(&key)
                        .map(|n| n.to_string())
                        .unwrap_or("-".into()),
                );
            }
            table.rows.push(row);
        }
        sections.push(ReportSection {
            heading: "Edge ablation".into(),
            paragraphs: vec![],
            tables: vec![table],
            figures: vec![],
        });
    }

    // Spectra and edge mass.
    let spectra = spectra_series(graphs);
    let mut mass = Vec::new();
    for (name, g) in graphs {
        for (l, e) in g.edges.iter().enumerate() {
            let mut v: Vec<f64> = e
                .col_iter()
                .flat_map(|c| c.iter().copied().collect::<Vec<_>>())
                .collect();
            v.sort_by(|a, b| b.total_cmp(a));
            mass.push((
                format!("{name} {}->{}", g.layers[l].name, g.layers[l + 1].name),
                v,
            ));
        }
    }
    let mut figs = Vec::new();
    if !spectra.is_empty() {
        let f = figures::draw_spectra(&fig_dir.join("spectra"), &spectra)?;
        figs.push(Figure::from_files(
            "Lambda (LIB) and eigenvalue (PCA) spectra",
            &f,
        ));
    }
    if !mass.is_empty() {
        let f = figures::draw_edge_mass(&fig_dir.join("edge-mass"), &mass)?;
        figs.push(Figure::from_files(
            "Sorted edge mass: fraction of the total held by the top edges",
            &f,
        ));
    }
    sections.push(ReportSection {
        heading: "Spectra and edge mass".into(),
        paragraphs: vec![],
        tables: vec![],
        figures: figs,
    });

    // Fourier labels.
    if let Some(labels) = fourier {
        let mut table = Table {
            caption: "Leading LIB features: Fourier power split and dominant frequency (k_a, k_b)"
                .into(),
            header: vec![
                "node layer".into(),
                "feature".into(),
                "Lambda".into(),
                "const".into(),
                "a".into(),
                "b".into(),
                "cross".into(),
                "dominant".into(),
            ],
            rows: vec![],
        };
        for (l, ls) in labels.iter().enumerate() {
            for (j, f) in ls.iter().enumerate().take(12) {
                let (ka, kb, frac) = f.dominant.first().copied().unwrap_or((0, 0, 0.0));
                table.rows.push(vec![
                    lib.layers[l].name.clone(),
                    j.to_string(),
                    format!(
                        "{:.4e}",
                        lib.layers[l].lambda.get(j).copied().unwrap_or(0.0)
                    ),
                    format!("{:.3}", f.constant),
                    format!("{:.3}", f.a),
                    format!("{:.3}", f.b),
                    format!("{:.3}", f.cross),
                    format!("({ka}, {kb}) {:.0}%", 100.0 * frac),
                ]);
            }
        }
        sections.push(ReportSection {
            heading: "Fourier labels".into(),
            paragraphs: vec!["Each LIB feature's activation over all p^2 input pairs (summed over positions), 2-D DFT; fractions of its power in the constant, pure-a, pure-b and cross terms.".into()],
            tables: vec![table],
            figures: vec![],
        });
    }
    write_report(
        html,
        &Report {
            title: format!("ibasis report: {}", cfg.model_path().display()),
            sections,
        },
    )?;
    Ok(clusters)
}

/// Whether every rotated node layer of `g` is a permutation of the neurons (the `neuron` basis:
/// 0/1 entries, one 1 per column), whatever the graph is called.
pub fn is_neuron_basis(g: &Graph) -> bool {
    let mut any = false;
    for c in g.layers.iter().filter_map(|b| b.c.as_ref()) {
        any = true;
        for col in c.col_iter() {
            let ones = col.iter().filter(|&&v| v == 1.0).count();
            if ones != 1 || col.iter().any(|&v| v != 0.0 && v != 1.0) {
                return false;
            }
        }
    }
    any
}

/// The Lambda (LIB) and eigenvalue (PCA) spectra of `graphs`, one series per node layer; the
/// neuron basis (told apart by its matrices, not its name) has none worth plotting.
pub fn spectra_series(graphs: &[(&str, &Graph)]) -> Vec<(String, Vec<f64>)> {
    let mut spectra = Vec::new();
    for (name, g) in graphs {
        if is_neuron_basis(g) {
            continue;
        }
        for b in &g.layers {
            if !b.lambda.is_empty() {
                spectra.push((format!("{name} {}", b.name), b.lambda.clone()));
            }
        }
    }
    spectra
}

/// `ibasis report --graph DIR [--graph DIR ...] --out report.html`: the report of built graphs,
/// with the ablation results found inside them (`DIR/ablation-nodes`, `DIR/ablation-edges`).
pub fn report_from_dirs(
    dirs: &[PathBuf],
    out: &Path,
    gamma: f64,
    delta: f64,
) -> anyhow::Result<()> {
    anyhow::ensure!(!dirs.is_empty(), "give at least one --graph folder");
    let mut loaded = Vec::new();
    for d in dirs {
        let (g, s) = Graph::load(d)?;
        loaded.push((
            d.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            g,
            s,
        ));
    }
    let cfg: RunConfig =
        serde_json::from_value(super::ablate::strip_extras(loaded[0].2.config.clone()))
            .context("graph.json has no usable build config")?;
    let read = |d: &Path, kind: &str| -> Option<AblationResult> {
        let text = std::fs::read_to_string(d.join(kind).join("ablation.json")).ok()?;
        serde_json::from_str(&text).ok()
    };
    let nodes: Vec<AblationResult> = dirs
        .iter()
        .map_while(|d| read(d, "ablation-nodes"))
        .collect();
    let edges: Vec<AblationResult> = dirs
        .iter()
        .map_while(|d| read(d, "ablation-edges"))
        .collect();
    let model = load_model(&cfg.model)?;
    let fourier = fourier_labels(&cfg, &model, &loaded[0].1)?;
    let graphs: Vec<(&str, &Graph)> = loaded.iter().map(|(n, g, _)| (n.as_str(), g)).collect();
    let fig_dir = out.with_extension("figures");
    write_full_report(
        out,
        &cfg,
        &graphs,
        &nodes,
        &edges,
        fourier.as_deref(),
        gamma,
        delta,
        &fig_dir,
    )?;
    Ok(())
}

/// A few lines for a person.
pub fn describe(s: &PipelineSummary) -> String {
    let mut out = format!(
        "model {}: unablated test {} {:.6}\n",
        s.model, s.metric, s.baseline
    );
    out += "fewest features within delta (lib / pca / neuron):\n";
    for (layer, per) in &s.features_required {
        let v: Vec<String> = per
            .iter()
            .map(|(_, n)| n.map(|n| n.to_string()).unwrap_or("-".into()))
            .collect();
        out += &format!("  {layer:<10} {}\n", v.join(" / "));
    }
    out += "fewest edges within delta (lib / pca):\n";
    for (m, per) in &s.edges_required {
        let v: Vec<String> = per.iter().map(|(_, n)| n.to_string()).collect();
        out += &format!("  {m:<18} {}\n", v.join(" / "));
    }
    for (layer, ks) in &s.frequencies {
        let ks: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
        out += &format!("key Fourier frequencies at {layer}: {}\n", ks.join(", "));
    }
    out += &format!(
        "Leiden: {} modules, Q = {:.4}\n",
        s.n_modules, s.modularity_q
    );
    let t: Vec<String> = s
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    out += &format!("time: {}\n", t.join(", "));
    out += &format!("report: {}\n", s.report.display());
    out += &format!("explorer: {}", s.explorer.display());
    out
}
