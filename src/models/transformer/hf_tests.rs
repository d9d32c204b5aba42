//! The Hugging Face loader: tiny random checkpoints of every family, in Hugging Face naming and
//! layout (`Conv1D` weights `[in, out]`, `nn.Linear` weights `[out, in]`), written to disk,
//! loaded with [`load_hf`] and compared with an independent forward pass written here with
//! plain loops straight from the checkpoint's tensors (no folding, no modules); finite
//! differences of every module of those models; `last_pos` on rotary models; loader errors.

use super::hf::{hf_model_from_tensors, load_hf, LmOptions};
use super::tests::{check_section, random_batch, random_tokens};
use super::tokens_batch;
use crate::io::weights::{serialize_safetensors, Tensors};
use crate::models::mlp::erf;
use crate::models::{Activation, Model};
use crate::tensor::HostTensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::Path;

const VOCAB: usize = 11;
const N_POS: usize = 6;
/// Tokens per test sequence (less than `N_POS`, more than GPT-Neo's window).
const SEQ: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    Gpt2,
    /// Layer 1 local with window 2.
    GptNeo,
    /// Rotary on half of each head.
    GptNeoX {
        parallel: bool,
    },
    /// H = 4, H_kv = 2.
    Llama {
        tied: bool,
    },
}

const FAMILIES: [Family; 6] = [
    Family::Gpt2,
    Family::GptNeo,
    Family::GptNeoX { parallel: true },
    Family::GptNeoX { parallel: false },
    Family::Llama { tied: true },
    Family::Llama { tied: false },
];

/// A checkpoint: `config.json` and the tensors of `model.safetensors`.
#[derive(Clone)]
struct Checkpoint {
    config: Value,
    tensors: Tensors,
}

struct Gen {
    rng: ChaCha8Rng,
    t: Tensors,
}

impl Gen {
    /// Uniform in `centre ± spread`.
    fn put(&mut self, name: &str, shape: &[usize], centre: f64, spread: f64) {
        let len = shape.iter().product();
        let data = (0..len)
            .map(|_| centre + spread * self.rng.random_range(-1.0..1.0))
            .collect();
        self.t
            .insert(name.to_string(), HostTensor::new(shape.to_vec(), data));
    }
    /// A weight with fan-in `fan_in`.
    fn weight(&mut self, name: &str, shape: &[usize], fan_in: usize) {
        self.put(name, shape, 0.0, 1.5 / (fan_in as f64).sqrt());
    }
    /// A random nonzero bias.
    fn bias(&mut self, name: &str, len: usize) {
        self.put(name, &[len], 0.0, 0.3);
    }
    /// Norm weights around 1 (and a bias for layer norm).
    fn norm(&mut self, name: &str, d: usize, with_bias: bool) {
        self.put(&format!("{name}.weight"), &[d], 1.0, 0.5);
        if with_bias {
            self.bias(&format!("{name}.bias"), d);
        }
    }
}

