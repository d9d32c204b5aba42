//! `ibasis modularity`: the reference's modularity recipe on a saved graph (method.md
//! section 10): one of its edge norms, optionally only the first features of each node layer,
//! Leiden at one or several resolutions `gamma` (or the resolution that gives a target number
//! of modules, as the reference's `target_n_clusters`), and a table of modules and Newman's `Q`
//! per resolution.

use super::ablate::AblationResult;
use super::modularity::{cluster_graph, Clusters, EdgeNorm, ModularityOptions};
use super::pipeline::graph_view;
use super::view::GraphView;
use crate::algorithm::Graph;
use anyhow::{bail, ensure, Context};
use faer::Mat;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// An edge norm as named on the command line.
#[derive(Clone, Debug, PartialEq)]
pub enum NormSpec {
    /// `identity`, `sqrt`, `abs`, `max`, `log:MASS`, `log-eps:E1,E2,..`: a norm in full.
    Fixed(EdgeNorm),
    /// `log-bisect:PATH`: the by-layer log norm with each matrix's epsilon the smallest edge an
    /// edge-ablation bisection kept (`PATH` = its `ablation.json`), the paper's recipe.
    LogBisect(PathBuf),
}

impl std::str::FromStr for NormSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let number = |t: &str| -> anyhow::Result<f64> {
            t.trim()
                .parse::<f64>()
                .with_context(|| format!("edge norm `{s}`: `{t}` is not a number"))
        };
        Ok(match (name, arg) {
            ("identity", "") => Self::Fixed(EdgeNorm::Identity),
            ("sqrt", "") => Self::Fixed(EdgeNorm::Sqrt),
            ("abs", "") => Self::Fixed(EdgeNorm::Abs),
            ("max", "") => Self::Fixed(EdgeNorm::Max),
            ("log", mass) if !mass.is_empty() => Self::Fixed(EdgeNorm::LogByLayer {
                mass: number(mass)?,
            }),
            ("log-eps", list) if !list.is_empty() => Self::Fixed(EdgeNorm::LogByLayerEps(
                list.split(',').map(number).collect::<anyhow::Result<_>>()?,
            )),
            ("log-bisect", path) if !path.is_empty() => Self::LogBisect(PathBuf::from(path)),
            _ => bail!("unknown edge norm `{s}`; expected identity, sqrt, abs, max, log:MASS, log-eps:E1,E2,.. or log-bisect:ABLATION_JSON"),
        })
    }
}

/// What `ibasis modularity` runs.
#[derive(Clone, Debug)]
pub struct ClusteringRequest {
    pub norm: NormSpec,
    /// Resolutions to sweep (ignored with `target_n_clusters`).
    pub gammas: Vec<f64>,
    /// Find the resolution that gives this many modules of two or more features instead.
    pub target_n_clusters: Option<usize>,
    /// Keep only the first `n` features (by Lambda, the constant included) of each node layer.
    pub nodes_per_layer: Option<usize>,
    pub seed: u64,
}

/// One resolution's modules.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    pub gamma: f64,
    pub n_modules: usize,
    /// Modules with more than one feature.
    pub n_multi: usize,
    /// Newman's modularity (resolution 1) of the partition.
    pub q: f64,
    /// The objective at `gamma` that Leiden maximised.
    pub objective: f64,
    /// Sizes of the largest modules (up to 10).
    pub largest: Vec<usize>,
}

impl SweepRow {
    fn of(c: &Clusters) -> Self {
        let sizes = c.sizes();
        Self {
            gamma: c.gamma,
            n_modules: c.n_clusters,
            n_multi: sizes.iter().filter(|&&s| s > 1).count(),
            q: c.q,
            objective: c.objective,
            largest: sizes.into_iter().take(10).collect(),
        }
    }
}

/// Runs the request on the graph saved in `dir`.
pub fn run_clustering(dir: &Path, req: &ClusteringRequest) -> anyhow::Result<Vec<SweepRow>> {
    let (graph, _) = Graph::load(dir)?;
    let full = graph_view(&graph, None);
    let norm = match &req.norm {
        NormSpec::Fixed(n) => n.clone(),
        NormSpec::LogBisect(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let result: AblationResult = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an ablation.json", path.display()))?;
            EdgeNorm::LogByLayerEps(
                eps_from_bisection(&graph, &result)
                    .with_context(|| format!("epsilons from {}", path.display()))?,
            )
        }
    };
    let view = match req.nodes_per_layer {
        Some(n) => first_features(&full, n)?,
        None => full,
    };
    let opts = |gamma: f64| ModularityOptions {
        gamma,
        seed: req.seed,
        norm: norm.clone(),
    };
    if let Some(k) = req.target_n_clusters {
        let c = gamma_for_modules(&view, k, &|g| cluster_graph(&view, &opts(g)))?;
        return Ok(vec![SweepRow::of(&c)]);
    }
    ensure!(!req.gammas.is_empty(), "no resolution gamma given");
    req.gammas
        .iter()
        .map(|&g| Ok(SweepRow::of(&cluster_graph(&view, &opts(g))?)))
        .collect()
}

