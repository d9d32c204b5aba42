//! The interaction graph as figures and clustering read it: node layers with their features'
//! importance, and the squared edges between neighbouring layers.

use anyhow::ensure;
use faer::Mat;

/// One node layer of an interaction graph, as the algorithm hands it over.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerView {
    /// Node-layer name, e.g. `"mlp_in.0"`.
    pub name: String,
    /// Importance of each feature (LIB `Lambda`), descending.
    pub importance: Vec<f64>,
    /// Whether feature 0 is the constant (bias) feature, which has no place in the graph.
    pub has_constant: bool,
    /// Optional short label per feature (e.g. its Fourier frequency).
    pub labels: Option<Vec<String>>,
}

/// An interaction graph: node layers in order and the squared edges between neighbours.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphView {
    /// Node layers, input side first.
    pub layers: Vec<LayerView>,
    /// `edges[l]` has shape `(d_{l+1}, d_l)`, entries `>= 0`: `E[(i, j)]` joins feature `j` of
    /// layer `l` to feature `i` of layer `l + 1`.
    pub edges: Vec<Mat<f64>>,
}

impl GraphView {
    /// Checks counts, shapes, labels and that all numbers are finite (edges also `>= 0`).
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.edges.len() + 1 == self.layers.len()
                || (self.layers.is_empty() && self.edges.is_empty()),
            "{} edge matrices for {} node layers",
            self.edges.len(),
            self.layers.len()
        );
        for layer in &self.layers {
            ensure!(
                layer.importance.iter().all(|v| v.is_finite()),
                "layer {}: non-finite importance",
                layer.name
            );
            if let Some(labels) = &layer.labels {
                ensure!(
                    labels.len() == layer.importance.len(),
                    "layer {}: {} labels for {} features",
                    layer.name,
                    labels.len(),
                    layer.importance.len()
                );
            }
        }
        for (l, e) in self.edges.iter().enumerate() {
            let (d_in, d_out) = (
                self.layers[l].importance.len(),
                self.layers[l + 1].importance.len(),
            );
            ensure!(
                e.nrows() == d_out && e.ncols() == d_in,
                "edge matrix {l} is {}x{}, layers need {d_out}x{d_in}",
                e.nrows(),
                e.ncols()
            );
            for j in 0..e.ncols() {
                for i in 0..e.nrows() {
                    let v = e[(i, j)];
                    ensure!(
                        v.is_finite() && v >= 0.0,
                        "edge matrix {l} has entry ({i}, {j}) = {v}"
                    );
                }
            }
        }
        Ok(())
    }
}
