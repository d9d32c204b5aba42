//! Recognising sections with analytic structure (method.md section 11): a per-position linear
//! map, or a single elementwise nonlinearity between linear maps. Those get closed-form bases
//! and edges; everything else goes through batched VJPs and JVPs.

use crate::models::{Activation, Module, Structure};
use crate::tensor::linalg::mm;
use faer::Mat;

pub enum Shape {
    /// `y = x W` at every position.
    Linear(Mat<f64>),
    /// `y = act(x W1) W2` at every position.
    Dense {
        w1: Mat<f64>,
        act: Activation,
        w2: Mat<f64>,
    },
    General,
}

pub fn classify(modules: &[Box<dyn Module>]) -> Shape {
    let mut pre: Option<Mat<f64>> = None;
    let mut dense: Option<(Mat<f64>, Activation)> = None;
    let mut post: Option<Mat<f64>> = None;
    let chain = |acc: Option<Mat<f64>>, w: faer::MatRef<'_, f64>| match acc {
        None => w.to_owned(),
        Some(a) => mm(a.as_ref(), w),
    };
    for m in modules {
        match m.structure() {
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
                dense = Some((chain(pre.take(), w), act));
            }
            Structure::General => return Shape::General,
        }
    }
    match (pre, dense) {
        (Some(w), None) => Shape::Linear(w),
        (None, Some((w1, act))) => {
            let w2 = post.unwrap_or_else(|| Mat::identity(w1.ncols(), w1.ncols()));
            Shape::Dense { w1, act, w2 }
        }
        _ => Shape::General,
    }
}
