//! Wanda / OWL against the independent PyTorch reference (`tools/make_wanda_reference.py`:
//! transformers / diffusers forward hooks on the tiny fixture, the same 16 captions, 4-step
//! DDIM runs): calibration statistics, Wanda scores, masks (per-row, 2:4, global) and OWL's
//! outlier ratios and group sparsities. Also shows that the check can fail: masks made with a
//! wrong rule (per-column comparison, plain magnitude) miss the 99.9% bar.

mod reference_util;

use reference_util::fixture;
use sdsparse::calibrate::{self, CalibrationOptions};
use sdsparse::pipeline::StableDiffusion;
use sdsparse::prune::wanda::{self, ActivationStats, Layer, OwlParams, Rule, Spec};
use sdsparse::prune::{Method, Pattern, Scope};
use sdsparse::{Device, Weight};
use std::collections::HashMap;
use std::sync::OnceLock;

struct Reference {
    meta: serde_json::Value,
    f32s: HashMap<String, Vec<f32>>,
    f64s: HashMap<String, Vec<f64>>,
    u8s: HashMap<String, Vec<u8>>,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir = fixture("wanda-reference");
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (mut f32s, mut f64s, mut u8s) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (k, v) in st.tensors() {
            match v.dtype() {
                safetensors::Dtype::F32 => {
                    f32s.insert(
                        k,
                        v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                    );
                }
                safetensors::Dtype::F64 => {
                    f64s.insert(
                        k,
                        v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                    );
                }
                safetensors::Dtype::U8 => {
                    u8s.insert(k, v.data().to_vec());
                }
                d => panic!("{k}: unexpected dtype {d:?}"),
            }
        }
        Reference { meta, f32s, f64s, u8s }
    })
}

/// (name, rows, cols, values) of one dense Linear weight.
type DenseLayer = (String, usize, usize, Vec<f32>);

/// The tiny pipeline, calibrated as the reference was; the weights of both components.
struct Calibrated {
    stats: HashMap<&'static str, ActivationStats>,
    /// component -> [(name, rows, cols, values)] in the model's layer order
    weights: HashMap<&'static str, Vec<DenseLayer>>,
}

fn calibrated() -> &'static Calibrated {
    static C: OnceLock<Calibrated> = OnceLock::new();
    C.get_or_init(|| {
        let r = reference();
        let opts = CalibrationOptions {
            samples: r.meta["captions"].as_u64().unwrap() as usize,
            unet_samples: r.meta["captions"].as_u64().unwrap() as usize,
            steps: r.meta["unet_steps"].as_u64().unwrap() as usize,
            seed: r.meta["seed"].as_u64().unwrap(),
            guidance: r.meta["guidance"].as_f64().unwrap() as f32,
            prompts: None,
        };
        let captions = opts.captions().unwrap();
        let mut sd = StableDiffusion::load(&fixture("tiny-sd2-eps"), &Device::Cpu).unwrap();
        let te = calibrate::text_encoder_stats(&mut sd, &captions, &mut |_| {}).unwrap();
        let unet = calibrate::unet_stats(&mut sd, &captions, &opts, &mut |_| {}).unwrap();
        let dense = |l: &sdsparse::model::linear::Linear| {
            let Weight::Dense(w) = l.weight() else { panic!("fixture weights are dense") };
            let (rows, cols) = w.dims2().unwrap();
            (l.name().to_string(), rows, cols, w.to_vec().unwrap())
        };
        let weights = HashMap::from([
            ("text_encoder", sd.text_encoder_mut().linears_mut().into_iter().map(|l| dense(l)).collect()),
            ("unet", sd.unet_mut().linears_mut().into_iter().map(|l| dense(l)).collect()),
        ]);
        Calibrated { stats: HashMap::from([("text_encoder", te), ("unet", unet)]), weights }
    })
}

const COMPONENTS: [&str; 2] = ["text_encoder", "unet"];

fn spec(method: Method, pattern: Pattern, scope: Scope) -> Spec {
    let r = reference();
    Spec {
        method,
        pattern,
        scope,
        sparsity: r.meta["sparsity"].as_f64().unwrap(),
        owl: OwlParams {
            m: r.meta["owl_m"].as_f64().unwrap(),
            lambda: r.meta["owl_lambda"].as_f64().unwrap(),
        },
    }
}

