//! Results files are readable by numpy users; ablations reproduce the baseline when nothing is
//! ablated and fall to chance when everything is.

mod common;
use common::*;
use ibasis::algorithm::Graph;
use ibasis::data::modadd::Split;
use ibasis::experiments::ablate::{
    edge_ablation, node_ablation, AblationKind, AblationSettings, Metric, Schedule,
};
use ibasis::experiments::{build::build_config, config, config::RunConfig};

fn shipped(layers: &str) -> RunConfig {
    let text = std::fs::read_to_string(root().join("configs/modadd-lib.toml")).unwrap();
    let text = text.replace(
        r#"node_layers = ["ln1.0", "ln2.0", "unembed", "output"]"#,
        layers,
    );
    RunConfig::parse(&text).unwrap()
}

fn settings(kind: AblationKind, schedule: Schedule) -> AblationSettings {
    AblationSettings {
        kind,
        schedule,
        cutoff: 2,
        base: 8.0,
        step: 1,
        delta: 0.001,
        split: Split::Test,
        metric: Metric::Accuracy,
        node_layers: None,
        batch_size: 1024,
    }
}

#[test]
#[ignore = "needs python3 with numpy and safetensors: python3 -m pip install numpy safetensors"]
fn numpy_reads_graph_safetensors() {
    chdir_root();
    let out = tmp("numpy");
    let cfg = shipped(r#"node_layers = ["unembed", "output"]"#);
    let g = build_config(&cfg, "test", &out).unwrap();
    let probe = std::process::Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output();
    assert!(
        matches!(probe, Ok(ref o) if o.status.success()),
        "python3 with numpy and safetensors is not installed: python3 -m pip install numpy safetensors"
    );
    let c = g.layers[0].c.as_ref().unwrap();
    let script = format!(
        "from safetensors.numpy import load_file\n\
         import json, numpy as np\n\
         g = load_file('{dir}/graph.safetensors')\n\
         s = json.load(open('{dir}/graph.json'))\n\
         c = g['C/unembed']; e = g['edges/unembed/output']\n\
         assert c.dtype == np.float64 and c.shape == ({r}, {k}), c.shape\n\
         assert e.shape == (114, {k})\n\
         assert abs(c[1, 2] - {c12:e}) <= 1e-15 * abs({c12:e})\n\
         assert np.allclose(g['C_pinv/unembed'] @ c, np.eye({k}), atol=1e-8)\n\
         assert s['node_layers'][0]['d_lib'] == {k}\n\
         print('ok')",
        dir = out.display(),
        r = c.nrows(),
        k = c.ncols(),
        c12 = c[(1, 2)]
    );
    let run = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn ablating_nothing_gives_baseline_and_everything_chance() {
    chdir_root();
    let out = tmp("ablate");
    let cfg = shipped(r#"node_layers = ["ln2.0", "unembed", "output"]"#);
    build_config(&cfg, "test", &out).unwrap();
    let (g, _) = Graph::load(&out).unwrap();
    let model = config::load_model(&cfg.model).unwrap();
    let test = config::load_data(&cfg.with_split(Split::Test)).unwrap();
    let r = node_ablation(
        &model,
        test.as_ref(),
        &g,
        &settings(AblationKind::Node, Schedule::Exponential),
    )
    .unwrap();
    assert!(r.baseline > 0.99);
    for (layer, c) in &r.node_layers {
        assert_eq!(c.n_kept[0], 0);
        assert!(
            c.score[0] < 0.05,
            "{layer}: nothing kept gives chance (1/113), got {}",
            c.score[0]
        );
        assert_eq!(
            *c.n_kept.last().unwrap(),
            g.layers.iter().find(|b| &b.name == layer).unwrap().d_lib()
        );
        assert!(
            (c.score.last().unwrap() - r.baseline).abs() < 1e-12,
            "{layer}: everything kept gives the baseline"
        );
    }
    // Bisect finds a count whose score is within delta, and one fewer is not.
    let b = node_ablation(
        &model,
        test.as_ref(),
        &g,
        &settings(AblationKind::Node, Schedule::Bisect),
    )
    .unwrap();
    for (layer, &n) in &b.features_required {
        let c = &b.node_layers[layer];
        let at = |k: usize| c.score[c.n_kept.iter().position(|&x| x == k).unwrap()];
        assert!(at(n) >= b.baseline - 0.001);
        if n > 0 {
            assert!(at(n - 1) < b.baseline - 0.001, "{layer}: bisect minimum");
        }
    }
    // Edges: all kept gives the baseline, none (but the constant's) far less.
    let e = edge_ablation(
        &model,
        test.as_ref(),
        &g,
        &settings(AblationKind::Edge, Schedule::Exponential),
    )
    .unwrap();
    for (key, c) in &e.edge_curves {
        assert!(
            (c.score.last().unwrap() - e.baseline).abs() < 1e-12,
            "{key}"
        );
        assert!(c.score[0] < 0.05, "{key}: {}", c.score[0]);
    }
    let _ = std::fs::remove_dir_all(out);
}

/// A report of a graph whose node ablations cover only some node layers (`[experiments]
/// ablate_node_layers`) draws curves for those and skips the rest.
#[test]
fn report_with_ablations_of_some_layers() {
    chdir_root();
    let out = tmp("partial-report");
    let cfg = shipped(r#"node_layers = ["ln2.0", "unembed", "output"]"#);
    build_config(&cfg, "test", &out.join("lib")).unwrap();
    let (g, _) = Graph::load(&out.join("lib")).unwrap();
    let model = config::load_model(&cfg.model).unwrap();
    let test = config::load_data(&cfg.with_split(Split::Test)).unwrap();
    let mut s = settings(AblationKind::Node, Schedule::Exponential);
    s.node_layers = Some(vec!["unembed".into()]);
    let r = node_ablation(&model, test.as_ref(), &g, &s).unwrap();
    assert_eq!(r.node_layers.keys().collect::<Vec<_>>(), ["unembed"]);
    let html = out.join("report.html");
    ibasis::experiments::pipeline::write_full_report(
        &html,
        &cfg,
        &[("LIB", &g)],
        &[r],
        &[],
        None,
        1.0,
        &out.join("figures"),
    )
    .unwrap();
    assert!(out.join("figures/ablation-unembed.svg").exists());
    assert!(!out.join("figures/ablation-ln2_0.svg").exists());
    assert!(std::fs::read_to_string(&html).unwrap().contains("unembed"));
    let _ = std::fs::remove_dir_all(out);
}
