//! The explorer page: self-contained (no network), pruning keeps the share it states, what the
//! cards show equals the graph's values, the circuit-tracer JSON export has the viewers'
//! shape, and (where chromium and tests/browser/node_modules exist) a real browser loads it
//! without errors, draws, and opens the right card on a click.

mod common;
use common::*;
use faer::Mat;
use ibasis::algorithm::{BasisFormula, EdgeFormula, Graph};
use ibasis::experiments::build::build_config;
use ibasis::experiments::config::{self, RunConfig};
use ibasis::experiments::explorer::{self, prune_edges, ExplorerOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn shipped() -> RunConfig {
    let text = std::fs::read_to_string(root().join("configs/modadd-lib.toml")).unwrap();
    RunConfig::parse(&text).unwrap()
}

/// LIB, PCA and neuron graphs of the shipped model in `dir/{lib,pca,neuron}`.
fn modadd_graphs(dir: &Path) -> Vec<PathBuf> {
    let lib = shipped();
    let mut pca = lib.clone();
    pca.lib.basis_formula = BasisFormula::Svd;
    let mut neuron = lib.clone();
    neuron.lib.basis_formula = BasisFormula::Neuron;
    neuron.lib.center = false;
    neuron.lib.edge_formula = EdgeFormula::None;
    let mut dirs = Vec::new();
    for (name, cfg) in [("lib", lib), ("pca", pca), ("neuron", neuron)] {
        build_config(&cfg, "test", &dir.join(name)).unwrap();
        dirs.push(dir.join(name));
    }
    dirs
}

/// The JSON data block of an explorer page.
fn embedded(html: &str) -> Value {
    let start =
        html.find(r#"id="ibasis-data">"#).expect("data block") + r#"id="ibasis-data">"#.len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

/// Standard base64 decoding, written here independently of the encoder.
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 {c}"),
        }
    };
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    for q in bytes.chunks(4) {
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = q.iter().take(4 - pad).fold(0u32, |n, &c| (n << 6) | val(c)) << (6 * pad);
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..3 - pad]);
    }
    out
}

fn f32s(s: &Value) -> Vec<f32> {
    unbase64(s.as_str().unwrap())
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(s: &Value) -> Vec<u32> {
    unbase64(s.as_str().unwrap())
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Feature indices stored with `index_bytes` bytes each.
fn indices(s: &Value, index_bytes: &Value) -> Vec<u32> {
    match index_bytes.as_u64().unwrap() {
        2 => unbase64(s.as_str().unwrap())
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect(),
        4 => u32s(s),
        n => panic!("{n} bytes per index"),
    }
}

#[test]
fn base64_decoder_of_the_tests_reads_rfc4648_vectors() {
    for (raw, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(unbase64(enc), raw.as_bytes());
    }
}

/// Per row, the kept inputs are the largest until `mass` of the row is reached or `max_in`
/// are kept; the stated share is the kept sum over the total. Checked against a brute force
/// over sorted rows, on a random matrix with ties, zeros and a constant feature.
#[test]
fn pruning_keeps_the_stated_share() {
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    let (n_out, n_in) = (23, 37);
    let e = Mat::from_fn(n_out, n_in, |_, j| {
        let r = next();
        if r < 0.2 {
            0.0
        } else if j % 7 == 3 {
            0.5 // ties
        } else {
            r.powi(6)
        }
    });
    for (mass, max_in) in [(0.5, 64), (0.9, 5), (1.0, 100), (0.99, 1)] {
        let p = prune_edges(&e, 1, 1, mass, max_in).unwrap();
        let (mut total, mut kept) = (0.0, 0.0);
        let mut want = Vec::new();
        for i in 1..n_out {
            let mut row: Vec<(usize, f64)> = (1..n_in)
                .map(|j| (j, e[(i, j)]))
                .filter(|x| x.1 > 0.0)
                .collect();
            row.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            let sum: f64 = row.iter().map(|x| x.1).sum();
            total += sum;
            // Smallest n with the top-n sum >= mass * sum, capped at max_in.
            let mut n = 0;
            let mut acc = 0.0;
            while n < row.len() && n < max_in && acc < mass * sum * (1.0 - 1e-12) {
                acc += row[n].1;
                n += 1;
            }
            kept += acc;
            for &(j, v) in &row[..n] {
                want.push((i as u32, j as u32, v));
            }
        }
        let mut got = p.edges.clone();
        got.sort_by_key(|a| (a.0, a.1));
        want.sort_by_key(|a| (a.0, a.1));
        assert_eq!(got, want, "mass {mass}, max_in {max_in}");
        assert!((p.total - total).abs() <= 1e-12 * total);
        assert!((p.kept_share() - kept / total).abs() < 1e-12);
        if max_in >= n_in {
            assert!(p.kept_share() >= mass * (1.0 - 1e-12));
        }
        // Largest first.
        assert!(p.edges.windows(2).all(|w| w[0].2 >= w[1].2));
    }
    assert!(prune_edges(&e, 0, 0, 0.0, 4).is_err());
    let mut bad = e.clone();
    bad[(2, 3)] = f64::NAN;
    assert!(prune_edges(&bad, 0, 0, 0.9, 4).is_err());
}

/// One explorer of the shipped model for the tests below (built once per test process).
fn modadd_explorer() -> &'static (PathBuf, Vec<PathBuf>, String) {
    static ONCE: std::sync::OnceLock<(PathBuf, Vec<PathBuf>, String)> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        chdir_root();
        let dir = tmp("explorer-modadd");
        let dirs = modadd_graphs(&dir);
        let html = dir.join("explorer.html");
        let files = explorer::explore_from_dirs(&dirs, &html, &ExplorerOptions::default()).unwrap();
        assert_eq!(files.json.len(), 3);
        let text = std::fs::read_to_string(&html).unwrap();
        (html, dirs, text)
    })
}

