//! Activations and host tensors.
//!
//! Every activation, tangent or cotangent that flows through a model is a [`Batch`]: a dense
//! `faer::Mat<f64>` whose rows are `(sample, vector, position)` in that order (row index
//! `(x * r + v) * pos + s`) and whose columns are features. A forward pass has `r = 1`; a batched
//! vector-Jacobian or Jacobian-vector product carries `r` vectors per sample through the same
//! rows-as-positions layout, so per-position modules are a single GEMM over all rows.

pub mod linalg;
pub mod simd;

use faer::Mat;

/// A batch of per-position feature vectors, rows ordered `(sample, vector, position)`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Number of samples.
    pub n: usize,
    /// Vectors per sample (1 for activations; the number of tangents or cotangents otherwise).
    pub r: usize,
    /// Positions per vector.
    pub pos: usize,
    /// `(n * r * pos) x features`.
    pub data: Mat<f64>,
}

impl Batch {
    pub fn new(n: usize, r: usize, pos: usize, data: Mat<f64>) -> Self {
        assert_eq!(data.nrows(), n * r * pos, "Batch rows must be n * r * pos");
        Self { n, r, pos, data }
    }

    pub fn zeros(n: usize, r: usize, pos: usize, features: usize) -> Self {
        Self::new(n, r, pos, Mat::zeros(n * r * pos, features))
    }

    pub fn features(&self) -> usize {
        self.data.ncols()
    }

    pub fn rows(&self) -> usize {
        self.data.nrows()
    }

    /// Row index of `(sample, vector, position)`.
    #[inline]
    pub fn row(&self, x: usize, v: usize, s: usize) -> usize {
        (x * self.r + v) * self.pos + s
    }
}

/// A dense row-major tensor as read from or written to a file (checkpoints, results).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// A 2-D tensor as a matrix.
    pub fn to_mat(&self) -> Option<Mat<f64>> {
        match self.shape[..] {
            [r, c] => Some(Mat::from_fn(r, c, |i, j| self.data[i * c + j])),
            _ => None,
        }
    }

    pub fn from_mat(m: &Mat<f64>) -> Self {
        let (r, c) = (m.nrows(), m.ncols());
        let mut data = Vec::with_capacity(r * c);
        for i in 0..r {
            for j in 0..c {
                data.push(m[(i, j)]);
            }
        }
        Self::new(vec![r, c], data)
    }
}
