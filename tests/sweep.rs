//! `sdsparse sweep` on the tiny fixture: in-memory pruning equals `convert`'s masks, the
//! whole sweep end to end (files, resume, errors), and the trained toy's dense task score.

mod format_util;

use format_util::*;
use sdsparse::checkpoint::ComponentStore;
use sdsparse::convert::{convert, ConvertOptions};
use sdsparse::prune::{ComponentKind, Method, Pattern, Scope, Selection};
use sdsparse::sweep::{self, parse_sparsities, prune_in_memory, DenseComponent, SweepOptions, Target};

/// For each option set: the tensors `prune_in_memory` zeroes are exactly those the sparse
/// checkpoint of `convert` stores as zeros (bit-exact values elsewhere).
#[test]
fn in_memory_pruning_equals_convert() {
    let cases = [
        (Method::Magnitude, Scope::Layer, Pattern::Unstructured, false, 0.35),
        (Method::Magnitude, Scope::Global, Pattern::Unstructured, true, 0.6),
        (Method::Random, Scope::Layer, Pattern::Unstructured, false, 0.475),
        (Method::Magnitude, Scope::Layer, Pattern::Sparse24, false, 0.5),
    ];
    for (method, scope, pattern, include_conv, s) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let selection = Selection { include_conv, ..Selection::default() };
        let opts = ConvertOptions {
            text_encoder_sparsity: Some(s),
            unet_sparsity: Some(s),
            pattern,
            method,
            scope,
            seed: 3,
            selection: selection.clone(),
            ..ConvertOptions::default()
        };
        convert(&fixture(), &tmp.path().join("sparse"), &opts, &mut |_| {}).unwrap();
        for (folder, kind) in [("text_encoder", ComponentKind::TextEncoder), ("unet", ComponentKind::Unet)] {
            let dense = DenseComponent::load(&fixture().join(folder), kind).unwrap();
            let (mine, achieved) = prune_in_memory(&dense, &selection, method, scope, pattern, s, 3).unwrap();
            let theirs = ComponentStore::open(&tmp.path().join("sparse").join(folder)).unwrap();
            let mut zeros = (0usize, 0usize);
            for (name, _) in &dense.tensors {
                let a = mine[name].to_vec().unwrap();
                let b = theirs.tensor_f32(name).unwrap().to_vec().unwrap();
                assert_eq!(a, b, "{folder} {name} {method:?} {scope:?} {pattern:?}");
                zeros.0 += a.iter().filter(|v| **v == 0.0).count();
                zeros.1 += a.len();
            }
            assert!(achieved > s - 0.02 && achieved <= s + 1e-9, "{folder}: achieved {achieved} for {s}");
            assert!(zeros.0 > 0);
        }
    }
}

