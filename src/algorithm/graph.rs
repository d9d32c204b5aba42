//! The result of a build: a basis per node layer and edges between adjacent node layers, saved
//! as `graph.safetensors` (f64 tensors) plus `graph.json` (what a person or a script reads first).

use crate::io::weights::{load_safetensors, serialize_safetensors, Tensors};
use crate::io::write_files_as_one;
use crate::tensor::HostTensor;
use anyhow::Context;
use faer::Mat;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The basis of one node layer (method.md section 4). `c = None` means the neuron basis
/// (identity), as for an unrotated `output`.
#[derive(Clone, Debug)]
pub struct NodeBasis {
    pub name: String,
    /// Original dimension, bias coordinate included.
    pub d_orig: usize,
    /// Positions per sample at this node layer.
    pub pos: usize,
    pub mean: Vec<f64>,
    /// The Gram matrix the basis was computed from (centred when centring).
    pub gram: Mat<f64>,
    pub c: Option<Mat<f64>>,
    pub c_pinv: Option<Mat<f64>>,
    pub w: Option<Mat<f64>>,
    pub w_pinv: Option<Mat<f64>>,
    pub v: Option<Mat<f64>>,
    /// Importance of each basis direction, in basis order.
    pub lambda: Vec<f64>,
    /// Leading directions held fixed (constant direction, LN variance).
    pub n_masked: usize,
    /// Whether direction 0 is the constant direction.
    pub has_constant: bool,
}

impl NodeBasis {
    /// Node layer `name` in neuron coordinates (no basis yet, nothing accumulated): the start
    /// of a build's basis, and of stand-ins that set only the fields they need.
    pub fn neuron(name: &str, d_orig: usize, pos: usize) -> Self {
        Self {
            name: name.to_string(),
            d_orig,
            pos,
            mean: Vec::new(),
            gram: Mat::zeros(0, 0),
            c: None,
            c_pinv: None,
            w: None,
            w_pinv: None,
            v: None,
            lambda: Vec::new(),
            n_masked: 0,
            has_constant: false,
        }
    }

    /// LIB dimension (number of basis directions).
    pub fn d_lib(&self) -> usize {
        self.c.as_ref().map(|c| c.ncols()).unwrap_or(self.d_orig)
    }
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub layers: Vec<NodeBasis>,
    /// `edges[l]` between node layers `l` and `l + 1`, shape `(d_lib[l + 1], d_lib[l])`.
    pub edges: Vec<Mat<f64>>,
    /// `(stage, seconds)`.
    pub timings: Vec<(String, f64)>,
}