/// A tiny random checkpoint of `family` with two blocks.
fn checkpoint(family: Family, seed: u64) -> Checkpoint {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        t: Tensors::new(),
    };
    let config = match family {
        Family::Gpt2 => {
            // Saved from the bare GPT2Model, as on the Hub: no `transformer.` prefix.
            let (d, i) = (8, 12);
            g.put("wte.weight", &[VOCAB, d], 0.0, 1.0);
            g.put("wpe.weight", &[N_POS, d], 0.0, 1.0);
            for k in 0..2 {
                let p = |s: &str| format!("h.{k}.{s}");
                g.norm(&p("ln_1"), d, true);
                g.weight(&p("attn.c_attn.weight"), &[d, 3 * d], d);
                g.bias(&p("attn.c_attn.bias"), 3 * d);
                g.weight(&p("attn.c_proj.weight"), &[d, d], d);
                g.bias(&p("attn.c_proj.bias"), d);
                g.put(&p("attn.bias"), &[1, 1, N_POS, N_POS], 1.0, 0.0);
                g.norm(&p("ln_2"), d, true);
                g.weight(&p("mlp.c_fc.weight"), &[d, i], d);
                g.bias(&p("mlp.c_fc.bias"), i);
                g.weight(&p("mlp.c_proj.weight"), &[i, d], i);
                g.bias(&p("mlp.c_proj.bias"), d);
            }
            g.norm("ln_f", d, true);
            json!({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": d, "n_head": 2, "n_layer": 2, "n_positions": N_POS, "n_ctx": N_POS,
                "vocab_size": VOCAB, "n_inner": i, "layer_norm_epsilon": 1e-5,
                "activation_function": "gelu_new", "scale_attn_weights": true
            })
        }
        Family::GptNeo => {
            let d = 8;
            let i = 4 * d;
            g.put("transformer.wte.weight", &[VOCAB, d], 0.0, 1.0);
            g.put("transformer.wpe.weight", &[N_POS, d], 0.0, 1.0);
            for k in 0..2 {
                let p = |s: &str| format!("transformer.h.{k}.{s}");
                g.norm(&p("ln_1"), d, true);
                for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    g.weight(&p(&format!("attn.attention.{m}.weight")), &[d, d], d);
                }
                g.bias(&p("attn.attention.out_proj.bias"), d);
                g.norm(&p("ln_2"), d, true);
                g.weight(&p("mlp.c_fc.weight"), &[i, d], d);
                g.bias(&p("mlp.c_fc.bias"), i);
                g.weight(&p("mlp.c_proj.weight"), &[d, i], i);
                g.bias(&p("mlp.c_proj.bias"), d);
            }
            g.norm("transformer.ln_f", d, true);
            json!({
                "model_type": "gpt_neo", "hidden_size": d, "num_heads": 2, "num_layers": 2,
                "max_position_embeddings": N_POS, "vocab_size": VOCAB,
                "intermediate_size": null, "window_size": 2,
                "attention_types": [[["global", "local"], 1]],
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5
            })
        }
        Family::GptNeoX { parallel } => {
            let (d, i) = (16, 20);
            g.put("gpt_neox.embed_in.weight", &[VOCAB, d], 0.0, 1.0);
            for k in 0..2 {
                let p = |s: &str| format!("gpt_neox.layers.{k}.{s}");
                g.norm(&p("input_layernorm"), d, true);
                g.norm(&p("post_attention_layernorm"), d, true);
                g.weight(&p("attention.query_key_value.weight"), &[3 * d, d], d);
                g.bias(&p("attention.query_key_value.bias"), 3 * d);
                g.weight(&p("attention.dense.weight"), &[d, d], d);
                g.bias(&p("attention.dense.bias"), d);
                g.put(&p("attention.rotary_emb.inv_freq"), &[2], 1.0, 0.0);
                g.weight(&p("mlp.dense_h_to_4h.weight"), &[i, d], d);
                g.bias(&p("mlp.dense_h_to_4h.bias"), i);
                g.weight(&p("mlp.dense_4h_to_h.weight"), &[d, i], i);
                g.bias(&p("mlp.dense_4h_to_h.bias"), d);
            }
            g.norm("gpt_neox.final_layer_norm", d, true);
            g.weight("embed_out.weight", &[VOCAB, d], d);
            json!({
                "model_type": "gpt_neox", "hidden_size": d, "num_attention_heads": 2,
                "num_hidden_layers": 2, "intermediate_size": i,
                "max_position_embeddings": N_POS, "vocab_size": VOCAB, "rotary_pct": 0.5,
                "rotary_emb_base": 100, "layer_norm_eps": 1e-5,
                "use_parallel_residual": parallel, "hidden_act": "gelu",
                "tie_word_embeddings": false, "rope_scaling": null
            })
        }
        Family::Llama { tied } => {
            let (d, h, hkv, dh, i) = (16, 4, 2, 4, 12);
            g.put("model.embed_tokens.weight", &[VOCAB, d], 0.0, 1.0);
            for k in 0..2 {
                let p = |s: &str| format!("model.layers.{k}.{s}");
                g.norm(&p("input_layernorm"), d, false);
                g.weight(&p("self_attn.q_proj.weight"), &[h * dh, d], d);
                g.weight(&p("self_attn.k_proj.weight"), &[hkv * dh, d], d);
                g.weight(&p("self_attn.v_proj.weight"), &[hkv * dh, d], d);
                g.weight(&p("self_attn.o_proj.weight"), &[d, h * dh], h * dh);
                g.norm(&p("post_attention_layernorm"), d, false);
                g.weight(&p("mlp.gate_proj.weight"), &[i, d], d);
                g.weight(&p("mlp.up_proj.weight"), &[i, d], d);
                g.weight(&p("mlp.down_proj.weight"), &[d, i], i);
            }
            g.norm("model.norm", d, false);
            if !tied {
                g.weight("lm_head.weight", &[VOCAB, d], d);
            }
            json!({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_size": d, "num_attention_heads": h, "num_key_value_heads": hkv,
                "num_hidden_layers": 2, "intermediate_size": i,
                "max_position_embeddings": N_POS, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
                "rope_theta": 500.0, "rope_scaling": null, "hidden_act": "silu",
                "tie_word_embeddings": tied, "attention_bias": false, "mlp_bias": false
            })
        }
    };
    Checkpoint {
        config,
        tensors: g.t,
    }
}

/// Writes `config.json` and `model.safetensors` (F64) into `dir`.
fn write_checkpoint(ck: &Checkpoint, dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&ck.config).unwrap(),
    )
    .unwrap();
    let bytes = serialize_safetensors(&ck.tensors, false, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The independent reference: plain loops on the Hugging Face tensors.
// ---------------------------------------------------------------------------------------------

/// `nn.Linear`: `y_o = b_o + sum_i W[o, i] x_i`, `W` stored `[out, in]`.
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let dout = w.len() / x.len();
    (0..dout)
        .map(|o| {
            let row = &w[o * x.len()..(o + 1) * x.len()];
            b.map_or(0.0, |b| b[o]) + row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>()
        })
        .collect()
}

/// GPT-2's `Conv1D`: `y_o = b_o + sum_i x_i W[i, o]`, `W` stored `[in, out]`.
fn conv1d(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let dout = w.len() / x.len();
    (0..dout)
        .map(|o| b[o] + (0..x.len()).map(|i| x[i] * w[i * dout + o]).sum::<f64>())
        .collect()
}

fn layer_norm(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
    (0..x.len())
        .map(|i| (x[i] - m) / (var + eps).sqrt() * g[i] + b[i])
        .collect()
}

fn rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    (0..x.len())
        .map(|i| x[i] / (ms + eps).sqrt() * g[i])
        .collect()
}

/// Hugging Face `apply_rotary_pos_emb` on one head at position `s`, the first `dims`
/// coordinates: `v * cos + rotate_half(v) * sin` with `cos = cat(cos(s f), cos(s f))`,
/// `f_i = base^(-2i / dims)`, `rotate_half(v) = cat(-v[half..], v[..half])`.
fn rope(v: &[f64], s: usize, dims: usize, base: f64) -> Vec<f64> {
    let half = dims / 2;
    let freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / dims as f64))
        .collect();
    let emb: Vec<f64> = freq.iter().chain(&freq).map(|f| s as f64 * f).collect();
    let rotated: Vec<f64> = (0..dims)
        .map(|j| if j < half { -v[j + half] } else { v[j - half] })
        .collect();
    (0..v.len())
        .map(|j| {
            if j < dims {
                v[j] * emb[j].cos() + rotated[j] * emb[j].sin()
            } else {
                v[j]
            }
        })
        .collect()
}

