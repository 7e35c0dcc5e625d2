//! `sdsparse plan` on the tiny fixture (text encoder only, to stay cheap): the plan keeps
//! its budget, saves and loads, `convert --plan` writes exactly the chosen pattern and
//! sparsity per layer, and the additivity assumption is measured (predicted vs measured).

mod reference_util;

use reference_util::fixture;
use sdsparse::convert::{convert, ConvertOptions};
use sdsparse::plan::{make_plan, measure, Choice, MixedPlan, PlanOptions};
use std::sync::Arc;

#[test]
fn plan_keeps_its_budget_and_convert_applies_it() {
    let model = fixture("tiny-sd2-eps");
    let opts =
        PlanOptions { budget: 2e-3, sparsities: vec![0.5, 0.8], unet: false, ..PlanOptions::default() };
    let plan = make_plan(&model, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(plan.layers.len(), 30, "5 CLIP layers x 6 Linears");
    assert!(plan.predicted_deviation <= opts.budget, "{}", plan.predicted_deviation);
    assert!(plan.cost < plan.dense_cost, "a budget this size must buy some pruning");
    assert!(plan.layers.iter().any(|l| l.chosen != Choice::Dense));
    // Single-layer deviations grow with sparsity (a sanity check of the measurement).
    for l in &plan.layers {
        let d = |s| l.options.iter().find(|o| o.choice == Choice::Unstructured(s)).unwrap().deviation;
        assert!(d(0.8) > d(0.5) && d(0.5) > 0.0, "{}: {} vs {}", l.name, d(0.5), d(0.8));
    }
    // Additivity: the measured deviation of the whole plan vs the sum of single-layer ones.
    let ratio = plan.measured_deviation / plan.predicted_deviation;
    eprintln!(
        "predicted {:.3e}, measured {:.3e} (ratio {ratio:.2}); cost {:.3} of dense",
        plan.predicted_deviation,
        plan.measured_deviation,
        plan.cost / plan.dense_cost
    );
    assert!(ratio > 0.2 && ratio < 5.0, "additivity off by {ratio}");

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("plan.json");
    plan.save(&path, false).unwrap();
    assert!(plan.save(&path, false).is_err(), "no overwrite without force");
    let loaded = MixedPlan::load(&path).unwrap();
    // (serde_json reads floats back to within an ulp, so compare what matters)
    assert_eq!(loaded.layers.len(), plan.layers.len());
    for (a, b) in loaded.layers.iter().zip(&plan.layers) {
        assert!(a.name == b.name && a.chosen == b.chosen && a.shape == b.shape, "{}", a.name);
    }
    assert!((loaded.cost - plan.cost).abs() <= 1e-9 * plan.cost);

    let out = tmp.path().join("sparse");
    let copts = ConvertOptions { mixed_plan: Some(Arc::new(loaded)), ..ConvertOptions::default() };
    let report = convert(&model, &out, &copts, &mut |_| {}).unwrap();
    let te = report.components.iter().find(|c| c.name == "text_encoder").unwrap();
    for l in &plan.layers {
        let written = te.layers.iter().find(|w| w.name == l.name);
        match l.chosen {
            Choice::Dense => assert!(written.is_none(), "{}: should stay dense", l.name),
            Choice::Sparse24 => assert_eq!(written.unwrap().format, "2:4", "{}", l.name),
            Choice::Unstructured(s) => {
                let w = written.unwrap();
                assert_eq!(w.format, "unstructured");
                assert_eq!(w.zeros, sdsparse::prune::prune_count(s, w.numel), "{}", l.name);
            }
        }
    }
    // The plan listed no UNet layer: the UNet stays dense.
    assert_eq!(report.components.iter().find(|c| c.name == "unet").unwrap().pruned, 0);

    // A plan cannot be mixed with a method or global scope.
    let bad = ConvertOptions { scope: sdsparse::prune::Scope::Global, ..copts };
    let err = convert(&model, &tmp.path().join("x"), &bad, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("--plan"), "{err}");
}

/// How well additivity holds over a range of budgets, both components (about 3 minutes on
/// two loaded cores: `cargo test --test plan_tiny -- --ignored --nocapture`). Figures in
/// docs/PRUNING.md.
#[test]
#[ignore]
fn additivity_across_budgets() {
    let model = fixture("tiny-sd2-eps");
    let mut plan = make_plan(&model, &PlanOptions::default(), &mut |_, _| {}).unwrap();
    for budget in [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] {
        plan.rechoose(budget);
        let measured = measure(&model, &plan).unwrap();
        eprintln!(
            "budget {budget:.0e}: cost {:.3} of dense, predicted {:.3e}, measured {measured:.3e} (ratio {:.2})",
            plan.cost / plan.dense_cost,
            plan.predicted_deviation,
            measured / plan.predicted_deviation
        );
    }
}
