//! Recognising sections with analytic structure (method.md section 11): a per-position linear
//! map, or a single elementwise (or gated) nonlinearity between linear maps. Those get
//! closed-form bases and edges; everything else goes through batched VJPs and JVPs.

use crate::models::transformer::attention::AttnOut;
use crate::models::{Activation, Module, Structure};
use crate::tensor::linalg::mm;
use faer::Mat;

pub enum Shape {
    /// `y = x W` at every position.
    Linear(Mat<f64>),
    /// `y = act(x W1) W2` at every position, `act` acting on the first `act.width` columns of
    /// `x W1` (the identity on the rest).
    Dense {
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
    },
    /// `y = (act(x W1_g) * (x W1_u), x W1_x) W2` at every position (SwiGLU beside the carried
    /// residual): `W1`'s columns are `act.width` gates, `act.width` ups, then the carried
    /// features; `W2`'s rows are the `act.width` gated units, then the carried features.
    Gated {
        w1: Mat<f64>,
        act: PartialAct,
        w2: Mat<f64>,
    },
    General,
}

/// An activation on the first `width` features, the identity on the rest.
#[derive(Clone, Copy, Debug)]
pub struct PartialAct {
    pub act: Activation,
    pub width: usize,
}

impl PartialAct {
    /// `dbar = sum_p w_p act'(a_p z)` per entry of `z` (1 on the identity columns).
    pub fn integrated_derivative(&self, z: &Mat<f64>, points: &[(f64, f64)]) -> Mat<f64> {
        let mut d = Mat::<f64>::ones(z.nrows(), z.ncols());
        for j in 0..self.width.min(z.ncols()) {
            let (zc, dc) = (z.col_as_slice(j), d.col_as_slice_mut(j));
            for (dv, &zv) in dc.iter_mut().zip(zc) {
                *dv = points
                    .iter()
                    .map(|&(a, w)| w * self.act.derivative(a * zv))
                    .sum();
            }
        }
        d
    }
}

pub fn classify(modules: &[Box<dyn Module>]) -> Shape {
    let mut pre: Option<Mat<f64>> = None;
    let mut dense: Option<(Mat<f64>, PartialAct)> = None;
    let mut post: Option<Mat<f64>> = None;
    let mut gated = false;
    let chain = |acc: Option<Mat<f64>>, w: faer::MatRef<'_, f64>| match acc {
        None => w.to_owned(),
        Some(a) => mm(a.as_ref(), w),
    };
    for m in modules {
        if m.is_identity() {
            continue;
        }
        let materialised = m.fixed_linear().then(|| materialise(m.as_ref()));
        let structure = match &materialised {
            Some(w) => Structure::Linear(w.as_ref()),
            None => m.structure(),
        };
        match structure {
            Structure::Linear(w) => {
                if dense.is_none() {
                    pre = Some(chain(pre, w));
                } else {
                    post = Some(chain(post, w));
                }
            }
            Structure::Dense { w, act } => {
                if dense.is_some() {
                    return Shape::General;
                }
                let width = w.ncols();
                dense = Some((chain(pre.take(), w), PartialAct { act, width }));
            }
            Structure::Elementwise { act, width } | Structure::Gated { act, width } => {
                if dense.is_some() {
                    return Shape::General;
                }
                let w = pre
                    .take()
                    .unwrap_or_else(|| Mat::identity(m.in_features(), m.in_features()));
                dense = Some((w, PartialAct { act, width }));
                gated = matches!(structure, Structure::Gated { .. });
            }
            Structure::NormVar { .. }
            | Structure::NormOut { .. }
            | Structure::Attention(_)
            | Structure::General => return Shape::General,
        }
    }
    match (pre, dense) {
        (Some(w), None) => Shape::Linear(w),
        (None, Some((w1, act))) if gated => {
            let width = w1.ncols() - act.width;
            let w2 = post.unwrap_or_else(|| Mat::identity(width, width));
            Shape::Gated { w1, act, w2 }
        }
        (None, Some((w1, act))) => {
            let w2 = post.unwrap_or_else(|| Mat::identity(w1.ncols(), w1.ncols()));
            Shape::Dense { w1, act, w2 }
        }
        _ => Shape::General,
    }
}

/// The matrix `W` (`in x out`) of a module whose VJP and JVP are one fixed linear map
/// ([`Module::fixed_linear`]): row `i` is the JVP of the unit tangent `e_i`.
pub fn materialise(m: &dyn Module) -> Mat<f64> {
    let d = m.in_features();
    let x = crate::tensor::Batch::zeros(1, 1, 1, d);
    let (_, cache) = m.forward(&x);
    let t = crate::tensor::Batch::new(1, d, 1, Mat::identity(d, d));
    m.jvp(&cache, &t).data
}