/// Causal attention over positions: `q[t]` of `h` heads, `k[s]`, `v[s]` of `hkv` heads of
/// `dh`; query head `j` reads kv head `j / (h / hkv)`; key `s` allowed for query `t` iff
/// `s <= t` and, with a window, `t - window < s`. Returns `z[t]` (`h * dh`).
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    h: usize,
    hkv: usize,
    dh: usize,
    scale: f64,
    window: Option<usize>,
) -> Vec<Vec<f64>> {
    let pos = q.len();
    let mut z = vec![vec![0.0; h * dh]; pos];
    for t in 0..pos {
        for j in 0..h {
            let g = j / (h / hkv);
            let allowed: Vec<usize> = (0..pos)
                .filter(|&s| s <= t && window.is_none_or(|w| t < s + w))
                .collect();
            let scores: Vec<f64> = allowed
                .iter()
                .map(|&s| {
                    scale
                        * (0..dh)
                            .map(|e| q[t][j * dh + e] * k[s][g * dh + e])
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|a| (a - max).exp()).sum();
            for (&s, a) in allowed.iter().zip(&scores) {
                let p = (a - max).exp() / sum;
                for e in 0..dh {
                    z[t][j * dh + e] += p * v[s][g * dh + e];
                }
            }
        }
    }
    z
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Logits `[t][vocab]` of one sequence, straight from the checkpoint.
fn reference_logits(family: Family, ck: &Checkpoint, tokens: &[usize]) -> Vec<Vec<f64>> {
    let t = |name: &str| -> &[f64] {
        &ck.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"))
            .data
    };
    let c = &ck.config;
    let pos = tokens.len();
    let row = |w: &[f64], d: usize, i: usize| w[i * d..(i + 1) * d].to_vec();
    match family {
        Family::Gpt2 | Family::GptNeo => {
            let neo = family == Family::GptNeo;
            let pre = if neo { "transformer." } else { "" };
            let n = |s: &str| format!("{pre}{s}");
            let d = c["n_embd"].as_u64().or(c["hidden_size"].as_u64()).unwrap() as usize;
            let h = 2;
            let dh = d / h;
            let eps = 1e-5;
            let mut x: Vec<Vec<f64>> = (0..pos)
                .map(|s| {
                    let (e, p) = (
                        row(t(&n("wte.weight")), d, tokens[s]),
                        row(t(&n("wpe.weight")), d, s),
                    );
                    e.iter().zip(&p).map(|(a, b)| a + b).collect()
                })
                .collect();
            for k in 0..2 {
                let b = |s: &str| n(&format!("h.{k}.{s}"));
                let hn: Vec<Vec<f64>> = x
                    .iter()
                    .map(|r| layer_norm(r, t(&b("ln_1.weight")), t(&b("ln_1.bias")), eps))
                    .collect();
                let (mut q, mut kk, mut v) = (vec![], vec![], vec![]);
                for r in &hn {
                    if neo {
                        let a = |m: &str| t(&b(&format!("attn.attention.{m}.weight"))).to_vec();
                        q.push(linear(r, &a("q_proj"), None));
                        kk.push(linear(r, &a("k_proj"), None));
                        v.push(linear(r, &a("v_proj"), None));
                    } else {
                        let qkv = conv1d(r, t(&b("attn.c_attn.weight")), t(&b("attn.c_attn.bias")));
                        q.push(qkv[..d].to_vec());
                        kk.push(qkv[d..2 * d].to_vec());
                        v.push(qkv[2 * d..].to_vec());
                    }
                }
                let (scale, window) = if neo {
                    (1.0, (k == 1).then_some(2))
                } else {
                    (1.0 / (dh as f64).sqrt(), None)
                };
                let z = attention(&q, &kk, &v, h, h, dh, scale, window);
                for s in 0..pos {
                    let a = if neo {
                        linear(
                            &z[s],
                            t(&b("attn.attention.out_proj.weight")),
                            Some(t(&b("attn.attention.out_proj.bias"))),
                        )
                    } else {
                        conv1d(
                            &z[s],
                            t(&b("attn.c_proj.weight")),
                            t(&b("attn.c_proj.bias")),
                        )
                    };
                    for i in 0..d {
                        x[s][i] += a[i];
                    }
                    let hn = layer_norm(&x[s], t(&b("ln_2.weight")), t(&b("ln_2.bias")), eps);
                    let m = if neo {
                        let pre =
                            linear(&hn, t(&b("mlp.c_fc.weight")), Some(t(&b("mlp.c_fc.bias"))));
                        let act: Vec<f64> = pre.into_iter().map(gelu_tanh).collect();
                        linear(
                            &act,
                            t(&b("mlp.c_proj.weight")),
                            Some(t(&b("mlp.c_proj.bias"))),
                        )
                    } else {
                        let pre = conv1d(&hn, t(&b("mlp.c_fc.weight")), t(&b("mlp.c_fc.bias")));
                        let act: Vec<f64> = pre.into_iter().map(gelu_tanh).collect();
                        conv1d(&act, t(&b("mlp.c_proj.weight")), t(&b("mlp.c_proj.bias")))
                    };
                    for i in 0..d {
                        x[s][i] += m[i];
                    }
                }
            }
            x.iter()
                .map(|r| {
                    let f = layer_norm(r, t(&n("ln_f.weight")), t(&n("ln_f.bias")), eps);
                    linear(&f, t(&n("wte.weight")), None)
                })
                .collect()
        }
        Family::GptNeoX { parallel } => {
            let (d, h) = (16, 2);
            let dh = d / h;
            let (rd, base, eps) = (dh / 2, 100.0, 1e-5);
            let mut x: Vec<Vec<f64>> = tokens
                .iter()
                .map(|&tok| row(t("gpt_neox.embed_in.weight"), d, tok))
                .collect();
            for k in 0..2 {
                let b = |s: &str| format!("gpt_neox.layers.{k}.{s}");
                let ln = |r: &[f64], which: &str| {
                    layer_norm(
                        r,
                        t(&b(&format!("{which}.weight"))),
                        t(&b(&format!("{which}.bias"))),
                        eps,
                    )
                };
                let mlp = |r: &[f64]| {
                    let hn = ln(r, "post_attention_layernorm");
                    let pre = linear(
                        &hn,
                        t(&b("mlp.dense_h_to_4h.weight")),
                        Some(t(&b("mlp.dense_h_to_4h.bias"))),
                    );
                    let act: Vec<f64> = pre.into_iter().map(gelu).collect();
                    linear(
                        &act,
                        t(&b("mlp.dense_4h_to_h.weight")),
                        Some(t(&b("mlp.dense_4h_to_h.bias"))),
                    )
                };
                let (mut q, mut kk, mut v) = (vec![], vec![], vec![]);
                for (s, r) in x.iter().enumerate() {
                    let qkv = linear(
                        &ln(r, "input_layernorm"),
                        t(&b("attention.query_key_value.weight")),
                        Some(t(&b("attention.query_key_value.bias"))),
                    );
                    // view (H, 3 d_head), split into q, k, v.
                    let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
                    for j in 0..h {
                        let head = &qkv[j * 3 * dh..(j + 1) * 3 * dh];
                        qs.extend(rope(&head[..dh], s, rd, base));
                        ks.extend(rope(&head[dh..2 * dh], s, rd, base));
                        vs.extend_from_slice(&head[2 * dh..]);
                    }
                    q.push(qs);
                    kk.push(ks);
                    v.push(vs);
                }
                let z = attention(&q, &kk, &v, h, h, dh, 1.0 / (dh as f64).sqrt(), None);
                for s in 0..pos {
                    let a = linear(
                        &z[s],
                        t(&b("attention.dense.weight")),
                        Some(t(&b("attention.dense.bias"))),
                    );
                    if parallel {
                        let m = mlp(&x[s]);
                        for i in 0..d {
                            x[s][i] += a[i] + m[i];
                        }
                    } else {
                        for i in 0..d {
                            x[s][i] += a[i];
                        }
                        let m = mlp(&x[s]);
                        for i in 0..d {
                            x[s][i] += m[i];
                        }
                    }
                }
            }
            x.iter()
                .map(|r| {
                    let f = layer_norm(
                        r,
                        t("gpt_neox.final_layer_norm.weight"),
                        t("gpt_neox.final_layer_norm.bias"),
                        eps,
                    );
                    linear(&f, t("embed_out.weight"), None)
                })
                .collect()
        }
        Family::Llama { tied } => {
            let (d, h, hkv, dh) = (16, 4, 2, 4);
            let (base, eps) = (500.0, 1e-6);
            let mut x: Vec<Vec<f64>> = tokens
                .iter()
                .map(|&tok| row(t("model.embed_tokens.weight"), d, tok))
                .collect();
            for k in 0..2 {
                let b = |s: &str| format!("model.layers.{k}.{s}");
                let (mut q, mut kk, mut v) = (vec![], vec![], vec![]);
                for (s, r) in x.iter().enumerate() {
                    let hn = rms_norm(r, t(&b("input_layernorm.weight")), eps);
                    let qs = linear(&hn, t(&b("self_attn.q_proj.weight")), None);
                    let ks = linear(&hn, t(&b("self_attn.k_proj.weight")), None);
                    q.push(qs.chunks(dh).flat_map(|c| rope(c, s, dh, base)).collect());
                    kk.push(ks.chunks(dh).flat_map(|c| rope(c, s, dh, base)).collect());
                    v.push(linear(&hn, t(&b("self_attn.v_proj.weight")), None));
                }
                let z = attention(&q, &kk, &v, h, hkv, dh, 1.0 / (dh as f64).sqrt(), None);
                for s in 0..pos {
                    let a = linear(&z[s], t(&b("self_attn.o_proj.weight")), None);
                    for i in 0..d {
                        x[s][i] += a[i];
                    }
                    let hn = rms_norm(&x[s], t(&b("post_attention_layernorm.weight")), eps);
                    let gate = linear(&hn, t(&b("mlp.gate_proj.weight")), None);
                    let up = linear(&hn, t(&b("mlp.up_proj.weight")), None);
                    let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
                    let m = linear(&act, t(&b("mlp.down_proj.weight")), None);
                    for i in 0..d {
                        x[s][i] += m[i];
                    }
                }
            }
            let head = if tied {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            x.iter()
                .map(|r| linear(&rms_norm(r, t("model.norm.weight"), eps), t(head), None))
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

fn opts(fold_norms: bool, last: Option<&str>) -> LmOptions {
    LmOptions {
        fold_norms,
        last_pos_module_type: last.map(String::from),
        n_ctx: None,
    }
}

/// Loads `ck` from disk (through the directory or the `config.json` path).
fn load(ck: &Checkpoint, o: &LmOptions, via_config: bool) -> Model {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(ck, dir.path());
    let path = if via_config {
        dir.path().join("config.json")
    } else {
        dir.path().to_path_buf()
    };
    load_hf(&path, o).unwrap()
}

/// Runs the model module by module, checking every node layer from `add_embed` on ends in
/// exactly 1, and returns the worst relative difference of the logits against the reference
/// (at the last position only when the model keeps only that).
fn worst_vs_reference(family: Family, ck: &Checkpoint, model: &Model, seqs: &[Vec<usize>]) -> f64 {
    let mut x = tokens_batch(seqs);
    for (i, m) in model.modules.iter().enumerate() {
        assert_eq!(x.features(), m.in_features(), "{family:?} {}", m.id());
        if i >= 2 {
            let bias = x.data.col_as_slice(x.features() - 1);
            assert!(
                bias.iter().all(|&b| b == 1.0),
                "{family:?}: node layer {} does not end in 1",
                m.id()
            );
        }
        x = m.forward(&x).0;
        assert_eq!(x.features(), m.out_features(), "{family:?} {}", m.id());
    }
    let mut worst: f64 = 0.0;
    for (n, seq) in seqs.iter().enumerate() {
        let want = reference_logits(family, ck, seq);
        for p in 0..x.pos {
            let t = seq.len() - x.pos + p;
            for (j, &w) in want[t].iter().enumerate() {
                let got = x.data[(n * x.pos + p, j)];
                worst = worst.max((got - w).abs() / (1.0 + w.abs()));
            }
        }
    }
    worst
}

#[test]
fn every_family_matches_the_reference_forward_folded_and_unfolded() {
    let seqs = random_tokens(3, SEQ, VOCAB, 1);
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let ck = checkpoint(family, 10 + i as u64);
        for fold in [true, false] {
            let model = load(&ck, &opts(fold, None), fold);
            let worst = worst_vs_reference(family, &ck, &model, &seqs);
            eprintln!("{family:?} fold_norms={fold}: worst logit error {worst:.1e}");
            assert!(
                worst < 1e-10,
                "{family:?} fold_norms={fold}: logits differ from the reference by {worst:e}"
            );
        }
    }
}

#[test]
fn folded_and_unfolded_norms_give_the_same_logits() {
    let seqs = random_tokens(2, SEQ, VOCAB, 2);
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let ck = checkpoint(family, 20 + i as u64);
        let run = |fold| {
            let model =
                hf_model_from_tensors(&ck.config, ck.tensors.clone(), &opts(fold, None), "mem")
                    .unwrap();
            model.run(tokens_batch(&seqs), 0, model.modules.len()).data
        };
        let (a, b) = (run(true), run(false));
        let worst = (0..a.nrows())
            .flat_map(|r| (0..a.ncols()).map(move |c| (r, c)))
            .map(|(r, c)| (a[(r, c)] - b[(r, c)]).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "{family:?}: {worst:e}");
    }
}

#[test]
fn rotary_models_keep_the_last_position() {
    let seqs = random_tokens(3, SEQ, VOCAB, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (family, last) in [
        (Family::Llama { tied: false }, "attn_out"),
        (Family::Llama { tied: true }, "add_resid2"),
        (Family::GptNeoX { parallel: true }, "add_resid1"),
        (Family::GptNeoX { parallel: false }, "ln_final"),
    ] {
        let ck = checkpoint(family, 30);
        let model = hf_model_from_tensors(
            &ck.config,
            ck.tensors.clone(),
            &opts(true, Some(last)),
            "mem",
        )
        .unwrap();
        assert_eq!(model.section(0, model.modules.len()).out_pos(SEQ), 1);
        let worst = worst_vs_reference(family, &ck, &model, &seqs);
        assert!(worst < 1e-10, "{family:?} last_pos {last}: {worst:e}");
        // Derivatives through the last-position modules.
        let a = model.node_index("attn_in.1").unwrap();
        let x = model.run(tokens_batch(&seqs), 0, a);
        let what = format!("{family:?} last_pos {last}");
        check_section(
            &model.section(a, model.modules.len()),
            &x,
            2,
            &what,
            &mut rng,
        );
    }
}

#[test]
fn every_module_of_every_family_matches_finite_differences() {
    let seqs = random_tokens(2, SEQ, VOCAB, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let ck = checkpoint(family, 40 + i as u64);
        for fold in [true, false] {
            let model =
                hf_model_from_tensors(&ck.config, ck.tensors.clone(), &opts(fold, None), "mem")
                    .unwrap();
            let input = tokens_batch(&seqs);
            for (j, m) in model.modules.iter().enumerate().skip(1) {
                let x = model.run(input.clone(), 0, j);
                let what = format!("{family:?} fold_norms={fold} {}", m.id());
                check_section(&model.section(j, j + 1), &x, 2, &what, &mut rng);
            }
            let (a, b) = (model.node_index("add_embed").unwrap(), model.modules.len());
            let x = model.run(input.clone(), 0, a);
            let what = format!("{family:?} fold_norms={fold} whole model");
            check_section(&model.section(a, b), &x, 2, &what, &mut rng);
        }
    }
}

#[test]
fn gated_mlp_carries_the_folded_one() {
    let r = Activation::Silu.unit_root();
    assert!((Activation::Silu.apply(r) - 1.0).abs() < 1e-15, "silu({r})");
    assert!((r - 1.278_464_542_761_074).abs() < 1e-12, "silu root {r}");
    let ck = checkpoint(Family::Llama { tied: true }, 50);
    let model = hf_model_from_tensors(&ck.config, ck.tensors, &opts(true, None), "mem").unwrap();
    let seqs = random_tokens(2, SEQ, VOCAB, 7);
    for k in 0..2 {
        let i = model.node_index(&format!("mlp_act.{k}")).unwrap();
        let x = model.run(tokens_batch(&seqs), 0, i);
        // (gate, up, resid): gate ends in r, up in 1.
        let m = 13;
        assert_eq!(x.features(), 2 * m + 17);
        assert!(x.data.col_as_slice(m - 1).iter().all(|&g| g == r));
        assert!(x.data.col_as_slice(2 * m - 1).iter().all(|&u| u == 1.0));
        let y = model.run(x, i, i + 1);
        assert!(y
            .data
            .col_as_slice(m - 1)
            .iter()
            .all(|&h| (h - 1.0).abs() < 1e-15));
        // Scaling the input to 0 sends the whole gated activation to 0.
        let z = model.run(crate::tensor::Batch::zeros(1, 1, 1, 2 * m + 17), i, i + 1);
        assert!(z.data.col_as_slice(0).iter().all(|&v| v == 0.0));
    }
    // Node-layer widths: GQA attn_in = q (4 x 4) + k (2 x 4) + v (2 x 5) + (LN, resid).
    let a = model.node_index("attn_out.0").unwrap();
    assert_eq!(model.node_features(a), 16 + 8 + 10 + 17);
}

#[test]
fn parallel_residual_layout() {
    let ck = checkpoint(Family::GptNeoX { parallel: true }, 60);
    let model = hf_model_from_tensors(&ck.config, ck.tensors, &opts(true, None), "mem").unwrap();
    let r = 17;
    let width = |name: &str| model.node_features(model.node_index(name).unwrap());
    assert_eq!(width("add_resid1.0"), 2 * r);
    assert_eq!(width("ln2.0"), 2 * r);
    assert_eq!(width("ln2_out.0"), 1 + 2 * r);
    assert_eq!(width("mlp_in.0"), 3 * r);
    assert_eq!(width("mlp_act.0"), 21 + r);
    assert_eq!(width("add_embed"), r);
    assert_eq!(width("ln1.0"), r);
}

fn load_err(ck: &Checkpoint) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(ck, dir.path());
    match load_hf(dir.path(), &LmOptions::default()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "not one line: {msg}");
            assert!(msg.contains("model.safetensors"), "no file: {msg}");
            msg
        }
    }
}

#[test]
fn loader_errors_are_one_line_naming_the_tensor_or_key() {
    let llama = checkpoint(Family::Llama { tied: false }, 70);
    let neox = checkpoint(Family::GptNeoX { parallel: true }, 71);
    let gpt2 = checkpoint(Family::Gpt2, 72);

    let mut ck = llama.clone();
    ck.config["model_type"] = json!("bert");
    let e = load_err(&ck);
    assert!(e.contains("model_type") && e.contains("bert"), "{e}");

    let mut ck = llama.clone();
    ck.config.as_object_mut().unwrap().remove("model_type");
    ck.config["architectures"] = json!(["BertModel"]);
    assert!(load_err(&ck).contains("BertModel"));

    let mut ck = llama.clone();
    ck.tensors.remove("model.layers.1.mlp.up_proj.weight");
    let e = load_err(&ck);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let mut ck = llama.clone();
    ck.tensors.remove("lm_head.weight");
    assert!(load_err(&ck).contains("lm_head.weight"));

    let mut ck = neox.clone();
    ck.tensors.insert(
        "gpt_neox.layers.0.attention.query_key_value.weight".into(),
        HostTensor::new(vec![16, 48], vec![0.0; 16 * 48]),
    );
    let e = load_err(&ck);
    assert!(
        e.contains("gpt_neox.layers.0.attention.query_key_value.weight") && e.contains("shape"),
        "{e}"
    );

    let mut ck = gpt2.clone();
    ck.tensors.get_mut("h.1.mlp.c_fc.bias").unwrap().data[2] = f64::NAN;
    let e = load_err(&ck);
    assert!(e.contains("h.1.mlp.c_fc.bias") && e.contains("NaN"), "{e}");

    let mut ck = llama.clone();
    ck.config["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
    assert!(load_err(&ck).contains("rope_scaling"));

    let mut ck = neox.clone();
    ck.config["rotary_pct"] = json!(0.375);
    let e = load_err(&ck);
    assert!(e.contains("rotary_pct") && e.contains("3 rotary"), "{e}");

    let mut ck = llama.clone();
    ck.config.as_object_mut().unwrap().remove("hidden_size");
    assert!(load_err(&ck).contains("hidden_size"));

    let mut ck = llama.clone();
    ck.config["num_key_value_heads"] = json!(3);
    assert!(load_err(&ck).contains("num_key_value_heads"));

    // Biases the config says are absent.
    let mut ck = llama.clone();
    ck.tensors.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        HostTensor::new(vec![16], vec![0.1; 16]),
    );
    let e = load_err(&ck);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("attention_bias"),
        "{e}"
    );

    let mut ck = gpt2.clone();
    ck.config["activation_function"] = json!("mish");
    assert!(load_err(&ck).contains("activation_function"));

    // A bad last_pos_module_type, and n_ctx beyond the learned positions.
    let e = hf_model_from_tensors(
        &gpt2.config,
        gpt2.tensors.clone(),
        &opts(true, Some("attn_in")),
        "mem",
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("last_pos_module_type"), "{e}");
    let o = LmOptions {
        n_ctx: Some(N_POS + 1),
        ..LmOptions::default()
    };
    let e = hf_model_from_tensors(&gpt2.config, gpt2.tensors.clone(), &o, "mem")
        .err()
        .unwrap();
    assert!(e.to_string().contains("n_ctx"), "{e}");

    // Sizes no model has, which would otherwise allocate or loop for hours.
    for (ck, key) in [
        (&gpt2, "n_layer"),
        (&llama, "num_hidden_layers"),
        (&llama, "head_dim"),
        (&llama, "max_position_embeddings"),
    ] {
        let mut ck = ck.clone();
        ck.config[key] = json!(1u64 << 31);
        let e = load_err(&ck);
        assert!(
            e.contains(key) && e.contains("larger than any model"),
            "{e}"
        );
    }
}

#[test]
fn shorter_context_and_architecture_name_dispatch() {
    // n_ctx below the learned positions keeps the first rows; `architectures` alone is enough.
    let mut ck = checkpoint(Family::Gpt2, 80);
    ck.config.as_object_mut().unwrap().remove("model_type");
    let o = LmOptions {
        n_ctx: Some(SEQ),
        ..LmOptions::default()
    };
    let model = hf_model_from_tensors(&ck.config, ck.tensors.clone(), &o, "mem").unwrap();
    let seqs = random_tokens(2, SEQ, VOCAB, 8);
    assert!(worst_vs_reference(Family::Gpt2, &ck, &model, &seqs) < 1e-10);
    assert_eq!(model.name, "gpt2");
}

#[test]
fn tied_head_stored_anyway_and_safetensors_path() {
    let mut ck = checkpoint(Family::Llama { tied: true }, 85);
    let mut head = ck.tensors["model.embed_tokens.weight"].clone();
    head.data[0] += 1.0; // ignored: the token embedding is the head
    ck.tensors.insert("lm_head.weight".into(), head);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(&ck, dir.path());
    let model = load_hf(&dir.path().join("model.safetensors"), &LmOptions::default()).unwrap();
    let seqs = random_tokens(2, SEQ, VOCAB, 10);
    ck.tensors.remove("lm_head.weight");
    assert!(worst_vs_reference(Family::Llama { tied: true }, &ck, &model, &seqs) < 1e-10);
}

#[test]
fn sharded_checkpoints_load() {
    let ck = checkpoint(Family::Llama { tied: true }, 90);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), ck.config.to_string()).unwrap();
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in ck.tensors.iter().enumerate() {
        let (part, file) = if i.is_multiple_of(2) {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        part.insert(name.clone(), t.clone());
        map.insert(name.clone(), json!(file));
    }
    for (part, file) in [
        (&a, "model-00001-of-00002.safetensors"),
        (&b, "model-00002-of-00002.safetensors"),
    ] {
        std::fs::write(
            dir.path().join(file),
            serialize_safetensors(part, false, None).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let model = load_hf(dir.path(), &LmOptions::default()).unwrap();
    let seqs = random_tokens(2, SEQ, VOCAB, 9);
    assert!(worst_vs_reference(Family::Llama { tied: true }, &ck, &model, &seqs) < 1e-10);
}

#[test]
fn lm_options_deserialise_strictly() {
    let o: LmOptions = toml::from_str("").unwrap();
    assert_eq!(o, LmOptions::default());
    assert!(o.fold_norms);
    let o: LmOptions =
        toml::from_str("fold_norms = false\nn_ctx = 128\nlast_pos_module_type = \"unembed\"")
            .unwrap();
    assert!(!o.fold_norms);
    assert_eq!(o.n_ctx, Some(128));
    assert!(toml::from_str::<LmOptions>("fold_norm = true").is_err());
}

/// The gated MLP activation on random points, beyond the models' own pre-activations: a wide
/// range of gate values (the rotary and windowed attention are checked inside the models).
#[test]
fn gated_activation_matches_finite_differences_on_random_points() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let m = super::modules::MlpAct {
        id: "mlp_act.0".into(),
        act: Activation::Silu,
        width: 5,
        resid: 3,
        gated: true,
    };
    let sec_modules: Vec<Box<dyn crate::models::Module>> = vec![Box::new(m)];
    let sec = crate::models::Section {
        modules: &sec_modules,
    };
    let mut x = random_batch(3, 1, 2, 13, &mut rng);
    for v in x.data.col_as_slice_mut(0) {
        *v *= 6.0;
    }
    check_section(&sec, &x, 3, "gated silu", &mut rng);
}

/// The llama.cpp name of a Hugging Face Llama tensor.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.").expect("a block tensor");
            let (k, part) = rest.split_once('.').unwrap();
            let g = match part {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => panic!("unexpected tensor {other}"),
            };
            format!("blk.{k}.{g}")
        }
    }
}

