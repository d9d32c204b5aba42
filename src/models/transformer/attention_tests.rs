//! The GEMM form of [`AttnOut`] against the straightforward per-`(sample, vector, head)` loops
//! it replaced (kept here as the reference), and a timing at SmolLM2-135M's attention sizes.

use super::*;
use crate::models::transformer::modules::write_rows;
use crate::tensor::simd::axpy;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `a . b`, a plain loop (the references' own, not the module's kernels).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Reference forward: scalar loops per `(sample, head, query)`. Output and the weights `p`.
fn ref_forward(m: &AttnOut, x: &Batch) -> (Mat<f64>, Vec<f64>) {
    let (n, pos, heads, dh, dv, f) = (x.n, x.pos, m.heads, m.d_head, m.dv(), m.fqkv());
    let (t0, pout, hz) = (m.t0(pos), m.out_pos(pos), heads * dv);
    let mut qkv = vec![0.0; n * pos * f];
    read_rows(&x.data, 0, 0, f, &mut qkv);
    m.rotate_rows(&mut qkv, pos, false);
    let mut p = vec![0.0; n * heads * pos * pos];
    let mut z = vec![0.0; n * pout * hz];
    for xs in 0..n {
        let row = |s: usize| &qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
        for h in 0..heads {
            let (oq, ok, ov) = m.offsets(h);
            for t in t0..pos {
                let s0 = m.first_key(t);
                let q = &row(t)[oq..oq + dh];
                let pt = &mut p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                let mut max = f64::NEG_INFINITY;
                for (s, a) in (s0..).zip(pt.iter_mut()) {
                    *a = m.scale * dot(q, &row(s)[ok..ok + dh]);
                    max = max.max(*a);
                }
                let mut sum = 0.0;
                for a in pt.iter_mut() {
                    *a = (*a - max).exp();
                    sum += *a;
                }
                let zt = &mut z[(xs * pout + t - t0) * hz + h * dv..][..dv];
                for (s, a) in (s0..).zip(pt.iter_mut()) {
                    *a /= sum;
                    axpy(zt, *a, &row(s)[ov..ov + dv]);
                }
            }
        }
    }
    let mut y = Mat::zeros(n * pout, 2 * m.resid);
    gemm(
        y.as_mut().subcols_mut(0, m.resid),
        Accum::Replace,
        MatRef::from_row_major_slice(&z, n * pout, hz),
        m.w_o.as_ref(),
    );
    copy_cols_from_pos(&mut y, m.resid, &x.data, f, m.resid, pos, t0);
    (y, p)
}

/// Reference VJP: scalar loops per `(sample, vector, head, query)`.
fn ref_vjp(m: &AttnOut, c: &AttnCache, dy: &Batch) -> Batch {
    let (n, r, pout, heads, dh, dv, f) = (dy.n, dy.r, dy.pos, m.heads, m.d_head, m.dv(), m.fqkv());
    let (pos, hz) = (c.pos, heads * dv);
    let t0 = m.t0(pos);
    let mut gz = vec![0.0; n * r * pout * hz];
    gemm(
        MatMut::from_row_major_slice_mut(&mut gz, n * r * pout, hz),
        Accum::Replace,
        dy.data.as_ref().subcols(0, m.resid),
        m.w_o.transpose(),
    );
    let mut dx = Mat::zeros(n * r * pos, f + m.resid);
    let mut g = vec![0.0; r * pos * f];
    let (mut gp, mut gq) = (vec![0.0; pos], vec![0.0; dh]);
    for xs in 0..n {
        let row = |s: usize| &c.qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
        g.fill(0.0);
        for v in 0..r {
            for h in 0..heads {
                let (oq, ok, ov) = m.offsets(h);
                for t in t0..pos {
                    let s0 = m.first_key(t);
                    let pt = &c.p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                    let gzt = &gz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                    let mut mean = 0.0;
                    for (s, &ps) in (s0..).zip(pt) {
                        gp[s] = dot(gzt, &row(s)[ov..ov + dv]);
                        mean += ps * gp[s];
                        axpy(&mut g[(v * pos + s) * f + ov..][..dv], ps, gzt);
                    }
                    gq.fill(0.0);
                    let q = &row(t)[oq..oq + dh];
                    for (s, &ps) in (s0..).zip(pt) {
                        let ga = m.scale * ps * (gp[s] - mean);
                        axpy(&mut gq, ga, &row(s)[ok..ok + dh]);
                        axpy(&mut g[(v * pos + s) * f + ok..][..dh], ga, q);
                    }
                    axpy(&mut g[(v * pos + t) * f + oq..][..dh], 1.0, &gq);
                }
            }
        }
        m.rotate_rows(&mut g, pos, true);
        write_rows(&mut dx, xs * r * pos, 0, f, &g);
    }
    copy_cols_to_pos(&mut dx, f, &dy.data, m.resid, m.resid, pos, t0);
    Batch::new(n, r, pos, dx)
}

