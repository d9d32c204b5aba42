//! Hugging Face checkpoints of decoder-only language models: `config.json` plus
//! `model.safetensors` (or shards listed in `model.safetensors.index.json`), Hugging Face
//! tensor names and layouts, folded into the module list of [`super`] (method.md sections 8
//! and 9) through the same builder as the TransformerLens path.
//!
//! Families (`model_type`, or `architectures[0]`):
//! - `gpt2`: learned positions, layer norm with weights, `Conv1D` weights (`[in, out]`), fused
//!   `c_attn` (`q | k | v`), biases everywhere, tied unembedding.
//! - `gpt_neo`: as GPT-2 but `nn.Linear` weights (`[out, in]`), q/k/v without bias, no attention
//!   scaling, local attention (`t - window_size < s <= t`) on the layers `attention_layers`
//!   marks `local`.
//! - `gpt_neox` (Pythia): rotary embeddings on the first `int(d_head * rotary_pct)` coordinates
//!   of each head, fused `query_key_value` laid out per head `[h][q, k, v][d_head]`, parallel
//!   (or sequential) residual, untied `embed_out`.
//! - `llama`: RMS norm, rotary embeddings on whole heads, grouped-query attention, SwiGLU MLP,
//!   no biases (unless `attention_bias` / `mlp_bias`), optionally tied `lm_head`.
//!
//! Norm weights are folded into the following linear maps unless
//! [`LmOptions::fold_norms`] is false. Errors are one line naming the file and the tensor or
//! config key.

use super::build::{build_transformer, Affine, Arch, BlockWeights, Ends};
use super::modules::{NormAffine, NormKind};
use crate::io::weights::{load_safetensors, take, Tensors};
use crate::models::{Activation, Model};
use anyhow::{bail, ensure, Context};
use faer::Mat;
use serde_json::Value;
use std::path::Path;

/// How to build a language model from a Hugging Face checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct LmOptions {
    /// Fold the norms' affine weights into the following linear maps (default), leaving
    /// weight-free norms as the reference's preprocessing does; `false` keeps them in the
    /// `lnX_out` modules (same logits, different node layers `attn_in`, `mlp_in`, `unembed`).
    pub fold_norms: bool,
    /// Keep only the last position from this module on (see
    /// [`super::TransformerOptions::last_pos_module_type`]).
    pub last_pos_module_type: Option<String>,
    /// Context length; default the config's maximum positions (learned position embeddings
    /// cannot go beyond it, and only its first `n_ctx` rows are kept).
    pub n_ctx: Option<usize>,
}

impl Default for LmOptions {
    fn default() -> Self {
        Self {
            fold_norms: true,
            last_pos_module_type: None,
            n_ctx: None,
        }
    }
}

/// Loads a Hugging Face checkpoint: `path` is its directory (with `config.json` and
/// `model.safetensors`, or safetensors shards listed in `model.safetensors.index.json`), its
/// `config.json`, or its `.safetensors` file (the config beside it).
pub fn load_hf(path: &Path, opts: &LmOptions) -> anyhow::Result<Model> {
    let beside = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    if path.extension().is_some_and(|e| e == "safetensors") {
        let config = read_json(&beside(path).join("config.json"))?;
        let file = path.display().to_string();
        return hf_model_from_tensors(&config, load_safetensors(path)?, opts, &file);
    }
    let (config_path, dir) = if path.is_dir() {
        (path.join("config.json"), path.to_path_buf())
    } else {
        (path.to_path_buf(), beside(path))
    };
    let config = read_json(&config_path)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let (tensors, file) = if single.exists() || !index.exists() {
        (load_safetensors(&single)?, single.display().to_string())
    } else {
        (load_shards(&index)?, index.display().to_string())
    };
    hf_model_from_tensors(&config, tensors, opts, &file)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = crate::io::read_text(path)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Reads every shard an index's `weight_map` names into one map.
fn load_shards(index: &Path) -> anyhow::Result<Tensors> {
    let shown = index.display();
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{shown}: no `weight_map` object"))?;
    let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    shards.sort_unstable();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut tensors = Tensors::new();
    for shard in shards {
        tensors.append(&mut load_safetensors(&dir.join(shard))?);
    }
    Ok(tensors)
}

/// The architecture families this loader knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Gpt2,
    GptNeo,
    GptNeoX,
    Llama,
}

