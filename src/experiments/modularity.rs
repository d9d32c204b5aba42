//! Modularity of an interaction graph (section 10): an undirected weighted graph over all
//! non-constant features of all node layers, Leiden community detection at resolution `gamma`,
//! and Newman's modularity `Q` of the result.
//!
//! Community detection uses the `leiden-rs` crate (local moving, refinement, aggregation) with
//! its `rayon` feature off: the parallel local-moving path collapsed a dense graph into a single
//! community here, while the sequential path is deterministic for a fixed seed and recovers
//! planted partitions (see the tests). `Q` is recomputed by [`modularity`], written
//! independently of the crate, and the two are checked against each other.

use super::view::GraphView;
use anyhow::{bail, ensure, Context};

/// How squared edges `E >= 0` become graph weights `w >= 0` (the reference's edge norms).
/// Norms that divide by a matrix's sum or maximum take them over the whole matrix, constant
/// feature included, as the reference does before it drops the constant's edges.
#[derive(Clone, Debug, PartialEq)]
pub enum EdgeNorm {
    /// `w = E`.
    Identity,
    /// `w = sqrt(E)`: back to the scale of an attribution, so a few huge edges do not swamp
    /// the graph.
    Sqrt,
    /// `w = E / sum |E|`, per edge matrix.
    Abs,
    /// `w = E / max E`, per edge matrix.
    Max,
    /// `w = max(0, log10(E / eps_l))` with one `eps_l` per edge matrix (as the reference's
    /// by-layer log norm): edges below `eps_l` vanish, the rest count by orders of magnitude,
    /// which makes layers with very different edge scales comparable. `eps_l` is the smallest
    /// of the largest edges of matrix `l` that together hold `mass` (in (0, 1]) of its
    /// non-constant total: a stand-in for the smallest edge an edge-ablation bisection keeps.
    /// That edge itself gets weight exactly 0.
    LogByLayer {
        /// Fraction of each matrix's edge mass that keeps a positive weight, e.g. 0.99.
        mass: f64,
    },
    /// As [`EdgeNorm::LogByLayer`] with explicit `eps_l`, one per edge matrix (e.g. the
    /// smallest edge kept by an edge-ablation bisection).
    LogByLayerEps(Vec<f64>),
}

/// Settings of [`cluster_graph`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModularityOptions {
    /// Resolution `gamma` of the modularity (1 = Newman's); larger gives more, smaller clusters.
    pub gamma: f64,
    /// Seed of Leiden's random node order; equal seeds give equal clusters.
    pub seed: u64,
    /// How edges become weights.
    pub norm: EdgeNorm,
}

impl Default for ModularityOptions {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            seed: 0,
            norm: EdgeNorm::Sqrt,
        }
    }
}

/// An undirected weighted graph whose nodes are features `(layer, feature)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureGraph {
    /// `(layer index, feature index)` of each node, layer by layer, features ascending.
    pub nodes: Vec<(usize, usize)>,
    /// Undirected edges `(node a, node b, weight > 0)`, each listed once.
    pub edges: Vec<(usize, usize, f64)>,
}

/// Communities of the features of a [`GraphView`].
#[derive(Clone, Debug, PartialEq)]
pub struct Clusters {
    /// `(layer, feature)` of each graph node (all non-constant features).
    pub nodes: Vec<(usize, usize)>,
    /// Community of each graph node, in `0..n_clusters`; community 0 is the largest, ties
    /// broken by the earliest member.
    pub assignment: Vec<usize>,
    /// Community of each feature, indexed `[layer][feature]`; `None` for a constant feature.
    pub by_layer: Vec<Vec<Option<usize>>>,
    /// Number of communities.
    pub n_clusters: usize,
    /// Newman's modularity `Q` of the partition (resolution 1, whatever `gamma` found it: what
    /// the reference's networkit reports), from [`modularity`].
    pub q: f64,
    /// The objective Leiden maximised: the modularity at resolution `gamma` (equals `q` at
    /// `gamma = 1`; a single module scores `1 - gamma`).
    pub objective: f64,
    /// The resolution used.
    pub gamma: f64,
}

