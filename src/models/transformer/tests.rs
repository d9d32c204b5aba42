//! Folding vs an independent unfolded forward pass; every module's and several sections' VJP
//! and JVP vs central finite differences; loader errors.

use super::*;
use crate::models::Section;
use crate::tensor::{Batch, HostTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy)]
struct Cfg {
    vocab: usize,
    vocab_out: usize,
    d_model: usize,
    n_ctx: usize,
    layers: usize,
    heads: usize,
    d_head: usize,
    d_mlp: usize,
}

const SMALL: Cfg = Cfg {
    vocab: 7,
    vocab_out: 5,
    d_model: 8,
    n_ctx: 4,
    layers: 2,
    heads: 2,
    d_head: 3,
    d_mlp: 12,
};

/// TransformerLens-named random weights (plus the `mask`/`IGNORE` buffers, to be ignored).
fn random_tensors(c: Cfg, seed: u64) -> Tensors {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tensors::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f64| {
        let len = shape.iter().product();
        let data = (0..len)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect();
        t.insert(name, HostTensor::new(shape, data));
    };
    let (dm, h, dh) = (c.d_model, c.heads, c.d_head);
    let s_in = 1.0 / (dm as f64).sqrt();
    put("embed.W_E".into(), vec![c.vocab, dm], 1.0);
    put("pos_embed.W_pos".into(), vec![c.n_ctx, dm], 1.0);
    for k in 0..c.layers {
        for w in ["W_Q", "W_K", "W_V"] {
            put(format!("blocks.{k}.attn.{w}"), vec![h, dm, dh], 2.0 * s_in);
        }
        for b in ["b_Q", "b_K", "b_V"] {
            put(format!("blocks.{k}.attn.{b}"), vec![h, dh], 0.5);
        }
        put(
            format!("blocks.{k}.attn.W_O"),
            vec![h, dh, dm],
            1.0 / dh as f64,
        );
        put(format!("blocks.{k}.attn.b_O"), vec![dm], 0.3);
        put(format!("blocks.{k}.attn.IGNORE"), vec![], 1.0);
        put(format!("blocks.{k}.attn.mask"), vec![c.n_ctx, c.n_ctx], 1.0);
        put(
            format!("blocks.{k}.mlp.W_in"),
            vec![dm, c.d_mlp],
            2.0 * s_in,
        );
        put(format!("blocks.{k}.mlp.b_in"), vec![c.d_mlp], 0.5);
        put(
            format!("blocks.{k}.mlp.W_out"),
            vec![c.d_mlp, dm],
            1.0 / (c.d_mlp as f64).sqrt(),
        );
        put(format!("blocks.{k}.mlp.b_out"), vec![dm], 0.3);
    }
    put("unembed.W_U".into(), vec![dm, c.vocab_out], s_in);
    put("unembed.b_U".into(), vec![c.vocab_out], 0.3);
    t
}

pub(super) fn random_tokens(n: usize, pos: usize, vocab: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..pos).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

pub(super) fn random_batch(
    n: usize,
    r: usize,
    pos: usize,
    f: usize,
    rng: &mut ChaCha8Rng,
) -> Batch {
    let data = Mat::from_fn(n * r * pos, f, |_, _| rng.random_range(-1.0..1.0));
    Batch::new(n, r, pos, data)
}

fn opts(norm: Normalization, act: Activation, last: Option<&str>) -> TransformerOptions {
    TransformerOptions {
        act,
        normalization: norm,
        last_pos_module_type: last.map(String::from),
        ..Default::default()
    }
}

/// The configurations every test runs over.
fn configs() -> Vec<TransformerOptions> {
    use Activation::*;
    use Normalization::*;
    vec![
        opts(None, Relu, Option::None),
        opts(LnPre, Relu, Option::None),
        opts(LnPre, Gelu, Some("add_resid1")),
        opts(None, GeluTanh, Some("attn_out")),
        opts(LnPre, Relu, Some("attn_out.1")),
        opts(None, Relu, Some("ln_final")),
        opts(LnPre, Gelu, Some("unembed")),
    ]
}

