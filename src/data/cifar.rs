//! CIFAR-10 in its binary format: `data_batch_{1..5}.bin` (train) and `test_batch.bin`, each a
//! run of 3073-byte records: a label byte 0-9, then 1024 red, 1024 green and 1024 blue pixels
//! (each channel row-major 32 x 32).
//!
//! Inputs are one row per image: the 3072 pixels / 255 in file order (channel, row, column),
//! then a constant 1, so `pos = 1` and 3073 features. Pixels stay `u8` in memory.

use super::mnist::pixel_batch;
use super::Dataset;
use crate::tensor::Batch;
use anyhow::{bail, Context};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Pixels per image: 3 channels of 32 x 32.
pub const CIFAR_PIXELS: usize = 3 * 32 * 32;
const RECORD: usize = 1 + CIFAR_PIXELS;

/// CIFAR-10 images with labels 0-9.
pub struct Cifar10 {
    /// `len * CIFAR_PIXELS` bytes, image after image.
    pixels: Vec<u8>,
    labels: Vec<u8>,
    source: String,
}

impl Cifar10 {
    /// Loads the training split (every `data_batch_<k>.bin` in `dir`, by `k`) or the test split
    /// (`test_batch.bin`). `dir` may also be the folder holding `cifar-10-batches-bin/`, as the
    /// official archive unpacks.
    pub fn load(dir: &Path, train: bool) -> anyhow::Result<Self> {
        let nested = dir.join("cifar-10-batches-bin");
        let dir = if nested.is_dir() { &nested } else { dir };
        let files: Vec<PathBuf> = if train {
            let entries = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list folder {}", dir.display()))?;
            let mut numbered: Vec<(u32, PathBuf)> = Vec::new();
            for entry in entries {
                let path = entry
                    .with_context(|| format!("cannot list folder {}", dir.display()))?
                    .path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let k = name
                    .strip_prefix("data_batch_")
                    .and_then(|s| s.strip_suffix(".bin"))
                    .and_then(|s| s.parse::<u32>().ok());
                if let Some(k) = k {
                    numbered.push((k, path));
                }
            }
            numbered.sort();
            numbered.into_iter().map(|(_, p)| p).collect()
        } else {
            let test = dir.join("test_batch.bin");
            if test.is_file() {
                vec![test]
            } else {
                vec![]
            }
        };
        if files.is_empty() {
            bail!(
                "no CIFAR-10 {} in folder {} (the binary version, cifar-10-binary.tar.gz)",
                if train {
                    "data_batch_*.bin files"
                } else {
                    "test_batch.bin"
                },
                dir.display()
            );
        }
        let mut d = Self::from_files(&files)?;
        d.source = format!(
            "{} ({}, {} file{})",
            dir.display(),
            if train { "train" } else { "test" },
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        );
        Ok(d)
    }

    /// Loads the records of `files`, in order.
    pub fn from_files(files: &[PathBuf]) -> anyhow::Result<Self> {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for path in files {
            let bytes = crate::io::read_file(path)?;
            if bytes.is_empty() {
                bail!("{}: empty file, no CIFAR-10 records", path.display());
            }
            if bytes.len() % RECORD != 0 {
                bail!(
                    "{}: truncated record: {} bytes is not a whole number of {RECORD}-byte \
                     records",
                    path.display(),
                    bytes.len()
                );
            }
            pixels.reserve(bytes.len() / RECORD * CIFAR_PIXELS);
            for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
                if rec[0] > 9 {
                    bail!(
                        "{}: record {i} has label {}, not a class 0-9 (CIFAR-100 file?)",
                        path.display(),
                        rec[0]
                    );
                }
                labels.push(rec[0]);
                pixels.extend_from_slice(&rec[1..]);
            }
        }
        Ok(Self {
            pixels,
            labels,
            source: files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn inputs(&self, range: Range<usize>) -> Batch {
        pixel_batch(&self.pixels, CIFAR_PIXELS, range)
    }

    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.labels[range].iter().map(|&l| l as usize).collect()
    }

    fn describe(&self) -> String {
        format!("CIFAR-10 {}, {} samples", self.source, self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` records: label `(first + i) % 10`, pixel `k` = `(i + k) % 256`.
    fn records(first: usize, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                std::iter::once(((first + i) % 10) as u8)
                    .chain((0..CIFAR_PIXELS).map(move |k| ((first + i + k) % 256) as u8))
            })
            .collect()
    }

    #[test]
    fn batches_in_numeric_order_and_test_split() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&sub).unwrap();
        // Written out of order, with a two-digit index, to check the numeric sort.
        std::fs::write(sub.join("data_batch_10.bin"), records(5, 1)).unwrap();
        std::fs::write(sub.join("data_batch_2.bin"), records(2, 3)).unwrap();
        std::fs::write(sub.join("data_batch_1.bin"), records(0, 2)).unwrap();
        std::fs::write(sub.join("test_batch.bin"), records(7, 4)).unwrap();
        std::fs::write(sub.join("batches.meta.txt"), "airplane\n").unwrap();
        let train = Cifar10::load(dir.path(), true).unwrap();
        assert_eq!(train.len(), 6);
        assert_eq!(train.labels(0..6), vec![0, 1, 2, 3, 4, 5]);
        let x = train.inputs(2..4);
        assert_eq!((x.n, x.r, x.pos, x.features()), (2, 1, 1, 3073));
        // Sample 2 is the first record of batch 2: pixel k = (2 + k) % 256.
        for k in [0, 1, 253, 254, 1024, 3071] {
            assert_eq!(x.data[(0, k)], ((2 + k) % 256) as f64 / 255.0, "pixel {k}");
            assert_eq!(x.data[(1, k)], ((3 + k) % 256) as f64 / 255.0, "pixel {k}");
        }
        assert_eq!((x.data[(0, 3072)], x.data[(1, 3072)]), (1.0, 1.0));
        assert!(train.describe().contains("3 files"));

        let test = Cifar10::load(&sub, false).unwrap();
        assert_eq!(test.labels(0..4), vec![7, 8, 9, 0]);
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data_batch_1.bin");
        let mut bytes = records(0, 2);
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = Cifar10::load(dir.path(), true).err().unwrap().to_string();
        assert!(
            e.contains("truncated record") && e.contains("data_batch_1.bin"),
            "{e}"
        );
        bytes[RECORD] = 10;
        std::fs::write(&path, &bytes).unwrap();
        let e = Cifar10::load(dir.path(), true).err().unwrap().to_string();
        assert!(e.contains("record 1 has label 10"), "{e}");
        std::fs::write(&path, []).unwrap();
        assert!(Cifar10::load(dir.path(), true).is_err());
        let e = Cifar10::load(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("test_batch.bin"), "{e}");
        let e = Cifar10::load(&dir.path().join("nowhere"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nowhere"), "{e}");
    }
}
