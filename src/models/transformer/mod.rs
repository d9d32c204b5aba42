//! Decoder-only transformers as a flat list of bias-folded modules (method.md sections 8 and
//! 9), built from TransformerLens-named weights ([`transformer_from_tensors`]: the
//! modular-addition and LNPre models) or Hugging Face checkpoints ([`hf::load_hf`]: GPT-2,
//! GPT-Neo, GPT-NeoX / Pythia, Llama), both through one builder.
//!
//! # Modules and their output streams
//!
//! `R = d_model + 1` is the residual stream with the folded bias last; `H` query heads and
//! `H_kv` key / value heads (`H_kv = H` except with grouped-query attention) of `d_head`;
//! `M = d_mlp + 1`. Offsets are feature (column) offsets of a module's output; the node layer
//! named `m` is the *input* of module `m`, i.e. the previous module's output. Every node layer
//! from `add_embed` on ends with a constant 1 (the residual's bias coordinate). Side streams
//! travel with the residual, which is always last.
//!
//! | module | output streams (offset: stream) | features |
//! |---|---|---|
//! | `embed` | 0: `W_E'[token] = [W_E[token], 0]` (rotary models: `[W_E[token], 1]`) | `R` |
//! | `pos_embed` (learned positions) | 0: token embedding, `R`: `W_pos'[s] = [W_pos[s], 1]` | `2R` |
//! | `add_embed` (learned positions) | 0: resid | `R` |
//! | `pos_embed`, `add_embed` (rotary) | 0: resid (identities) | `R` |
//! | `ln1.k`, `ln_final`, sequential `ln2.k` | 0: var, 1: resid | `1 + R` |
//! | parallel `ln2.k` | 0: var, 1: attn, `1 + R`: resid | `1 + 2R` |
//! | `ln1_out.k`, sequential `ln2_out.k` | 0: LN(resid) (its last coordinate the bias 1), `R`: resid | `2R` |
//! | parallel `ln2_out.k` | 0: LN(resid), `R`: attn, `2R`: resid | `3R` |
//! | `ln_final_out` | 0: LN(resid) (bias 1 last) | `R` |
//! | `lnX`, `lnX_out` (no normalization) | 0: resid (identity) | `R` |
//! | `attn_in.k` | 0: q (`H d_head`), `Hd`: k (`H_kv d_head`), `Hd + H_kv d`: v (`H_kv (d_head + 1)`, each head ends in 1), then resid | `(H + H_kv) d_head + H_kv (d_head + 1) + R` |
//! | `attn_out.k` | 0: attn (last coordinate 0), `R`: resid | `2R` |
//! | sequential `add_resid1.k` | 0: resid + attn | `R` |
//! | parallel `add_resid1.k` | 0: attn, `R`: resid (identity: nothing added yet) | `2R` |
//! | `mlp_in.k` | 0: pre-activations (last = `r`, `act(r) = 1`), `M`: resid (parallel: resid + attn) | `M + R` |
//! | gated `mlp_in.k` | 0: gate (last = `r`, `act(r) = 1`), `M`: up (last = 1), `2M`: resid (parallel: resid + attn) | `2M + R` |
//! | `mlp_act.k` | 0: post-activations `act(pre)` or `act(gate) * up` (last = 1), `M`: resid | `M + R` |
//! | `mlp_out.k` | 0: mlp (last coordinate 0), `R`: resid | `2R` |
//! | `add_resid2.k` | 0: resid + mlp | `R` |
//! | `unembed` | 0: logits | `d_vocab_out` |
//!
//! `var` is the norm's channel: the variance of the residual's non-bias coordinates for layer
//! norm, their mean square for RMS norm. `LN(resid)` is the normalized residual, times the
//! norm's affine weights only with `fold_norms = false` (by default they are folded into the
//! next linear map: `attn_in`, `mlp_in`, `unembed`). Query head `h` is at `h d_head ..` inside
//! `q`; kv head `g` at `g d_head ..` inside `k` and `g (d_head + 1) ..` inside `v`; query head
//! `h` reads kv head `h / (H / H_kv)`. Rotary embeddings and local attention windows act inside
//! `attn_out` ([`attention::AttnOut`]).
//!
//! **Parallel residual** (GPT-NeoX `use_parallel_residual`: `x + attn(ln1(x)) + mlp(ln2(x))`):
//! `add_resid1.k` leaves `(attn, resid)` unadded, `ln2.k` / `ln2_out.k` normalise the block's
//! input `resid` and carry `attn` along, and `mlp_in.k` adds it to the residual (a fixed
//! linear map), so from `mlp_act.k` on the streams mean the same as in a sequential block.
//!
//! Without layer norm the `lnX` / `lnX_out` modules are identities on the residual stream (so
//! node layers `ln1.0`, `ln2.0`, `unembed` of the modular-addition model are all exactly the
//! 129-dim residual stream), and `attn_in` / `mlp_in` / `unembed` read the residual itself as
//! their "normalized" input. With a norm, coordinate 0 of `ln1_out.k`, `ln2_out.k`,
//! `ln_final_out` is the variance channel (method.md section 4.1, layer-norm isolation).
//! `ln_final_out` drops the residual: nothing after it needs it (as the reference).
//!
//! `embed` and `pos_embed` cannot be node layers ([`check_node_layer`]).