impl Family {
    /// From `model_type`, else from `architectures[0]`.
    fn of(config: &Config) -> anyhow::Result<Self> {
        if let Some(t) = config.get("model_type") {
            return match t.as_str() {
                Some("gpt2") => Ok(Family::Gpt2),
                Some("gpt_neo") => Ok(Family::GptNeo),
                Some("gpt_neox") => Ok(Family::GptNeoX),
                Some("llama") => Ok(Family::Llama),
                _ => bail!(
                    "{}: config `model_type` = {t} is not supported (gpt2, gpt_neo, gpt_neox, \
                     llama)",
                    config.file
                ),
            };
        }
        let arch = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .with_context(|| {
                format!(
                    "{}: config has neither `model_type` nor `architectures`",
                    config.file
                )
            })?;
        match arch.as_str() {
            Some("GPT2LMHeadModel" | "GPT2Model") => Ok(Family::Gpt2),
            Some("GPTNeoForCausalLM" | "GPTNeoModel") => Ok(Family::GptNeo),
            Some("GPTNeoXForCausalLM" | "GPTNeoXModel") => Ok(Family::GptNeoX),
            Some("LlamaForCausalLM" | "LlamaModel") => Ok(Family::Llama),
            _ => bail!(
                "{}: config `architectures[0]` = {arch} is not supported (GPT2LMHeadModel, \
                 GPTNeoForCausalLM, GPTNeoXForCausalLM, LlamaForCausalLM)",
                config.file
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::GptNeo => "gpt_neo",
            Family::GptNeoX => "gpt_neox",
            Family::Llama => "llama",
        }
    }

    /// The prefix of the tensor names below the LM head (`transformer.h.0...`), which a file
    /// saved from the bare model (`GPT2Model`) lacks.
    fn prefix(self) -> &'static str {
        match self {
            Family::Gpt2 | Family::GptNeo => "transformer.",
            Family::GptNeoX => "gpt_neox.",
            Family::Llama => "model.",
        }
    }
}

/// Largest size a config may give (2^24: vocabularies reach 2^18, context lengths 2^20).
const MAX_DIM: usize = 1 << 24;

/// `config.json`, with one-line errors naming the file and the key. `null` counts as absent.
struct Config<'a> {
    v: &'a Value,
    file: &'a str,
}