/// A Llama checkpoint written as llama.cpp writes GGUF files (F16 matrices, F32 norms, Q/K
/// rows permuted) loads, through the GGUF reader and the Hugging Face builder, to logits equal
/// to the reference forward pass on the same rounded weights in Hugging Face order.
#[test]
fn llama_gguf_matches_the_reference_forward() {
    use crate::io::gguf::{
        f64_to_f16, llama_from_gguf, permute_like_llama_cpp, read_gguf, write_gguf, GgufType,
        GgufValue,
    };
    use crate::io::weights::f16_to_f64;
    let seqs = random_tokens(3, SEQ, VOCAB, 7);
    for tied in [true, false] {
        let ck = checkpoint(Family::Llama { tied }, 40 + tied as u64);
        let cfg = &ck.config;
        let int = |k: &str| cfg[k].as_u64().unwrap() as u32;
        let (heads, kv_heads) = (
            int("num_attention_heads") as usize,
            int("num_key_value_heads") as usize,
        );
        let mut reference = ck.clone();
        let mut stored = Vec::new();
        for (name, t) in &ck.tensors {
            let (ty, data): (GgufType, Vec<f64>) = if t.shape.len() == 2 {
                let r = t.data.iter().map(|&x| f16_to_f64(f64_to_f16(x))).collect();
                (GgufType::F16, r)
            } else {
                (
                    GgufType::F32,
                    t.data.iter().map(|&x| x as f32 as f64).collect(),
                )
            };
            let rounded = HostTensor::new(t.shape.clone(), data);
            reference.tensors.insert(name.clone(), rounded.clone());
            let on_disk = if name.ends_with("q_proj.weight") {
                permute_like_llama_cpp(&rounded, heads)
            } else if name.ends_with("k_proj.weight") {
                permute_like_llama_cpp(&rounded, kv_heads)
            } else {
                rounded
            };
            stored.push((gguf_name(name), t.shape.clone(), ty, on_disk.data));
        }
        let mut meta = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: GgufValue| {
            meta.insert(k.to_string(), v);
        };
        put("general.architecture", GgufValue::String("llama".into()));
        put("llama.embedding_length", GgufValue::U32(int("hidden_size")));
        put(
            "llama.feed_forward_length",
            GgufValue::U32(int("intermediate_size")),
        );
        put(
            "llama.block_count",
            GgufValue::U32(int("num_hidden_layers")),
        );
        put("llama.attention.head_count", GgufValue::U32(heads as u32));
        put(
            "llama.attention.head_count_kv",
            GgufValue::U32(kv_heads as u32),
        );
        put(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        );
        put(
            "llama.rope.freq_base",
            GgufValue::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        );
        put(
            "llama.context_length",
            GgufValue::U32(int("max_position_embeddings")),
        );
        put("llama.vocab_size", GgufValue::U32(int("vocab_size")));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &meta, &stored).unwrap();
        let g = read_gguf(&path).unwrap();
        let (config, tensors) = llama_from_gguf(&g, "tiny.gguf").unwrap();
        for fold in [true, false] {
            let model =
                hf_model_from_tensors(&config, tensors.clone(), &opts(fold, None), "tiny.gguf")
                    .unwrap();
            let worst = worst_vs_reference(Family::Llama { tied }, &reference, &model, &seqs);
            eprintln!("GGUF llama tied={tied} fold_norms={fold}: worst logit error {worst:.1e}");
            assert!(worst < 1e-10, "GGUF llama tied={tied}: {worst:e}");
        }
    }
}