#[test]
fn folded_model_matches_unfolded_forward_and_carries_the_bias() {
    let t = random_tensors(SMALL, 1);
    let tokens = random_tokens(5, SMALL.n_ctx, SMALL.vocab, 2);
    for o in configs() {
        let model = transformer_from_tensors(&t, &o, "random").unwrap();
        assert_eq!(model.module_ids(), module_ids(SMALL.layers));
        let reference = unfolded_forward(&t, &o, &tokens).unwrap();
        let mut x = tokens_batch(&tokens);
        for (i, m) in model.modules.iter().enumerate() {
            assert_eq!(x.features(), m.in_features(), "{}", m.id());
            if i >= 2 {
                // Node layers from add_embed on end with exactly 1.
                let bias = x.data.col_as_slice(x.features() - 1);
                assert!(bias.iter().all(|&b| b == 1.0), "{:?}: {}", o, m.id());
            }
            let pos = x.pos;
            x = m.forward(&x).0;
            assert_eq!(x.pos, m.out_pos(pos), "{}", m.id());
            assert_eq!(x.features(), m.out_features(), "{}", m.id());
        }
        let last_only = o.last_pos_module_type.is_some();
        assert_eq!(x.pos, if last_only { 1 } else { SMALL.n_ctx });
        let mut worst: f64 = 0.0;
        for s in 0..5 {
            for p in 0..x.pos {
                let pr = if last_only { SMALL.n_ctx - 1 } else { p };
                for j in 0..SMALL.vocab_out {
                    let (a, b) = (
                        x.data[(s * x.pos + p, j)],
                        reference[(s * SMALL.n_ctx + pr, j)],
                    );
                    worst = worst.max((a - b).abs() / (1.0 + b.abs()));
                }
            }
        }
        assert!(
            worst < 1e-12,
            "{o:?}: folded vs unfolded logits differ by {worst:e}"
        );
    }
}

/// Checks a section's JVP and VJP at `x` against the full Jacobian from central finite
/// differences (each input coordinate perturbed in every sample at once: samples are
/// independent), with `r` random tangents / cotangents per sample, and `<vjp(u), t> ==
/// <u, jvp(t)>`.
pub(super) fn check_section(sec: &Section, x: &Batch, r: usize, what: &str, rng: &mut ChaCha8Rng) {
    let (y, caches) = sec.forward(x);
    let (n, pin, fin) = (x.n, x.pos, x.features());
    let (pout, fout) = (y.pos, y.features());
    assert_eq!(pout, sec.out_pos(pin), "{what}");
    let h = 1e-6;
    // jac[((x * pout + t) * fout + i) * pin * fin + s * fin + j]
    let nin = pin * fin;
    let mut jac = vec![0.0; n * pout * fout * nin];
    for s in 0..pin {
        for j in 0..fin {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            for xs in 0..n {
                xp.data[(xs * pin + s, j)] += h;
                xm.data[(xs * pin + s, j)] -= h;
            }
            let (yp, ym) = (sec.forward(&xp).0, sec.forward(&xm).0);
            for row in 0..n * pout {
                for i in 0..fout {
                    let d = (yp.data[(row, i)] - ym.data[(row, i)]) / (2.0 * h);
                    jac[(row * fout + i) * nin + s * fin + j] = d;
                }
            }
        }
    }
    let dx = random_batch(n, r, pin, fin, rng);
    let dy = random_batch(n, r, pout, fout, rng);
    let jv = sec.jvp(&caches, &dx);
    let vj = sec.vjp(&caches, &dy);
    assert_eq!(
        (jv.n, jv.r, jv.pos, jv.features()),
        (n, r, pout, fout),
        "{what}"
    );
    assert_eq!(
        (vj.n, vj.r, vj.pos, vj.features()),
        (n, r, pin, fin),
        "{what}"
    );
    for xs in 0..n {
        for v in 0..r {
            let jrow = |t: usize, i: usize| &jac[((xs * pout + t) * fout + i) * nin..][..nin];
            // JVP
            for t in 0..pout {
                for i in 0..fout {
                    let jr = jrow(t, i);
                    let (mut want, mut mag) = (0.0, 0.0);
                    for s in 0..pin {
                        for j in 0..fin {
                            let p = jr[s * fin + j] * dx.data[(dx.row(xs, v, s), j)];
                            want += p;
                            mag += p.abs();
                        }
                    }
                    let got = jv.data[(jv.row(xs, v, t), i)];
                    assert!(
                        (got - want).abs() <= 1e-6 * (1e-3 + mag),
                        "{what}: jvp x{xs} v{v} t{t} i{i}: {got} vs fd {want}"
                    );
                }
            }
            // VJP
            for s in 0..pin {
                for j in 0..fin {
                    let (mut want, mut mag) = (0.0, 0.0);
                    for t in 0..pout {
                        for i in 0..fout {
                            let p = jrow(t, i)[s * fin + j] * dy.data[(dy.row(xs, v, t), i)];
                            want += p;
                            mag += p.abs();
                        }
                    }
                    let got = vj.data[(vj.row(xs, v, s), j)];
                    assert!(
                        (got - want).abs() <= 1e-6 * (1e-3 + mag),
                        "{what}: vjp x{xs} v{v} s{s} j{j}: {got} vs fd {want}"
                    );
                }
            }
            // <vjp(u), t> == <u, jvp(t)>
            let (mut a, mut b, mut mag) = (0.0, 0.0, 0.0);
            for s in 0..pin {
                for j in 0..fin {
                    let p = vj.data[(vj.row(xs, v, s), j)] * dx.data[(dx.row(xs, v, s), j)];
                    a += p;
                    mag += p.abs();
                }
            }
            for t in 0..pout {
                for i in 0..fout {
                    b += dy.data[(dy.row(xs, v, t), i)] * jv.data[(jv.row(xs, v, t), i)];
                }
            }
            assert!(
                (a - b).abs() <= 1e-10 * (1.0 + mag),
                "{what}: <vjp(u), t> = {a} but <u, jvp(t)> = {b}"
            );
        }
    }
}