impl Config<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    /// The first of `keys` present (aliases across Hugging Face versions).
    fn first<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter().find_map(|&k| self.get(k).map(|v| (k, v)))
    }
    /// A positive integer of at most [`MAX_DIM`]: every size in a config (layers, heads, widths,
    /// vocabulary, context) is far below it, and a larger one would only allocate or loop.
    fn usize_of(&self, key: &str, v: &Value) -> anyhow::Result<usize> {
        let n = v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .with_context(|| {
                format!(
                    "{}: config `{key}` = {v} is not a positive integer",
                    self.file
                )
            })?;
        anyhow::ensure!(
            n <= MAX_DIM,
            "{}: config `{key}` = {n} is larger than any model's ({MAX_DIM} at most)",
            self.file
        );
        Ok(n)
    }
    /// A positive integer under the first of `keys` present.
    fn usize(&self, keys: &[&str]) -> anyhow::Result<usize> {
        let (k, v) = self
            .first(keys)
            .with_context(|| format!("{}: config `{}` is missing", self.file, keys[0]))?;
        self.usize_of(k, v)
    }
    fn usize_or(&self, keys: &[&str], default: usize) -> anyhow::Result<usize> {
        match self.first(keys) {
            Some((k, v)) => self.usize_of(k, v),
            None => Ok(default),
        }
    }
    fn f64_or(&self, keys: &[&str], default: f64) -> anyhow::Result<f64> {
        match self.first(keys) {
            Some((k, v)) => v.as_f64().filter(|x| x.is_finite()).with_context(|| {
                format!("{}: config `{k}` = {v} is not a finite number", self.file)
            }),
            None => Ok(default),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> anyhow::Result<bool> {
        match self.get(key) {
            Some(v) => v
                .as_bool()
                .with_context(|| format!("{}: config `{key}` = {v} is not a boolean", self.file)),
            None => Ok(default),
        }
    }
    /// The activation named under `key` (Hugging Face `ACT2FN` names).
    fn activation(&self, key: &str, default: &str) -> anyhow::Result<Activation> {
        let v = self.get(key);
        match v.map_or(Some(default), Value::as_str) {
            Some("gelu") => Ok(Activation::Gelu),
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Ok(Activation::GeluTanh),
            Some("relu") => Ok(Activation::Relu),
            Some("silu" | "swish") => Ok(Activation::Silu),
            _ => bail!(
                "{}: config `{key}` = {} is not a supported activation (gelu, gelu_new, \
                 gelu_pytorch_tanh, gelu_fast, relu, silu)",
                self.file,
                v.map_or(default.to_string(), |v| v.to_string())
            ),
        }
    }
    /// Rejects rope scaling (only plain rotary embeddings are supported) and returns the
    /// rotary base: `rope_parameters.rope_theta` (newer configs) or the first of `base_keys`.
    fn rope_base(&self, base_keys: &[&str], default: f64) -> anyhow::Result<f64> {
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(v) = self.get(key) {
                let kind = v.get("rope_type").or_else(|| v.get("type"));
                if kind.is_some_and(|t| t != "default") {
                    bail!(
                        "{}: config `{key}` = {v} is not supported (plain rotary embeddings \
                         only)",
                        self.file
                    );
                }
            }
        }
        if let Some(theta) = self
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
        {
            return theta
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| {
                    format!(
                    "{}: config `rope_parameters.rope_theta` = {theta} is not a positive number",
                    self.file
                )
                });
        }
        let base = self.f64_or(base_keys, default)?;
        ensure!(
            base > 0.0,
            "{}: config `{}` = {base} is not positive",
            self.file,
            base_keys[0]
        );
        Ok(base)
    }
}

/// The checkpoint's tensors, consumed (moved out) as they are read so that the unfolded and
/// the folded model never both sit in memory whole.
struct Weights {
    t: Tensors,
    /// Prefix of the body's names (empty if the file has none).
    prefix: &'static str,
    file: String,
}

