//! The result of a build: a basis per node layer and edges between adjacent node layers, saved
//! as `graph.safetensors` (f64 tensors) plus `graph.json` (what a person or a script reads first).

use crate::io::weights::load_safetensors;
use crate::io::write_as_one;
use anyhow::Context;
use faer::{Mat, MatRef};
use safetensors::{Dtype, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::Path;

/// One tensor of `graph.safetensors`, f64, row-major: its bytes are made when the writer
/// reaches it, so saving holds one tensor's bytes at a time, not the whole file twice (the
/// 61-layer SmolLM2 graph is 1.1 GB: the copies took that build's peak from ~3.2 GB to 6.1 GB).
#[derive(Clone, Copy)]
enum F64View<'a> {
    Vector(&'a [f64], [usize; 1]),
    Matrix(MatRef<'a, f64>, [usize; 2]),
}

impl<'a> F64View<'a> {
    fn vector(v: &'a [f64]) -> Self {
        F64View::Vector(v, [v.len()])
    }
    fn matrix(m: &'a Mat<f64>) -> Self {
        F64View::Matrix(m.as_ref(), [m.nrows(), m.ncols()])
    }
}

impl View for F64View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F64
    }
    fn shape(&self) -> &[usize] {
        match self {
            F64View::Vector(_, shape) => shape,
            F64View::Matrix(_, shape) => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let bytes: Vec<u8> = match self {
            F64View::Vector(v, _) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            F64View::Matrix(m, _) => (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).flat_map(move |j| m[(i, j)].to_le_bytes()))
                .collect(),
        };
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        match self {
            F64View::Vector(v, _) => v.len() * 8,
            F64View::Matrix(_, [r, c]) => r * c * 8,
        }
    }
}

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
    /// [`write_as_one`]).
    pub fn save(&self, dir: &Path, config: serde_json::Value) -> anyhow::Result<()> {
        let mut t: Vec<(String, F64View)> = Vec::new();
        for b in &self.layers {
            let n = &b.name;
            t.push((format!("mean/{n}"), F64View::vector(&b.mean)));
            t.push((format!("gram/{n}"), F64View::matrix(&b.gram)));
            for (key, m) in [
                ("C", &b.c),
                ("C_pinv", &b.c_pinv),
                ("W", &b.w),
                ("W_pinv", &b.w_pinv),
                ("V", &b.v),
            ] {
                if let Some(m) = m {
                    t.push((format!("{key}/{n}"), F64View::matrix(m)));
                }
            }
            if !b.lambda.is_empty() {
                t.push((format!("Lambda/{n}"), F64View::vector(&b.lambda)));
            }
        }
        for (l, e) in self.edges.iter().enumerate() {
            let key = format!("edges/{}/{}", self.layers[l].name, self.layers[l + 1].name);
            t.push((key, F64View::matrix(e)));
        }
        let summary = self.summary(config);
        let mut meta = std::collections::HashMap::new();
        meta.insert(
            "layers".to_string(),
            serde_json::to_string(&summary.node_layers)?,
        );
        let json = serde_json::to_string_pretty(&summary)?;
        // One result: after a kill `dir` holds the old pair or the new one.
        write_as_one(dir, &["graph.safetensors", "graph.json"], &|i, path| {
            let written = if i == 0 {
                // The crate writes through a private temporary file (mode 0600): give the
                // result the permissions a plain `File::create` gets here (the umask's).
                let perms = std::fs::File::create(path)
                    .and_then(|f| f.metadata())
                    .map(|m| m.permissions());
                perms.map_err(anyhow::Error::from).and_then(|perms| {
                    let views = t.iter().map(|(k, v)| (k, *v));
                    safetensors::serialize_to_file(views, Some(meta.clone()), path)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    std::fs::set_permissions(path, perms).map_err(Into::into)
                })
            } else {
                std::fs::write(path, json.as_bytes()).map_err(Into::into)
            };
            written.with_context(|| format!("cannot write {}", path.display()))
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed `graph.safetensors` holds every matrix row-major at its shape, readable by
    /// the safetensors crate's own parser, with the permissions of a plain new file.
    #[test]
    fn saved_tensors_are_the_graphs_matrices() {
        let m = |r: usize, c: usize, s: f64| Mat::from_fn(r, c, |i, j| s * (i as f64) - j as f64);
        let mut layers = Vec::new();
        for (k, name) in ["a", "b"].into_iter().enumerate() {
            let mut b = NodeBasis::neuron(name, 3 + k, 1);
            b.mean = vec![0.5, -1.0, 2.0];
            b.gram = m(3 + k, 3 + k, 1.5);
            b.c = Some(m(3 + k, 2, 0.25));
            b.lambda = vec![3.0, 1.0];
            layers.push(b);
        }
        let g = Graph {
            layers,
            edges: vec![m(2, 2, 7.0)],
            timings: vec![],
        };
        let dir = std::env::temp_dir().join(format!("ibasis-graph-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        g.save(&dir, serde_json::json!({})).unwrap();
        let path = dir.join("graph.safetensors");
        let t = load_safetensors(&path).unwrap();
        let check = |key: &str, want: &Mat<f64>| {
            let got = &t[key];
            assert_eq!(got.shape, vec![want.nrows(), want.ncols()], "{key}");
            for i in 0..want.nrows() {
                for j in 0..want.ncols() {
                    assert_eq!(got.data[i * want.ncols() + j], want[(i, j)], "{key}");
                }
            }
        };
        check("gram/b", &g.layers[1].gram);
        check("C/a", g.layers[0].c.as_ref().unwrap());
        check("edges/a/b", &g.edges[0]);
        assert_eq!(t["mean/a"].data, g.layers[0].mean);
        assert_eq!(t["Lambda/b"].data, g.layers[1].lambda);
        let plain = dir.join("plain");
        std::fs::write(&plain, b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions();
        assert_eq!(mode(&path), mode(&plain));
        let (back, _) = Graph::load(&dir).unwrap();
        assert_eq!(back.edges[0], g.edges[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