/// Per edge matrix, the smallest edge a bisection kept, the constant's edges left out where the
/// graph has a constant feature (the reference's `ByLayerLogEdgeNorm.from_bisect_results`).
pub fn eps_from_bisection(graph: &Graph, result: &AblationResult) -> anyhow::Result<Vec<f64>> {
    graph
        .edges
        .iter()
        .enumerate()
        .map(|(l, e)| {
            let (b_in, b_out) = (&graph.layers[l], &graph.layers[l + 1]);
            let key = format!("{}/{}", b_in.name, b_out.name);
            let kept = result.kept_edges.get(&key).with_context(|| {
                format!(
                    "no bisection result for edges {key} (run the edge bisection on every matrix)"
                )
            })?;
            let skip_in = usize::from(b_in.has_constant);
            let skip_out = usize::from(b_out.has_constant);
            let mut eps = f64::INFINITY;
            for &[i, j] in kept {
                ensure!(
                    i < e.nrows() && j < e.ncols(),
                    "edges {key}: kept edge ({i}, {j}) outside the {}x{} matrix",
                    e.nrows(),
                    e.ncols()
                );
                if i >= skip_out && j >= skip_in {
                    eps = eps.min(e[(i, j)]);
                }
            }
            ensure!(
                eps.is_finite() && eps > 0.0,
                "edges {key}: the bisection kept no positive edge between non-constant features"
            );
            Ok(eps)
        })
        .collect()
}

/// The first `n` features of every node layer and the edges among them.
pub fn first_features(view: &GraphView, n: usize) -> anyhow::Result<GraphView> {
    ensure!(n >= 1, "nodes per layer must be at least 1");
    let mut out = view.clone();
    for layer in &mut out.layers {
        layer.importance.truncate(n);
        if let Some(labels) = &mut layer.labels {
            labels.truncate(n);
        }
    }
    for (l, e) in out.edges.iter_mut().enumerate() {
        let (d_in, d_out) = (
            out.layers[l].importance.len(),
            out.layers[l + 1].importance.len(),
        );
        *e = Mat::from_fn(d_out, d_in, |i, j| e[(i, j)]);
    }
    Ok(out)
}

/// The resolution at which Leiden finds `k` modules of two or more features (features left
/// without edges by the norm stay singletons at every resolution, so they are not counted).
/// The count rises with gamma and falls again once modules break into singletons, so: a scan
/// of 61 resolutions `10^(-3 + i / 10)`, and where the count steps over `k` between two of
/// them, bisection on `log gamma` (30 tries); errors with the counts seen when none gives `k`.
fn gamma_for_modules(
    view: &GraphView,
    k: usize,
    cluster: &dyn Fn(f64) -> anyhow::Result<Clusters>,
) -> anyhow::Result<Clusters> {
    let nodes: usize = view
        .layers
        .iter()
        .map(|l| l.importance.len() - usize::from(l.has_constant))
        .sum();
    ensure!(
        k >= 1 && 2 * k <= nodes,
        "target_n_clusters {k} outside 1..={} (modules of 2+ of the graph's {nodes} non-constant features)",
        nodes / 2
    );
    let multi = |c: &Clusters| c.sizes().iter().filter(|&&s| s > 1).count();
    let mut seen: Vec<(f64, usize)> = Vec::new();
    let mut prev: Option<(f64, usize)> = None;
    for i in 0..=60 {
        let log_g = (-3.0 + i as f64 / 10.0) * std::f64::consts::LN_10;
        let c = cluster(log_g.exp())?;
        let m = multi(&c);
        seen.push((c.gamma, m));
        if m == k {
            return Ok(c);
        }
        let bracket = prev.filter(|&(_, m_lo)| m_lo < k && k < m);
        if let Some((mut lo, _)) = bracket {
            let mut hi = log_g;
            for _ in 0..30 {
                let mid = 0.5 * (lo + hi);
                let c = cluster(mid.exp())?;
                let m = multi(&c);
                seen.push((c.gamma, m));
                match m.cmp(&k) {
                    std::cmp::Ordering::Equal => return Ok(c),
                    std::cmp::Ordering::Less => lo = mid,
                    std::cmp::Ordering::Greater => hi = mid,
                }
            }
        }
        prev = Some((log_g, m));
    }
    seen.sort_by(|a, b| a.0.total_cmp(&b.0));
    seen.dedup_by_key(|t| t.1);
    bail!("no resolution gave {k} modules of 2+ features; (gamma, modules) where the count changed: {seen:?}")
}

