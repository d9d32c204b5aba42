//! Evaluating a model: accuracy and mean cross-entropy of the class read at the last position,
//! or, for language models, of every next token; optionally with a node layer replaced by a
//! projection (the ablations of method.md section 10).

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

/// Logits per batch at most (rows x vocabulary): a language model's logits over a large
/// vocabulary would otherwise dominate memory (64 x 128 tokens x 49152 f64 = 3.2 GB).
const MAX_LOGITS: usize = 1 << 24;

/// Samples per batch for evaluating `model` on `data`: at most `batch`, fewer where the
/// logits would exceed [`MAX_LOGITS`].
pub fn eval_batch(model: &Model, data: &dyn Dataset, batch: usize) -> usize {
    let pos = data.inputs(0..1.min(data.len())).pos.max(1);
    let vocab = model.modules.last().map_or(1, |m| m.out_features()).max(1);
    batch.min(MAX_LOGITS / (pos * vocab)).max(1)
}

/// Accuracy and mean cross-entropy of the logits against the data's targets (the class at the
/// last position, or every next token for text).
pub fn evaluate(
    model: &Model,
    data: &dyn Dataset,
    intervention: Option<&Intervention<'_>>,
    batch: usize,
) -> Score {
    let end = model.modules.len();
    let (correct, loss, n) = fold(
        data,
        eval_batch(model, data, batch),
        "evaluating",
        || (0.0f64, 0.0f64, 0.0f64),
        |acc, _, range| {
            let targets = Targets::of(data, range.clone());
            let x = data.inputs(range);
            let y = match intervention {
                None => model.run(x, 0, end),
                Some(iv) => {
                    let h = model.run(x, 0, iv.index);
                    model.run((iv.apply)(&h), iv.index, end)
                }
            };
            let (c, l, count) = score_logits(&y, &targets);
            acc.0 += c;
            acc.1 += l;
            acc.2 += count;
        },
        |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2),
    );
    Score {
        accuracy: correct / n,
        loss: loss / n,
    }
}

/// What a batch's logits are scored against.
pub enum Targets {
    /// One class per sample, read at the last position.
    Labels(Vec<usize>),
    /// Language modelling: position `t < pos - 1` of every sample predicts the input token at
    /// `t + 1` (`tokens` in rows `(sample, position)`, the inputs themselves).
    NextTokens { tokens: Vec<usize>, pos: usize },
}

impl Targets {
    /// The targets of samples `range`.
    pub fn of(data: &dyn Dataset, range: std::ops::Range<usize>) -> Self {
        if data.next_token_targets() {
            let x = data.inputs(range);
            Targets::NextTokens {
                tokens: x.data.col(0).iter().map(|&t| t as usize).collect(),
                pos: x.pos,
            }
        } else {
            Targets::Labels(data.labels(range))
        }
    }
}

/// Number correct, summed cross-entropy and number of predictions scored.
pub fn score_logits(y: &Batch, targets: &Targets) -> (f64, f64, f64) {
    let mut correct = 0.0;
    let mut loss = 0.0;
    let mut count = 0.0;
    let mut score = |row: usize, label: usize| {
        let logits = y.data.row(row);
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        loss += lse - logits[label];
        let argmax = (0..logits.ncols()).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
        if argmax == label {
            correct += 1.0;
        }
        count += 1.0;
    };
    match targets {
        Targets::Labels(labels) => {
            for (x, &label) in labels.iter().enumerate() {
                score(y.row(x, 0, y.pos - 1), label);
            }
        }
        Targets::NextTokens { tokens, pos } => {
            assert_eq!(
                y.pos, *pos,
                "next-token scoring needs logits at every position (no last_pos_module_type)"
            );
            for x in 0..y.n {
                for t in 0..pos.saturating_sub(1) {
                    score(y.row(x, 0, t), tokens[x * pos + t + 1]);
                }
            }
        }
    }
    (correct, loss, count)
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