#[test]
fn sparsity_ranges_parse_and_bad_ones_are_clear_errors() {
    assert_eq!(parse_sparsities("0:0.9:0.3").unwrap(), vec![0.0, 0.3, 0.6, 0.9]);
    assert_eq!(parse_sparsities("0:0.9:0.05").unwrap().len(), 19);
    assert_eq!(parse_sparsities("0.35, 0.475").unwrap(), vec![0.35, 0.475]);
    // A value given twice is one point, in the order first given.
    assert_eq!(parse_sparsities("0.5,0.35,0.5").unwrap(), vec![0.5, 0.35]);
    for (bad, says) in [
        ("0.5:0.1:0.1", "above stop"),
        ("0:1:0.1", "outside [0, 1)"),
        ("0:0.5:0", "must be positive"),
        ("0:0.5:-0.1", "must be positive"),
        ("0:0.5", "START:STOP:STEP"),
        ("a,b", "not a number"),
        ("-0.1", "outside [0, 1)"),
        ("0:0.9:0.0000001", "at most"),
    ] {
        let e = parse_sparsities(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

fn options(out: &std::path::Path) -> SweepOptions {
    SweepOptions {
        model: fixture(),
        out: out.to_path_buf(),
        targets: vec![Target::Unet, Target::Both],
        sparsities: vec![0.0, 0.5],
        methods: vec![Method::Magnitude],
        scope: Scope::Layer,
        pattern: Pattern::Unstructured,
        include_conv: false,
        prompts: Some(vec!["a red circle".into(), "a photo of a cat".into()]),
        seeds: 1,
        steps: 2,
        guidance: 7.5,
        prune_seed: 0,
        owl: Default::default(),
        calibration: Default::default(),
    }
}

#[test]
fn sweep_end_to_end_on_the_tiny_fixture_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let mut calls = Vec::new();
    let r = sweep::run(&options(&out), &mut |d, t, _| calls.push((d, t))).unwrap();
    // dense + 2 targets x 2 sparsities, 2 images each (sparsity 0 reuses the dense run).
    assert_eq!(r.points.len(), 5);
    assert_eq!(calls.last(), Some(&(6, 6)));
    let dense = &r.points[0];
    assert!(dense.target.is_none() && dense.task_score.is_none() && dense.ssim == 1.0);
    for p in &r.points[1..] {
        if p.sparsity == 0.0 {
            assert_eq!((p.latent_rel_err, p.ssim), (0.0, 1.0), "sparsity 0 is the dense model");
        } else {
            assert!(p.latent_rel_err > 0.0 && p.ssim < 1.0 && p.psnr_db < sweep::PSNR_CAP_DB, "{p:?}");
            assert!((p.unet_sparsity - 0.5).abs() < 0.01);
            assert_eq!(p.text_encoder_sparsity > 0.0, p.target == Some(Target::Both));
        }
        for f in ["p000_s000.png", "p001_s000.png"] {
            assert!(out.join(&p.image_dir).join(f).is_file(), "{} {f}", p.image_dir);
        }
    }
    for f in ["results.json", "results.csv", "curves.png", "grid.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6);
    assert!(csv.starts_with("component,method,scope,pattern,include_conv,sparsity"));

    // Resume: nothing left but the dense reference; a new sparsity adds only its points.
    let mut calls = Vec::new();
    let again = sweep::run(&options(&out), &mut |d, t, _| calls.push((d, t))).unwrap();
    assert_eq!(calls.last(), Some(&(2, 2)), "only the dense run again");
    assert_eq!(again.points.len(), 5);
    for (a, b) in again.points[1..].iter().zip(&r.points[1..]) {
        assert_eq!((a.key(), a.seconds), (b.key(), b.seconds), "kept from results.json, not rerun");
        assert!((a.ssim - b.ssim).abs() < 1e-12 && (a.latent_rel_err - b.latent_rel_err).abs() < 1e-12);
    }
    let mut more = options(&out);
    more.sparsities = vec![0.0, 0.5, 0.7];
    let mut calls = Vec::new();
    let r3 = sweep::run(&more, &mut |d, t, _| calls.push((d, t))).unwrap();
    assert_eq!(calls.last(), Some(&(6, 6)));
    assert_eq!(r3.points.len(), 7);

    // Other prompts into the same folder: refused, not mixed.
    let mut other = options(&out);
    other.prompts = Some(vec!["something else".into()]);
    let e = sweep::run(&other, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("other prompts"), "{e}");
}

#[test]
fn bad_sweep_options_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(&tmp.path().join("x"));
    o.pattern = Pattern::Sparse24;
    let e = sweep::run(&o, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("2:4") && e.contains("exactly 50%"), "{e}");
    let mut o = options(&tmp.path().join("x"));
    o.seeds = 0;
    assert!(sweep::run(&o, &mut |_, _, _| {}).unwrap_err().to_string().contains("--seeds"));
    let mut o = options(&tmp.path().join("x"));
    o.model = tmp.path().join("missing");
    assert!(sweep::run(&o, &mut |_, _, _| {}).is_err());
    assert!(!tmp.path().join("x").join("results.json").exists());
    // The CLI: a bad range is one line and exit 1.
    let (code, _, err) = run_bin(&["sweep", "--model", "x", "--out", "y", "--sparsities", "0.9:0.1:0.1"]);
    assert_eq!(code, 1);
    assert!(err.contains("above stop") && err.lines().count() == 1, "{err}");
}

/// The trained toy (embedded in the binary): dense task score over 60 prompt-seed pairs at the
/// issue's bar (>= 0.8; measured 1.000), and the study's configuration (text encoder 47.5% +
/// UNet 35%, through `convert`) within the 0.05 of it (measured 0.983; docs/STUDY.md).
#[test]
fn toy_task_score_meets_the_dense_bar() {
    toy_task_scores(0.8, 0.05);
}

fn toy_task_scores(dense_min: f64, study_max_loss: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    sdsparse::toy::write_model(&model, false).unwrap();
    let mut o = options(&tmp.path().join("sweep"));
    o.model = model;
    o.prompts = None; // the task's 30 default prompts
    o.seeds = 2;
    o.steps = 20;
    o.targets = vec![Target::Unet];
    o.sparsities = vec![0.35];
    let r = sweep::run(&o, &mut |_, _, _| {}).unwrap();
    let dense = r.points[0].task_score.unwrap();
    let pruned = r.points[1].task_score.unwrap();
    assert!(r.points[0].images >= 60);
    // The study's configuration (text encoder 47.5%, UNet 35%) through `convert`.
    let sparse = tmp.path().join("sparse");
    convert(&tmp.path().join("toy"), &sparse, &ConvertOptions::default(), &mut |_| {}).unwrap();
    let study = sweep::task_score_of(&sparse, &r.prompts, 2, 20, 7.5).unwrap();
    let again = sweep::task_score_of(&tmp.path().join("toy"), &r.prompts, 2, 20, 7.5).unwrap();
    eprintln!("toy task score: dense {dense} ({again}), UNet 35% {pruned}, study configuration {study}");
    assert_eq!(again, dense, "the same score through the sweep and task_score_of");
    assert!(dense >= dense_min, "dense task score {dense}");
    assert!(study >= dense - study_max_loss, "study configuration {study} vs dense {dense}");
}

/// `--methods wanda,owl`: the model calibrated once, each point pruned as `convert` prunes
/// it with the same calibration, so a point's image is the image of the converted checkpoint
/// (byte for byte); Linear-only methods refuse `--include-conv` before any work.
#[test]
fn sweep_wanda_and_owl_equal_convert() {
    use sdsparse::calibrate::CalibrationOptions;
    use sdsparse::pipeline::{image_to_rgb8, GenerateRequest, StableDiffusion};
    let tmp = tempfile::tempdir().unwrap();
    let calibration =
        CalibrationOptions { samples: 4, unet_samples: 2, steps: 2, ..CalibrationOptions::default() };
    let mut o = options(&tmp.path().join("sweep"));
    o.methods = vec![Method::Wanda, Method::Owl];
    o.targets = vec![Target::Both];
    o.sparsities = vec![0.5];
    o.prompts = Some(vec!["a red circle".into()]);
    o.calibration = calibration.clone();
    let r = sweep::run(&o, &mut |_, _, _| {}).unwrap();
    assert_eq!(r.points.len(), 3);
    for (p, method) in r.points[1..].iter().zip([Method::Wanda, Method::Owl]) {
        assert_eq!(p.method, method.name());
        // Wanda prunes floor(s * cols) of every row, OWL spreads the target over blocks.
        assert!((p.unet_sparsity - 0.5).abs() < 0.02, "{}: {}", p.method, p.unet_sparsity);
        assert!((p.text_encoder_sparsity - 0.5).abs() < 0.02, "{}: {}", p.method, p.text_encoder_sparsity);
        assert!(p.latent_rel_err > 0.0 && p.latent_rel_err.is_finite());
        let sparse = tmp.path().join(format!("sparse-{}", p.method));
        let copts = ConvertOptions {
            method,
            text_encoder_sparsity: Some(0.5),
            unet_sparsity: Some(0.5),
            calibration: calibration.clone(),
            ..ConvertOptions::default()
        };
        convert(&fixture(), &sparse, &copts, &mut |_| {}).unwrap();
        let sd = StableDiffusion::load(&sparse, &sdsparse::Device::Cpu).unwrap();
        let mut req = GenerateRequest::new("a red circle");
        req.steps = o.steps;
        req.guidance = o.guidance;
        req.seed = 0;
        let g = sd.generate(&req, &mut |_, _| {}).unwrap();
        let (_, _, rgb) = image_to_rgb8(&g.image).unwrap();
        let png = image::open(tmp.path().join("sweep").join(&p.image_dir).join(sweep::image_name(0, 0)))
            .unwrap()
            .to_rgb8();
        assert!(png.as_raw() == &rgb, "{}: the sweep's image differs from convert's", p.method);
    }
    let mut o = options(&tmp.path().join("conv"));
    o.methods = vec![Method::Wanda];
    o.include_conv = true;
    let e = sweep::run(&o, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("Linear layers only"), "{e}");
    assert!(!tmp.path().join("conv").exists());
}

/// A converted (sparse) checkpoint or a component folder is refused by `sweep` and `plan`
/// before any work: no output folder, no baseline images.
#[test]
fn sweep_and_plan_refuse_a_converted_model_before_any_work() {
    use sdsparse::plan::{make_plan, PlanOptions};
    let tmp = tempfile::tempdir().unwrap();
    let sparse = tmp.path().join("sparse");
    convert(&fixture(), &sparse, &ConvertOptions::default(), &mut |_| {}).unwrap();
    let out = tmp.path().join("sweep");
    let mut o = options(&out);
    o.model = sparse.clone();
    let e = sweep::run(&o, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("sweep needs a dense checkpoint"), "{e}");
    assert!(!out.exists(), "the sweep wrote {} before refusing", out.display());
    o.model = fixture().join("unet");
    let e = sweep::run(&o, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("one component (unet)"), "{e}");
    assert!(!out.exists());
    let e = make_plan(&sparse, &PlanOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("plan needs a dense checkpoint"), "{e}");
}
