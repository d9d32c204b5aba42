//! Modular arithmetic: pairs `(a, b)` become tokens `[a, b, p]` with label `(a op b) mod p`
//! (reference.md). Pair index `a * p + b`, as in the reference's split file.

use super::Dataset;
use crate::tensor::Batch;
use anyhow::{bail, Context};
use faer::Mat;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::ops::Range;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModOp {
    Add,
    Subtract,
}

/// Which pairs a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
    All,
}

pub struct ModularArithmetic {
    pub modulus: usize,
    pub op: ModOp,
    /// Pair indices `a * p + b`, in order.
    pub pairs: Vec<usize>,
}

impl ModularArithmetic {
    pub fn label(&self, pair: usize) -> usize {
        let (p, a, b) = (self.modulus, pair / self.modulus, pair % self.modulus);
        match self.op {
            ModOp::Add => (a + b) % p,
            ModOp::Subtract => (a + p - b) % p,
        }
    }

    /// The train pairs: from a split file (one index per line) when given, else a seeded
    /// shuffle keeping `frac_train` of all pairs. Test = every other pair, ascending.
    pub fn new(
        modulus: usize,
        op: ModOp,
        split: Split,
        frac_train: f64,
        seed: u64,
        split_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        if modulus < 2 {
            bail!("modulus must be at least 2, got {modulus}");
        }
        let total = modulus * modulus;
        let train: Vec<usize> = match split_file {
            Some(path) => {
                let text = crate::io::read_text(path).context("split file")?;
                let mut v = Vec::new();
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let k: usize = line.trim().parse().with_context(|| {
                        format!("{}:{}: not a pair index: {line:?}", path.display(), i + 1)
                    })?;
                    if k >= total {
                        bail!(
                            "{}:{}: pair index {k} out of range for modulus {modulus}",
                            path.display(),
                            i + 1
                        );
                    }
                    v.push(k);
                }
                v
            }
            None => {
                if !(0.0..=1.0).contains(&frac_train) {
                    bail!("frac_train must be in [0, 1], got {frac_train}");
                }
                let mut all: Vec<usize> = (0..total).collect();
                all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
                all.truncate((frac_train * total as f64).round() as usize);
                all
            }
        };
        let pairs = match split {
            Split::Train => train,
            Split::All => (0..total).collect(),
            Split::Test => {
                let mut in_train = vec![false; total];
                for &k in &train {
                    in_train[k] = true;
                }
                (0..total).filter(|&k| !in_train[k]).collect()
            }
        };
        Ok(Self { modulus, op, pairs })
    }
}

impl Dataset for ModularArithmetic {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn inputs(&self, range: Range<usize>) -> Batch {
        let p = self.modulus;
        let pairs = &self.pairs[range];
        let data = Mat::from_fn(pairs.len() * 3, 1, |row, _| {
            let k = pairs[row / 3];
            match row % 3 {
                0 => (k / p) as f64,
                1 => (k % p) as f64,
                _ => p as f64,
            }
        });
        Batch::new(pairs.len(), 1, 3, data)
    }

    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.pairs[range].iter().map(|&k| self.label(k)).collect()
    }

    fn describe(&self) -> String {
        format!(
            "modular arithmetic p={} {:?}, {} pairs",
            self.modulus,
            self.op,
            self.pairs.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_labels() {
        let d = ModularArithmetic::new(7, ModOp::Add, Split::All, 1.0, 0, None).unwrap();
        assert_eq!(d.len(), 49);
        let x = d.inputs(10..12);
        // pair 10 = (1, 3)
        assert_eq!(
            (x.data[(0, 0)], x.data[(1, 0)], x.data[(2, 0)]),
            (1.0, 3.0, 7.0)
        );
        assert_eq!(d.labels(10..12), vec![4, 5]);
        let s = ModularArithmetic::new(7, ModOp::Subtract, Split::All, 1.0, 0, None).unwrap();
        assert_eq!(s.labels(10..11), vec![5]);
    }

    #[test]
    fn seeded_split_partitions_all_pairs() {
        let tr = ModularArithmetic::new(11, ModOp::Add, Split::Train, 0.3, 5, None).unwrap();
        let te = ModularArithmetic::new(11, ModOp::Add, Split::Test, 0.3, 5, None).unwrap();
        assert_eq!(tr.len(), 36);
        let mut all: Vec<usize> = tr.pairs.iter().chain(&te.pairs).copied().collect();
        all.sort();
        assert_eq!(all, (0..121).collect::<Vec<_>>());
    }
}
