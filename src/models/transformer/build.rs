//! The one builder behind both loaders (TransformerLens-named weights in [`super`], Hugging Face
//! checkpoints in [`super::hf`]): unfolded per-architecture weights in, the bias-folded module
//! list of method.md sections 8 and 9 out (stream layout: the table in [`super`]'s docs).

use super::attention::{AttnOut, Rotary};
use super::modules::{
    Add, Embed, Identity, LastPos, LnOut, LnVar, MlpAct, NormAffine, NormKind, PosEmbed, Project,
};
use super::{last_pos_index, module_ids};
use crate::models::mlp::Dense;
use crate::models::{Activation, InputKind, Model, Module};
use anyhow::ensure;
use faer::Mat;
use std::sync::Arc;

/// Everything the module list depends on besides the weights.
#[derive(Clone, Debug)]
pub(crate) struct Arch {
    /// The model's name ([`Model::name`]).
    pub name: String,
    pub d_vocab: usize,
    pub d_model: usize,
    /// Positions the model accepts (rows of `W_pos`, or rotary tables).
    pub n_ctx: usize,
    pub n_layers: usize,
    /// `H`, query heads.
    pub n_heads: usize,
    /// `H_kv`, key / value heads (divides `H`).
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    /// `None`: no normalization (the `lnX` modules are identities).
    pub norm: Option<NormKind>,
    pub eps: f64,
    pub act: Activation,
    /// SwiGLU-style MLP `down(act(gate x) * up x)`.
    pub gated: bool,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` instead of the sequential block.
    pub parallel: bool,
    /// Rotary embeddings `(dims per head, base)` instead of learned positions.
    pub rotary: Option<(usize, f64)>,
    /// Fold the norms' affine weights into the following linear maps (else `lnX_out` applies
    /// them).
    pub fold_norms: bool,
    pub last_pos_module_type: Option<String>,
}

/// An unfolded affine map `x W + b`, `W` of shape `(in, out)`; `b = None`: no bias.
pub(crate) struct Affine {
    pub w: Mat<f64>,
    pub b: Option<Vec<f64>>,
}

impl Affine {
    /// `(n g + beta) W + b = n (diag(g) W) + (beta W + b)`: a norm's affine weights moved into
    /// the map that reads the norm's output.
    fn absorb_norm(&mut self, norm: &NormAffine) {
        let mut b = self.b.take().unwrap_or_else(|| vec![0.0; self.w.ncols()]);
        for (j, bj) in b.iter_mut().enumerate() {
            let col = self.w.col_as_slice_mut(j);
            for ((w, beta), g) in col.iter_mut().zip(&norm.bias).zip(&norm.weight) {
                *bj += beta * *w;
                *w *= g;
            }
        }
        self.b = Some(b);
    }

    /// The bias, zeros if none.
    fn bias(&self) -> Vec<f64> {
        self.b.clone().unwrap_or_else(|| vec![0.0; self.w.ncols()])
    }

    /// `[[W, 0], [b, last]]` (`(in + 1) x (out + 1)`): the bias as the last input row and an extra
    /// output column `[0, .., 0, last]` carrying the folded 1 on (method.md section 8); without
    /// `last`, `[[W], [b]]` (`(in + 1) x out`, for the logits).
    fn fold(&self, last: Option<f64>) -> Mat<f64> {
        let (din, dout) = (self.w.nrows(), self.w.ncols());
        let b = self.bias();
        let cols = dout + usize::from(last.is_some());
        let last = last.unwrap_or(0.0);
        Mat::from_fn(din + 1, cols, |i, j| match (i < din, j < dout) {
            (true, true) => self.w[(i, j)],
            (false, true) => b[j],
            (true, false) => 0.0,
            (false, false) => last,
        })
    }
}

/// Unfolded weights of one block, every map `x W + b` with `W` of shape `(in, out)`.
pub(crate) struct BlockWeights {
    /// Affine weights of the two norms (`None`: weightless, e.g. LNPre).
    pub ln1: Option<NormAffine>,
    pub ln2: Option<NormAffine>,
    /// `D x H d_head`, head `h` at columns `h d_head ..`.
    pub q: Affine,
    /// `D x H_kv d_head`.
    pub k: Affine,
    /// `D x H_kv d_head`.
    pub v: Affine,
    /// `H d_head x D`.
    pub o: Affine,
    /// `D x d_mlp`: `W_in`, or the gate of a gated MLP.
    pub mlp_in: Affine,
    /// `D x d_mlp`: the up projection of a gated MLP.
    pub mlp_up: Option<Affine>,
    /// `d_mlp x D`.
    pub mlp_out: Affine,
    /// Multiplies `q . k`.
    pub attn_scale: f64,
    /// Local attention window (`None`: global).
    pub window: Option<usize>,
}

/// The embeddings and the unembedding, unfolded.
pub(crate) struct Ends {
    /// `d_vocab x D`.
    pub w_e: Mat<f64>,
    /// `n_ctx x D` learned positions (`None` with rotary embeddings).
    pub w_pos: Option<Mat<f64>>,
    /// Affine weights of the final norm.
    pub ln_final: Option<NormAffine>,
    /// `D x d_vocab_out`.
    pub unembed: Affine,
}

/// The folded attention and MLP weights of one block (method.md section 8).
struct FoldedBlock {
    /// `R x (H d_head + H_kv d_head + H_kv (d_head + 1))`: `[W_Q' | W_K' | W_V']`.
    w_qkv: Mat<f64>,
    /// `H (d_head + 1) x R`.
    w_o: Mat<f64>,
    /// `R x M` (`M = d_mlp + 1`), or `R x 2M` `[W_gate' | W_up']` when gated.
    w_in: Mat<f64>,
    /// `M x R`.
    w_out: Mat<f64>,
}

fn fold_block(a: &Arch, b: &BlockWeights) -> FoldedBlock {
    let (dm, h, hkv, dh) = (a.d_model, a.n_heads, a.n_kv_heads, a.d_head);
    // W_Q', W_K': bias as an extra input row. W_V': extra input row and, per kv head, an
    // extra output column [0, .., 0, 1] so that every head's value ends in the folded 1.
    let (fq, fk, dv) = (h * dh, hkv * dh, dh + 1);
    let mut w_qkv = Mat::zeros(dm + 1, fq + fk + hkv * dv);
    let (bq, bk, bv) = (b.q.bias(), b.k.bias(), b.v.bias());
    for i in 0..=dm {
        for c in 0..fq {
            w_qkv[(i, c)] = if i < dm { b.q.w[(i, c)] } else { bq[c] };
        }
        for c in 0..fk {
            w_qkv[(i, fq + c)] = if i < dm { b.k.w[(i, c)] } else { bk[c] };
            let cv = fq + fk + (c / dh) * dv + c % dh;
            w_qkv[(i, cv)] = if i < dm { b.v.w[(i, c)] } else { bv[c] };
        }
    }
    for g in 0..hkv {
        w_qkv[(dm, fq + fk + g * dv + dh)] = 1.0;
    }
    // W_O': per head the rows of W_O[h], then b_O / H (attention weights sum to 1, so the heads
    // add exactly b_O); a zero output column for the bias coordinate.
    let bo = b.o.bias();
    let w_o = Mat::from_fn(h * dv, dm + 1, |row, j| match (row % dv < dh, j < dm) {
        (_, false) => 0.0,
        (true, true) => b.o.w[((row / dv) * dh + row % dv, j)],
        (false, true) => bo[j] / h as f64,
    });
    // W_in' as an MLP layer (bias row, column [0, .., 0, r] with act(r) = 1); a gated MLP's up
    // projection gets the column [0, .., 0, 1], so act(g) * u ends in 1.
    let mut w_in = b.mlp_in.fold(Some(a.act.unit_root()));
    if let Some(up) = &b.mlp_up {
        let (gate, up) = (w_in, up.fold(Some(1.0)));
        let m = gate.ncols();
        w_in = Mat::from_fn(dm + 1, 2 * m, |i, j| {
            if j < m {
                gate[(i, j)]
            } else {
                up[(i, j - m)]
            }
        });
    }
    // W_out': bias row and zero column.
    let w_out = b.mlp_out.fold(Some(0.0));
    FoldedBlock {
        w_qkv,
        w_o,
        w_in,
        w_out,
    }
}

/// Builds the folded module list (ids [`module_ids`]) from the architecture, the embeddings
/// and unembedding, and the blocks read one at a time by `block(k)` (so that a loader can
/// drop each block's unfolded tensors before reading the next). Checks the dimensions.
pub(crate) fn build_transformer(
    a: &Arch,
    ends: Ends,
    mut block: impl FnMut(usize) -> anyhow::Result<BlockWeights>,
) -> anyhow::Result<Model> {
    let (dm, r) = (a.d_model, a.d_model + 1);
    ensure!(
        a.eps.is_finite() && a.eps >= 0.0,
        "{}: norm epsilon must be finite and non-negative, got {}",
        a.name,
        a.eps
    );
    ensure!(
        a.n_kv_heads > 0 && a.n_heads.is_multiple_of(a.n_kv_heads),
        "{}: {} query heads are not a multiple of {} key/value heads",
        a.name,
        a.n_heads,
        a.n_kv_heads
    );
    ensure!(
        !a.parallel || a.norm.is_some(),
        "{}: a parallel residual needs layer norms",
        a.name
    );
    let ids = module_ids(a.n_layers);
    let last_pos = a
        .last_pos_module_type
        .as_deref()
        .map(|w| last_pos_index(&ids, a.n_layers, w))
        .transpose()?;

    let ln_in = |id: String, carried: usize| -> Box<dyn Module> {
        match a.norm {
            Some(kind) => Box::new(LnVar {
                id,
                width: r,
                carried,
                kind,
            }),
            None => Box::new(Identity {
                id,
                width: carried + r,
            }),
        }
    };
    let ln_out = |id: String, carried: usize, keep_resid: bool, affine: Option<NormAffine>| {
        let m: Box<dyn Module> = match a.norm {
            Some(kind) => Box::new(LnOut {
                id,
                width: r,
                carried,
                eps: a.eps,
                kind,
                keep_resid,
                affine: if a.fold_norms { None } else { affine },
            }),
            None => Box::new(Identity {
                id,
                width: carried + r,
            }),
        };
        m
    };
    // Width of (LN(resid), resid) with a norm, of resid alone without.
    let normed_in = if a.norm.is_some() { 2 * r } else { r };

    let Ends {
        w_e,
        w_pos,
        mut ln_final,
        mut unembed,
    } = ends;
    // W_E' = [W_E, 0] and W_pos' = [W_pos, 1]; rotary models: W_E' = [W_E, 1] (method.md 8).
    let e_bias = if w_pos.is_some() { 0.0 } else { 1.0 };
    let embed = Embed {
        w_e: Mat::from_fn(
            a.d_vocab,
            r,
            |i, j| if j < dm { w_e[(i, j)] } else { e_bias },
        ),
    };
    drop(w_e);
    let mut modules: Vec<Box<dyn Module>> = vec![Box::new(embed)];
    match w_pos {
        Some(wp) => {
            modules.push(Box::new(PosEmbed {
                w_pos: Mat::from_fn(a.n_ctx, r, |i, j| if j < dm { wp[(i, j)] } else { 1.0 }),
            }));
            modules.push(Box::new(Add {
                id: "add_embed".into(),
                width: r,
            }));
        }
        None => {
            for id in ["pos_embed", "add_embed"] {
                modules.push(Box::new(Identity {
                    id: id.into(),
                    width: r,
                }));
            }
        }
    }
    let rotary = a
        .rotary
        .map(|(dims, base)| Arc::new(Rotary::new(dims, base, a.n_ctx)));
    // The parallel residual carries attn_out's output (attn, resid) unadded through ln2 and
    // ln2_out; mlp_in adds the two.
    let carried = if a.parallel { r } else { 0 };
    for k in 0..a.n_layers {
        let mut b = block(k)?;
        if a.fold_norms {
            if let Some(n) = &b.ln1 {
                for m in [&mut b.q, &mut b.k, &mut b.v] {
                    m.absorb_norm(n);
                }
            }
            if let Some(n) = &b.ln2 {
                b.mlp_in.absorb_norm(n);
                if let Some(up) = &mut b.mlp_up {
                    up.absorb_norm(n);
                }
            }
        }
        let f = fold_block(a, &b);
        let attn_out_id = format!("attn_out.{k}");
        let attn_last = last_pos.is_some_and(|i| ids[i] == attn_out_id);
        let m = a.d_mlp + 1;
        modules.push(ln_in(format!("ln1.{k}"), 0));
        modules.push(ln_out(format!("ln1_out.{k}"), 0, true, b.ln1.take()));
        modules.push(Box::new(Project {
            id: format!("attn_in.{k}"),
            w: f.w_qkv,
            in_features: normed_in,
            resid: r,
            resid_streams: 1,
        }));
        modules.push(Box::new(AttnOut {
            id: attn_out_id,
            heads: a.n_heads,
            kv_heads: a.n_kv_heads,
            d_head: a.d_head,
            scale: b.attn_scale,
            w_o: f.w_o,
            resid: r,
            last_pos: attn_last,
            window: b.window,
            rotary: rotary.clone(),
        }));
        modules.push(if a.parallel {
            Box::new(Identity {
                id: format!("add_resid1.{k}"),
                width: 2 * r,
            })
        } else {
            Box::new(Add {
                id: format!("add_resid1.{k}"),
                width: r,
            })
        });
        modules.push(ln_in(format!("ln2.{k}"), carried));
        modules.push(ln_out(format!("ln2_out.{k}"), carried, true, b.ln2.take()));
        modules.push(Box::new(Project {
            id: format!("mlp_in.{k}"),
            w: f.w_in,
            in_features: normed_in + carried,
            resid: r,
            resid_streams: if a.parallel { 2 } else { 1 },
        }));
        modules.push(Box::new(MlpAct {
            id: format!("mlp_act.{k}"),
            act: a.act,
            width: m,
            resid: r,
            gated: a.gated,
        }));
        modules.push(Box::new(Project {
            id: format!("mlp_out.{k}"),
            w: f.w_out,
            in_features: m + r,
            resid: r,
            resid_streams: 1,
        }));
        modules.push(Box::new(Add {
            id: format!("add_resid2.{k}"),
            width: r,
        }));
    }
    modules.push(ln_in("ln_final".into(), 0));
    if a.fold_norms {
        if let Some(n) = &ln_final {
            unembed.absorb_norm(n);
        }
    }
    modules.push(ln_out("ln_final_out".into(), 0, false, ln_final.take()));
    // W_U': bias row; logits carry no bias coordinate.
    modules.push(Box::new(Dense {
        id: "unembed".into(),
        w: unembed.fold(None),
        act: Activation::Identity,
    }));
    drop(unembed);
    debug_assert!(modules
        .iter()
        .map(|m| m.id())
        .eq(ids.iter().map(|s| s.as_str())));

    // attn_out computes its last query itself; per-position modules are wrapped.
    let modules = modules
        .into_iter()
        .enumerate()
        .map(|(i, m)| -> Box<dyn Module> {
            if last_pos == Some(i) && !ids[i].starts_with("attn_out.") {
                Box::new(LastPos(m))
            } else {
                m
            }
        })
        .collect();
    Ok(Model {
        name: a.name.clone(),
        input: InputKind::Tokens { vocab: a.d_vocab },
        modules,
    })
}