pub mod attention;
mod build;
pub mod hf;
pub mod modules;

#[cfg(test)]
mod hf_tests;
#[cfg(test)]
mod tests;

use super::{Activation, Model};
use crate::io::weights::{take, Tensors};
use anyhow::{bail, ensure, Context};
use build::{build_transformer, Affine, Arch, BlockWeights, Ends};
use faer::Mat;
use modules::NormKind;

/// Layer normalization of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// No layer norm (the modular-addition model).
    #[default]
    None,
    /// TransformerLens `LNPre`: centre and scale the non-bias coordinates, no affine weights.
    #[serde(alias = "lnpre", alias = "LNPre")]
    LnPre,
}

/// How to build a transformer from TransformerLens-named weights.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct TransformerOptions {
    /// The MLP nonlinearity (default relu).
    pub act: Activation,
    pub normalization: Normalization,
    /// Layer-norm epsilon (default 1e-5).
    pub ln_eps: f64,
    /// Factor multiplying `q . k` before the softmax; default `1 / sqrt(d_head)` (TransformerLens
    /// divides by `sqrt(d_head)`); `1.0` for no scaling (GPT-Neo).
    pub attn_scale: Option<f64>,
    /// Keep only the last position from this module on (method.md section 9): a module type
    /// such as `add_resid1` (its instance in the **last** block, the only choice that leaves
    /// the last position's logits unchanged) or a full module id such as `add_resid1.0`.
    /// Allowed from the last block's `attn_out` on (earlier, a later attention would lose its
    /// keys); `unembed` is always allowed.
    pub last_pos_module_type: Option<String>,
}

impl Default for TransformerOptions {
    fn default() -> Self {
        Self {
            act: Activation::Relu,
            normalization: Normalization::None,
            ln_eps: 1e-5,
            attn_scale: None,
            last_pos_module_type: None,
        }
    }
}

/// Rejects node layers that cannot be differentiated through: `embed` (its input is token
/// ids) and `pos_embed` (its input is the token embedding, whose folded bias coordinate is 0,
/// not 1: `W_E` gets a 0 column, method.md section 8).
pub fn check_node_layer(name: &str) -> anyhow::Result<()> {
    match name {
        "embed" => bail!(
            "node layer `embed` is not allowed: its input is token ids, which have no \
             derivative; use `add_embed` or a later module"
        ),
        "pos_embed" => bail!(
            "node layer `pos_embed` is not allowed: its input is the token embedding, whose \
             folded bias coordinate is 0 rather than 1 (method.md section 8); use `add_embed` \
             or a later module"
        ),
        _ => Ok(()),
    }
}

/// Dimensions read off the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerDims {
    pub d_vocab: usize,
    pub d_vocab_out: usize,
    pub d_model: usize,
    pub n_ctx: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
}