impl Weights {
    /// Removes tensor `name` (under the body prefix unless `top`), checking its shape and
    /// values.
    fn take(&mut self, name: &str, shape: &[usize], top: bool) -> anyhow::Result<Vec<f64>> {
        let full = if top {
            name.to_string()
        } else {
            format!("{}{name}", self.prefix)
        };
        take(&self.t, &full, shape, &self.file)?;
        Ok(self.t.remove(&full).expect("checked above").data)
    }
    fn vector(&mut self, name: &str, len: usize) -> anyhow::Result<Vec<f64>> {
        self.take(name, &[len], false)
    }
    /// An `nn.Linear` weight `[out, in]` as the `(in, out)` matrix of `x W`.
    fn linear(&mut self, name: &str, din: usize, dout: usize) -> anyhow::Result<Mat<f64>> {
        let v = self.take(name, &[dout, din], false)?;
        Ok(Mat::from_fn(din, dout, |i, j| v[j * din + i]))
    }
    /// A `Conv1D` weight (GPT-2), already `[in, out]`.
    fn conv1d(&mut self, name: &str, din: usize, dout: usize) -> anyhow::Result<Mat<f64>> {
        let v = self.take(name, &[din, dout], false)?;
        Ok(Mat::from_fn(din, dout, |i, j| v[i * dout + j]))
    }
    /// `nn.Linear` `{name}.weight` and, if `bias`, `{name}.bias`.
    fn linear_affine(
        &mut self,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> anyhow::Result<Affine> {
        Ok(Affine {
            w: self.linear(&format!("{name}.weight"), din, dout)?,
            b: bias
                .then(|| self.vector(&format!("{name}.bias"), dout))
                .transpose()?,
        })
    }
    /// `Conv1D` `{name}.weight` and `{name}.bias`.
    fn conv1d_affine(&mut self, name: &str, din: usize, dout: usize) -> anyhow::Result<Affine> {
        Ok(Affine {
            w: self.conv1d(&format!("{name}.weight"), din, dout)?,
            b: Some(self.vector(&format!("{name}.bias"), dout)?),
        })
    }
    /// A norm's `{name}.weight` and, for layer norm, `{name}.bias` (RMS norm: bias 0).
    fn norm(&mut self, name: &str, d: usize, kind: NormKind) -> anyhow::Result<NormAffine> {
        let weight = self.vector(&format!("{name}.weight"), d)?;
        let bias = match kind {
            NormKind::LayerNorm => self.vector(&format!("{name}.bias"), d)?,
            NormKind::Rms => vec![0.0; d],
        };
        Ok(NormAffine { weight, bias })
    }
    /// A `[rows, cols]` embedding table as a matrix.
    fn table(&mut self, name: &str, rows: usize, cols: usize) -> anyhow::Result<Mat<f64>> {
        let v = self.take(name, &[rows, cols], false)?;
        Ok(Mat::from_fn(rows, cols, |i, j| v[i * cols + j]))
    }
    /// The unembedding `D x V`: the transposed token embedding when tied, else the LM head
    /// `[V, D]` named `head` (outside the body prefix).
    fn unembed(
        &mut self,
        tied: Option<&Mat<f64>>,
        head: &str,
        d: usize,
        vocab: usize,
    ) -> anyhow::Result<Affine> {
        let w = match tied {
            Some(we) => we.transpose().to_owned(),
            None => {
                let v = self.take(head, &[vocab, d], true)?;
                Mat::from_fn(d, vocab, |i, j| v[j * d + i])
            }
        };
        Ok(Affine { w, b: None })
    }
}

/// Per-family facts the block reader needs beyond [`Arch`].
struct Spec {
    family: Family,
    arch: Arch,
    /// Learned positions in the checkpoint (`W_pos` rows; only the first `n_ctx` are kept).
    n_pos: usize,
    /// Attention scale per layer.
    scales: Vec<f64>,
    /// Local attention window per layer.
    windows: Vec<Option<usize>>,
    attn_bias: bool,
    mlp_bias: bool,
}

/// Builds the folded model from a Hugging Face `config.json` (parsed) and its tensors under
/// Hugging Face names (taken by value and consumed block by block). `file` names the source
/// in errors. The GGUF loader calls this with a Llama-style config and tensors renamed to
/// Hugging Face names (rotary q/k rows already in Hugging Face order).
pub fn hf_model_from_tensors(
    config: &Value,
    tensors: Tensors,
    opts: &LmOptions,
    file: &str,
) -> anyhow::Result<Model> {
    let cfg = Config { v: config, file };
    let family = Family::of(&cfg)?;
    let spec = spec(&cfg, family, opts)?;
    let prefix = family.prefix();
    let has_prefix = tensors.keys().any(|k| k.starts_with(prefix));
    let mut w = Weights {
        t: tensors,
        prefix: if has_prefix { prefix } else { "" },
        file: file.to_string(),
    };
    let ends = read_ends(&mut w, &spec, &cfg)?;
    let model = build_transformer(&spec.arch, ends, |k| read_block(&mut w, &spec, k))?;
    // Every weight the architecture reads was moved out: what is left must be a buffer, or the
    // config does not describe the checkpoint (e.g. biases it says are absent).
    if let Some(name) = w.t.keys().find(|n| !is_buffer(n)) {
        bail!(
            "{file}: tensor `{name}` is not used by the {} architecture the config describes \
             (check e.g. attention_bias, mlp_bias, tie_word_embeddings)",
            family.name()
        );
    }
    Ok(model)
}

/// Non-weight tensors some checkpoints carry: causal-mask buffers and rotary frequencies.
fn is_buffer(name: &str) -> bool {
    [
        ".attn.bias",
        ".attn.masked_bias",
        ".attention.bias",
        ".attention.masked_bias",
        ".rotary_emb.inv_freq",
    ]
    .iter()
    .any(|suffix| name.ends_with(suffix))
}

/// `d_model / n_heads`, which must divide.
fn head_dim(file: &str, d_model: usize, n_heads: usize) -> anyhow::Result<usize> {
    ensure!(
        d_model.is_multiple_of(n_heads),
        "{file}: config: hidden size {d_model} is not a multiple of the {n_heads} heads"
    );
    Ok(d_model / n_heads)
}

/// The architecture from the config.
fn spec(cfg: &Config, family: Family, opts: &LmOptions) -> anyhow::Result<Spec> {
    let file = cfg.file;
    // Defaults: learned positions, layer norm, sequential, plain MLP, biases, global attention.
    let d_model;
    let n_heads;
    let n_layers;
    let n_pos;
    let d_vocab = cfg.usize(&["vocab_size"])?;
    let mut n_kv_heads = None;
    let d_head;
    let d_mlp;
    let mut norm = NormKind::LayerNorm;
    let (mut gated, mut parallel, mut rotary) = (false, false, None);
    let (mut attn_bias, mut mlp_bias) = (true, true);
    let scale: Box<dyn Fn(usize) -> f64>;
    let mut windows = None;
    let (eps, act) = match family {
        Family::Gpt2 => {
            d_model = cfg.usize(&["n_embd", "hidden_size"])?;
            n_heads = cfg.usize(&["n_head", "num_attention_heads"])?;
            n_layers = cfg.usize(&["n_layer", "num_hidden_layers"])?;
            n_pos = cfg.usize(&["n_positions", "n_ctx", "max_position_embeddings"])?;
            d_mlp = cfg.usize_or(&["n_inner"], 4 * d_model)?;
            d_head = head_dim(file, d_model, n_heads)?;
            // 1 / sqrt(d_head) unless scale_attn_weights is false, further divided by
            // layer_idx + 1 with scale_attn_by_inverse_layer_idx.
            let base = if cfg.bool_or("scale_attn_weights", true)? {
                1.0 / (d_head as f64).sqrt()
            } else {
                1.0
            };
            let by_layer = cfg.bool_or("scale_attn_by_inverse_layer_idx", false)?;
            scale = Box::new(move |k| {
                if by_layer {
                    base / (k + 1) as f64
                } else {
                    base
                }
            });
            (
                cfg.f64_or(&["layer_norm_epsilon"], 1e-5)?,
                cfg.activation("activation_function", "gelu_new")?,
            )
        }
        Family::GptNeo => {
            d_model = cfg.usize(&["hidden_size"])?;
            n_heads = cfg.usize(&["num_heads"])?;
            n_layers = cfg.usize(&["num_layers"])?;
            n_pos = cfg.usize(&["max_position_embeddings"])?;
            d_mlp = cfg.usize_or(&["intermediate_size"], 4 * d_model)?;
            d_head = head_dim(file, d_model, n_heads)?;
            // No attention scaling in GPT-Neo.
            scale = Box::new(|_| 1.0);
            let window = cfg.usize_or(&["window_size"], 256)?;
            windows = Some(
                neo_layer_kinds(cfg, n_layers)?
                    .into_iter()
                    .map(|local| local.then_some(window))
                    .collect(),
            );
            (
                cfg.f64_or(&["layer_norm_epsilon"], 1e-5)?,
                cfg.activation("activation_function", "gelu_new")?,
            )
        }
        Family::GptNeoX => {
            d_model = cfg.usize(&["hidden_size"])?;
            n_heads = cfg.usize(&["num_attention_heads"])?;
            n_layers = cfg.usize(&["num_hidden_layers"])?;
            n_pos = cfg.usize(&["max_position_embeddings"])?;
            d_mlp = cfg.usize(&["intermediate_size"])?;
            d_head = head_dim(file, d_model, n_heads)?;
            parallel = cfg.bool_or("use_parallel_residual", true)?;
            attn_bias = cfg.bool_or("attention_bias", true)?;
            let pct = match cfg
                .get("rope_parameters")
                .and_then(|p| p.get("partial_rotary_factor"))
            {
                Some(v) => v.as_f64().with_context(|| {
                    format!(
                        "{file}: config `rope_parameters.partial_rotary_factor` = {v} is not a \
                         number"
                    )
                })?,
                None => cfg.f64_or(&["rotary_pct", "partial_rotary_factor"], 0.25)?,
            };
            // Hugging Face: rotary_ndims = int(head_size * rotary_pct).
            let dims = (d_head as f64 * pct).floor() as usize;
            ensure!(
                (0.0..=1.0).contains(&pct) && dims > 0 && dims.is_multiple_of(2),
                "{file}: config `rotary_pct` = {pct} gives {dims} rotary dimensions per head of \
                 {d_head}; a positive even number is needed"
            );
            rotary = Some((
                dims,
                cfg.rope_base(&["rotary_emb_base", "rope_theta"], 10000.0)?,
            ));
            let s = 1.0 / (d_head as f64).sqrt();
            scale = Box::new(move |_| s);
            (
                cfg.f64_or(&["layer_norm_eps"], 1e-5)?,
                cfg.activation("hidden_act", "gelu")?,
            )
        }
        Family::Llama => {
            d_model = cfg.usize(&["hidden_size"])?;
            n_heads = cfg.usize(&["num_attention_heads"])?;
            n_layers = cfg.usize(&["num_hidden_layers"])?;
            n_pos = cfg.usize(&["max_position_embeddings"])?;
            d_mlp = cfg.usize(&["intermediate_size"])?;
            let kv = cfg.usize_or(&["num_key_value_heads"], n_heads)?;
            ensure!(
                n_heads.is_multiple_of(kv),
                "{file}: config `num_attention_heads` = {n_heads} is not a multiple of \
                 `num_key_value_heads` = {kv}"
            );
            n_kv_heads = Some(kv);
            d_head = match cfg.get("head_dim") {
                Some(_) => cfg.usize(&["head_dim"])?,
                None => head_dim(file, d_model, n_heads)?,
            };
            ensure!(
                d_head.is_multiple_of(2),
                "{file}: config: head dimension {d_head} is odd; rotary embeddings need it even"
            );
            norm = NormKind::Rms;
            gated = true;
            attn_bias = cfg.bool_or("attention_bias", false)?;
            mlp_bias = cfg.bool_or("mlp_bias", false)?;
            rotary = Some((d_head, cfg.rope_base(&["rope_theta"], 10000.0)?));
            let s = 1.0 / (d_head as f64).sqrt();
            scale = Box::new(move |_| s);
            (
                cfg.f64_or(&["rms_norm_eps"], 1e-6)?,
                cfg.activation("hidden_act", "silu")?,
            )
        }
    };
    let n_ctx = opts.n_ctx.unwrap_or(n_pos);
    ensure!(n_ctx > 0, "{file}: n_ctx must be positive");
    ensure!(
        rotary.is_some() || n_ctx <= n_pos,
        "{file}: n_ctx {n_ctx} exceeds the config's {n_pos} learned positions"
    );
    Ok(Spec {
        family,
        n_pos,
        arch: Arch {
            name: family.name().into(),
            d_vocab,
            d_model,
            n_ctx,
            n_layers,
            n_heads,
            n_kv_heads: n_kv_heads.unwrap_or(n_heads),
            d_head,
            d_mlp,
            norm: Some(norm),
            eps,
            act,
            gated,
            parallel,
            rotary,
            fold_norms: opts.fold_norms,
            last_pos_module_type: opts.last_pos_module_type.clone(),
        },
        scales: (0..n_layers).map(scale).collect(),
        windows: windows.unwrap_or_else(|| vec![None; n_layers]),
        attn_bias,
        mlp_bias,
    })
}

/// GPT-Neo's per-layer attention kinds (`true`: local), from `attention_layers` (a list of
/// `"global"` / `"local"`) or, failing that, `attention_types` (`[[["global", "local"], n],
/// ...]`, expanded as Hugging Face does).
fn neo_layer_kinds(cfg: &Config, n_layers: usize) -> anyhow::Result<Vec<bool>> {
    let file = cfg.file;
    let kind = |key: &str, v: &Value| -> anyhow::Result<bool> {
        match v.as_str() {
            Some("local") => Ok(true),
            Some("global") => Ok(false),
            _ => bail!("{file}: config `{key}`: attention kind {v} is neither global nor local"),
        }
    };
    let kinds: Vec<bool> = if let Some(layers) = cfg.get("attention_layers") {
        let list = layers
            .as_array()
            .with_context(|| format!("{file}: config `attention_layers` is not a list"))?;
        list.iter()
            .map(|v| kind("attention_layers", v))
            .collect::<anyhow::Result<_>>()?
    } else if let Some(types) = cfg.get("attention_types") {
        let bad =
            || format!("{file}: config `attention_types` = {types} is not [[[kinds], n], ...]");
        let mut out = Vec::new();
        for item in types.as_array().with_context(bad)? {
            let kinds = item.get(0).and_then(Value::as_array).with_context(bad)?;
            let reps = item.get(1).and_then(Value::as_u64).with_context(bad)?;
            for _ in 0..reps {
                for v in kinds {
                    out.push(kind("attention_types", v)?);
                }
            }
        }
        out
    } else {
        bail!("{file}: config `attention_layers` is missing");
    };
    ensure!(
        kinds.len() == n_layers,
        "{file}: config `attention_layers` lists {} layers but `num_layers` = {n_layers}",
        kinds.len()
    );
    Ok(kinds)
}

/// The embeddings, the final norm and the unembedding.
fn read_ends(w: &mut Weights, spec: &Spec, cfg: &Config) -> anyhow::Result<Ends> {
    let a = &spec.arch;
    let (d, v) = (a.d_model, a.d_vocab);
    let kind = a.norm.expect("language models have norms");
    let (embed, pos, final_norm, head, tie_default) = match spec.family {
        Family::Gpt2 => (
            "wte.weight",
            Some("wpe.weight"),
            "ln_f",
            "lm_head.weight",
            true,
        ),
        Family::GptNeo => (
            "wte.weight",
            Some("wpe.weight"),
            "ln_f",
            "lm_head.weight",
            true,
        ),
        Family::GptNeoX => (
            "embed_in.weight",
            None,
            "final_layer_norm",
            "embed_out.weight",
            false,
        ),
        Family::Llama => ("embed_tokens.weight", None, "norm", "lm_head.weight", false),
    };
    let w_e = w.table(embed, v, d)?;
    let w_pos = match pos {
        Some(name) => {
            // Only the first n_ctx learned positions are kept.
            let table = w.table(name, spec.n_pos, d)?;
            Some(table.subrows(0, a.n_ctx).to_owned())
        }
        None => None,
    };
    let tied = cfg.bool_or("tie_word_embeddings", tie_default)?;
    if tied {
        // Some files store the tied head anyway: the token embedding is used.
        w.t.remove(head);
    }
    let unembed = w.unembed(tied.then_some(&w_e), head, d, v)?;
    let ln_final = Some(w.norm(final_norm, d, kind)?);
    Ok(Ends {
        w_e,
        w_pos,
        ln_final,
        unembed,
    })
}

/// The unfolded weights of block `k`, moved out of the checkpoint.
fn read_block(w: &mut Weights, spec: &Spec, k: usize) -> anyhow::Result<BlockWeights> {
    let a = &spec.arch;
    let (d, h, hkv, dh, dmlp) = (a.d_model, a.n_heads, a.n_kv_heads, a.d_head, a.d_mlp);
    let kind = a.norm.expect("language models have norms");
    let (fq, fk) = (h * dh, hkv * dh);
    let (ln1, ln2, q, kk, v, o, mlp_in, mlp_up, mlp_out);
    match spec.family {
        Family::Gpt2 => {
            let p = |s: &str| format!("h.{k}.{s}");
            ln1 = w.norm(&p("ln_1"), d, kind)?;
            ln2 = w.norm(&p("ln_2"), d, kind)?;
            // c_attn: [D, 3D] = [q | k | v], each head-major.
            let qkv = w.conv1d_affine(&p("attn.c_attn"), d, 3 * d)?;
            let part = |i: usize| Affine {
                w: qkv.w.subcols(i * d, d).to_owned(),
                b: qkv.b.as_ref().map(|b| b[i * d..(i + 1) * d].to_vec()),
            };
            (q, kk, v) = (part(0), part(1), part(2));
            o = w.conv1d_affine(&p("attn.c_proj"), d, d)?;
            mlp_in = w.conv1d_affine(&p("mlp.c_fc"), d, dmlp)?;
            mlp_up = None;
            mlp_out = w.conv1d_affine(&p("mlp.c_proj"), dmlp, d)?;
        }
        Family::GptNeo => {
            let p = |s: &str| format!("h.{k}.{s}");
            ln1 = w.norm(&p("ln_1"), d, kind)?;
            ln2 = w.norm(&p("ln_2"), d, kind)?;
            q = w.linear_affine(&p("attn.attention.q_proj"), d, d, false)?;
            kk = w.linear_affine(&p("attn.attention.k_proj"), d, d, false)?;
            v = w.linear_affine(&p("attn.attention.v_proj"), d, d, false)?;
            o = w.linear_affine(&p("attn.attention.out_proj"), d, d, true)?;
            mlp_in = w.linear_affine(&p("mlp.c_fc"), d, dmlp, true)?;
            mlp_up = None;
            mlp_out = w.linear_affine(&p("mlp.c_proj"), dmlp, d, true)?;
        }
        Family::GptNeoX => {
            let p = |s: &str| format!("layers.{k}.{s}");
            ln1 = w.norm(&p("input_layernorm"), d, kind)?;
            ln2 = w.norm(&p("post_attention_layernorm"), d, kind)?;
            // query_key_value: output o = (h * 3 + part) * d_head + e (Hugging Face views it
            // as (..., H, 3 d_head) and splits the last axis into q, k, v).
            let qkv = w.linear_affine(&p("attention.query_key_value"), d, 3 * d, spec.attn_bias)?;
            let part = |i: usize| {
                let col = |c: usize| (c / dh * 3 + i) * dh + c % dh;
                Affine {
                    w: Mat::from_fn(d, d, |r, c| qkv.w[(r, col(c))]),
                    b: qkv.b.as_ref().map(|b| (0..d).map(|c| b[col(c)]).collect()),
                }
            };
            (q, kk, v) = (part(0), part(1), part(2));
            drop(qkv);
            o = w.linear_affine(&p("attention.dense"), d, d, spec.attn_bias)?;
            mlp_in = w.linear_affine(&p("mlp.dense_h_to_4h"), d, dmlp, true)?;
            mlp_up = None;
            mlp_out = w.linear_affine(&p("mlp.dense_4h_to_h"), dmlp, d, true)?;
        }
        Family::Llama => {
            let p = |s: &str| format!("layers.{k}.{s}");
            ln1 = w.norm(&p("input_layernorm"), d, kind)?;
            ln2 = w.norm(&p("post_attention_layernorm"), d, kind)?;
            let ab = spec.attn_bias;
            q = w.linear_affine(&p("self_attn.q_proj"), d, fq, ab)?;
            kk = w.linear_affine(&p("self_attn.k_proj"), d, fk, ab)?;
            v = w.linear_affine(&p("self_attn.v_proj"), d, fk, ab)?;
            o = w.linear_affine(&p("self_attn.o_proj"), fq, d, ab)?;
            let mb = spec.mlp_bias;
            mlp_in = w.linear_affine(&p("mlp.gate_proj"), d, dmlp, mb)?;
            mlp_up = Some(w.linear_affine(&p("mlp.up_proj"), d, dmlp, mb)?);
            mlp_out = w.linear_affine(&p("mlp.down_proj"), dmlp, d, mb)?;
        }
    }
    Ok(BlockWeights {
        ln1: Some(ln1),
        ln2: Some(ln2),
        q,
        k: kk,
        v,
        o,
        mlp_in,
        mlp_up,
        mlp_out,
        attn_scale: spec.scales[k],
        window: spec.windows[k],
    })
}