type ScoreFn = fn(&[f32], usize, &[f32]) -> Vec<f32>;

/// Masks of every layer of `comp` (2:4: only layers with `cols % 4 == 0`) from our decisions,
/// with Wanda scores computed by `score`.
fn our_masks(comp: &str, spec: &Spec, score: ScoreFn) -> (Vec<(String, Vec<u8>)>, Vec<wanda::OwlGroup>) {
    let c = calibrated();
    let layers: Vec<_> = c.weights[comp]
        .iter()
        .filter(|(_, _, cols, _)| spec.pattern != Pattern::Sparse24 || cols % 4 == 0)
        .collect();
    let keys = |i: usize| {
        let (name, _, cols, w) = layers[i];
        let rms = wanda::lookup(&c.stats[comp], name).unwrap().rms();
        wanda::score_keys(&score(w, *cols, &rms))
    };
    let shapes: Vec<Layer> =
        layers.iter().map(|(n, r, c, _)| Layer { name: n.clone(), rows: *r, cols: *c }).collect();
    let (decisions, groups) = wanda::decide(&shapes, spec, &mut |i| Ok(keys(i))).unwrap();
    let masks = decisions
        .iter()
        .enumerate()
        .map(|(i, d)| (layers[i].0.clone(), wanda::apply(d.rule, &keys(i), layers[i].1, layers[i].2).0))
        .collect();
    (masks, groups)
}

/// Share of mask entries equal to the reference's `mask_{variant}`, over all layers.
fn agreement(comp: &str, variant: &str, masks: &[(String, Vec<u8>)]) -> f64 {
    let r = reference();
    let c = calibrated();
    let (mut equal, mut total) = (0usize, 0usize);
    for (name, mask) in masks {
        let want = &r.u8s[&format!("{comp}/{name}/mask_{variant}")];
        let cols = c.weights[comp].iter().find(|w| &w.0 == name).unwrap().2;
        let rb = cols.div_ceil(8);
        assert_eq!(mask.len(), want.len(), "{name}");
        for (a, b) in mask.chunks(rb).zip(want.chunks(rb)) {
            for col in 0..cols {
                equal += ((a[col / 8] >> (col % 8)) & 1 == (b[col / 8] >> (col % 8)) & 1) as usize;
                total += 1;
            }
        }
    }
    equal as f64 / total as f64
}

#[test]
fn calibration_statistics_match_the_reference() {
    let (r, c) = (reference(), calibrated());
    for comp in COMPONENTS {
        let layers = r.meta["components"][comp]["layers"].as_object().unwrap();
        assert_eq!(c.stats[comp].len(), layers.len(), "{comp}: observed layers");
        let mut worst = 0f64;
        for (name, m) in layers {
            let ours =
                wanda::lookup(&c.stats[comp], name).unwrap_or_else(|| panic!("{comp}: {name} not observed"));
            assert_eq!(ours.tokens, m["tokens"].as_u64().unwrap(), "{name}: tokens");
            let want = &r.f64s[&format!("{comp}/{name}/sum_sq")];
            for (a, b) in ours.sum_sq.iter().zip(want) {
                let e = (a - b).abs() / b.abs().max(1e-30);
                assert!(e.is_finite(), "{name}: NaN");
                worst = worst.max(e);
            }
        }
        eprintln!("{comp}: worst relative error of a per-feature sum of squares {worst:.2e}");
        assert!(worst < 1e-4, "{comp}: sums of squares differ by {worst:.2e}");
    }
}

#[test]
fn wanda_scores_match_the_reference() {
    let (r, c) = (reference(), calibrated());
    for comp in COMPONENTS {
        let mut worst = 0f64;
        for (name, _, cols, w) in &c.weights[comp] {
            let rms = wanda::lookup(&c.stats[comp], name).unwrap().rms();
            let ours = wanda::scores(w, *cols, &rms);
            let want = &r.f32s[&format!("{comp}/{name}/score")];
            let scale = want.iter().fold(0f32, |m, &v| m.max(v)) as f64;
            for (a, b) in ours.iter().zip(want) {
                worst = worst.max((*a as f64 - *b as f64).abs() / scale);
            }
        }
        eprintln!("{comp}: worst score error {worst:.2e} (relative to each layer's largest score)");
        assert!(worst < 1e-5, "{comp}: Wanda scores differ by {worst:.2e}");
    }
}