/// A 2-D or 3-D shape of a tensor that must exist, for inferring dimensions.
fn shape_of<'a>(
    t: &'a Tensors,
    name: &str,
    ndim: usize,
    file: &str,
) -> anyhow::Result<&'a [usize]> {
    let s = &t
        .get(name)
        .with_context(|| format!("{file}: missing tensor `{name}`"))?
        .shape;
    ensure!(
        s.len() == ndim && s.iter().all(|&d| d > 0),
        "{file}: tensor `{name}` has shape {s:?}, expected {ndim} nonzero dimensions"
    );
    Ok(s)
}

impl TransformerDims {
    /// Infers the dimensions from `embed.W_E`, `pos_embed.W_pos`, `blocks.0.attn.W_Q`,
    /// `blocks.0.mlp.W_in` and `unembed.W_U`, and the number of blocks from the `blocks.{k}.`
    /// names (consistency of every other tensor is checked when it is read).
    pub fn infer(t: &Tensors, file: &str) -> anyhow::Result<Self> {
        let we = shape_of(t, "embed.W_E", 2, file)?;
        let (d_vocab, d_model) = (we[0], we[1]);
        let n_ctx = shape_of(t, "pos_embed.W_pos", 2, file)?[0];
        let wu = shape_of(t, "unembed.W_U", 2, file)?;
        let d_vocab_out = wu[1];
        let mut n_layers = 0;
        for name in t.keys() {
            if let Some(rest) = name.strip_prefix("blocks.") {
                let k: usize = rest
                    .split('.')
                    .next()
                    .and_then(|k| k.parse().ok())
                    .with_context(|| format!("{file}: tensor `{name}`: no block index"))?;
                n_layers = n_layers.max(k + 1);
            }
        }
        let (mut n_heads, mut d_head, mut d_mlp) = (1, 1, 1);
        if n_layers > 0 {
            let wq = shape_of(t, "blocks.0.attn.W_Q", 3, file)?;
            (n_heads, d_head) = (wq[0], wq[2]);
            d_mlp = shape_of(t, "blocks.0.mlp.W_in", 2, file)?[1];
        }
        Ok(Self {
            d_vocab,
            d_vocab_out,
            d_model,
            n_ctx,
            n_layers,
            n_heads,
            d_head,
            d_mlp,
        })
    }
}

/// Row-major data of a checked tensor.
fn get<'a>(t: &'a Tensors, name: &str, shape: &[usize], file: &str) -> anyhow::Result<&'a [f64]> {
    Ok(&take(t, name, shape, file)?.data)
}

/// A checked 2-D tensor as a matrix.
fn mat(t: &Tensors, name: &str, rows: usize, cols: usize, file: &str) -> anyhow::Result<Mat<f64>> {
    let v = get(t, name, &[rows, cols], file)?;
    Ok(Mat::from_fn(rows, cols, |i, j| v[i * cols + j]))
}

/// The unfolded weights of block `k` from TransformerLens names.
fn tl_block(
    t: &Tensors,
    k: usize,
    d: &TransformerDims,
    attn_scale: f64,
    file: &str,
) -> anyhow::Result<BlockWeights> {
    let (dm, h, dh, dmlp) = (d.d_model, d.n_heads, d.d_head, d.d_mlp);
    let name = |s: &str| format!("blocks.{k}.attn.{s}");
    // W_Q, W_K, W_V `[H, D, d_head]` -> `D x H d_head`; biases `[H, d_head]`.
    let per_head = |w: &str, b: &str| -> anyhow::Result<Affine> {
        let wv = get(t, &name(w), &[h, dm, dh], file)?;
        let bv = get(t, &name(b), &[h, dh], file)?;
        Ok(Affine {
            w: Mat::from_fn(dm, h * dh, |i, c| wv[((c / dh) * dm + i) * dh + c % dh]),
            b: Some(bv.to_vec()),
        })
    };
    let affine = |w: &str, b: &str, din: usize, dout: usize| -> anyhow::Result<Affine> {
        Ok(Affine {
            w: mat(t, &format!("blocks.{k}.{w}"), din, dout, file)?,
            b: Some(get(t, &format!("blocks.{k}.{b}"), &[dout], file)?.to_vec()),
        })
    };
    Ok(BlockWeights {
        ln1: None,
        ln2: None,
        q: per_head("W_Q", "b_Q")?,
        k: per_head("W_K", "b_K")?,
        v: per_head("W_V", "b_V")?,
        // W_O `[H, d_head, D]` is `H d_head x D` row-major.
        o: Affine {
            w: {
                let wo = get(t, &name("W_O"), &[h, dh, dm], file)?;
                Mat::from_fn(h * dh, dm, |i, j| wo[i * dm + j])
            },
            b: Some(get(t, &name("b_O"), &[dm], file)?.to_vec()),
        },
        mlp_in: affine("mlp.W_in", "mlp.b_in", dm, dmlp)?,
        mlp_up: None,
        mlp_out: affine("mlp.W_out", "mlp.b_out", dmlp, dm)?,
        attn_scale,
        window: None,
    })
}