/// Token sequences as a dataset (for LIB builds on the tiny checkpoints).
struct Sequences(Vec<Vec<usize>>);

impl crate::data::Dataset for Sequences {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn inputs(&self, range: std::ops::Range<usize>) -> crate::tensor::Batch {
        tokens_batch(&self.0[range])
    }
    fn labels(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        self.0[range].iter().map(|s| s[s.len() - 1]).collect()
    }
    fn describe(&self) -> String {
        format!("{} random sequences", self.0.len())
    }
}

/// The closed-form squared edges of layer-norm halves (layer norm with a carried attention
/// stream in parallel GPT-NeoX blocks, RMS norm in Llama) equal the general JVP path, for the
/// gradient rule and for Gauss-Legendre points (where the norm is not homogeneous).
/// `ln2.k -> ln1.{k+1}` (the norm, then the MLP, then the residual add) by per-row Jacobians
/// through the norm's rank-one form, and `ln1.k -> ln2.k` (the norm, q/k/v, attention, the
/// residual add) by attention JVPs of tangents built through it, against the general JVP path
/// in every family (layer norm and RMS norm, dense and gated MLPs, the parallel residual's
/// carried stream, local attention, rotary and grouped-query attention), and in f32.
#[test]
fn norm_section_edges_equal_the_general_path_in_every_family() {
    use crate::algorithm::{
        build, edges::edge_path, integration, resolve_node_layers, BasisFormula, ComputeDtype,
        LibConfig,
    };
    let data = Sequences(random_tokens(24, SEQ, VOCAB, 5));
    let layers = ["ln1.0", "ln2.0", "ln1.1"];
    for family in FAMILIES {
        let ck = checkpoint(family, 78);
        let model = load(&ck, &opts(true, None), true);
        for (rule, n) in [
            (integration::Rule::Gradient, 0),
            (integration::Rule::GaussLegendre, 2),
        ] {
            let mut cfg = LibConfig {
                node_layers: layers.iter().map(|s| s.to_string()).collect(),
                basis_formula: BasisFormula::Jacobian,
                center: true,
                tau: 1e-12,
                integration_rule: rule,
                n_intervals: n,
                batch_size: 5,
                ..Default::default()
            };
            let resolved = resolve_node_layers(&model, &cfg.node_layers).unwrap();
            let path = edge_path(&model, &cfg, &resolved, 1, 9, 9);
            assert!(path.contains("rank-one"), "{family:?}: {path}");
            let path = edge_path(&model, &cfg, &resolved, 0, 9, 9);
            assert!(path.starts_with("attention JVP"), "{family:?}: {path}");
            let fast = build(&model, &data, &cfg).unwrap();
            let slow = build(&load(&ck, &opts(true, None), true).opaque(), &data, &cfg).unwrap();
            let rel = |a: &faer::Mat<f64>, b: &faer::Mat<f64>| {
                let d: faer::Mat<f64> = a - b;
                d.norm_l2() / b.norm_l2()
            };
            for l in 0..2 {
                let err = rel(&fast.edges[l], &slow.edges[l]);
                assert!(
                    err <= 1e-9,
                    "{family:?} {rule:?}: {} -> {} relative difference {err:e}",
                    layers[l],
                    layers[l + 1]
                );
            }
            cfg.compute_dtype = ComputeDtype::F32;
            let low = build(&model, &data, &cfg).unwrap();
            // The general path's f32 projection too (`jvp_edges`).
            let opaque = load(&ck, &opts(true, None), true).opaque();
            let low_slow = build(&opaque, &data, &cfg).unwrap();
            for l in 0..2 {
                let err = rel(&low.edges[l], &fast.edges[l]);
                assert!(
                    err <= 1e-4 && err > 0.0,
                    "{family:?} {rule:?} edges {l}: f32 {err:e}"
                );
                let err = rel(&low_slow.edges[l], &slow.edges[l]);
                assert!(
                    err <= 1e-4 && err > 0.0,
                    "{family:?} {rule:?} edges {l}: general path in f32 {err:e}"
                );
            }
        }
    }
}

