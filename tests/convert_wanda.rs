//! `convert --method wanda|owl` on the tiny fixture: the written checkpoint equals pruning
//! the loaded model in memory with the same calibration (`prune_model::prune_linears`), for
//! layer / global scope and unstructured / 2:4; calibration is recorded; Linear-only methods
//! refuse convolutions with a clear error before writing anything.

mod reference_util;

use reference_util::fixture;
use sdsparse::calibrate::{calibrate, CalibrationOptions};
use sdsparse::convert::{convert, ConvertOptions};
use sdsparse::pipeline::StableDiffusion;
use sdsparse::prune::wanda::OwlParams;
use sdsparse::prune::{Method, Pattern, Scope};
use sdsparse::prune_model::{prune_linears, PruneOptions};
use sdsparse::Device;

fn calibration() -> CalibrationOptions {
    CalibrationOptions { samples: 4, steps: 2, ..CalibrationOptions::default() }
}

fn check(method: Method, pattern: Pattern, scope: Scope) {
    let model = fixture("tiny-sd2-eps");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sparse");
    let opts = ConvertOptions {
        method,
        pattern,
        scope,
        text_encoder_sparsity: Some(0.5),
        unet_sparsity: Some(0.5),
        calibration: calibration(),
        ..ConvertOptions::default()
    };
    let report = convert(&model, &out, &opts, &mut |_| {}).unwrap();

    // The same pruning in memory, from the same calibration.
    let cal = calibrate(&model, &calibration(), true, true, &mut |_| {}).unwrap();
    let mut expected = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let p = PruneOptions { method, pattern, scope, sparsity: 0.5, seed: 0, owl: OwlParams::default() };
    let te = prune_linears(expected.text_encoder_mut().linears_mut(), &p, cal.text_encoder.as_ref()).unwrap();
    let unet = prune_linears(expected.unet_mut().linears_mut(), &p, cal.unet.as_ref()).unwrap();

    let mut written = StableDiffusion::load(&out, &Device::Cpu).unwrap();
    let mut compared = 0;
    let dense = |sd: &mut StableDiffusion| -> Vec<(String, Vec<f32>)> {
        let mut v: Vec<_> = sd
            .text_encoder_mut()
            .linears_mut()
            .into_iter()
            .map(|l| (l.name().to_string(), l.weight().to_dense_host().unwrap().to_f32()))
            .collect();
        v.extend(
            sd.unet_mut()
                .linears_mut()
                .into_iter()
                .map(|l| (l.name().to_string(), l.weight().to_dense_host().unwrap().to_f32())),
        );
        v
    };
    for ((na, x), (nb, y)) in dense(&mut written).into_iter().zip(dense(&mut expected)) {
        assert_eq!(na, nb);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{na}: differs");
        compared += 1;
    }
    assert!(compared > 50);
    for (c, r) in [("text_encoder", &te), ("unet", &unet)] {
        let comp = report.components.iter().find(|x| x.name == c).unwrap();
        assert_eq!(comp.pruned, r.layers.iter().map(|l| l.pruned).sum::<usize>(), "{c}");
        let sorted = |g: &[sdsparse::prune::wanda::OwlGroup]| {
            let mut g = g.to_vec();
            g.sort_by(|a, b| a.name.cmp(&b.name));
            g
        };
        assert_eq!(sorted(&comp.owl_groups), sorted(&r.owl_groups), "{c}");
        assert_eq!(comp.owl_groups.is_empty(), method != Method::Owl || pattern == Pattern::Sparse24);
        if pattern == Pattern::Unstructured {
            assert!((comp.achieved_sparsity() - 0.5).abs() < 0.06, "{c}: {}", comp.achieved_sparsity());
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sdsparse.json")).unwrap()).unwrap();
    assert_eq!(summary["method"], method.name());
    assert_eq!(summary["calibration"]["captions"], 4);
}

#[test]
fn wanda_layer_unstructured() {
    check(Method::Wanda, Pattern::Unstructured, Scope::Layer);
}

#[test]
fn wanda_24_and_global() {
    check(Method::Wanda, Pattern::Sparse24, Scope::Layer);
    check(Method::Wanda, Pattern::Unstructured, Scope::Global);
}

#[test]
fn owl_layer_and_global() {
    check(Method::Owl, Pattern::Unstructured, Scope::Layer);
    check(Method::Owl, Pattern::Unstructured, Scope::Global);
}

#[test]
fn wanda_refuses_convolutions_and_bad_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sparse");
    let mut opts =
        ConvertOptions { method: Method::Wanda, calibration: calibration(), ..ConvertOptions::default() };
    opts.selection.include_conv = true;
    let err = convert(&fixture("tiny-sd2-eps"), &out, &opts, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("Linear layers only"), "{err}");
    assert!(!out.exists());
    for (bad, what) in [
        (
            ConvertOptions {
                owl: OwlParams { m: 0.0, lambda: 0.08 },
                method: Method::Owl,
                ..ConvertOptions::default()
            },
            "--owl-m",
        ),
        (
            ConvertOptions {
                method: Method::Wanda,
                calibration: CalibrationOptions { samples: 500, ..CalibrationOptions::default() },
                ..ConvertOptions::default()
            },
            "--calibration-samples",
        ),
    ] {
        let err = convert(&fixture("tiny-sd2-eps"), &out, &bad, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}