/// Reference JVP: scalar loops per `(sample, vector, head, query)`.
fn ref_jvp(m: &AttnOut, c: &AttnCache, dx: &Batch) -> Batch {
    let (n, r, pos, heads, dh, dv, f) = (dx.n, dx.r, dx.pos, m.heads, m.d_head, m.dv(), m.fqkv());
    let (t0, pout, hz) = (m.t0(pos), m.out_pos(pos), heads * dv);
    let mut dz = vec![0.0; n * r * pout * hz];
    let mut tq = vec![0.0; r * pos * f];
    let mut da = vec![0.0; pos];
    for xs in 0..n {
        let row = |s: usize| &c.qkv[(xs * pos + s) * f..(xs * pos + s + 1) * f];
        read_rows(&dx.data, xs * r * pos, 0, f, &mut tq);
        m.rotate_rows(&mut tq, pos, false);
        for v in 0..r {
            let trow = |s: usize| &tq[(v * pos + s) * f..(v * pos + s + 1) * f];
            for h in 0..heads {
                let (oq, ok, ov) = m.offsets(h);
                for t in t0..pos {
                    let s0 = m.first_key(t);
                    let pt = &c.p[((xs * heads + h) * pos + t) * pos..][s0..=t];
                    let (q, dq) = (&row(t)[oq..oq + dh], &trow(t)[oq..oq + dh]);
                    let mut mean = 0.0;
                    for (s, &ps) in (s0..).zip(pt) {
                        da[s] = m.scale
                            * (dot(dq, &row(s)[ok..ok + dh]) + dot(q, &trow(s)[ok..ok + dh]));
                        mean += ps * da[s];
                    }
                    let dzt = &mut dz[((xs * r + v) * pout + t - t0) * hz + h * dv..][..dv];
                    for (s, &ps) in (s0..).zip(pt) {
                        axpy(dzt, ps * (da[s] - mean), &row(s)[ov..ov + dv]);
                        axpy(dzt, ps, &trow(s)[ov..ov + dv]);
                    }
                }
            }
        }
    }
    let mut t = Mat::zeros(n * r * pout, 2 * m.resid);
    gemm(
        t.as_mut().subcols_mut(0, m.resid),
        Accum::Replace,
        MatRef::from_row_major_slice(&dz, n * r * pout, hz),
        m.w_o.as_ref(),
    );
    copy_cols_from_pos(&mut t, m.resid, &dx.data, f, m.resid, pos, t0);
    Batch::new(n, r, pout, t)
}

#[allow(clippy::too_many_arguments)]
fn attn(
    heads: usize,
    kv_heads: usize,
    d_head: usize,
    resid: usize,
    last_pos: bool,
    window: Option<usize>,
    rotary: Option<Rotary>,
    rng: &mut ChaCha8Rng,
) -> AttnOut {
    AttnOut {
        id: "attn_out.0".into(),
        heads,
        kv_heads,
        d_head,
        scale: 1.0 / (d_head as f64).sqrt(),
        w_o: Mat::from_fn(heads * (d_head + 1), resid, |_, _| {
            rng.random_range(-1.0..1.0)
        }),
        resid,
        last_pos,
        window,
        rotary: rotary.map(Arc::new),
    }
}

fn random(n: usize, r: usize, pos: usize, f: usize, amp: f64, rng: &mut ChaCha8Rng) -> Batch {
    let data = Mat::from_fn(n * r * pos, f, |_, _| amp * rng.random_range(-1.0..1.0));
    Batch::new(n, r, pos, data)
}

/// `max |a - b| / max |b|`.
fn rel(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    assert_eq!((a.nrows(), a.ncols()), (b.nrows(), b.ncols()));
    let (mut d, mut m) = (0.0f64, 0.0f64);
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            d = d.max((a[(i, j)] - b[(i, j)]).abs());
            m = m.max(b[(i, j)].abs());
        }
    }
    d / m.max(f64::MIN_POSITIVE)
}