#[test]
fn wanda_masks_match_the_reference() {
    for comp in COMPONENTS {
        for (variant, pattern, scope) in [
            ("wanda", Pattern::Unstructured, Scope::Layer),
            ("wanda24", Pattern::Sparse24, Scope::Layer),
            ("wanda_global", Pattern::Unstructured, Scope::Global),
        ] {
            let (masks, _) = our_masks(comp, &spec(Method::Wanda, pattern, scope), wanda::scores);
            let a = agreement(comp, variant, &masks);
            eprintln!("{comp} {variant}: {:.5}% of mask entries equal", 100.0 * a);
            assert!(a >= 0.999, "{comp} {variant}: only {:.4}% of mask entries equal", 100.0 * a);
        }
    }
}

#[test]
fn owl_ratios_sparsities_and_masks_match_the_reference() {
    let r = reference();
    for comp in COMPONENTS {
        let (masks, groups) =
            our_masks(comp, &spec(Method::Owl, Pattern::Unstructured, Scope::Layer), wanda::scores);
        let want = r.meta["components"][comp]["owl_groups"].as_array().unwrap();
        assert_eq!(groups.len(), want.len(), "{comp}: OWL groups");
        for g in &groups {
            let w =
                want.iter().find(|w| w["name"] == g.name.as_str()).unwrap_or_else(|| panic!("{}", g.name));
            assert_eq!(g.params as u64, w["params"].as_u64().unwrap(), "{}", g.name);
            let (dr, ds) = (
                (g.outlier_ratio - w["outlier_ratio"].as_f64().unwrap()).abs(),
                (g.sparsity - w["sparsity"].as_f64().unwrap()).abs(),
            );
            assert!(dr <= 1e-6 && ds <= 1e-6, "{}: ratio off by {dr:.2e}, sparsity by {ds:.2e}", g.name);
        }
        // The allocation must actually spread (else this test proves little).
        let (lo, hi) = groups.iter().fold((1f64, 0f64), |(a, b), g| (a.min(g.sparsity), b.max(g.sparsity)));
        assert!(hi - lo > 0.1, "{comp}: OWL sparsities span only {lo}..{hi}");
        let a = agreement(comp, "owl", &masks);
        eprintln!("{comp} owl: {:.5}% of mask entries equal; sparsities {lo:.4}..{hi:.4}", 100.0 * a);
        assert!(a >= 0.999, "{comp} owl: only {:.4}% of mask entries equal", 100.0 * a);
    }
}

