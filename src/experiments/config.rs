//! Run configurations (TOML): which model, which data, which LIB settings. Unknown keys are
//! rejected with their path, so a typo never silently falls back to a default.

use crate::algorithm::LibConfig;
use crate::data::modadd::{ModOp, ModularArithmetic, Split};
use crate::data::text::{SampleMode, TextDataset, TextOptions};
use crate::data::tokenizer::{Gpt2Tokenizer, Tokenizer};
use crate::data::Dataset;
use crate::io::weights::{load_safetensors, take, Tensors};
use crate::models::mlp::MlpWeights;
use crate::models::transformer::hf::{hf_model_from_tensors, load_hf, LmOptions};
use crate::models::{Activation, Model};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub lib: LibConfig,
    /// Settings of `ibasis run`'s ablations (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiments: Option<ExperimentConfig>,
}

/// How `ibasis run` ablates (defaults: every node layer, the whole test split, every feature
/// count up to 20 then doubling; language models: 16 held-out chunks).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Node layers to ablate.
    #[serde(default)]
    pub ablate_node_layers: Option<Vec<String>>,
    /// Test samples each ablation is scored on.
    #[serde(default)]
    pub eval_samples: Option<usize>,
    /// Every feature count up to this one is tried...
    #[serde(default)]
    pub schedule_cutoff: Option<usize>,
    /// ...then counts growing by this factor.
    #[serde(default)]
    pub schedule_base: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    /// An MLP with tensors `layers.{k}.W` (`[in, out]`) and `layers.{k}.b`.
    Mlp {
        path: PathBuf,
        #[serde(default = "relu")]
        activation: Activation,
    },
    /// A transformer with TransformerLens tensor names.
    Transformer {
        path: PathBuf,
        #[serde(default)]
        options: crate::models::transformer::TransformerOptions,
    },
    /// A Hugging Face language model: a folder with `config.json` + `model.safetensors`
    /// (GPT-2, GPT-Neo, GPT-NeoX / Pythia, Llama).
    Hf {
        path: PathBuf,
        #[serde(default)]
        options: LmOptions,
    },
    /// A GGUF language model (Llama architecture; quantised tensors are dequantised).
    Gguf {
        path: PathBuf,
        #[serde(default)]
        options: LmOptions,
    },
}