#[test]
fn explorer_is_one_file_without_network_references() {
    let (_, _, html) = modadd_explorer();
    for bad in [
        "http://",
        "https://",
        "<link",
        " src=",
        "@import",
        "url(",
        "fetch(",
        "XMLHttpRequest",
        "WebSocket",
    ] {
        assert!(!html.contains(bad), "the page contains {bad:?}");
    }
    assert!(
        html.contains("default-src 'none'"),
        "CSP forbids every load"
    );
    assert!(html.contains("window.ibasisExplorer"), "script inlined");
    assert!(html.contains("#card"), "style inlined");
    assert!(!html.contains("{{"), "every template marker filled");
    let d = embedded(html);
    assert_eq!(d["format"], "ibasis-explorer/1");
    let names: Vec<&str> = d["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lib", "pca", "neuron"]);
}

/// Lambda, modules, edges and Fourier data in the page equal the graph's values.
#[test]
fn card_data_equals_graph_values() {
    let (_, dirs, html) = modadd_explorer();
    let d = embedded(html);
    let opts = ExplorerOptions::default();
    for (gi, dir) in dirs.iter().enumerate() {
        let (g, _) = Graph::load(dir).unwrap();
        let gj = &d["graphs"][gi];
        for (l, b) in g.layers.iter().enumerate() {
            let lj = &gj["layers"][l];
            assert_eq!(lj["name"], b.name.as_str());
            assert_eq!(lj["d_lib"], b.d_lib());
            if b.lambda.len() == b.d_lib() {
                let lam: Vec<f64> = lj["lambda"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(lam, b.lambda, "{} exact Lambda", b.name);
            }
        }
        // Edges: every stored edge is E[dst, src] (f32 of E / w_max), and the stated share is
        // the stored mass over the matrix's non-constant total.
        for (m, e) in g.edges.iter().enumerate() {
            let ej = &gj["edges"][m];
            let (src, dst, w) = (
                indices(&ej["src"], &ej["index_bytes"]),
                indices(&ej["dst"], &ej["index_bytes"]),
                f32s(&ej["w"]),
            );
            let w_max = ej["w_max"].as_f64().unwrap();
            assert_eq!(src.len(), ej["n_kept"].as_u64().unwrap() as usize);
            let skip_in = usize::from(g.layers[m].has_constant);
            let skip_out = usize::from(g.layers[m + 1].has_constant);
            let mut total = 0.0;
            for i in skip_out..e.nrows() {
                for j in skip_in..e.ncols() {
                    total += e[(i, j)];
                }
            }
            let mut kept = 0.0;
            for k in 0..src.len() {
                let want = e[(dst[k] as usize, src[k] as usize)];
                assert!(
                    src[k] as usize >= skip_in && dst[k] as usize >= skip_out,
                    "no constant edges"
                );
                let got = w[k] as f64 * w_max;
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "edge {k}: {got} vs {want}"
                );
                kept += want;
            }
            let share = ej["kept_share"].as_f64().unwrap();
            assert!(
                (share - kept / total).abs() < 1e-9,
                "kept share {share} vs {}",
                kept / total
            );
            assert!(share >= opts.edge_mass * 0.5 && share <= 1.0 + 1e-12);
        }
        // Modules: the first graph's are Leiden's on the same graph (seed 0).
        if !g.edges.is_empty() {
            let p = explorer::prepare("x", &g, None, &opts).unwrap();
            let c = p.clusters.unwrap();
            assert_eq!(gj["n_modules"], c.n_clusters);
            for (l, b) in g.layers.iter().enumerate() {
                let m: Vec<i64> = gj["layers"][l]["module"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                for (j, &mj) in m.iter().enumerate().take(b.d_lib()) {
                    assert_eq!(mj, c.of(l, j).map(|x| x as i64).unwrap_or(-1));
                }
            }
        }
    }
    // Fourier: the spectra bytes are the DFT power of each feature over (a, b), written here
    // as a separable O(p^3) transform of the feature grids.
    chdir_root();
    let cfg = shipped();
    let model = config::load_model(&cfg.model).unwrap();
    let (g, _) = Graph::load(&dirs[0]).unwrap();
    let p = 113;
    let layer = 1; // ln2.0
    let grids = ibasis::experiments::fourier::feature_grids(
        &model,
        &[&g.layers[layer]],
        p,
        ibasis::data::modadd::ModOp::Add,
    )
    .unwrap();
    let fj = &d["graphs"][0]["layers"][layer]["fourier"];
    let h = fj["h"].as_u64().unwrap() as usize;
    let bytes = unbase64(fj["power"].as_str().unwrap());
    let tw = |k: usize| 2.0 * std::f64::consts::PI * k as f64 / p as f64;
    for j in [1usize, 2, 10] {
        // Along b, then along a.
        let mut re = vec![0.0; p * p];
        let mut im = vec![0.0; p * p];
        for a in 0..p {
            for kb in 0..p {
                for b in 0..p {
                    let v = grids[0][(a * p + b, j)];
                    re[a * p + kb] += v * tw(kb * b % p).cos();
                    im[a * p + kb] -= v * tw(kb * b % p).sin();
                }
            }
        }
        let mut power = vec![0.0; p * p];
        for ka in 0..p {
            for kb in 0..p {
                let (mut r, mut i) = (0.0, 0.0);
                for a in 0..p {
                    let (c, s) = (tw(ka * a % p).cos(), -tw(ka * a % p).sin());
                    r += re[a * p + kb] * c - im[a * p + kb] * s;
                    i += re[a * p + kb] * s + im[a * p + kb] * c;
                }
                power[ka * p + kb] = r * r + i * i;
            }
        }
        let max = power.iter().copied().fold(0.0, f64::max);
        assert!((fj["max"][j].as_f64().unwrap() - max).abs() <= 1e-9 * max);
        for ka in 0..p {
            for kb in 0..h {
                let want = explorer::power_byte(power[ka * p + kb], max) as i32;
                let got = bytes[(j * p + ka) * h + kb] as i32;
                assert!(
                    (got - want).abs() <= 1,
                    "feature {j} ({ka}, {kb}): {got} vs {want}"
                );
            }
        }
        // The labels on the card are those of the report.
        let label = d["graphs"][0]["layers"][layer]["labels"][j]
            .as_str()
            .unwrap();
        let dom = &fj["dominant"][j][0];
        let (ka, kb) = (dom[0].as_u64().unwrap(), dom[1].as_u64().unwrap());
        assert!(
            label == "const"
                || label == format!("a{ka}b{kb}")
                || label == format!("a{ka}")
                || label == format!("b{kb}"),
            "{label} vs ({ka}, {kb})"
        );
    }
    let reference = ibasis::experiments::fourier::label_layers(
        &model,
        &[&g.layers[layer]],
        p,
        ibasis::data::modadd::ModOp::Add,
    )
    .unwrap();
    for (j, f) in reference[0].iter().enumerate() {
        assert_eq!(
            d["graphs"][0]["layers"][layer]["labels"][j],
            f.label.as_str()
        );
    }
}

/// The export has circuit-tracer's `{metadata, qParams, nodes, links}` layout: every link's
/// ends are nodes, weights are the graph's edges, node activations its Lambdas.
#[test]
fn json_export_has_the_viewers_layout() {
    let (html, dirs, _) = modadd_explorer();
    let (g, _) = Graph::load(&dirs[0]).unwrap();
    let path = explorer::json_path(html, "lib");
    assert_eq!(path.file_name().unwrap(), "explorer-lib.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for key in ["slug", "scan", "transcoder_list", "prompt_tokens", "prompt"] {
        assert!(v["metadata"].get(key).is_some(), "metadata.{key}");
    }
    for key in ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"] {
        assert!(v["qParams"].get(key).is_some(), "qParams.{key}");
    }
    let nodes = v["nodes"].as_array().unwrap();
    let mut ids = std::collections::HashMap::new();
    for n in nodes {
        for key in [
            "node_id",
            "feature",
            "layer",
            "ctx_idx",
            "feature_type",
            "jsNodeId",
            "clerp",
        ] {
            assert!(n.get(key).is_some(), "node.{key}");
        }
        let l: usize = n["layer"].as_str().unwrap().parse().unwrap();
        let j = n["feature"].as_u64().unwrap() as usize;
        assert_eq!(n["node_id"], format!("{l}_{j}_0"));
        if let Some(a) = n["activation"].as_f64() {
            assert_eq!(a, g.layers[l].lambda[j]);
        }
        ids.insert(n["node_id"].as_str().unwrap().to_string(), (l, j));
    }
    let n_features: usize = g
        .layers
        .iter()
        .map(|b| b.d_lib() - usize::from(b.has_constant))
        .sum();
    assert_eq!(ids.len(), n_features);
    let links = v["links"].as_array().unwrap();
    assert!(!links.is_empty());
    for k in links {
        let (ls, j) = ids[k["source"].as_str().unwrap()];
        let (lt, i) = ids[k["target"].as_str().unwrap()];
        assert_eq!(lt, ls + 1);
        assert_eq!(k["weight"].as_f64().unwrap(), g.edges[ls][(i, j)]);
    }
    // The neuron graph has no edges, so no links.
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(explorer::json_path(html, "neuron")).unwrap(),
    )
    .unwrap();
    assert!(v["links"].as_array().unwrap().is_empty());
}