#[test]
fn closed_form_section_edges_equal_the_general_path_in_every_family() {
    use crate::algorithm::{build, integration, BasisFormula, LibConfig};
    let data = Sequences(random_tokens(24, SEQ, VOCAB, 3));
    let layers = [
        "ln1.0",
        "ln1_out.0",
        "attn_in.0",
        "ln2.0",
        "ln2_out.0",
        "mlp_in.0",
        "ln1.1",
    ];
    // Every family: the norm halves in closed form, the MLP sections (dense GELU, SwiGLU) by
    // per-row Jacobians, against the general JVP path.
    for family in FAMILIES {
        let ck = checkpoint(family, 77);
        for (rule, n) in [
            (integration::Rule::Gradient, 0),
            (integration::Rule::GaussLegendre, 2),
        ] {
            let cfg = LibConfig {
                node_layers: layers.iter().map(|s| s.to_string()).collect(),
                basis_formula: BasisFormula::Jacobian,
                center: true,
                tau: 1e-12,
                integration_rule: rule,
                n_intervals: n,
                batch_size: 5,
                ..Default::default()
            };
            let model = load(&ck, &opts(true, None), true);
            let fast = build(&model, &data, &cfg).unwrap();
            let slow = build(&model.opaque(), &data, &cfg).unwrap();
            for (l, (a, b)) in fast.edges.iter().zip(&slow.edges).enumerate() {
                let d: faer::Mat<f64> = a - b;
                let rel = d.norm_l2() / b.norm_l2();
                assert!(
                    rel <= 1e-9,
                    "{family:?} {rule:?} edges {} -> {}: relative difference {rel:e}",
                    layers[l],
                    layers[l + 1]
                );
            }
        }
    }
}
