//! MNIST-format image datasets (MNIST, Fashion-MNIST): IDX files, raw or gzipped.
//!
//! Inputs are one row per image: the pixels / 255 in row-major order, then a constant 1 (the
//! bias feature of the folded layers), so `pos = 1` and 28 x 28 images give 785 features.
//! Pixels stay `u8` in memory and are converted per batch: 60000 images as f64 would be 376 MB.

use super::Dataset;
use crate::tensor::Batch;
use anyhow::{bail, Context};
use faer::Mat;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An IDX array of unsigned bytes (the only element type MNIST uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    /// Row-major elements, `dims.iter().product()` of them.
    pub data: Vec<u8>,
}

/// Reads the whole of `path`, gunzipping it when its name ends in `.gz`.
pub(crate) fn read_maybe_gz(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = crate::io::read_file(path)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt or truncated gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads an IDX file of unsigned bytes with `ndims` dimensions (raw, or `.gz`).
pub fn read_idx(path: &Path, ndims: usize) -> anyhow::Result<Idx> {
    let bytes = read_maybe_gz(path)?;
    parse_idx(&bytes, ndims).with_context(|| format!("{} is not a valid IDX file", path.display()))
}

/// Parses IDX bytes: magic `00 00 08 ndims`, `ndims` big-endian u32 sizes, then the elements.
pub fn parse_idx(bytes: &[u8], ndims: usize) -> anyhow::Result<Idx> {
    if bytes.len() < 4 {
        bail!("file too short for an IDX header ({} bytes)", bytes.len());
    }
    if bytes[0..2] != [0, 0] {
        bail!(
            "bad magic number {:02x}{:02x}{:02x}{:02x}",
            bytes[0],
            bytes[1],
            bytes[2],
            bytes[3]
        );
    }
    if bytes[2] != 0x08 {
        bail!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        );
    }
    if bytes[3] as usize != ndims {
        bail!("{} dimensions, expected {ndims}", bytes[3]);
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        bail!("truncated header");
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("dimensions overflow")?;
    let body = bytes.len() - header;
    if body < count {
        bail!("truncated: header {dims:?} needs {count} bytes of data, found {body}");
    }
    if body > count {
        bail!("header {dims:?} needs {count} bytes of data, found {body}: trailing garbage");
    }
    Ok(Idx {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Rows `range` of `pixels` (each `width` bytes) as a `pos = 1` batch of pixels / 255 plus a
/// trailing constant 1.
pub(crate) fn pixel_batch(pixels: &[u8], width: usize, range: Range<usize>) -> Batch {
    let n = range.len();
    let rows = &pixels[range.start * width..range.end * width];
    let mut data = Mat::<f64>::zeros(n, width + 1);
    for i in 0..n {
        for (j, &p) in rows[i * width..(i + 1) * width].iter().enumerate() {
            data[(i, j)] = p as f64 / 255.0;
        }
        data[(i, width)] = 1.0;
    }
    Batch::new(n, 1, 1, data)
}

/// An MNIST-format dataset: greyscale images with labels 0-9.
pub struct Mnist {
    /// `len * height * width` pixels, image after image, each row-major.
    pixels: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    source: String,
}

impl Mnist {
    /// Loads the training (`train-*`) or test (`t10k-*`) split from `dir`, which holds the IDX
    /// files under their canonical names, raw or `.gz`.
    pub fn load(dir: &Path, train: bool) -> anyhow::Result<Self> {
        let prefix = if train { "train" } else { "t10k" };
        let images = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let mut d = Self::from_idx(&images, &labels)?;
        d.source = format!(
            "{} ({})",
            dir.display(),
            if train { "train" } else { "test" }
        );
        Ok(d)
    }

    /// Loads an images file (`[n, height, width]`) and a labels file (`[n]`).
    pub fn from_idx(images: &Path, labels: &Path) -> anyhow::Result<Self> {
        let img = read_idx(images, 3)?;
        let lab = read_idx(labels, 1)?;
        if img.dims[0] != lab.dims[0] {
            bail!(
                "{} holds {} images but {} holds {} labels",
                images.display(),
                img.dims[0],
                labels.display(),
                lab.dims[0]
            );
        }
        if let Some(i) = lab.data.iter().position(|&l| l > 9) {
            bail!(
                "{}: label {} of sample {i} is not a digit class 0-9",
                labels.display(),
                lab.data[i]
            );
        }
        Ok(Self {
            pixels: img.data,
            labels: lab.data,
            height: img.dims[1],
            width: img.dims[2],
            source: images.display().to_string(),
        })
    }

    /// Image height and width in pixels.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Input features per sample: the pixels plus the constant 1.
    pub fn features(&self) -> usize {
        self.height * self.width + 1
    }
}

/// `dir/name`, or `dir/name.gz`, whichever exists.
fn find(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no {name} or {name}.gz in folder {}; run `scripts/fetch-data.sh mnist` (or \
         `fashion-mnist`) to fetch the data",
        dir.display()
    )
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn inputs(&self, range: Range<usize>) -> Batch {
        pixel_batch(&self.pixels, self.height * self.width, range)
    }

    fn labels(&self, range: Range<usize>) -> Vec<usize> {
        self.labels[range].iter().map(|&l| l as usize).collect()
    }

    fn describe(&self) -> String {
        format!(
            "MNIST-format images {}, {} samples of {}x{}",
            self.source,
            self.len(),
            self.height,
            self.width
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Three 2x3 images with pixels `10 * image + k` and labels 7, 0, 9.
    fn small_set() -> (Vec<u8>, Vec<u8>) {
        let px: Vec<u8> = (0..3u8)
            .flat_map(|i| (0..6u8).map(move |k| 10 * i + k))
            .collect();
        (idx_bytes(&[3, 2, 3], &px), idx_bytes(&[3], &[7, 0, 9]))
    }

    fn check_small(d: &Mnist) {
        assert_eq!(d.len(), 3);
        assert_eq!(d.image_size(), (2, 3));
        assert_eq!(d.features(), 7);
        let x = d.inputs(1..3);
        assert_eq!((x.n, x.r, x.pos, x.rows(), x.features()), (2, 1, 1, 2, 7));
        for k in 0..6 {
            assert_eq!(x.data[(0, k)], (10 + k) as f64 / 255.0);
            assert_eq!(x.data[(1, k)], (20 + k) as f64 / 255.0);
        }
        assert_eq!((x.data[(0, 6)], x.data[(1, 6)]), (1.0, 1.0));
        assert_eq!(d.labels(0..3), vec![7, 0, 9]);
    }

    #[test]
    fn raw_and_gzipped_idx_files() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = small_set();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gz(&lab)).unwrap();
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), gz(&img)).unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), &lab).unwrap();
        check_small(&Mnist::load(dir.path(), true).unwrap());
        let test = Mnist::load(dir.path(), false).unwrap();
        check_small(&test);
        assert!(test.describe().contains("(test)"));
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = small_set();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let labels = write("labels", &lab);
        let err = |images: &Path, labels: &Path| {
            let e = format!("{:#}", Mnist::from_idx(images, labels).err().unwrap());
            assert!(e.contains(&dir.path().display().to_string()), "{e}");
            e
        };
        let cut = write("cut", &img[..img.len() - 1]);
        assert!(err(&cut, &labels).contains("truncated"));
        let cut_header = write("cut-header", &img[..9]);
        assert!(err(&cut_header, &labels).contains("truncated header"));
        let long = write("long", &[&img[..], &[0]].concat());
        assert!(err(&long, &labels).contains("trailing"));
        let mut bad = img.clone();
        bad[2] = 0x0d;
        let float = write("float", &bad);
        assert!(err(&float, &labels).contains("element type"));
        let mut bad = img.clone();
        bad[0] = 0x1f;
        let magic = write("magic", &bad);
        assert!(err(&magic, &labels).contains("magic"));
        // Labels where images belong: wrong dimension count.
        assert!(err(&labels, &labels).contains("dimensions"));
        let two = write("two", &idx_bytes(&[2], &[1, 2]));
        let images = write("images", &img);
        assert!(err(&images, &two).contains("3 images"));
        let ten = write("ten", &idx_bytes(&[3], &[1, 10, 2]));
        assert!(err(&images, &ten).contains("label 10"));
        let gz_cut = write("cut.gz", &gz(&img)[..20]);
        assert!(err(&gz_cut, &labels).contains("gzip"));
        assert!(err(&dir.path().join("absent"), &labels).contains("cannot read"));

        let e = Mnist::load(&dir.path().join("nowhere"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nowhere") && e.contains("scripts/fetch-data.sh mnist"));
    }

    /// The real data, when `scripts/fetch-data.sh` has fetched it.
    fn real(dir: &str, first_train: usize, first_test: usize) {
        let dir = Path::new(dir);
        assert!(
            dir.is_dir(),
            "{} not found: run scripts/fetch-data.sh mnist (or fashion-mnist)",
            dir.display()
        );
        for (train, n, first) in [(true, 60000, first_train), (false, 10000, first_test)] {
            let d = Mnist::load(dir, train).unwrap();
            assert_eq!(d.len(), n);
            assert_eq!(d.image_size(), (28, 28));
            let labels = d.labels(0..n);
            assert_eq!(labels[0], first);
            let mut counts = [0usize; 10];
            for l in labels {
                counts[l] += 1;
            }
            assert!(counts.iter().all(|&c| c > n / 20), "{counts:?}");
            let x = d.inputs(n - 100..n);
            assert_eq!((x.rows(), x.features()), (100, 785));
            assert!((0..100).all(|i| x.data[(i, 784)] == 1.0));
            let max = (0..100)
                .flat_map(|i| (0..784).map(move |j| (i, j)))
                .map(|ij| x.data[ij])
                .fold(0.0, f64::max);
            assert_eq!(max, 1.0);
        }
    }

    #[test]
    #[ignore = "needs data/mnist: scripts/fetch-data.sh mnist"]
    fn real_mnist() {
        real("data/mnist", 5, 7);
    }

    #[test]
    #[ignore = "needs data/fashion-mnist: scripts/fetch-data.sh fashion-mnist"]
    fn real_fashion_mnist() {
        real("data/fashion-mnist", 9, 9);
    }
}