impl Clusters {
    /// The community of feature `feature` of layer `layer`; `None` for a constant or unknown
    /// feature.
    pub fn of(&self, layer: usize, feature: usize) -> Option<usize> {
        self.by_layer.get(layer)?.get(feature).copied().flatten()
    }

    /// Number of nodes in each community.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.n_clusters];
        for &c in &self.assignment {
            sizes[c] += 1;
        }
        sizes
    }
}

/// Builds the feature graph of `view`: a node per non-constant feature, an edge per positive
/// normalised entry of each edge matrix. Errors on shape mismatches or non-finite / negative
/// edges.
pub fn feature_graph(view: &GraphView, norm: &EdgeNorm) -> anyhow::Result<FeatureGraph> {
    view.validate()?;
    let mut node_of: Vec<Vec<Option<usize>>> = Vec::with_capacity(view.layers.len());
    let mut nodes = Vec::new();
    for (l, layer) in view.layers.iter().enumerate() {
        let first = usize::from(layer.has_constant);
        let mut ids = vec![None; layer.importance.len()];
        for (f, id) in ids.iter_mut().enumerate().skip(first) {
            *id = Some(nodes.len());
            nodes.push((l, f));
        }
        node_of.push(ids);
    }
    if let EdgeNorm::LogByLayerEps(eps) = norm {
        ensure!(
            eps.len() == view.edges.len(),
            "{} log-norm epsilons for {} edge matrices",
            eps.len(),
            view.edges.len()
        );
    }

    let mut edges = Vec::new();
    for (l, e) in view.edges.iter().enumerate() {
        let (ins, outs) = (&node_of[l], &node_of[l + 1]);
        let entries: Vec<(usize, usize, f64)> = (0..e.nrows())
            .filter_map(|i| outs[i].map(|b| (i, b)))
            .flat_map(|(i, b)| {
                (0..e.ncols()).filter_map(move |j| ins[j].map(|a| (a, b, e[(i, j)])))
            })
            .collect();
        let scale = match norm {
            EdgeNorm::Abs => e
                .col_iter()
                .map(|c| c.iter().map(|v| v.abs()).sum::<f64>())
                .sum(),
            EdgeNorm::Max => e
                .col_iter()
                .flat_map(|c| c.iter().copied())
                .fold(0.0, f64::max),
            _ => 1.0,
        };
        let log_eps = match norm {
            EdgeNorm::Identity | EdgeNorm::Sqrt | EdgeNorm::Abs | EdgeNorm::Max => None,
            EdgeNorm::LogByLayer { mass } => {
                ensure!(
                    *mass > 0.0 && *mass <= 1.0,
                    "log-norm mass {mass} outside (0, 1]"
                );
                let values: Vec<f64> = entries.iter().map(|t| t.2).collect();
                Some(mass_threshold(&values, *mass))
            }
            EdgeNorm::LogByLayerEps(eps) => {
                ensure!(
                    eps[l].is_finite() && eps[l] > 0.0,
                    "log-norm epsilon {} of edge matrix {l} is not positive",
                    eps[l]
                );
                Some(eps[l])
            }
        };
        for (a, b, v) in entries {
            let w = match (norm, log_eps) {
                (EdgeNorm::Sqrt, _) => v.sqrt(),
                // An all-zero matrix (scale 0) has no edges to keep.
                (EdgeNorm::Identity | EdgeNorm::Abs | EdgeNorm::Max, _) if scale > 0.0 => v / scale,
                (_, None) => 0.0,
                // An all-zero matrix has no threshold; nothing survives.
                (_, Some(eps)) if eps > 0.0 => (v / eps).log10().max(0.0),
                (_, Some(_)) => 0.0,
            };
            if w > 0.0 {
                edges.push((a, b, w));
            }
        }
    }
    Ok(FeatureGraph { nodes, edges })
}

/// The smallest value among the largest values of `values` (all `>= 0`) that together hold a
/// fraction `mass` of their sum; 0 when the sum is 0.
pub fn mass_threshold(values: &[f64], mass: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = sorted.iter().sum();
    let mut acc = 0.0;
    for &v in &sorted {
        acc += v;
        // A relative slack so `mass = 1` reaches the smallest edge despite rounding.
        if acc >= mass * total * (1.0 - 1e-12) {
            return v;
        }
    }
    sorted.last().copied().unwrap_or(0.0)
}