/// Rejects layer-norm weights: this builder knows weightless layer norms only.
fn reject_ln_weights(t: &Tensors, n_layers: usize, file: &str) -> anyhow::Result<()> {
    let mut names = vec!["ln_final.w".to_string(), "ln_final.b".to_string()];
    for k in 0..n_layers {
        for ln in ["ln1", "ln2"] {
            names.push(format!("blocks.{k}.{ln}.w"));
            names.push(format!("blocks.{k}.{ln}.b"));
        }
    }
    if let Some(n) = names.iter().find(|n| t.contains_key(*n)) {
        bail!(
            "{file}: tensor `{n}`: layer norms with weights are not supported; fold them into \
             the following weights first (TransformerLens `fold_ln=True`, then normalization \
             `ln_pre`)"
        );
    }
    Ok(())
}

/// The module ids, in order (method.md section 9).
pub fn module_ids(n_layers: usize) -> Vec<String> {
    let mut ids: Vec<String> = ["embed", "pos_embed", "add_embed"].map(String::from).into();
    for k in 0..n_layers {
        for m in [
            "ln1",
            "ln1_out",
            "attn_in",
            "attn_out",
            "add_resid1",
            "ln2",
            "ln2_out",
            "mlp_in",
            "mlp_act",
            "mlp_out",
            "add_resid2",
        ] {
            ids.push(format!("{m}.{k}"));
        }
    }
    ids.extend(["ln_final", "ln_final_out", "unembed"].map(String::from));
    ids
}

/// The index (into [`module_ids`]) of the module `last_pos_module_type` names.
pub(crate) fn last_pos_index(ids: &[String], n_layers: usize, what: &str) -> anyhow::Result<usize> {
    let last_block = n_layers.checked_sub(1);
    let candidate = ids.iter().position(|id| id == what).or_else(|| {
        let k = last_block?;
        ids.iter().position(|id| *id == format!("{what}.{k}"))
    });
    // Allowed: from the last block's attn_out on (or from add_embed without blocks).
    let first_allowed = match last_block {
        Some(k) => ids.iter().position(|id| *id == format!("attn_out.{k}")),
        None => ids.iter().position(|id| id == "add_embed"),
    }
    .expect("module list has its fixed ids");
    match candidate {
        Some(i) if i >= first_allowed => Ok(i),
        _ => bail!(
            "last_pos_module_type `{what}` is not allowed: use a module type or id from {} on \
             ({}); earlier, a later attention layer would lose the other positions",
            ids[first_allowed],
            ids[first_allowed..].join(", ")
        ),
    }
}