/// A norm in front of a per-position MLP: `lnX -> lnX_out` (keeping the residual, no affine
/// weights of its own), then `act(y W1) W2` or a gated unit, where `y` is the normalised
/// residual (method.md section 9's two halves of a layer norm or RMS norm).
#[derive(Clone, Copy, Debug)]
pub struct NormPrefix {
    /// Side-stream features before the residual.
    pub carried: usize,
    /// `R`, the residual with its bias coordinate last.
    pub width: usize,
    pub centre: bool,
    pub eps: f64,
}

/// Recognises `norm -> MLP` sections: the two norm halves, then modules [`classify`] reads as
/// dense or gated, whose first linear map reads the residual streams only through its
/// pass-through columns (so the carried part of the Jacobian is the same on every row).
pub fn norm_mlp(modules: &[Box<dyn Module>]) -> Option<(NormPrefix, Shape)> {
    let (norm, second) = norm_halves(modules)?;
    let NormPrefix { carried, width, .. } = norm;
    let shape = classify(&modules[second + 1..]);
    let (w1, pre) = match &shape {
        Shape::Dense { w1, act, .. } => (w1, act.width),
        Shape::Gated { w1, act, .. } => (w1, 2 * act.width),
        _ => return None,
    };
    // `W1`'s rows: `y` (R), then the carried streams and the residual; the unit columns first.
    if w1.nrows() != 2 * width + carried || w1.ncols() < pre || y_feeds(w1, width, pre) {
        return None;
    }
    Some((norm, shape))
}

/// Whether the normalised residual `y` (the first `width - 1` rows of `w`) feeds any column
/// from `col` on.
fn y_feeds(w: &Mat<f64>, width: usize, col: usize) -> bool {
    (0..width - 1).any(|i| (col..w.ncols()).any(|j| w[(i, j)] != 0.0))
}

/// A norm in front of causal attention over every query (`ln1.k -> ln2.k`): the two norm
/// halves, fixed linear maps (`attn_in`'s q/k/v projection, `w`, `(y, c, x) -> (q, k, v, x)`),
/// the attention module (the `at`-th of the section), then fixed linear maps only (`suffix`,
/// `(attn, x) -> ` the next node layer: the residual add).
pub struct NormAttention<'a> {
    pub norm: NormPrefix,
    pub w: Mat<f64>,
    pub attn: &'a AttnOut,
    pub at: usize,
    pub suffix: Mat<f64>,
}

/// Recognises `norm -> attention` sections whose projection reads the normalised residual into
/// `q, k, v` only (so the residual's tangent passes through on every row alike).
pub fn norm_attention(modules: &[Box<dyn Module>]) -> Option<NormAttention<'_>> {
    let (norm, second) = norm_halves(modules)?;
    let at = (second + 1..modules.len())
        .find(|&i| matches!(modules[i].structure(), Structure::Attention(_)))?;
    let Structure::Attention(attn) = modules[at].structure() else {
        return None;
    };
    let fixed = |ms: &[Box<dyn Module>]| -> Option<Option<Mat<f64>>> {
        let mut acc: Option<Mat<f64>> = None;
        for m in ms.iter().filter(|m| !m.is_identity()) {
            if !m.fixed_linear() {
                return None;
            }
            let w = materialise(m.as_ref());
            acc = Some(match acc {
                None => w,
                Some(a) => mm(a.as_ref(), w.as_ref()),
            });
        }
        Some(acc)
    };
    let w = fixed(&modules[second + 1..at])??;
    let suffix = fixed(&modules[at + 1..])?.unwrap_or_else(|| {
        let d = attn.out_features();
        Mat::identity(d, d)
    });
    let (width, f) = (norm.width, attn.fqkv());
    let fits = !attn.last_pos
        && w.nrows() == 2 * width + norm.carried
        && w.ncols() == f + attn.resid
        && suffix.nrows() == attn.out_features();
    (fits && !y_feeds(&w, width, f)).then_some(NormAttention {
        norm,
        w,
        attn,
        at,
        suffix,
    })
}

/// The two halves of a norm (`lnX`, `lnX_out` keeping the residual) at the start of a section:
/// the norm, and the index of its second half.
fn norm_halves(modules: &[Box<dyn Module>]) -> Option<(NormPrefix, usize)> {
    let active: Vec<usize> = (0..modules.len())
        .filter(|&i| !modules[i].is_identity())
        .collect();
    let (&first, &second) = (active.first()?, active.get(1)?);
    let Structure::NormVar {
        carried,
        width,
        centre,
    } = modules[first].structure()
    else {
        return None;
    };
    let Structure::NormOut {
        carried: c2,
        width: w2,
        centre: ce2,
        eps,
        keep_resid: true,
    } = modules[second].structure()
    else {
        return None;
    };
    if (c2, w2, ce2) != (carried, width, centre) {
        return None;
    }
    Some((
        NormPrefix {
            carried,
            width,
            centre,
            eps,
        },
        second,
    ))
}