/// The sweep as a Markdown table.
pub fn sweep_table(rows: &[SweepRow]) -> String {
    let mut s = String::from(
        "| gamma | modules | modules of 2+ features | Newman Q | objective at gamma | largest modules |\n|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:?} |\n",
            r.gamma, r.n_modules, r.n_multi, r.q, r.objective, r.largest
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::NodeBasis;
    use crate::experiments::view::LayerView;

    fn layer(name: &str, d: usize) -> LayerView {
        LayerView {
            name: name.into(),
            importance: (0..d).map(|i| (d - i) as f64).collect(),
            has_constant: true,
            labels: None,
        }
    }

    #[test]
    fn norms_parse_and_bad_ones_are_named() {
        assert_eq!(
            "sqrt".parse::<NormSpec>().unwrap(),
            NormSpec::Fixed(EdgeNorm::Sqrt)
        );
        assert_eq!(
            "log-eps:0.5,2".parse::<NormSpec>().unwrap(),
            NormSpec::Fixed(EdgeNorm::LogByLayerEps(vec![0.5, 2.0]))
        );
        assert_eq!(
            "log:0.99".parse::<NormSpec>().unwrap(),
            NormSpec::Fixed(EdgeNorm::LogByLayer { mass: 0.99 })
        );
        for bad in ["cube", "log", "log-eps:1,x", "sqrt:3", "log-bisect:"] {
            let e = bad.parse::<NormSpec>().unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn first_features_keeps_the_leading_block() {
        let view = GraphView {
            layers: vec![layer("a", 4), layer("b", 3)],
            edges: vec![Mat::from_fn(3, 4, |i, j| (10 * i + j) as f64)],
        };
        let v = first_features(&view, 2).unwrap();
        assert_eq!(v.layers[0].importance, vec![4.0, 3.0]);
        assert_eq!(v.edges[0].shape(), (2, 2));
        assert_eq!(v.edges[0][(1, 1)], 11.0);
    }

    #[test]
    fn bisection_epsilon_is_the_smallest_kept_non_constant_edge() {
        let basis = |name: &str, d: usize| NodeBasis {
            c: Some(Mat::identity(d, d)),
            c_pinv: Some(Mat::identity(d, d)),
            lambda: vec![1.0; d],
            n_masked: 1,
            has_constant: true,
            ..NodeBasis::neuron(name, d, 1)
        };
        let e = Mat::from_fn(3, 3, |i, j| (1 + 3 * i + j) as f64);
        let graph = Graph {
            layers: vec![basis("a", 3), basis("b", 3)],
            edges: vec![e],
            timings: vec![],
        };
        let mut result = AblationResult::default();
        // (0, 0) = 1 touches the constant; the smallest kept non-constant edge is (1, 2) = 6.
        result
            .kept_edges
            .insert("a/b".into(), vec![[2, 2], [0, 0], [1, 2], [2, 1]]);
        assert_eq!(eps_from_bisection(&graph, &result).unwrap(), vec![6.0]);
        result.kept_edges.insert("a/b".into(), vec![[0, 1]]);
        assert!(eps_from_bisection(&graph, &result).is_err());
        result.kept_edges.clear();
        let e = eps_from_bisection(&graph, &result).unwrap_err().to_string();
        assert!(e.contains("a/b"), "{e}");
    }

    #[test]
    fn target_module_count_is_found_on_planted_blocks() {
        // Two layers of 1 + 12 features in three blocks of four wired only within the block:
        // three modules exist at some resolution.
        let block = |f: usize| (f - 1) / 4;
        let view = GraphView {
            layers: vec![layer("a", 13), layer("b", 13)],
            edges: vec![Mat::from_fn(13, 13, |i, j| {
                if i == 0 || j == 0 {
                    5.0
                } else if block(i) == block(j) {
                    1.0 + 0.01 * ((i * 7 + j) % 5) as f64
                } else {
                    1e-3
                }
            })],
        };
        let norm = EdgeNorm::Identity;
        let c = gamma_for_modules(&view, 3, &|g| {
            cluster_graph(
                &view,
                &ModularityOptions {
                    gamma: g,
                    seed: 3,
                    norm: norm.clone(),
                },
            )
        })
        .unwrap();
        assert_eq!(c.n_clusters, 3);
        for (&(l, f), &m) in c.nodes.iter().zip(&c.assignment) {
            let peer = c.of(1 - l, f).unwrap();
            assert_eq!(m, peer, "feature {f} of layer {l} and its twin");
        }
        assert!(gamma_for_modules(&view, 99, &|_| unreachable!()).is_err());
    }
}