#[test]
fn every_module_and_attention_sections_match_finite_differences() {
    let t = random_tensors(SMALL, 3);
    let tokens = random_tokens(3, SMALL.n_ctx, SMALL.vocab, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for o in configs() {
        let model = transformer_from_tensors(&t, &o, "random").unwrap();
        let input = tokens_batch(&tokens);
        // Every module on its own (embed takes token ids: checked separately below).
        for (i, m) in model.modules.iter().enumerate().skip(1) {
            let x = model.run(input.clone(), 0, i);
            let what = format!("{:?} {}", o, m.id());
            check_section(&model.section(i, i + 1), &x, 3, &what, &mut rng);
        }
        // Sections spanning attention, and the whole differentiable model.
        let idx = |name: &str| model.node_index(name).unwrap();
        for (from, to) in [
            ("ln1.0", "ln2.0"),
            ("attn_in.1", "mlp_in.1"),
            ("add_embed", "ln1.1"),
            ("ln2.0", "unembed"),
            ("pos_embed", "output"),
        ] {
            let (a, b) = (idx(from), idx(to));
            let x = model.run(input.clone(), 0, a);
            let what = format!("{o:?} {from}..{to}");
            check_section(&model.section(a, b), &x, 2, &what, &mut rng);
        }
        // embed: token ids carry no derivative.
        let sec = model.section(0, 1);
        let (y, c) = sec.forward(&input);
        let dy = random_batch(3, 2, SMALL.n_ctx, y.features(), &mut rng);
        let g = sec.vjp(&c, &dy);
        assert_eq!(g.features(), 1);
        assert!(g.data.col_as_slice(0).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn modadd_shaped_node_layers_are_the_residual_stream() {
    let c = Cfg {
        vocab: 114,
        vocab_out: 113,
        d_model: 16,
        n_ctx: 3,
        layers: 1,
        heads: 4,
        d_head: 4,
        d_mlp: 32,
    };
    let t = random_tensors(c, 9);
    let o = opts(Normalization::None, Activation::Relu, Some("add_resid1"));
    let model = transformer_from_tensors(&t, &o, "random").unwrap();
    for name in ["ln1.0", "ln2.0", "unembed"] {
        let i = model.node_index(name).unwrap();
        assert_eq!(model.node_features(i), c.d_model + 1, "{name}");
    }
    let i = model.node_index("output").unwrap();
    assert_eq!(model.node_features(i), 113);
    let ln2 = model.node_index("ln2.0").unwrap();
    let ln1 = model.node_index("ln1.0").unwrap();
    assert_eq!(model.section(ln1, ln2).out_pos(3), 1);
    assert_eq!(model.section(0, ln1).out_pos(3), 3);
}

#[test]
fn embed_node_layers_are_rejected() {
    assert!(check_node_layer("embed")
        .unwrap_err()
        .to_string()
        .contains("token ids"));
    assert!(check_node_layer("pos_embed").is_err());
    assert!(check_node_layer("add_embed").is_ok());
    assert!(check_node_layer("ln1.0").is_ok());
}

fn load_err(t: &Tensors, o: &TransformerOptions) -> String {
    match transformer_from_tensors(t, o, "model.pt") {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn loader_errors_name_the_tensor_and_the_file() {
    let good = random_tensors(SMALL, 7);
    let o = TransformerOptions::default();

    let mut t = good.clone();
    t.remove("blocks.1.attn.W_K");
    let e = load_err(&t, &o);
    assert!(
        e.contains("model.pt") && e.contains("blocks.1.attn.W_K"),
        "{e}"
    );

    let mut t = good.clone();
    t.insert(
        "blocks.0.mlp.b_in".into(),
        HostTensor::new(vec![5], vec![0.0; 5]),
    );
    let e = load_err(&t, &o);
    assert!(
        e.contains("blocks.0.mlp.b_in") && e.contains("shape"),
        "{e}"
    );

    let mut t = good.clone();
    t.get_mut("blocks.0.attn.W_O").unwrap().data[3] = f64::NAN;
    let e = load_err(&t, &o);
    assert!(e.contains("blocks.0.attn.W_O") && e.contains("NaN"), "{e}");

    // Inconsistent d_model between W_E and W_pos.
    let mut t = good.clone();
    t.insert(
        "pos_embed.W_pos".into(),
        HostTensor::new(vec![4, 9], vec![0.0; 36]),
    );
    let e = load_err(&t, &o);
    assert!(e.contains("pos_embed.W_pos"), "{e}");

    let mut t = good.clone();
    t.remove("embed.W_E");
    assert!(load_err(&t, &o).contains("embed.W_E"));

    let mut t = good.clone();
    t.insert(
        "blocks.0.ln1.w".into(),
        HostTensor::new(vec![8], vec![1.0; 8]),
    );
    assert!(load_err(&t, &o).contains("blocks.0.ln1.w"));

    let mut t = good.clone();
    t.insert("blocks.x.foo".into(), HostTensor::new(vec![1], vec![1.0]));
    assert!(load_err(&t, &o).contains("blocks.x.foo"));

    for bad in ["attn_in", "ln1", "add_resid1.0", "embed", "nonsense"] {
        let o = opts(Normalization::None, Activation::Relu, Some(bad));
        let e = load_err(&good, &o);
        assert!(e.contains("last_pos_module_type") && e.contains(bad), "{e}");
    }
}

#[test]
fn options_deserialise_strictly() {
    let o: TransformerOptions = toml::from_str(
        "act = \"gelu\"\nnormalization = \"ln_pre\"\nlast_pos_module_type = \"add_resid1\"",
    )
    .unwrap();
    assert_eq!(o.act, Activation::Gelu);
    assert_eq!(o.normalization, Normalization::LnPre);
    assert_eq!(o.ln_eps, 1e-5);
    assert_eq!(o.attn_scale, None);
    let o: TransformerOptions = toml::from_str("").unwrap();
    assert_eq!(o, TransformerOptions::default());
    assert!(toml::from_str::<TransformerOptions>("activation = \"relu\"").is_err());
}

/// CPU time of this thread (immune to other processes on a shared machine), Linux only.
fn thread_cpu() -> std::time::Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s.split_whitespace().next().and_then(|v| v.parse().ok());
    std::time::Duration::from_nanos(ns.unwrap_or(0))
}

/// Timing of the LIB workload's attention + MLP VJPs at modular-addition size (debug build:
/// indicative only). `cargo test --lib models::transformer -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_modadd_vjp() {
    let c = Cfg {
        vocab: 114,
        vocab_out: 113,
        d_model: 128,
        n_ctx: 3,
        layers: 1,
        heads: 4,
        d_head: 32,
        d_mlp: 512,
    };
    let t = random_tensors(c, 9);
    let o = opts(Normalization::None, Activation::Relu, Some("add_resid1"));
    let model = transformer_from_tensors(&t, &o, "random").unwrap();
    let (n, r) = (64, 129);
    let tokens = random_tokens(n, 3, c.vocab, 1);
    let x = model.run(tokens_batch(&tokens), 0, model.node_index("ln1.0").unwrap());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (from, to) in [("ln1.0", "ln2.0"), ("ln2.0", "unembed")] {
        let (a, b) = (
            model.node_index(from).unwrap(),
            model.node_index(to).unwrap(),
        );
        let x = model.run(x.clone(), model.node_index("ln1.0").unwrap(), a);
        let sec = model.section(a, b);
        let (y, caches) = sec.forward(&x);
        let dy = random_batch(n, r, y.pos, y.features(), &mut rng);
        let dx = random_batch(n, r, x.pos, x.features(), &mut rng);
        let mut g = dy.clone();
        for (m, c) in sec.modules.iter().zip(&caches).rev() {
            let start = thread_cpu();
            g = m.vjp(c, &g);
            eprintln!("  vjp {}: {:?}", m.id(), thread_cpu() - start);
        }
        let start = thread_cpu();
        let g = sec.vjp(&caches, &dy);
        let tv = thread_cpu() - start;
        let start = thread_cpu();
        let j = sec.jvp(&caches, &dx);
        let tj = thread_cpu() - start;
        eprintln!(
            "{from}..{to}: {n} samples x {r} vectors: vjp {tv:?} ({} rows), jvp {tj:?} ({} rows); \
             x {:.0} for 3830 samples",
            g.rows(),
            j.rows(),
            3830.0 / n as f64
        );
    }
}