#[test]
fn gemm_attention_matches_the_per_vector_loops() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, r, pos, dh, resid) = (2, 5, 7, 4, 6);
    let mut cases = 0;
    for (heads, kv) in [(2, 2), (4, 2), (6, 3), (3, 1)] {
        for rot_dims in [None, Some(2), Some(4)] {
            for window in [None, Some(1), Some(3)] {
                for last_pos in [false, true] {
                    let rotary = rot_dims.map(|d| Rotary::new(d, 10000.0, 9));
                    let m = attn(heads, kv, dh, resid, last_pos, window, rotary, &mut rng);
                    let what = format!(
                        "H {heads} kv {kv} rotary {rot_dims:?} window {window:?} last {last_pos}"
                    );
                    // Amplitude 2: attention weights far from uniform.
                    let x = random(n, 1, pos, m.in_features(), 2.0, &mut rng);
                    let (y, cache) = m.forward(&x);
                    let c = cache.downcast_ref::<AttnCache>().unwrap();
                    let (y_ref, p_ref) = ref_forward(&m, &x);
                    let ep =
                        c.p.iter()
                            .zip(&p_ref)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f64::max);
                    assert!(ep < 1e-12, "{what}: weights {ep:e}");
                    let e = rel(y.data.as_ref(), y_ref.as_ref());
                    assert!(e < 1e-12, "{what}: forward {e:e}");
                    let dx = random(n, r, pos, m.in_features(), 1.0, &mut rng);
                    let dy = random(n, r, y.pos, m.out_features(), 1.0, &mut rng);
                    let (jr, vr) = (ref_jvp(&m, c, &dx), ref_vjp(&m, c, &dy));
                    for (rb, cq) in [(1, 1), (2, 3), (r, 2), (64, 64), (3, CHUNK)] {
                        let own = OutProjection {
                            w: m.w_o.as_ref(),
                            w32: None,
                            resid: true,
                        };
                        let j = m.jvp_blocked(c, &Tangents::Batch(&dx), rb, cq, &own);
                        let e = rel(j.data.as_ref(), jr.data.as_ref());
                        assert!(e < 1e-12, "{what}: jvp (block {rb}, chunk {cq}) {e:e}");
                        assert_eq!((j.n, j.r, j.pos), (jr.n, jr.r, jr.pos));
                        let v = m.vjp_blocked(c, &dy, rb, cq);
                        let e = rel(v.data.as_ref(), vr.data.as_ref());
                        assert!(e < 1e-12, "{what}: vjp (block {rb}, chunk {cq}) {e:e}");
                        assert_eq!((v.n, v.r, v.pos), (vr.n, vr.r, vr.pos));
                    }
                    // The attention part projected by `W_O' M` is the JVP's attention part
                    // times `M`, from the (q, k, v) tangents alone.
                    let f = m.fqkv();
                    let mix = random(1, 1, m.resid, 3, 1.0, &mut rng).data;
                    let w = &m.w_o * &mix;
                    let qkv_only = crate::tensor::Batch::new(
                        dx.n,
                        dx.r,
                        dx.pos,
                        dx.data.subcols(0, f).to_owned(),
                    );
                    let projected =
                        m.jvp_projected(&cache, &Tangents::Batch(&qkv_only), w.as_ref(), None);
                    let expect = jr.data.subcols(0, m.resid) * &mix;
                    let e = rel(projected.as_ref(), expect.as_ref());
                    assert!(e < 1e-12, "{what}: projected jvp {e:e}");
                    // In f32: within f32 rounding of the products (1e-7 relative per entry).
                    let w32 = crate::tensor::linalg::cast::<f32>(w.as_ref());
                    let low = m.jvp_projected(
                        &cache,
                        &Tangents::Batch(&qkv_only),
                        w.as_ref(),
                        Some(w32.as_ref()),
                    );
                    let e = rel(low.as_ref(), expect.as_ref());
                    assert!(e < 1e-5 && e > 0.0, "{what}: f32 projected jvp {e:e}");
                    let (j, v) = (m.jvp(&cache, &dx), m.vjp(&cache, &dy));
                    assert!(rel(j.data.as_ref(), jr.data.as_ref()) < 1e-12, "{what}");
                    assert!(rel(v.data.as_ref(), vr.data.as_ref()) < 1e-12, "{what}");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 72);
}

/// CPU time of this thread (immune to other processes on a shared machine), Linux only.
fn thread_cpu() -> std::time::Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s.split_whitespace().next().and_then(|v| v.parse().ok());
    std::time::Duration::from_nanos(ns.unwrap_or(0))
}