/// Runs tests/browser/check-explorer.js on `html`. Its tests are `#[ignore]`d for chromium and
/// the npm packages, and fail, saying how to get them, when asked for without them.
fn browser_check(html: &Path, shot: &Path, expect: &[String], test: &str) -> Value {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{test}: {chromium} is absent (apt-get install chromium; CI installs it)"
    );
    assert!(
        root()
            .join("tests/browser/node_modules/puppeteer-core")
            .exists(),
        "{test}: tests/browser/node_modules is absent (run `npm ci` in tests/browser; CI does)"
    );
    let mut cmd = std::process::Command::new("node");
    cmd.current_dir(root().join("tests/browser"))
        .arg("check-explorer.js")
        .arg("--html")
        .arg(html)
        .arg("--shot")
        .arg(shot)
        .arg("--chromium")
        .arg(&chromium);
    for e in expect {
        cmd.arg("--expect").arg(e);
    }
    let out = cmd.output().expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{test}: {stdout}{stderr}");
    assert!(
        out.status.success(),
        "{test}: the browser check failed: {stdout}{stderr}"
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
#[ignore = "needs chromium and tests/browser/node_modules: apt-get install chromium; (cd tests/browser && npm ci)"]
fn explorer_works_in_chromium() {
    let (html, dirs, _) = modadd_explorer();
    let (g, _) = Graph::load(&dirs[0]).unwrap();
    let expect: Vec<String> = [(1usize, 3usize), (2, 5)]
        .iter()
        .map(|&(l, j)| format!("lib:{}:{j}:{}", g.layers[l].name, g.layers[l].lambda[j]))
        .collect();
    let shots = root().join("target/explorer-screens");
    std::fs::create_dir_all(&shots).unwrap();
    let r = browser_check(
        html,
        &shots.join("modadd.png"),
        &expect,
        "explorer_works_in_chromium",
    );
    assert_eq!(r["ok"], true);
    assert_eq!(r["clicked"].as_array().unwrap().len(), 2);
}

/// MNIST cards: the input-space direction at layers.0 is row j of C_pinv, the top test images
/// are those with the largest |f C| (checked against every test image), and their pixels are
/// the data's.
#[test]
#[ignore = "needs ../shared/reference, data/mnist, chromium and tests/browser/node_modules"]
fn mnist_cards_show_directions_and_top_images() {
    let model_path = "../shared/reference/mnist-mlp/model_epoch_12.pt";
    require(&[model_path, "data/mnist/t10k-images-idx3-ubyte"]);
    chdir_root();
    let text = std::fs::read_to_string(root().join("configs/mnist-lib.toml"))
        .unwrap()
        .replace("split = \"train\"", "split = \"train\"\nn_samples = 3000");
    let cfg = RunConfig::parse(&text).unwrap();
    let dir = tmp("explorer-mnist");
    build_config(&cfg, "test", &dir.join("lib")).unwrap();
    let html = dir.join("explorer.html");
    explorer::explore_from_dirs(&[dir.join("lib")], &html, &ExplorerOptions::default()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    let d = embedded(&page);
    let (g, _) = Graph::load(&dir.join("lib")).unwrap();
    // Directions.
    let b0 = &g.layers[0];
    let cp = b0.c_pinv.as_ref().unwrap();
    let dj = &d["graphs"][0]["layers"][0]["direction"];
    let vals: Vec<i8> = unbase64(dj["data"].as_str().unwrap())
        .iter()
        .map(|&x| x as i8)
        .collect();
    assert_eq!(vals.len(), b0.d_lib() * 784);
    for j in 0..b0.d_lib() {
        let scale = dj["scale"][j].as_f64().unwrap();
        let want = (0..784).map(|i| cp[(j, i)].abs()).fold(0.0, f64::max);
        assert!((scale - want).abs() <= 1e-12 * want);
        for i in 0..784 {
            let got = vals[j * 784 + i] as f64 / 127.0 * scale;
            assert!(
                (got - cp[(j, i)]).abs() <= 0.5 / 127.0 * scale + 1e-15,
                "feature {j} pixel {i}"
            );
        }
    }
    // Top images at layers.1, against all test images.
    let model = config::load_model(&cfg.model).unwrap();
    let test = config::load_data(&cfg.with_split(ibasis::data::modadd::Split::Test)).unwrap();
    let n = test.len();
    let f = model.run(test.inputs(0..n), 0, model.node_index("layers.1").unwrap());
    let fhat =
        ibasis::tensor::linalg::mm(f.data.as_ref(), g.layers[1].c.as_ref().unwrap().as_ref());
    let tj = &d["graphs"][0]["layers"][1]["top"];
    let k = tj["k"].as_u64().unwrap() as usize;
    let (value, row) = (f32s(&tj["value"]), unbase64(tj["row"].as_str().unwrap()));
    let row: Vec<i32> = row
        .chunks(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let images = &d["images"];
    let samples: Vec<usize> = images["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let pixels = unbase64(images["pixels"].as_str().unwrap());
    for j in 0..4 {
        let mut all: Vec<(f64, usize)> = (0..n).map(|x| (fhat[(x, j)].abs(), x)).collect();
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for s in 0..k {
            let r = row[j * k + s] as usize;
            let x = samples[r];
            assert_eq!(x, all[s].1, "feature {j}, place {s}");
            let v = value[j * k + s] as f64;
            assert!((v - fhat[(x, j)]).abs() <= 1e-6 * fhat[(x, j)].abs());
            let input = test.inputs(x..x + 1);
            for i in 0..784 {
                assert_eq!(
                    pixels[r * 784 + i],
                    (input.data[(0, i)] * 255.0).round() as u8
                );
            }
        }
    }
    let expect = vec![
        format!("lib:layers.0:1:{}", g.layers[0].lambda[1]),
        format!("lib:layers.1:2:{}", g.layers[1].lambda[2]),
    ];
    let shots = root().join("target/explorer-screens");
    std::fs::create_dir_all(&shots).unwrap();
    browser_check(
        &html,
        &shots.join("mnist-test.png"),
        &expect,
        "mnist_cards_show_directions_and_top_images",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `ibasis explore` writes the page and one JSON per graph; bad input is one error line and
/// no output.
#[test]
fn explore_command_writes_the_page_or_one_clear_error() {
    let (_, dirs, _) = modadd_explorer();
    let dir = tmp("explore-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("view.html");
    let (ok, stdout, stderr) = ibasis(&[
        "explore",
        "--graph",
        dirs[0].to_str().unwrap(),
        "--graph",
        dirs[2].to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("view.html") && stdout.contains("view-neuron.json"),
        "{stdout}"
    );
    assert!(
        out.exists() && dir.join("view-lib.json").exists() && dir.join("view-neuron.json").exists()
    );
    let d = embedded(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(d["graphs"].as_array().unwrap().len(), 2);
    let bad = dir.join("bad.html");
    for (args, needle) in [
        (vec!["--graph", "no/such/graph"], "no/such/graph"),
        (
            vec!["--graph", dirs[0].to_str().unwrap(), "--edge-mass", "1.5"],
            "--edge-mass",
        ),
        (
            vec!["--graph", dirs[0].to_str().unwrap(), "--max-in-edges", "0"],
            "--max-in-edges",
        ),
    ] {
        let mut a = vec!["explore"];
        a.extend(args);
        a.extend(["--out", bad.to_str().unwrap()]);
        let (ok, _, err) = ibasis(&a);
        assert!(!ok);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{err}"
        );
        assert!(!bad.exists(), "no page after an error");
    }
    let _ = std::fs::remove_dir_all(dir);
}