fn relu() -> Activation {
    Activation::Relu
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum DataConfig {
    /// MNIST-format IDX files (MNIST, Fashion-MNIST) in `dir`.
    Mnist {
        #[serde(default = "mnist_dir")]
        dir: PathBuf,
        #[serde(default = "train")]
        split: Split,
        /// Use only the first `n_samples` samples.
        #[serde(default)]
        n_samples: Option<usize>,
    },
    /// CIFAR-10 binary batches in `dir`.
    Cifar10 {
        dir: PathBuf,
        #[serde(default = "train")]
        split: Split,
        #[serde(default)]
        n_samples: Option<usize>,
    },
    /// Pairs `(a, b) -> [a, b, p]`, label `(a op b) mod p`.
    ModularArithmetic {
        #[serde(default = "p113")]
        modulus: usize,
        #[serde(default = "add")]
        op: ModOp,
        #[serde(default = "train")]
        split: Split,
        #[serde(default = "frac")]
        frac_train: f64,
        #[serde(default)]
        seed: u64,
        /// The reference's train indices (`a * p + b`, one per line); else a seeded split.
        #[serde(default)]
        split_file: Option<PathBuf>,
    },
    /// Text files (or folders of `*.txt`), tokenised, joined with the end-of-text token and cut
    /// into chunks of `n_ctx` tokens (see [`crate::data::text`]).
    Text {
        paths: Vec<PathBuf>,
        /// `gpt2` (r50k_base), or the path of a GGUF file whose tokenizer to use.
        tokenizer: String,
        n_ctx: usize,
        #[serde(default)]
        n_samples: Option<usize>,
        #[serde(default)]
        sample: SampleMode,
        #[serde(default)]
        seed: u64,
        #[serde(default)]
        bos_at_start: bool,
        #[serde(default = "all")]
        split: Split,
        #[serde(default = "test_frac")]
        test_frac: f64,
    },
}

fn all() -> Split {
    Split::All
}
fn test_frac() -> f64 {
    0.1
}

fn mnist_dir() -> PathBuf {
    PathBuf::from("data/mnist")
}
fn train() -> Split {
    Split::Train
}
fn p113() -> usize {
    113
}
fn add() -> ModOp {
    ModOp::Add
}
fn frac() -> f64 {
    0.3
}

impl RunConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks of values the types admit but a run cannot use (a hang, an allocation of
    /// terabytes, an empty result), each naming its key. Shapes against the model and data are
    /// checked when those are loaded ([`check_compatible`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        fn within<T: PartialOrd + std::fmt::Display>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> anyhow::Result<()> {
            if !(v >= lo && v <= hi) {
                bail!("{key} = {v} is outside {lo}..={hi}");
            }
            Ok(())
        }
        // Sign sources and batches beyond these sizes cost more memory than any machine has
        // for a model of useful size; the limits are far above what the paper's runs used.
        const SOURCES: usize = 1 << 16;
        let lib = &self.lib;
        within("[lib] batch_size", lib.batch_size, 1, 1 << 20)?;
        within(
            "[lib] n_stochastic_sources_edges",
            lib.n_stochastic_sources_edges,
            1,
            SOURCES,
        )?;
        if let Some(n) = lib.n_stochastic_sources_pos {
            within("[lib] n_stochastic_sources_pos", n, 1, SOURCES)?;
        }
        if let Some(n) = lib.n_stochastic_sources_hidden {
            within("[lib] n_stochastic_sources_hidden", n, 1, SOURCES)?;
        }
        within("[lib] n_intervals", lib.n_intervals, 0, 10_000)?;
        if !(lib.tau.is_finite() && lib.tau >= 0.0) {
            bail!("[lib] tau = {} must be finite and >= 0", lib.tau);
        }
        match &self.data {
            DataConfig::ModularArithmetic {
                modulus,
                frac_train,
                ..
            } => {
                // p^2 pairs; the Fourier labels cost p^3 per feature.
                within("[data] modulus", *modulus, 2, 2048)?;
                if !(*frac_train > 0.0 && *frac_train <= 1.0) {
                    bail!("[data] frac_train = {frac_train} must be in (0, 1]");
                }
            }
            DataConfig::Text {
                n_ctx,
                n_samples,
                test_frac,
                ..
            } => {
                within(
                    "[data] n_ctx",
                    *n_ctx,
                    1,
                    crate::models::transformer::attention::MAX_ROTARY_POSITIONS,
                )?;
                if let Some(n) = n_samples {
                    within("[data] n_samples", *n, 1, usize::MAX)?;
                }
                if !(*test_frac >= 0.0 && *test_frac < 1.0) {
                    bail!("[data] test_frac = {test_frac} must be in [0, 1)");
                }
            }
            DataConfig::Mnist { n_samples, .. } | DataConfig::Cifar10 { n_samples, .. } => {
                if let Some(n) = n_samples {
                    within("[data] n_samples", *n, 1, usize::MAX)?;
                }
            }
        }
        if let Some(exp) = &self.experiments {
            if let Some(b) = exp.schedule_base {
                // The counts after the cutoff grow by this factor: at 1 (or NaN) they never
                // reach the layer's size.
                if !(1.05..=1e6).contains(&b) {
                    bail!(
                        "[experiments] schedule_base = {b} must be a finite factor in 1.05..=1e6"
                    );
                }
            }
            if let Some(c) = exp.schedule_cutoff {
                within("[experiments] schedule_cutoff", c, 0, 1 << 20)?;
            }
            if let Some(n) = exp.eval_samples {
                within("[experiments] eval_samples", n, 1, usize::MAX)?;
            }
        }
        Ok(())
    }

    pub fn model_path(&self) -> &Path {
        match &self.model {
            ModelConfig::Mlp { path, .. }
            | ModelConfig::Transformer { path, .. }
            | ModelConfig::Hf { path, .. }
            | ModelConfig::Gguf { path, .. } => path,
        }
    }

    /// Replaces the model file (`--model PATH`).
    pub fn set_model_path(&mut self, p: PathBuf) {
        match &mut self.model {
            ModelConfig::Mlp { path, .. }
            | ModelConfig::Transformer { path, .. }
            | ModelConfig::Hf { path, .. }
            | ModelConfig::Gguf { path, .. } => *path = p,
        }
    }

    /// The same data with another split (ablations evaluate on a chosen split).
    pub fn with_split(&self, split: Split) -> DataConfig {
        let mut d = self.data.clone();
        match &mut d {
            DataConfig::Mnist { split: s, .. }
            | DataConfig::Cifar10 { split: s, .. }
            | DataConfig::ModularArithmetic { split: s, .. }
            | DataConfig::Text { split: s, .. } => *s = split,
        }
        d
    }
}

