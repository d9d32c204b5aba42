//! The model zoo: every model is a flat list of [`Module`]s, each owning its forward pass, its
//! batched vector-Jacobian product (VJP) and its Jacobian-vector product (JVP), written side by
//! side. A **node layer** named `m` is the input of module `m` (method.md section 9); the
//! **section** between two node layers is the run of modules between them.
//!
//! Biases are folded (method.md section 8): every activation that flows between modules ends
//! with a constant 1, so scaling a node layer's activation by `a -> 0` sends the section's output
//! to 0 and integrated gradients need no special case for biases.

pub mod mlp;
pub mod transformer;

use crate::tensor::Batch;
use faer::{Mat, MatRef};
use std::any::Any;

/// What a module kept from its forward pass for its VJP and JVP.
pub type Cache = Box<dyn Any + Send + Sync>;

/// Pointwise nonlinearities (method.md section 8 gives their bias-folding roots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Identity,
    Relu,
    /// Exact gelu, `x * Phi(x)`.
    Gelu,
    /// The tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// `x * sigmoid(x)` (Llama's SwiGLU gate).
    Silu,
}

/// Structure a module exposes so that the algorithm can take analytic shortcuts
/// (method.md section 11). `General` modules are handled through their VJP and JVP alone.
pub enum Structure<'a> {
    /// `y = x W` at every position independently, `W` of shape `(in, out)`.
    Linear(MatRef<'a, f64>),
    /// `y = act(x W)` at every position independently.
    Dense { w: MatRef<'a, f64>, act: Activation },
    /// `y_k = act(x_k)` for the first `width` features, `y_k = x_k` for the rest, at every
    /// position (an MLP activation carrying the residual stream alongside).
    Elementwise { act: Activation, width: usize },
    /// A gated unit (SwiGLU) at every position: input `(g, u, x)` (`width` gate and `width` up
    /// pre-activations, then carried features), output `(act(g) * u, x)`.
    Gated { act: Activation, width: usize },
    /// `lnX` (method.md section 9): input `(c, x)` (`carried` side-stream features, then the
    /// residual `x` of `width` features, bias last), output `(var, c, x)`, where
    /// `var = 1/D sum_{i<D} c_i^2` of the centred (`centre`) or raw non-bias coordinates.
    NormVar {
        carried: usize,
        width: usize,
        centre: bool,
    },
    /// `lnX_out` without affine weights: input `(var, c, x)`, output `(y, c, x)` (or `y` alone
    /// without `keep_resid`), `y_i = c_i (relu(var) + eps)^{-1/2}` for `i < D`, `y_D = x_D`.
    NormOut {
        carried: usize,
        width: usize,
        centre: bool,
        eps: f64,
        keep_resid: bool,
    },
    /// `attn_out` (method.md section 9): causal softmax attention, whose single-query form
    /// (`last_pos`) has a closed-form Jacobian (`algorithm::attention`).
    Attention(&'a transformer::attention::AttnOut),
    /// Anything else.
    General,
}

pub trait Module: Send + Sync {
    /// Module id, e.g. `layers.0`, `attn_in.0`, `unembed`.
    fn id(&self) -> &str;
    /// Features of the input (the node layer named after this module), bias coordinate included.
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Output positions for `in_pos` input positions.
    fn out_pos(&self, in_pos: usize) -> usize {
        in_pos
    }
    /// Forward pass of `x` (`x.r == 1`), keeping what the VJP and JVP need.
    fn forward(&self, x: &Batch) -> (Batch, Cache);
    /// Batched VJP at the cached point: `dy` holds `r` cotangents per sample on the output,
    /// the result the same `r` cotangents pulled back to the input.
    fn vjp(&self, cache: &Cache, dy: &Batch) -> Batch;
    /// Batched JVP at the cached point: `r` input tangents per sample pushed to the output.
    fn jvp(&self, cache: &Cache, dx: &Batch) -> Batch;
    /// The most positions per sample the module accepts (a learned position table's rows, a
    /// rotary table's length); `None` for no limit.
    fn max_positions(&self) -> Option<usize> {
        None
    }
    fn structure(&self) -> Structure<'_> {
        Structure::General
    }
    /// Whether the VJP and JVP are one fixed linear map applied to every row (position)
    /// independently, whatever the forward point: they never read the cache and keep the
    /// batch's `(n, r, pos)`. The algorithm may then push a few tangents or cotangents through
    /// once (with any cache) and reuse them for every sample.
    fn fixed_linear(&self) -> bool {
        false
    }
    /// Whether the module is one fixed linear map on inputs of a single position (as
    /// [`Module::fixed_linear`], which it defaults to; a last-position wrapper of a fixed
    /// linear module is one there, though it drops positions elsewhere).
    fn fixed_linear_at_one_position(&self) -> bool {
        self.fixed_linear()
    }
    /// Whether forward, VJP and JVP all return their input unchanged (a [`Section`] skips
    /// such modules instead of copying the batch).
    fn is_identity(&self) -> bool {
        false
    }
}

/// Wraps a module and hides its [`Structure`] (and its fixed-linear and identity flags), so
/// that the algorithm takes the general VJP / JVP path: a reference for checking the
/// closed-form shortcuts of method.md section 11 against.
pub struct Opaque(pub Box<dyn Module>);

impl Module for Opaque {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn out_pos(&self, in_pos: usize) -> usize {
        self.0.out_pos(in_pos)
    }
    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        self.0.forward(x)
    }
    fn vjp(&self, cache: &Cache, dy: &Batch) -> Batch {
        self.0.vjp(cache, dy)
    }
    fn jvp(&self, cache: &Cache, dx: &Batch) -> Batch {
        self.0.jvp(cache, dx)
    }
}