/// Builds the folded transformer from TransformerLens-named weights (`file` names the source in
/// errors). Dimensions are inferred from the shapes; every tensor is shape- and NaN-checked,
/// errors are one line naming the tensor and the file. `blocks.{k}.attn.mask` and `IGNORE` are
/// ignored (the mask is always causal).
pub fn transformer_from_tensors(
    tensors: &Tensors,
    opts: &TransformerOptions,
    file: &str,
) -> anyhow::Result<Model> {
    let d = TransformerDims::infer(tensors, file)?;
    reject_ln_weights(tensors, d.n_layers, file)?;
    ensure!(
        opts.ln_eps.is_finite() && opts.ln_eps >= 0.0,
        "ln_eps must be finite and non-negative, got {}",
        opts.ln_eps
    );
    let scale = opts.attn_scale.unwrap_or(1.0 / (d.d_head as f64).sqrt());
    ensure!(scale.is_finite(), "attn_scale must be finite, got {scale}");
    let arch = Arch {
        name: "transformer".into(),
        d_vocab: d.d_vocab,
        d_model: d.d_model,
        n_ctx: d.n_ctx,
        n_layers: d.n_layers,
        n_heads: d.n_heads,
        n_kv_heads: d.n_heads,
        d_head: d.d_head,
        d_mlp: d.d_mlp,
        norm: match opts.normalization {
            Normalization::None => None,
            Normalization::LnPre => Some(NormKind::LayerNorm),
        },
        eps: opts.ln_eps,
        act: opts.act,
        gated: false,
        parallel: false,
        rotary: None,
        fold_norms: true,
        last_pos_module_type: opts.last_pos_module_type.clone(),
    };
    // Reject a bad last_pos_module_type before reading any weights.
    if let Some(w) = &opts.last_pos_module_type {
        last_pos_index(&module_ids(d.n_layers), d.n_layers, w)?;
    }
    let ends = Ends {
        w_e: mat(tensors, "embed.W_E", d.d_vocab, d.d_model, file)?,
        w_pos: Some(mat(tensors, "pos_embed.W_pos", d.n_ctx, d.d_model, file)?),
        ln_final: None,
        unembed: Affine {
            w: mat(tensors, "unembed.W_U", d.d_model, d.d_vocab_out, file)?,
            b: Some(get(tensors, "unembed.b_U", &[d.d_vocab_out], file)?.to_vec()),
        },
    };
    build_transformer(&arch, ends, |k| tl_block(tensors, k, &d, scale, file))
}

/// Token sequences (all of one length) as the model's input batch: one column of ids.
pub fn tokens_batch(tokens: &[Vec<usize>]) -> crate::tensor::Batch {
    let pos = tokens.first().map_or(0, |t| t.len());
    assert!(
        tokens.iter().all(|t| t.len() == pos),
        "ragged token sequences"
    );
    let data = Mat::from_fn(tokens.len() * pos, 1, |i, _| {
        tokens[i / pos][i % pos] as f64
    });
    crate::tensor::Batch::new(tokens.len(), 1, pos, data)
}