/// Newman's modularity with resolution `gamma` of the partition `assignment` (community per
/// node) of the undirected graph with `n` nodes and `edges` (each listed once; a self-loop
/// counts twice in its node's degree):
/// `Q = sum_c [ W_c / m - gamma * (K_c / 2m)^2 ]`, `W_c` the weight inside community `c`, `K_c`
/// its total degree, `m` the total weight. 0 for a graph without weight.
pub fn modularity(
    n: usize,
    edges: &[(usize, usize, f64)],
    assignment: &[usize],
    gamma: f64,
) -> f64 {
    assert_eq!(assignment.len(), n, "one community per node");
    let n_comm = assignment.iter().map(|c| c + 1).max().unwrap_or(0);
    let mut inside = vec![0.0; n_comm];
    let mut degree = vec![0.0; n_comm];
    let mut m = 0.0;
    for &(a, b, w) in edges {
        m += w;
        degree[assignment[a]] += w;
        degree[assignment[b]] += w;
        if assignment[a] == assignment[b] {
            inside[assignment[a]] += w;
        }
    }
    if m <= 0.0 {
        return 0.0;
    }
    inside
        .iter()
        .zip(&degree)
        .map(|(w_c, k_c)| w_c / m - gamma * (k_c / (2.0 * m)).powi(2))
        .sum()
}

/// Runs Leiden (modularity, resolution `gamma`, sequential, seeded) on `graph`. Returns the
/// community of each node, numbered by decreasing community size (ties: earliest member
/// first), and the quality `leiden-rs` reports for it. A graph without edges gives singletons
/// and quality 0.
pub fn leiden(graph: &FeatureGraph, gamma: f64, seed: u64) -> anyhow::Result<(Vec<usize>, f64)> {
    ensure!(
        gamma.is_finite() && gamma >= 0.0,
        "resolution gamma {gamma} must be finite and >= 0"
    );
    let n = graph.nodes.len();
    if graph.edges.is_empty() {
        return Ok(((0..n).collect(), 0.0));
    }
    let mut builder = leiden_rs::GraphDataBuilder::new(n);
    for &(a, b, w) in &graph.edges {
        if !(w.is_finite() && w >= 0.0) {
            bail!("edge ({a}, {b}) has weight {w}");
        }
        builder
            .add_edge(a, b, w)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("building the Leiden graph")?;
    }
    let data = builder.build().map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = leiden_rs::LeidenConfig::builder()
        .resolution(gamma)
        .seed(seed)
        .quality(leiden_rs::QualityType::Modularity)
        .build();
    let out = leiden_rs::Leiden::new(config)
        .run(&data)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("Leiden community detection")?;
    let raw: Vec<usize> = (0..n).map(|v| out.partition.community_of(v)).collect();
    Ok((renumber_by_size(&raw), out.quality))
}

/// Renames communities `0..` by decreasing size, ties by earliest member.
fn renumber_by_size(raw: &[usize]) -> Vec<usize> {
    let k = raw.iter().map(|c| c + 1).max().unwrap_or(0);
    let mut size = vec![0usize; k];
    let mut first = vec![usize::MAX; k];
    for (v, &c) in raw.iter().enumerate() {
        size[c] += 1;
        first[c] = first[c].min(v);
    }
    let mut order: Vec<usize> = (0..k).filter(|&c| size[c] > 0).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(size[c]), first[c]));
    let mut new_id = vec![usize::MAX; k];
    for (i, &c) in order.iter().enumerate() {
        new_id[c] = i;
    }
    raw.iter().map(|&c| new_id[c]).collect()
}