/// The comparison can fail: plausible wrong rules land well below 99.9%.
#[test]
fn wrong_rules_fail_the_comparison() {
    // Bug 1: the activation factor applied along the wrong axis (output row r scaled by
    // feature r's norm): each row keeps its magnitude order, so this is magnitude pruning.
    fn by_row_norm(w: &[f32], cols: usize, rms: &[f32]) -> Vec<f32> {
        w.chunks_exact(cols)
            .enumerate()
            .flat_map(|(r, row)| row.iter().map(move |&v| v.abs() * rms[r % rms.len()]))
            .collect()
    }
    // Bug 2: plain magnitude (no activations).
    fn magnitude(w: &[f32], _cols: usize, _rms: &[f32]) -> Vec<f32> {
        w.iter().map(|v| v.abs()).collect()
    }
    for comp in COMPONENTS {
        let s = spec(Method::Wanda, Pattern::Unstructured, Scope::Layer);
        for (what, f) in [("row norm", by_row_norm as ScoreFn), ("magnitude", magnitude as ScoreFn)] {
            let a = agreement(comp, "wanda", &our_masks(comp, &s, f).0);
            eprintln!("{comp}: {what} instead of Wanda agrees on {:.3}%", 100.0 * a);
            assert!(a < 0.99, "{comp}: the check does not tell {what} from Wanda ({a})");
        }
        // Bug 3: scores compared within each input column instead of each output row.
        let (masks, _) = our_masks(comp, &s, wanda::scores);
        let c = calibrated();
        let by_column: Vec<_> = masks
            .iter()
            .map(|(name, _)| {
                let (_, rows, cols, w) = c.weights[comp].iter().find(|x| &x.0 == name).unwrap();
                let rms = wanda::lookup(&c.stats[comp], name).unwrap().rms();
                let keys = wanda::score_keys(&wanda::scores(w, *cols, &rms));
                let t: Vec<u32> = (0..rows * cols).map(|i| keys[(i % rows) * cols + i / rows]).collect();
                let (mt, _) = wanda::rowwise_mask(&t, *cols, *rows, rows / 2);
                let (rbt, rb) = (rows.div_ceil(8), cols.div_ceil(8));
                let mut m = vec![0u8; rows * rb];
                for r in 0..*rows {
                    for col in 0..*cols {
                        let keep = (mt[col * rbt + r / 8] >> (r % 8)) & 1;
                        m[r * rb + col / 8] |= keep << (col % 8);
                    }
                }
                (name.clone(), m)
            })
            .collect();
        let a = agreement(comp, "wanda", &by_column);
        eprintln!("{comp}: comparing within columns instead of rows agrees on {:.3}%", 100.0 * a);
        assert!(a < 0.99, "{comp}: the check does not tell column from row comparison ({a})");
        // Bug 4: one cut over the whole layer instead of per output row.
        let layer_cut: Vec<_> = masks
            .iter()
            .map(|(name, _)| {
                let (_, rows, cols, w) = c.weights[comp].iter().find(|x| &x.0 == name).unwrap();
                let rms = wanda::lookup(&c.stats[comp], name).unwrap().rms();
                let keys = wanda::score_keys(&wanda::scores(w, *cols, &rms));
                let k = sdsparse::prune::prune_count(0.5, rows * cols);
                let cut = sdsparse::prune::layer_cut(&keys, k).unwrap();
                (name.clone(), wanda::apply(Rule::Cut(cut), &keys, *rows, *cols).0)
            })
            .collect();
        let a = agreement(comp, "wanda", &layer_cut);
        eprintln!("{comp}: a per-layer cut instead of per-row agrees on {:.3}%", 100.0 * a);
        assert!(a < 0.99, "{comp}: the check does not tell a per-layer cut from per-row ({a})");
    }
}

#[test]
fn prune_linears_applies_the_same_masks() {
    let r = reference();
    let c = calibrated();
    let mut sd = StableDiffusion::load(&fixture("tiny-sd2-eps"), &Device::Cpu).unwrap();
    let opts = sdsparse::prune_model::PruneOptions {
        method: Method::Owl,
        pattern: Pattern::Unstructured,
        scope: Scope::Layer,
        sparsity: 0.5,
        seed: 0,
        owl: OwlParams::default(),
    };
    let res =
        sdsparse::prune_model::prune_linears(sd.unet_mut().linears_mut(), &opts, Some(&c.stats["unet"]))
            .unwrap();
    assert_eq!(res.layers.len(), c.weights["unet"].len());
    for l in sd.unet_mut().linears_mut() {
        let dense = l.weight().to_dense_host().unwrap().to_f32();
        let want = &r.u8s[&format!("unet/{}/mask_owl", l.name())];
        let (rows, cols) = l.weight().dims2().unwrap();
        let rb = cols.div_ceil(8);
        let orig = &c.weights["unet"].iter().find(|w| w.0 == l.name()).unwrap().3;
        let mut differ = 0;
        for i in 0..rows * cols {
            let keep = (want[(i / cols) * rb + (i % cols) / 8] >> ((i % cols) % 8)) & 1 == 1;
            let expect = if keep { orig[i] } else { 0.0 };
            differ += (dense[i] != expect) as usize;
        }
        assert!(
            differ * 1000 <= rows * cols,
            "{}: {differ} weights differ from the reference mask",
            l.name()
        );
    }
    assert!((res.sparsity() - 0.5).abs() < 0.05, "achieved {}", res.sparsity());
}