/// An independent, unfolded forward pass straight from the TransformerLens weights, with plain
/// loops (no folding, no modules): logits at every position, rows `(sample, position)`.
/// `last_pos_module_type` is ignored (compare the last position). For tests of the folding.
pub fn unfolded_forward(
    tensors: &Tensors,
    opts: &TransformerOptions,
    tokens: &[Vec<usize>],
) -> anyhow::Result<Mat<f64>> {
    let file = "unfolded_forward";
    let d = TransformerDims::infer(tensors, file)?;
    let (dm, h, dh, dmlp) = (d.d_model, d.n_heads, d.d_head, d.d_mlp);
    let scale = opts.attn_scale.unwrap_or(1.0 / (dh as f64).sqrt());
    let ln = |x: &[f64]| -> Vec<f64> {
        match opts.normalization {
            Normalization::None => x.to_vec(),
            Normalization::LnPre => {
                let m = x.iter().sum::<f64>() / dm as f64;
                let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / dm as f64;
                x.iter()
                    .map(|v| (v - m) / (var + opts.ln_eps).sqrt())
                    .collect()
            }
        }
    };
    let we = get(tensors, "embed.W_E", &[d.d_vocab, dm], file)?;
    let wp = get(tensors, "pos_embed.W_pos", &[d.n_ctx, dm], file)?;
    let wu = get(tensors, "unembed.W_U", &[dm, d.d_vocab_out], file)?;
    let bu = get(tensors, "unembed.b_U", &[d.d_vocab_out], file)?;
    let pos = tokens.first().map_or(0, |t| t.len());
    ensure!(pos <= d.n_ctx, "{pos} positions exceed n_ctx {}", d.n_ctx);
    let mut logits = Mat::zeros(tokens.len() * pos, d.d_vocab_out);
    for (x, seq) in tokens.iter().enumerate() {
        ensure!(seq.len() == pos, "ragged token sequences");
        if let Some(&bad) = seq.iter().find(|&&t| t >= d.d_vocab) {
            bail!("token {bad} out of range for d_vocab {}", d.d_vocab);
        }
        // resid[s][i]
        let mut resid: Vec<Vec<f64>> = seq
            .iter()
            .enumerate()
            .map(|(s, &tok)| (0..dm).map(|i| we[tok * dm + i] + wp[s * dm + i]).collect())
            .collect();
        for k in 0..d.n_layers {
            let name = |s: &str| format!("blocks.{k}.{s}");
            let wq = get(tensors, &name("attn.W_Q"), &[h, dm, dh], file)?;
            let wk = get(tensors, &name("attn.W_K"), &[h, dm, dh], file)?;
            let wv = get(tensors, &name("attn.W_V"), &[h, dm, dh], file)?;
            let bq = get(tensors, &name("attn.b_Q"), &[h, dh], file)?;
            let bk = get(tensors, &name("attn.b_K"), &[h, dh], file)?;
            let bv = get(tensors, &name("attn.b_V"), &[h, dh], file)?;
            let wo = get(tensors, &name("attn.W_O"), &[h, dh, dm], file)?;
            let bo = get(tensors, &name("attn.b_O"), &[dm], file)?;
            let win = get(tensors, &name("mlp.W_in"), &[dm, dmlp], file)?;
            let bin = get(tensors, &name("mlp.b_in"), &[dmlp], file)?;
            let wout = get(tensors, &name("mlp.W_out"), &[dmlp, dm], file)?;
            let bout = get(tensors, &name("mlp.b_out"), &[dm], file)?;
            let xn: Vec<Vec<f64>> = resid.iter().map(|r| ln(r)).collect();
            // proj[s][hh][e] = xn[s] . W[hh][:, e] + b[hh][e]
            let proj = |w: &[f64], b: &[f64]| -> Vec<Vec<Vec<f64>>> {
                (0..pos)
                    .map(|s| {
                        (0..h)
                            .map(|hh| {
                                (0..dh)
                                    .map(|e| {
                                        let mut acc = b[hh * dh + e];
                                        for i in 0..dm {
                                            acc += xn[s][i] * w[(hh * dm + i) * dh + e];
                                        }
                                        acc
                                    })
                                    .collect()
                            })
                            .collect()
                    })
                    .collect()
            };
            let (q, kk, v) = (proj(wq, bq), proj(wk, bk), proj(wv, bv));
            let mut attn = vec![bo.to_vec(); pos];
            for hh in 0..h {
                for t in 0..pos {
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| scale * (0..dh).map(|e| q[t][hh][e] * kk[s][hh][e]).sum::<f64>())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|a| (a - max).exp()).sum();
                    let mut z = vec![0.0; dh];
                    for s in 0..=t {
                        let p = (scores[s] - max).exp() / sum;
                        for e in 0..dh {
                            z[e] += p * v[s][hh][e];
                        }
                    }
                    for (j, a) in attn[t].iter_mut().enumerate() {
                        for e in 0..dh {
                            *a += z[e] * wo[(hh * dh + e) * dm + j];
                        }
                    }
                }
            }
            for s in 0..pos {
                for i in 0..dm {
                    resid[s][i] += attn[s][i];
                }
                let xn = ln(&resid[s]);
                let hid: Vec<f64> = (0..dmlp)
                    .map(|j| {
                        let z = bin[j] + (0..dm).map(|i| xn[i] * win[i * dmlp + j]).sum::<f64>();
                        opts.act.apply(z)
                    })
                    .collect();
                for i in 0..dm {
                    resid[s][i] +=
                        bout[i] + (0..dmlp).map(|j| hid[j] * wout[j * dm + i]).sum::<f64>();
                }
            }
        }
        for s in 0..pos {
            let xn = ln(&resid[s]);
            for o in 0..d.d_vocab_out {
                logits[(x * pos + s, o)] = bu[o]
                    + (0..dm)
                        .map(|i| xn[i] * wu[i * d.d_vocab_out + o])
                        .sum::<f64>();
            }
        }
    }
    Ok(logits)
}