/// Clusters the non-constant features of `view` (section 10, modularity): builds the
/// [`feature_graph`], runs [`leiden`] and reports the communities and their modularity.
pub fn cluster_graph(view: &GraphView, opts: &ModularityOptions) -> anyhow::Result<Clusters> {
    let graph = feature_graph(view, &opts.norm)?;
    let (assignment, q_leiden) = leiden(&graph, opts.gamma, opts.seed)?;
    let objective = modularity(graph.nodes.len(), &graph.edges, &assignment, opts.gamma);
    // Both are the same formula; a gap means the partition or the graph was mistranslated.
    ensure!(
        (objective - q_leiden).abs() <= 1e-9 * objective.abs().max(1.0),
        "modularity {objective} disagrees with Leiden's {q_leiden}"
    );
    let q = modularity(graph.nodes.len(), &graph.edges, &assignment, 1.0);
    let mut by_layer: Vec<Vec<Option<usize>>> = view
        .layers
        .iter()
        .map(|l| vec![None; l.importance.len()])
        .collect();
    for (&(l, f), &c) in graph.nodes.iter().zip(&assignment) {
        by_layer[l][f] = Some(c);
    }
    Ok(Clusters {
        n_clusters: assignment.iter().map(|c| c + 1).max().unwrap_or(0),
        nodes: graph.nodes,
        assignment,
        by_layer,
        q,
        objective,
        gamma: opts.gamma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::view::LayerView;
    use faer::Mat;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `k` communities of `size` nodes; an edge with probability `p_in` inside and `p_out`
    /// across, weight uniform in [0.5, 1.5).
    fn planted(
        k: usize,
        size: usize,
        p_in: f64,
        p_out: f64,
        seed: u64,
    ) -> (FeatureGraph, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = k * size;
        let truth: Vec<usize> = (0..n).map(|v| v / size).collect();
        let mut edges = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let p = if truth[a] == truth[b] { p_in } else { p_out };
                if rng.random::<f64>() < p {
                    edges.push((a, b, rng.random_range(0.5..1.5)));
                }
            }
        }
        let nodes = (0..n).map(|v| (0, v)).collect();
        (FeatureGraph { nodes, edges }, truth)
    }

    fn choose2(x: f64) -> f64 {
        x * (x - 1.0) / 2.0
    }

    /// Adjusted Rand index (Hubert and Arabie) of two labelings.
    fn ari(a: &[usize], b: &[usize]) -> f64 {
        let ka = a.iter().max().map_or(0, |m| m + 1);
        let kb = b.iter().max().map_or(0, |m| m + 1);
        let mut table = vec![vec![0.0; kb]; ka];
        for (&x, &y) in a.iter().zip(b) {
            table[x][y] += 1.0;
        }
        let index: f64 = table.iter().flatten().map(|&c| choose2(c)).sum();
        let rows: f64 = table.iter().map(|r| choose2(r.iter().sum())).sum();
        let cols: f64 = (0..kb)
            .map(|j| choose2(table.iter().map(|r| r[j]).sum()))
            .sum();
        let expected = rows * cols / choose2(a.len() as f64);
        let max = 0.5 * (rows + cols);
        if max == expected {
            return 1.0;
        }
        (index - expected) / (max - expected)
    }

    #[test]
    fn ari_of_itself_and_of_relabelling_is_one() {
        let a = [0, 0, 1, 1, 2, 2];
        assert!((ari(&a, &a) - 1.0).abs() < 1e-12);
        assert!((ari(&a, &[2, 2, 0, 0, 1, 1]) - 1.0).abs() < 1e-12);
        assert!(ari(&a, &[0, 1, 2, 0, 1, 2]) < 0.1);
    }

    #[test]
    fn recovers_planted_partitions() {
        for seed in 0..5 {
            let (g, truth) = planted(4, 25, 0.5, 0.02, seed);
            let (found, _) = leiden(&g, 1.0, seed).unwrap();
            let score = ari(&truth, &found);
            assert!(score >= 0.9, "seed {seed}: ARI {score}");
        }
    }

    #[test]
    fn leiden_quality_equals_independent_modularity() {
        for (seed, gamma) in [(1, 1.0), (2, 0.5), (3, 2.0)] {
            let (g, truth) = planted(4, 25, 0.5, 0.02, seed);
            let (found, q_leiden) = leiden(&g, gamma, seed).unwrap();
            let q = modularity(g.nodes.len(), &g.edges, &found, gamma);
            assert!((q - q_leiden).abs() <= 1e-12, "{q} vs {q_leiden}");
            // Leiden should do at least as well as the planted partition.
            let q_truth = modularity(g.nodes.len(), &g.edges, &truth, gamma);
            assert!(q >= q_truth - 1e-9, "{q} < planted {q_truth}");
        }
    }

    #[test]
    fn modularity_of_two_triangles_by_hand() {
        // Two triangles joined by one edge, all weights 1: m = 7, each side K = 7, W = 3.
        let edges = [
            (0, 1, 1.0),
            (1, 2, 1.0),
            (0, 2, 1.0),
            (3, 4, 1.0),
            (4, 5, 1.0),
            (3, 5, 1.0),
            (2, 3, 1.0),
        ];
        let q = modularity(6, &edges, &[0, 0, 0, 1, 1, 1], 1.0);
        let expected = 2.0 * (3.0 / 7.0 - 0.25);
        assert!((q - expected).abs() < 1e-15);
        assert_eq!(modularity(6, &edges, &[0; 6], 1.0), 0.0);
    }

    #[test]
    fn fixed_seed_is_deterministic() {
        let (g, _) = planted(5, 20, 0.3, 0.05, 9);
        let first = leiden(&g, 1.0, 42).unwrap();
        for _ in 0..3 {
            assert_eq!(leiden(&g, 1.0, 42).unwrap(), first);
        }
    }

    fn layer(name: &str, d: usize, has_constant: bool) -> LayerView {
        LayerView {
            name: name.into(),
            importance: (0..d).map(|i| 1.0 / (i + 1) as f64).collect(),
            has_constant,
            labels: None,
        }
    }

    #[test]
    fn empty_and_edgeless_graphs_do_not_panic() {
        let empty = GraphView {
            layers: vec![],
            edges: vec![],
        };
        let c = cluster_graph(&empty, &ModularityOptions::default()).unwrap();
        assert_eq!((c.n_clusters, c.q), (0, 0.0));

        let edgeless = GraphView {
            layers: vec![layer("a", 3, true), layer("b", 4, true)],
            edges: vec![Mat::zeros(4, 3)],
        };
        for norm in [EdgeNorm::Sqrt, EdgeNorm::LogByLayer { mass: 0.99 }] {
            let opts = ModularityOptions {
                norm,
                ..Default::default()
            };
            let c = cluster_graph(&edgeless, &opts).unwrap();
            assert_eq!(c.nodes.len(), 5);
            assert_eq!(c.n_clusters, 5);
            assert_eq!(c.q, 0.0);
        }
    }

    #[test]
    fn q_is_newmans_at_any_resolution() {
        // One module: Newman's Q is 0 whatever the resolution; the resolution objective is
        // 1 - gamma (by hand: W/m = 1, K/2m = 1).
        let (g, _) = planted(3, 8, 0.9, 0.05, 4);
        let one = vec![0; g.nodes.len()];
        assert!(modularity(g.nodes.len(), &g.edges, &one, 1.0).abs() < 1e-12);
        assert!((modularity(g.nodes.len(), &g.edges, &one, 0.5) - 0.5).abs() < 1e-12);
        // A complete bipartite graph between two layers: at gamma 0.1 Leiden keeps one module.
        let view = GraphView {
            layers: vec![layer("a", 5, false), layer("b", 5, false)],
            edges: vec![Mat::from_fn(5, 5, |_, _| 1.0)],
        };
        let opts = ModularityOptions {
            gamma: 0.1,
            ..Default::default()
        };
        let c = cluster_graph(&view, &opts).unwrap();
        assert_eq!(c.n_clusters, 1);
        assert!(c.q.abs() < 1e-12, "Q {}", c.q);
        assert!(
            (c.objective - 0.9).abs() < 1e-12,
            "objective {}",
            c.objective
        );
        // Planted modules: Leiden's quality is the objective at gamma, which differs from
        // Newman's Q of the same partition.
        for gamma in [0.5, 2.0] {
            let (found, objective) = leiden(&g, gamma, 1).unwrap();
            let newman = modularity(g.nodes.len(), &g.edges, &found, 1.0);
            let at_gamma = modularity(g.nodes.len(), &g.edges, &found, gamma);
            assert!((objective - at_gamma).abs() < 1e-9);
            assert!(
                (newman - at_gamma).abs() > 1e-3,
                "gamma {gamma} should differ"
            );
        }
    }

    #[test]
    fn layered_blocks_cluster_across_layers_and_skip_the_constant() {
        // Three layers of 1 + 2*6 features; features 1..7 and 7..13 form two blocks wired only
        // to the same block of the next layer. The constant feature has huge edges everywhere.
        let d = 13;
        let block = |f: usize| (f - 1) / 6;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let edges: Vec<Mat<f64>> = (0..2)
            .map(|_| {
                Mat::from_fn(d, d, |i, j| {
                    if i == 0 || j == 0 {
                        100.0
                    } else if block(i) == block(j) {
                        rng.random_range(1.0..2.0)
                    } else {
                        1e-6
                    }
                })
            })
            .collect();
        let view = GraphView {
            layers: vec![
                layer("l0", d, true),
                layer("l1", d, true),
                layer("l2", d, true),
            ],
            edges,
        };
        for norm in [EdgeNorm::Sqrt, EdgeNorm::LogByLayer { mass: 0.99 }] {
            let opts = ModularityOptions {
                norm: norm.clone(),
                ..Default::default()
            };
            let c = cluster_graph(&view, &opts).unwrap();
            assert_eq!(c.nodes.len(), 3 * 12, "{norm:?}");
            assert_eq!(c.n_clusters, 2, "{norm:?}");
            assert!(c.q > 0.4, "{norm:?}: Q = {}", c.q);
            for l in 0..3 {
                assert_eq!(c.of(l, 0), None);
                for f in 1..d {
                    assert_eq!(c.of(l, f), c.of(0, 1 + 6 * block(f)), "{norm:?} {l} {f}");
                }
            }
        }
    }

    #[test]
    fn dense_layered_graph_keeps_its_modules() {
        // Every entry positive (as real edge matrices are), 3 x 80 nodes and ~13k edges: the
        // size where leiden-rs's parallel path had merged everything into one community.
        let (d, blocks) = (81, 4);
        let block = |f: usize| (f - 1) % blocks;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let edges: Vec<Mat<f64>> = (0..2)
            .map(|_| {
                Mat::from_fn(d, d, |i, j| {
                    let noise = rng.random_range(0.5..1.5);
                    match (i, j) {
                        (0, _) | (_, 0) => 50.0 * noise,
                        _ if block(i) == block(j) => noise,
                        _ => 0.02 * noise,
                    }
                })
            })
            .collect();
        let view = GraphView {
            layers: vec![
                layer("l0", d, true),
                layer("l1", d, true),
                layer("l2", d, true),
            ],
            edges,
        };
        for norm in [EdgeNorm::Sqrt, EdgeNorm::LogByLayer { mass: 0.9 }] {
            let opts = ModularityOptions {
                norm: norm.clone(),
                ..Default::default()
            };
            let c = cluster_graph(&view, &opts).unwrap();
            let truth: Vec<usize> = c.nodes.iter().map(|&(_, f)| block(f)).collect();
            let score = ari(&truth, &c.assignment);
            assert!(
                score >= 0.9,
                "{norm:?}: ARI {score}, {} clusters",
                c.n_clusters
            );
        }
    }

    #[test]
    fn log_norm_threshold_holds_the_requested_mass() {
        let values = [8.0, 4.0, 2.0, 1.0, 1.0];
        assert_eq!(mass_threshold(&values, 0.5), 8.0);
        assert_eq!(mass_threshold(&values, 0.75), 4.0);
        assert_eq!(mass_threshold(&values, 1.0), 1.0);
        assert_eq!(mass_threshold(&[0.0, 0.0], 0.9), 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let view = GraphView {
            layers: vec![layer("a", 3, false), layer("b", 4, false)],
            edges: vec![Mat::zeros(3, 3)],
        };
        assert!(cluster_graph(&view, &ModularityOptions::default()).is_err());
        let mut e = Mat::zeros(4, 3);
        e[(0, 0)] = f64::NAN;
        let view = GraphView {
            edges: vec![e],
            ..view
        };
        assert!(cluster_graph(&view, &ModularityOptions::default()).is_err());
    }
}
