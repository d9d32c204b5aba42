//! Multilayer perceptrons: each layer `layers.k` is `act(x W + b)`, held bias-folded as
//! `act([x, 1] W')` (method.md section 8), forward, VJP and JVP side by side.

use super::{broadcast_rows, Activation, Cache, InputKind, Model, Module, Structure};
use crate::tensor::linalg::gemm;
use crate::tensor::Batch;
use faer::{Accum, Mat, MatRef};

impl Activation {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                let u = GELU_TANH_C * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Activation::Silu => x * sigmoid(x),
        }
    }

    /// The derivative `act'(x)` (relu'(0) = 0, as in PyTorch).
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Gelu => {
                let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + x * phi
            }
            Activation::GeluTanh => {
                let u = GELU_TANH_C * (x + 0.044715 * x * x * x);
                let t = u.tanh();
                let du = GELU_TANH_C * (1.0 + 3.0 * 0.044715 * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            // d/dx x s(x) = s(x) + x s(x) (1 - s(x)).
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
        }
    }

    /// The root `r` of `act(r) = 1`: the value the folded bias column feeds the activation so
    /// that the layer's output keeps a constant 1 (method.md section 8).
    pub fn unit_root(self) -> f64 {
        match self {
            Activation::Identity | Activation::Relu => 1.0,
            _ => {
                // Newton from 1.0: act is convex-ish and increasing there, converges in a few steps.
                let mut r = 1.0;
                for _ in 0..100 {
                    let step = (self.apply(r) - 1.0) / self.derivative(r);
                    r -= step;
                    if step.abs() < 1e-16 {
                        break;
                    }
                }
                r
            }
        }
    }
}

/// `1 / (1 + e^-x)`, without overflow for large `|x|`.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

const GELU_TANH_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

/// The error function, to double precision (Maclaurin series below 2.5, Lentz's continued
/// fraction for erfc above); written here because std has no `erf` and no well-kept crate is worth a dependency for it.
pub fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 is only 1e-7; use the series / continued fraction instead.
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series: erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)).
        let mut term = ax;
        let mut sum = ax;
        let x2 = ax * ax;
        // |x| < 2.5: the terms fall below 1e-17 of the sum within 60 terms; the bound also
        // ends the loop for x = 0 (every term 0) and NaN (no comparison holds).
        for n in 1..100 {
            let n = n as f64;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc (Lentz), accurate for x >= 2.5.
        let x2 = ax * ax;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 * 0.5;
            d = ax + a * d;
            d = 1.0 / d;
            c = ax + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// One bias-folded MLP layer `y = act(x W)` with `W` of shape `(in + 1, out [+ 1])`.
pub struct Dense {
    pub id: String,
    pub w: Mat<f64>,
    pub act: Activation,
}

/// Pre-activations `z = x W`, rows `(sample, position)`.
struct DenseCache {
    z: Mat<f64>,
}

impl Dense {
    /// Folds `act(x W + b)` (`W` of shape `(in, out)`): the bias becomes the last row; unless
    /// `last`, a column `[0, ..., 0, r]` with `act(r) = 1` carries the constant 1 onwards.
    pub fn fold(id: &str, w: MatRef<'_, f64>, b: &[f64], act: Activation, last: bool) -> Self {
        let (din, dout) = (w.nrows(), w.ncols());
        assert_eq!(b.len(), dout);
        let cols = if last { dout } else { dout + 1 };
        let mut wf = Mat::zeros(din + 1, cols);
        for i in 0..din {
            for j in 0..dout {
                wf[(i, j)] = w[(i, j)];
            }
        }
        for j in 0..dout {
            wf[(din, j)] = b[j];
        }
        if !last {
            wf[(din, dout)] = act.unit_root();
        }
        Self {
            id: id.to_string(),
            w: wf,
            act,
        }
    }

    fn derivatives(&self, z: MatRef<'_, f64>) -> Mat<f64> {
        Mat::from_fn(z.nrows(), z.ncols(), |i, j| self.act.derivative(z[(i, j)]))
    }
}

impl Module for Dense {
    fn id(&self) -> &str {
        &self.id
    }
    fn in_features(&self) -> usize {
        self.w.nrows()
    }
    fn out_features(&self) -> usize {
        self.w.ncols()
    }

    fn forward(&self, x: &Batch) -> (Batch, Cache) {
        let mut z = Mat::zeros(x.rows(), self.w.ncols());
        gemm(z.as_mut(), Accum::Replace, x.data.as_ref(), self.w.as_ref());
        let y = Mat::from_fn(z.nrows(), z.ncols(), |i, j| self.act.apply(z[(i, j)]));
        (Batch::new(x.n, x.r, x.pos, y), Box::new(DenseCache { z }))
    }

    /// `dx = (dy * act'(z)) W^T`.
    fn vjp(&self, cache: &Cache, dy: &Batch) -> Batch {
        let c = cache.downcast_ref::<DenseCache>().expect("Dense cache");
        let mut g = dy.data.clone();
        if self.act != Activation::Identity {
            let d = broadcast_rows(self.derivatives(c.z.as_ref()).as_ref(), dy.n, dy.r, dy.pos);
            g = Mat::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] * d[(i, j)]);
        }
        let mut dx = Mat::zeros(g.nrows(), self.w.nrows());
        gemm(dx.as_mut(), Accum::Replace, g.as_ref(), self.w.transpose());
        Batch::new(dy.n, dy.r, dy.pos, dx)
    }

    /// `dy = act'(z) * (dx W)`.
    fn jvp(&self, cache: &Cache, dx: &Batch) -> Batch {
        let c = cache.downcast_ref::<DenseCache>().expect("Dense cache");
        let mut t = Mat::zeros(dx.rows(), self.w.ncols());
        gemm(
            t.as_mut(),
            Accum::Replace,
            dx.data.as_ref(),
            self.w.as_ref(),
        );
        if self.act != Activation::Identity {
            let d = broadcast_rows(self.derivatives(c.z.as_ref()).as_ref(), dx.n, dx.r, dx.pos);
            t = Mat::from_fn(t.nrows(), t.ncols(), |i, j| t[(i, j)] * d[(i, j)]);
        }
        Batch::new(dx.n, dx.r, dx.pos, t)
    }

    fn structure(&self) -> Structure<'_> {
        if self.act == Activation::Identity {
            Structure::Linear(self.w.as_ref())
        } else {
            Structure::Dense {
                w: self.w.as_ref(),
                act: self.act,
            }
        }
    }
}

