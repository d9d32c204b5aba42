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
        0.001,
        &out.join("figures"),
    )
    .unwrap();
    assert!(out.join("figures/ablation-unembed.svg").exists());
    assert!(!out.join("figures/ablation-ln2_0.svg").exists());
    assert!(std::fs::read_to_string(&html).unwrap().contains("unembed"));
    let _ = std::fs::remove_dir_all(out);
}

/// The report's "fewest features within delta" table uses the delta it is given (as
/// `summary.json` does), not a fixed 0.001.
#[test]
fn report_table_uses_the_given_delta() {
    use ibasis::experiments::ablate::{AblationResult, Curve};
    use ibasis::experiments::pipeline::fewest_within;
    chdir_root();
    let out = tmp("delta-report");
    let cfg = shipped(r#"node_layers = ["unembed", "output"]"#);
    let g = build_config(&cfg, "test", &out.join("lib")).unwrap();
    // Accuracy 0.9 with one feature, 0.97 with two, 0.9995 with 4, 1 with all.
    let mut r = AblationResult {
        basis: "lib".into(),
        metric: "accuracy".into(),
        baseline: 1.0,
        ..Default::default()
    };
    r.node_layers.insert(
        "unembed".into(),
        Curve {
            n_kept: vec![0, 1, 2, 4, 8],
            score: vec![0.0, 0.9, 0.97, 0.9995, 1.0],
        },
    );
    for (delta, want) in [(0.001, "4"), (0.05, "2"), (0.2, "1")] {
        assert_eq!(
            fewest_within(&r, "unembed", delta).unwrap().to_string(),
            want
        );
        let html = out.join(format!("report-{delta}.html"));
        ibasis::experiments::pipeline::write_full_report(
            &html,
            &cfg,
            &[("lib", &g)],
            std::slice::from_ref(&r),
            &[],
            None,
            1.0,
            delta,
            &out.join("figures"),
        )
        .unwrap();
        let text = std::fs::read_to_string(&html).unwrap();
        let row = format!(r#"<tr><td>unembed</td><td class="num">{want}</td></tr>"#);
        assert!(text.contains(&row), "delta {delta}: no row {row}");
        assert!(text.contains(&format!("within delta = {delta} ")));
    }
    let _ = std::fs::remove_dir_all(out);
}

/// The spectra figure leaves out the neuron basis whatever its graph is called: `ibasis run`
/// named it `neurons`, `ibasis report` names graphs by folder (`neuron`).
#[test]
fn spectra_leave_out_the_neuron_basis_by_its_matrices() {
    use ibasis::algorithm::BasisFormula;
    use ibasis::experiments::pipeline::{is_neuron_basis, spectra_series};
    chdir_root();
    let out = tmp("neuron-spectra");
    let lib_cfg = shipped(r#"node_layers = ["ln2.0", "unembed", "output"]"#);
    let mut neuron_cfg = lib_cfg.clone();
    neuron_cfg.lib.basis_formula = BasisFormula::Neuron;
    neuron_cfg.lib.center = false;
    neuron_cfg.lib.edge_formula = ibasis::algorithm::EdgeFormula::None;
    build_config(&lib_cfg, "test", &out.join("lib")).unwrap();
    build_config(&neuron_cfg, "test", &out.join("neuron")).unwrap();
    let (lib, _) = Graph::load(&out.join("lib")).unwrap();
    let (neuron, _) = Graph::load(&out.join("neuron")).unwrap();
    assert!(is_neuron_basis(&neuron) && !is_neuron_basis(&lib));
    for name in ["neuron", "neurons", "lib"] {
        let s = spectra_series(&[("lib", &lib), (name, &neuron)]);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["lib ln2.0", "lib unembed"],
            "neuron graph named {name}"
        );
    }
    let _ = std::fs::remove_dir_all(out);
}