impl Model {
    /// The same model with every module [`Opaque`].
    pub fn opaque(self) -> Model {
        Model {
            name: self.name,
            input: self.input,
            modules: self
                .modules
                .into_iter()
                .map(|m| Box::new(Opaque(m)) as Box<dyn Module>)
                .collect(),
        }
    }
}

/// The raw input a model expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Real features with the bias 1 already appended (e.g. MNIST pixels / 255, then 1).
    Features(usize),
    /// Token ids stored as `f64` in a single feature column, one position per token.
    Tokens { vocab: usize },
}

/// A model: modules applied in order, from the raw input to the outputs (logits).
pub struct Model {
    pub name: String,
    pub input: InputKind,
    pub modules: Vec<Box<dyn Module>>,
}

/// Name of the pseudo node layer holding the model's outputs.
pub const OUTPUT: &str = "output";

impl Model {
    /// Index of the module whose input is node layer `name` (`modules.len()` for `output`).
    pub fn node_index(&self, name: &str) -> Option<usize> {
        if name == OUTPUT {
            return Some(self.modules.len());
        }
        self.modules.iter().position(|m| m.id() == name)
    }

    /// The model without the modules after node layer `last` (which keeps its own module, so
    /// that its name still resolves): what a build up to `last` reads. Unknown names and
    /// `output` keep everything.
    pub fn through(mut self, last: &str) -> Model {
        if let Some(i) = self.node_index(last) {
            self.modules.truncate(i + 1);
        }
        self
    }

    /// Feature dimension of node layer `index` (see [`Model::node_index`]).
    /// The module with the smallest position limit and that limit (see
    /// [`Module::max_positions`]).
    pub fn max_positions(&self) -> Option<(&str, usize)> {
        self.modules
            .iter()
            .filter_map(|m| m.max_positions().map(|p| (m.id(), p)))
            .min_by_key(|&(_, p)| p)
    }

    pub fn node_features(&self, index: usize) -> usize {
        match self.modules.get(index) {
            Some(m) => m.in_features(),
            None => self.modules.last().map(|m| m.out_features()).unwrap_or(0),
        }
    }