/// A TOML error on one line: `line L, column C: message`.
pub fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let message = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            anyhow::anyhow!("line {line}, column {column}: {message}")
        }
        None => anyhow::anyhow!("{message}"),
    }
}

/// Reads a weights file by extension: `.pt` (PyTorch) or `.safetensors`.
pub fn load_tensors(path: &Path) -> anyhow::Result<Tensors> {
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("pt") | Some("pth") | Some("bin") => crate::io::pt::load_pt(path),
        Some("safetensors") => load_safetensors(path),
        _ => bail!(
            "model file {}: unknown format (expected .pt or .safetensors)",
            path.display()
        ),
    }
}

/// Loads and folds the model a config names.
pub fn load_model(cfg: &ModelConfig) -> anyhow::Result<Model> {
    match cfg {
        ModelConfig::Mlp { path, activation } => {
            let t = load_tensors(path)?;
            let file = path.display().to_string();
            Ok(mlp_from_tensors(&t, *activation, &file)?.into_model(&file))
        }
        ModelConfig::Transformer { path, options } => {
            let t = load_tensors(path)?;
            crate::models::transformer::transformer_from_tensors(
                &t,
                options,
                &path.display().to_string(),
            )
        }
        ModelConfig::Hf { path, options } => load_hf(path, options),
        ModelConfig::Gguf { path, options } => {
            let file = path.display().to_string();
            let g = crate::io::gguf::read_gguf(path)?;
            let (config, tensors) = crate::io::gguf::llama_from_gguf(&g, &file)?;
            drop(g);
            hf_model_from_tensors(&config, tensors, options, &file)
        }
    }
}

/// MLP weights from tensors `layers.{k}.W` (`[in, out]`) and `layers.{k}.b`.
pub fn mlp_from_tensors(t: &Tensors, act: Activation, file: &str) -> anyhow::Result<MlpWeights> {
    let mut layers = Vec::new();
    let mut prev_out: Option<usize> = None;
    for k in 0.. {
        let key = format!("layers.{k}.W");
        let Some(w) = t.get(&key) else { break };
        let [din, dout] = w.shape[..] else {
            bail!(
                "{file}: tensor `{key}` has shape {:?}, expected [in, out]",
                w.shape
            );
        };
        if let Some(p) = prev_out {
            if p != din {
                bail!("{file}: tensor `{key}` has {din} inputs but the previous layer has {p} outputs");
            }
        }
        let w = take(t, &key, &[din, dout], file)?;
        let b = take(t, &format!("layers.{k}.b"), &[dout], file)?;
        layers.push((w.to_mat().expect("2-D"), b.data.clone()));
        prev_out = Some(dout);
    }
    if layers.is_empty() {
        let names: Vec<&String> = t.keys().take(8).collect();
        bail!("{file}: no MLP layers found (expected tensors `layers.0.W`, `layers.0.b`, ...; the file has {names:?})");
    }
    Ok(MlpWeights { layers, act })
}

/// Opens the dataset a config names.
pub fn load_data(cfg: &DataConfig) -> anyhow::Result<Box<dyn Dataset>> {
    Ok(match cfg {
        DataConfig::Mnist {
            dir,
            split,
            n_samples,
        } => {
            let d = crate::data::mnist::Mnist::load(dir, *split != Split::Test)?;
            limit(Box::new(d), *n_samples)
        }
        DataConfig::Cifar10 {
            dir,
            split,
            n_samples,
        } => {
            let d = crate::data::cifar::Cifar10::load(dir, *split != Split::Test)?;
            limit(Box::new(d), *n_samples)
        }
        DataConfig::ModularArithmetic {
            modulus,
            op,
            split,
            frac_train,
            seed,
            split_file,
        } => Box::new(ModularArithmetic::new(
            *modulus,
            *op,
            *split,
            *frac_train,
            *seed,
            split_file.as_deref(),
        )?),
        DataConfig::Text {
            paths,
            tokenizer,
            n_ctx,
            n_samples,
            sample,
            seed,
            bos_at_start,
            split,
            test_frac,
        } => {
            let tok = load_tokenizer(tokenizer)?;
            let opts = TextOptions {
                n_ctx: *n_ctx,
                n_samples: *n_samples,
                sample: *sample,
                seed: *seed,
                bos_at_start: *bos_at_start,
                split: *split,
                test_frac: *test_frac,
            };
            Box::new(TextDataset::new(paths, tok.as_ref(), &opts)?)
        }
    })
}