/// `graph.json`: everything but the big tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GraphSummary {
    pub ibasis_version: String,
    pub config: serde_json::Value,
    pub node_layers: Vec<LayerSummary>,
    pub edges: Vec<EdgeSummary>,
    pub timings: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerSummary {
    pub name: String,
    pub d_orig: usize,
    pub d_lib: usize,
    pub positions: usize,
    pub n_masked: usize,
    pub has_constant: bool,
    /// Up to 10 leading importances.
    pub leading_lambda: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EdgeSummary {
    pub in_layer: String,
    pub out_layer: String,
    pub shape: [usize; 2],
    pub total: f64,
}

impl Graph {
    pub fn summary(&self, config: serde_json::Value) -> GraphSummary {
        GraphSummary {
            ibasis_version: env!("CARGO_PKG_VERSION").to_string(),
            config,
            node_layers: self
                .layers
                .iter()
                .map(|b| LayerSummary {
                    name: b.name.clone(),
                    d_orig: b.d_orig,
                    d_lib: b.d_lib(),
                    positions: b.pos,
                    n_masked: b.n_masked,
                    has_constant: b.has_constant,
                    leading_lambda: b.lambda.iter().take(10).copied().collect(),
                })
                .collect(),
            edges: self
                .edges
                .iter()
                .enumerate()
                .map(|(l, e)| EdgeSummary {
                    in_layer: self.layers[l].name.clone(),
                    out_layer: self.layers[l + 1].name.clone(),
                    shape: [e.nrows(), e.ncols()],
                    total: e.col_iter().map(|c| c.iter().sum::<f64>()).sum(),
                })
                .collect(),
            timings: self.timings.clone(),
        }
    }

    /// Writes `dir/graph.safetensors` and `dir/graph.json` as one result (see
    /// [`write_files_as_one`]).
    pub fn save(&self, dir: &Path, config: serde_json::Value) -> anyhow::Result<()> {
        let mut t = Tensors::new();
        for b in &self.layers {
            let n = &b.name;
            t.insert(
                format!("mean/{n}"),
                HostTensor::new(vec![b.mean.len()], b.mean.clone()),
            );
            t.insert(format!("gram/{n}"), HostTensor::from_mat(&b.gram));
            for (key, m) in [
                ("C", &b.c),
                ("C_pinv", &b.c_pinv),
                ("W", &b.w),
                ("W_pinv", &b.w_pinv),
                ("V", &b.v),
            ] {
                if let Some(m) = m {
                    t.insert(format!("{key}/{n}"), HostTensor::from_mat(m));
                }
            }
            if !b.lambda.is_empty() {
                t.insert(
                    format!("Lambda/{n}"),
                    HostTensor::new(vec![b.lambda.len()], b.lambda.clone()),
                );
            }
        }
        for (l, e) in self.edges.iter().enumerate() {
            let key = format!("edges/{}/{}", self.layers[l].name, self.layers[l + 1].name);
            t.insert(key, HostTensor::from_mat(e));
        }
        let summary = self.summary(config);
        let mut meta = std::collections::HashMap::new();
        meta.insert(
            "layers".to_string(),
            serde_json::to_string(&summary.node_layers)?,
        );
        let bytes = serialize_safetensors(&t, false, Some(meta))?;
        let json = serde_json::to_string_pretty(&summary)?;
        // One result: after a kill `dir` holds the old pair or the new one.
        write_files_as_one(
            dir,
            &[
                ("graph.safetensors", &bytes[..]),
                ("graph.json", json.as_bytes()),
            ],
        )
    }

    /// Reads a graph written by [`Graph::save`]; returns it with its summary.
    pub fn load(dir: &Path) -> anyhow::Result<(Graph, GraphSummary)> {
        let json_path = dir.join("graph.json");
        let text = std::fs::read_to_string(&json_path).with_context(|| {
            format!(
                "cannot read {} (build a graph first with `ibasis build`)",
                json_path.display()
            )
        })?;
        let summary: GraphSummary = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid graph.json", json_path.display()))?;
        let st_path = dir.join("graph.safetensors");
        let t = load_safetensors(&st_path)?;
        let mat = |key: String| -> anyhow::Result<Option<Mat<f64>>> {
            match t.get(&key) {
                None => Ok(None),
                Some(h) => Ok(Some(h.to_mat().with_context(|| {
                    format!("{}: `{key}` is not a matrix", st_path.display())
                })?)),
            }
        };
        let vec = |key: String| t.get(&key).map(|h| h.data.clone()).unwrap_or_default();
        let mut layers = Vec::new();
        for s in &summary.node_layers {
            let n = &s.name;
            layers.push(NodeBasis {
                name: n.clone(),
                d_orig: s.d_orig,
                pos: s.positions,
                mean: vec(format!("mean/{n}")),
                gram: mat(format!("gram/{n}"))?
                    .with_context(|| format!("{}: missing `gram/{n}`", st_path.display()))?,
                c: mat(format!("C/{n}"))?,
                c_pinv: mat(format!("C_pinv/{n}"))?,
                w: mat(format!("W/{n}"))?,
                w_pinv: mat(format!("W_pinv/{n}"))?,
                v: mat(format!("V/{n}"))?,
                lambda: vec(format!("Lambda/{n}")),
                n_masked: s.n_masked,
                has_constant: s.has_constant,
            });
        }
        let mut edges = Vec::new();
        for e in &summary.edges {
            let key = format!("edges/{}/{}", e.in_layer, e.out_layer);
            edges.push(
                mat(key.clone())?
                    .with_context(|| format!("{}: missing `{key}`", st_path.display()))?,
            );
        }
        Ok((
            Graph {
                layers,
                edges,
                timings: summary.timings.clone(),
            },
            summary,
        ))
    }
}