/// JVP of 256 tangents and VJP of 256 cotangents for one sample at SmolLM2-135M's attention
/// sizes (9 query heads, 3 kv heads, d_head 64, 128 positions, rotary), GEMM form against the
/// per-vector loops. Not a pass / fail test: run in release,
/// `cargo test --release --lib attention::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_smollm2_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (r, pos, resid) = (256, 128, 577);
    for last_pos in [false, true] {
        let rotary = Some(Rotary::new(64, 100000.0, pos));
        let m = attn(9, 3, 64, resid, last_pos, None, rotary, &mut rng);
        let x = random(1, 1, pos, m.in_features(), 1.0, &mut rng);
        let (y, cache) = m.forward(&x);
        let c = cache.downcast_ref::<AttnCache>().unwrap();
        let dx = random(1, r, pos, m.in_features(), 1.0, &mut rng);
        let dy = random(1, r, y.pos, m.out_features(), 1.0, &mut rng);
        let time = |f: &dyn Fn() -> Batch| {
            let start = thread_cpu();
            let b = f();
            (thread_cpu() - start, b)
        };
        let (t_fwd, _) = time(&|| m.forward(&x).0);
        let (t_fwd_ref, _) = time(&|| Batch::new(1, 1, y.pos, ref_forward(&m, &x).0));
        let (t_jr, jr) = time(&|| ref_jvp(&m, c, &dx));
        let (t_j, j) = time(&|| m.jvp(&cache, &dx));
        let (t_vr, vr) = time(&|| ref_vjp(&m, c, &dy));
        let (t_v, v) = time(&|| m.vjp(&cache, &dy));
        // The output projection alone (`dz W_O'`, shared by both forms: the VJP's `gz = dy
        // W_O'^T` is the same size).
        let dz = Mat::<f64>::zeros(r * y.pos, m.heads * m.dv());
        let (t_proj, _) = time(&|| {
            let mut t = Mat::zeros(r * y.pos, resid);
            gemm(t.as_mut(), Accum::Replace, dz.as_ref(), m.w_o.as_ref());
            Batch::new(1, r, y.pos, t)
        });
        let (ej, ev) = (
            rel(j.data.as_ref(), jr.data.as_ref()),
            rel(v.data.as_ref(), vr.data.as_ref()),
        );
        let x = |a: std::time::Duration, b: std::time::Duration| a.as_secs_f64() / b.as_secs_f64();
        let core = |a: std::time::Duration| a.saturating_sub(t_proj);
        eprintln!(
            "last_pos {last_pos}, {r} vectors, block {}: forward {t_fwd_ref:?} -> {t_fwd:?}\n  \
             jvp {t_jr:?} -> {t_j:?} (x{:.1}; rel diff {ej:.1e})\n  \
             vjp {t_vr:?} -> {t_v:?} (x{:.1}; rel diff {ev:.1e})\n  \
             of which the output projection GEMM {t_proj:?}; without it: jvp x{:.1}, vjp x{:.1}",
            m.block(r, pos),
            x(t_jr, t_j),
            x(t_vr, t_v),
            x(core(t_jr), core(t_j)),
            x(core(t_vr), core(t_v)),
        );
        // `norm -> attention` edges' form: (q, k, v) tangents, `dz` onto a 577-wide basis,
        // in f64 and in f32 (`compute_dtype = "f32"`).
        let qkv_only = Batch::new(1, r, pos, dx.data.subcols(0, m.fqkv()).to_owned());
        let w = Mat::from_fn(m.heads * m.dv(), resid, |i, j| {
            ((i * 7 + j) % 13) as f64 - 6.0
        });
        let w32 = crate::tensor::linalg::cast::<f32>(w.as_ref());
        let proj = |w32: Option<MatRef<'_, f32>>| {
            let start = thread_cpu();
            let out = m.jvp_projected(&cache, &Tangents::Batch(&qkv_only), w.as_ref(), w32);
            (thread_cpu() - start, out)
        };
        let ((t64, p64), (t32, p32)) = (proj(None), proj(Some(w32.as_ref())));
        eprintln!(
            "  projected jvp: f64 {t64:?}, f32 {t32:?} (x{:.2}; rel diff {:.1e})",
            x(t64, t32),
            rel(p32.as_ref(), p64.as_ref())
        );
    }
}

#[test]
fn row_major_views_are_row_major() {
    let buf: Vec<f64> = (0..60).map(|i| i as f64).collect();
    let (q, k) = (rm(&buf, 1, 4, 3, 15), rm(&buf, 5, 4, 3, 15));
    assert_eq!((q[(1, 2)], k[(3, 0)]), (18.0, 50.0));
    let mut out = vec![0.0; 20];
    gemm(
        rm_mut(&mut out, 1, 4, 4, 5),
        Accum::Replace,
        q,
        k.transpose(),
    );
    for i in 0..4 {
        for j in 0..4 {
            assert_eq!(
                out[1 + 5 * i + j],
                dot(&buf[1 + 15 * i..][..3], &buf[5 + 15 * j..][..3])
            );
        }
    }
}