/// Unfolded MLP weights: `layers[k] = (W [in, out], b [out])`.
pub struct MlpWeights {
    pub layers: Vec<(Mat<f64>, Vec<f64>)>,
    pub act: Activation,
}

impl MlpWeights {
    /// The folded model with modules `layers.0 .. layers.{K-1}`; the last layer has no
    /// activation (it produces logits).
    pub fn into_model(&self, name: &str) -> Model {
        let k = self.layers.len();
        let modules: Vec<Box<dyn Module>> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, (w, b))| {
                let last = i + 1 == k;
                let act = if last { Activation::Identity } else { self.act };
                Box::new(Dense::fold(
                    &format!("layers.{i}"),
                    w.as_ref(),
                    b,
                    act,
                    last,
                )) as Box<dyn Module>
            })
            .collect();
        Model {
            name: name.to_string(),
            input: InputKind::Features(self.layers[0].0.nrows() + 1),
            modules,
        }
    }

    /// Unfolded forward pass on raw features (no bias column), for testing the folding.
    pub fn forward_unfolded(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        let mut h = x.to_owned();
        let k = self.layers.len();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let z = &h * w;
            let act = if i + 1 == k {
                Activation::Identity
            } else {
                self.act
            };
            h = Mat::from_fn(z.nrows(), z.ncols(), |r, c| act.apply(z[(r, c)] + b[c]));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_tabulated_values_and_ends_on_zero_and_nan() {
        // Values to 16 digits (Abramowitz and Stegun table 7.1 / mpmath).
        for (x, v) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            // The alternating series near |x| = 2.5 loses a few ulps to cancellation.
            assert!((erf(x) - v).abs() <= 2e-15, "erf({x}) = {} vs {v}", erf(x));
            assert_eq!(erf(-x), -erf(x));
        }
        assert!(erf(f64::NAN).is_nan());
    }
}