    /// All module ids, i.e. the valid node-layer names besides `output`.
    pub fn module_ids(&self) -> Vec<String> {
        self.modules.iter().map(|m| m.id().to_string()).collect()
    }

    /// Runs modules `from..to` on `x` without keeping caches.
    pub fn run(&self, x: Batch, from: usize, to: usize) -> Batch {
        self.modules[from..to]
            .iter()
            .fold(x, |x, m| m.forward(&x).0)
    }

    /// The section of modules `from..to`.
    pub fn section(&self, from: usize, to: usize) -> Section<'_> {
        Section {
            modules: &self.modules[from..to],
        }
    }
}

/// A run of consecutive modules, differentiated as one map.
pub struct Section<'a> {
    pub modules: &'a [Box<dyn Module>],
}

impl Section<'_> {
    pub fn forward(&self, x: &Batch) -> (Batch, Vec<Cache>) {
        let mut caches = Vec::with_capacity(self.modules.len());
        let mut y: Option<Batch> = None;
        for m in self.modules {
            if m.is_identity() {
                caches.push(Box::new(()) as Cache);
                continue;
            }
            let (next, cache) = m.forward(y.as_ref().unwrap_or(x));
            caches.push(cache);
            y = Some(next);
        }
        (y.unwrap_or_else(|| x.clone()), caches)
    }

    pub fn vjp(&self, caches: &[Cache], dy: &Batch) -> Batch {
        let mut g: Option<Batch> = None;
        for (m, c) in self.modules.iter().zip(caches).rev() {
            if !m.is_identity() {
                g = Some(m.vjp(c, g.as_ref().unwrap_or(dy)));
            }
        }
        g.unwrap_or_else(|| dy.clone())
    }

    pub fn jvp(&self, caches: &[Cache], dx: &Batch) -> Batch {
        let mut t: Option<Batch> = None;
        for (m, c) in self.modules.iter().zip(caches) {
            if !m.is_identity() {
                t = Some(m.jvp(c, t.as_ref().unwrap_or(dx)));
            }
        }
        t.unwrap_or_else(|| dx.clone())
    }

    /// The section split at `k`: modules `..k` and `k..`.
    pub fn split_at(&self, k: usize) -> (Section<'_>, Section<'_>) {
        let (a, b) = self.modules.split_at(k);
        (Section { modules: a }, Section { modules: b })
    }

    /// Number of leading modules that are [`Module::fixed_linear`] or identities.
    pub fn fixed_linear_prefix(&self) -> usize {
        self.modules
            .iter()
            .take_while(|m| m.fixed_linear() || m.is_identity())
            .count()
    }

    /// Number of trailing modules that are [`Module::fixed_linear`] or identities.
    pub fn fixed_linear_suffix(&self) -> usize {
        self.modules
            .iter()
            .rev()
            .take_while(|m| m.fixed_linear() || m.is_identity())
            .count()
    }

    /// Placeholder caches for `k` modules that never read theirs ([`Module::fixed_linear`]).
    pub fn no_caches(k: usize) -> Vec<Cache> {
        (0..k).map(|_| Box::new(()) as Cache).collect()
    }

    pub fn out_pos(&self, in_pos: usize) -> usize {
        self.modules.iter().fold(in_pos, |p, m| m.out_pos(p))
    }
}

/// Repeats each cached per-position row of `a` (rows `(sample, position)`) for the `r`
/// vectors of a batched product (rows `(sample, vector, position)`): the broadcast that every
/// per-position module's VJP and JVP needs.
pub fn broadcast_rows(a: MatRef<'_, f64>, n: usize, r: usize, pos: usize) -> Mat<f64> {
    Mat::from_fn(n * r * pos, a.ncols(), |row, j| {
        let s = row % pos;
        let x = row / (r * pos);
        a[(x * pos + s, j)]
    })
}
