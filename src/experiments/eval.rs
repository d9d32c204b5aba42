//! Evaluating a model: accuracy and mean cross-entropy of the class read at the last position,
//! optionally with a node layer replaced by a projection (the ablations of method.md section 10).

use crate::algorithm::pass::fold;
use crate::data::Dataset;
use crate::models::Model;
use crate::tensor::Batch;
use faer::Mat;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub accuracy: f64,
    pub loss: f64,
}

/// A change to the activations at one module's input, applied during evaluation.
pub struct Intervention<'a> {
    /// Module index whose input is replaced.
    pub index: usize,
    /// Maps the activation rows at that node layer.
    pub apply: &'a (dyn Fn(&Batch) -> Batch + Sync),
}

/// Accuracy and mean cross-entropy of the logits at the last position against the labels.
pub fn evaluate(
    model: &Model,
    data: &dyn Dataset,
    intervention: Option<&Intervention<'_>>,
    batch: usize,
) -> Score {
    let end = model.modules.len();
    let (correct, loss, n) = fold(
        data,
        batch,
        "evaluating",
        || (0.0f64, 0.0f64, 0.0f64),
        |acc, _, range| {
            let labels = data.labels(range.clone());
            let x = data.inputs(range);
            let y = match intervention {
                None => model.run(x, 0, end),
                Some(iv) => {
                    let h = model.run(x, 0, iv.index);
                    model.run((iv.apply)(&h), iv.index, end)
                }
            };
            let (c, l) = score_logits(&y, &labels);
            acc.0 += c;
            acc.1 += l;
            acc.2 += labels.len() as f64;
        },
        |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2),
    );
    Score {
        accuracy: correct / n,
        loss: loss / n,
    }
}

/// Number correct and summed cross-entropy, reading each sample's last position.
pub fn score_logits(y: &Batch, labels: &[usize]) -> (f64, f64) {
    let mut correct = 0.0;
    let mut loss = 0.0;
    for (x, &label) in labels.iter().enumerate() {
        let row = y.row(x, 0, y.pos - 1);
        let logits: Vec<f64> = (0..y.features()).map(|j| y.data[(row, j)]).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        loss += lse - logits[label];
        let argmax = (0..logits.len()).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
        if argmax == label {
            correct += 1.0;
        }
    }
    (correct, loss)
}

/// `f -> f P` for a projection matrix `P` (e.g. `C_k C_pinv`).
pub fn project(f: &Batch, p: &Mat<f64>) -> Batch {
    Batch::new(
        f.n,
        f.r,
        f.pos,
        crate::tensor::linalg::mm(f.data.as_ref(), p.as_ref()),
    )
}