/// `gpt2`, or the tokenizer stored in a GGUF file.
pub fn load_tokenizer(spec: &str) -> anyhow::Result<Box<dyn Tokenizer>> {
    if spec == "gpt2" {
        return Ok(Box::new(Gpt2Tokenizer::new()));
    }
    let path = Path::new(spec);
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("tokenizer `{spec}`: expected `gpt2` or the path of a .gguf file");
    }
    let g = crate::io::gguf::read_gguf(path)?;
    Ok(Box::new(
        crate::data::gguf_tokenizer::GgufTokenizer::from_gguf(&g, spec)?,
    ))
}

/// The first `n` samples of `d` (all of them when `n` is `None` or too large).
pub fn limit(d: Box<dyn Dataset>, n: Option<usize>) -> Box<dyn Dataset> {
    match n {
        Some(n) if n < d.len() => Box::new(crate::data::First::new(d.into(), n)),
        _ => d,
    }
}

/// Checks that the data fits the model's input.
pub fn check_compatible(model: &Model, data: &dyn Dataset) -> anyhow::Result<()> {
    let x = data.inputs(0..1.min(data.len()));
    if let Some((id, max)) = model.max_positions() {
        if x.pos > max {
            bail!(
                "data/model mismatch: {id} of model {} has {max} positions, {} gives {} per sample",
                model.name,
                data.describe(),
                x.pos
            );
        }
    }
    match model.input {
        crate::models::InputKind::Features(d) if x.features() != d => bail!(
            "data/model mismatch: {} gives {} input features (bias included) but model {} expects {d}",
            data.describe(),
            x.features(),
            model.name
        ),
        crate::models::InputKind::Tokens { vocab } => {
            if x.features() != 1 {
                bail!("data/model mismatch: model {} expects token ids but {} gives {} features", model.name, data.describe(), x.features());
            }
            if let Some(bad) = x.data.col(0).iter().find(|&&t| t < 0.0 || t >= vocab as f64) {
                bail!("data/model mismatch: token id {bad} from {} is outside the model's vocabulary of {vocab}", data.describe());
            }
        }
        _ => {}
    }
    // Class labels (not next-token targets) must be outputs of the model.
    if !data.next_token_targets() && !data.is_empty() {
        let classes = model.node_features(model.modules.len());
        let n = data.len().min(1 << 16);
        if let Some(bad) = data.labels(0..n).into_iter().find(|&l| l >= classes) {
            bail!(
                "data/model mismatch: {} has label {bad} but model {} has {classes} outputs",
                data.describe(),
                model.name
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
kind = "transformer"
path = "assets/modadd/model.safetensors"
[data]
kind = "modular_arithmetic"
[lib]
node_layers = ["ln2.0", "unembed"]
"#;

    #[test]
    fn values_out_of_range_are_refused_by_key() {
        assert!(RunConfig::parse(BASE).is_ok());
        let cases = [
            (
                "[lib]",
                "n_stochastic_sources_hidden = 1000000000",
                "[lib] n_stochastic_sources_hidden",
            ),
            ("[lib]", "batch_size = 0", "[lib] batch_size"),
            ("[lib]", "tau = inf", "[lib] tau"),
            ("[data]", "modulus = 1000000", "[data] modulus"),
            ("[data]", "frac_train = 0.0", "[data] frac_train"),
            (
                "[experiments]",
                "schedule_base = 1.0",
                "[experiments] schedule_base",
            ),
            (
                "[experiments]",
                "schedule_base = -2.0",
                "[experiments] schedule_base",
            ),
            (
                "[experiments]",
                "schedule_base = nan",
                "[experiments] schedule_base",
            ),
            (
                "[experiments]",
                "schedule_cutoff = 1000000000000",
                "[experiments] schedule_cutoff",
            ),
            (
                "[experiments]",
                "eval_samples = 0",
                "[experiments] eval_samples",
            ),
        ];
        for (table, line, key) in cases {
            let text = if table == "[experiments]" {
                format!("{BASE}[experiments]\n{line}\n")
            } else {
                BASE.replace(&format!("{table}\n"), &format!("{table}\n{line}\n"))
            };
            let e = RunConfig::parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(key), "{line}: {e}");
        }
    }

    #[test]
    fn every_shipped_config_is_in_range() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            // Trainer and ablation configs have schemas of their own.
            if !text.contains("\n[lib]") {
                continue;
            }
            RunConfig::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}
