//! Scheduler step math against diffusers, without a UNet: the reference runs recorded the
//! raw UNet outputs of every step (`*_step_unet_out`, batch [uncond, cond]) and the latents
//! after every step (`*_step_latents`). We apply classifier-free guidance to the recorded
//! outputs, run our scheduler, and compare latents.

use sdsparse::scheduler::{self, Scheduler, SchedulerConfig, SchedulerKind};
use sdsparse::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod reference_util;
use reference_util::{fixture, load_f32_raw, rel_err};

const GUIDANCE: f32 = 7.5;

/// All f32 tensors of a safetensors file, by name.
fn load_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    load_f32_raw(path)
}

fn tiny_config() -> SchedulerConfig {
    SchedulerConfig::from_file(&fixture("tiny-sd2-eps/scheduler/scheduler_config.json")).unwrap()
}

/// Runs `kind` over the recorded outputs of run `run`, both step by step from the reference
/// latents and chained from the initial latents; returns the worst relative error.
fn replay(kind: SchedulerKind, run: &str, steps: usize, init_name: &str, path: &Path) -> f64 {
    let refs = load_f32(path);
    let init = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let (lat_shape, init_lat) = &init[init_name];
    let (_, unet_out) = &refs[&format!("{run}_step_unet_out")];
    let (step_shape, step_lat) = &refs[&format!("{run}_step_latents")];
    let per = init_lat.len();
    assert_eq!(step_shape[0] * per, step_lat.len());

    let config = tiny_config();
    let mut chained = scheduler::build(kind, &config, steps).unwrap();
    let mut isolated = scheduler::build(kind, &config, steps).unwrap();
    let calls = chained.timesteps().len();
    assert_eq!(calls, step_shape[0], "{run}: model calls");

    let sigma = chained.init_noise_sigma();
    let start: Vec<f32> = init_lat.iter().map(|&v| v * sigma).collect();
    let mut x = Tensor::from_vec(start.clone(), lat_shape).unwrap();
    let mut worst = 0.0f64;
    for i in 0..calls {
        let u = &unet_out[(2 * i) * per..(2 * i + 1) * per];
        let c = &unet_out[(2 * i + 1) * per..(2 * i + 2) * per];
        let guided: Vec<f32> = u.iter().zip(c).map(|(&u, &c)| u + GUIDANCE * (c - u)).collect();
        let guided = Tensor::from_vec(guided, lat_shape).unwrap();
        let want = &step_lat[i * per..(i + 1) * per];

        x = chained.step(&guided, i, &x).unwrap();
        let e_chain = rel_err(x.as_slice().unwrap(), want);

        let prev = if i == 0 { start.clone() } else { step_lat[(i - 1) * per..i * per].to_vec() };
        let prev = Tensor::from_vec(prev, lat_shape).unwrap();
        let y = isolated.step(&guided, i, &prev).unwrap();
        let e_iso = rel_err(y.as_slice().unwrap(), want);
        println!("{run} step {i}: rel err isolated {e_iso:.3e}, chained {e_chain:.3e}");
        worst = worst.max(e_chain).max(e_iso);
    }
    worst
}

fn reference_path() -> PathBuf {
    fixture("tiny-sd2-eps/reference/reference.safetensors")
}

#[test]
fn ddim_timesteps_and_steps_match_diffusers() {
    let s = scheduler::build(SchedulerKind::Ddim, &tiny_config(), 4).unwrap();
    assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    assert_eq!(s.init_noise_sigma(), 1.0);
    let e = replay(SchedulerKind::Ddim, "ddim", 4, "init_latents", &reference_path());
    assert!(e < 1e-5, "DDIM rel err {e}");
}

#[test]
fn euler_timesteps_sigmas_and_steps_match_diffusers() {
    let config = tiny_config();
    let s = scheduler::EulerDiscreteScheduler::new(&config, 6).unwrap();
    assert_eq!(s.timesteps(), &[831.0, 665.0, 499.0, 333.0, 167.0, 1.0]);
    let want_sigmas = [
        5.906451225280762f64,
        2.907122850418091,
        1.6128870248794556,
        0.9323583841323853,
        0.49469730257987976,
        0.04131447896361351,
        0.0,
    ];
    for (a, b) in s.sigmas().iter().zip(want_sigmas) {
        assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-6), "sigma {a} vs {b}");
    }
    assert!((s.init_noise_sigma() as f64 - 5.990506172180176).abs() < 1e-5, "{}", s.init_noise_sigma());
    let e = replay(SchedulerKind::Euler, "euler", 6, "init_latents", &reference_path());
    assert!(e < 1e-5, "Euler rel err {e}");
}

#[test]
fn euler_scales_model_input_by_sigma() {
    let s = scheduler::build(SchedulerKind::Euler, &tiny_config(), 6).unwrap();
    let x = Tensor::from_vec(vec![2.0; 4], &[1, 4]).unwrap();
    let y = s.scale_model_input(&x, 0).unwrap();
    let sigma = 5.906_451_f32;
    let want = 2.0 / (sigma * sigma + 1.0).sqrt();
    assert!((y.as_slice().unwrap()[0] - want).abs() < 1e-6);
}

#[test]
fn dpmpp2m_timesteps_sigmas_and_steps_match_diffusers() {
    let config = tiny_config();
    let s = scheduler::DpmSolverMultistepScheduler::new(&config, 6).unwrap();
    assert_eq!(s.timesteps(), &[853.0, 711.0, 569.0, 427.0, 285.0, 143.0]);
    let want_sigmas = [
        6.570651531219482f64,
        3.4854564666748047,
        2.0473127365112305,
        1.2720634937286377,
        0.7900615334510803,
        0.4403095841407776,
        0.0,
    ];
    for (a, b) in s.sigmas().iter().zip(want_sigmas) {
        assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-6), "sigma {a} vs {b}");
    }
    let e = replay(SchedulerKind::DpmPp2m, "dpmpp2m", 6, "init_latents", &reference_path());
    assert!(e < 1e-5, "DPM++2M rel err {e}");
}

#[test]
fn pndm_steps_match_diffusers() {
    let path = fixture("tiny-sd2-eps/reference/pndm_reference.safetensors");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-sd2-eps/reference/pndm_reference.json")).unwrap(),
    )
    .unwrap();
    for run in ["pndm", "pndm_prk"] {
        let r = &meta["runs"][run];
        let steps = r["steps"].as_u64().unwrap() as usize;
        let mut config = tiny_config();
        config.skip_prk_steps = Some(r["skip_prk_steps"].as_bool().unwrap());
        let s = scheduler::PndmScheduler::new(&config, steps).unwrap();
        let want: Vec<f32> =
            r["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(s.timesteps(), want.as_slice(), "{run} timesteps");
        // replay() builds from the fixture config; PNDM needs skip_prk_steps set per run.
        let e = replay_pndm(&config, run, steps, &path);
        assert!(e < 1e-5, "{run} rel err {e}");
    }
}

fn replay_pndm(config: &SchedulerConfig, run: &str, steps: usize, path: &Path) -> f64 {
    let refs = load_f32(path);
    let init = load_f32(&reference_path());
    let (lat_shape, init_lat) = &init["init_latents"];
    let (_, unet_out) = &refs[&format!("{run}_step_unet_out")];
    let (_, step_lat) = &refs[&format!("{run}_step_latents")];
    let per = init_lat.len();
    let mut s = scheduler::PndmScheduler::new(config, steps).unwrap();
    let calls = s.timesteps().len();
    let mut x = Tensor::from_vec(init_lat.clone(), lat_shape).unwrap();
    let mut worst = 0.0f64;
    for i in 0..calls {
        let u = &unet_out[(2 * i) * per..(2 * i + 1) * per];
        let c = &unet_out[(2 * i + 1) * per..(2 * i + 2) * per];
        let guided: Vec<f32> = u.iter().zip(c).map(|(&u, &c)| u + GUIDANCE * (c - u)).collect();
        x = s.step(&Tensor::from_vec(guided, lat_shape).unwrap(), i, &x).unwrap();
        let e = rel_err(x.as_slice().unwrap(), &step_lat[i * per..(i + 1) * per]);
        println!("{run} call {i}: chained rel err {e:.3e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn spacings_match_diffusers_formulas() {
    // Values computed with diffusers 0.42.1 for the SD2 config (1000 train steps, offset 1).
    let mut c = tiny_config();
    c.timestep_spacing = Some("trailing".into());
    let s = scheduler::build(SchedulerKind::Ddim, &c, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    c.timestep_spacing = Some("linspace".into());
    let s = scheduler::build(SchedulerKind::Ddim, &c, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    let s = scheduler::build(SchedulerKind::Euler, &c, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
}

#[test]
fn config_class_picks_scheduler_and_bad_names_error() {
    assert_eq!(tiny_config().kind().unwrap(), SchedulerKind::Ddim);
    assert_eq!(SchedulerKind::from_cli_name("dpm++2m").unwrap(), SchedulerKind::DpmPp2m);
    assert!(SchedulerKind::from_cli_name("lms").is_err());
    assert!(SchedulerKind::from_class_name("LMSDiscreteScheduler").is_err());
    assert!(scheduler::build(SchedulerKind::Ddim, &tiny_config(), 0).is_err());
    assert!(scheduler::build(SchedulerKind::Ddim, &tiny_config(), 1001).is_err());
}

#[test]
fn v_prediction_is_consistent_across_schedulers() {
    // For a v-prediction model, feeding the exact v of a known x0 and noise must make every
    // first-order update land on the same point DDIM computes analytically from x0 and eps.
    let mut c = tiny_config();
    c.prediction_type = Some("v_prediction".into());
    let x0 = [0.3f32, -1.2, 0.7, 2.0];
    let eps = [1.1f32, -0.4, 0.2, -1.5];
    // DDIM at t=751 → 501.
    let mut ddim = scheduler::build(SchedulerKind::Ddim, &c, 4).unwrap();
    let ac = c.alphas_cumprod().unwrap();
    let (a, a_prev) = (ac[751], ac[501]);
    let xt: Vec<f32> = x0.iter().zip(&eps).map(|(&x, &e)| a.sqrt() * x + (1.0 - a).sqrt() * e).collect();
    let v: Vec<f32> = x0.iter().zip(&eps).map(|(&x, &e)| a.sqrt() * e - (1.0 - a).sqrt() * x).collect();
    let out = ddim
        .step(&Tensor::from_vec(v, &[1, 4]).unwrap(), 0, &Tensor::from_vec(xt, &[1, 4]).unwrap())
        .unwrap();
    let want: Vec<f32> =
        x0.iter().zip(&eps).map(|(&x, &e)| a_prev.sqrt() * x + (1.0 - a_prev).sqrt() * e).collect();
    assert!(rel_err(out.as_slice().unwrap(), &want) < 1e-5);
}

/// Scheduler-only cases from diffusers (tools/make_scheduler_reference.py): v_prediction,
/// trailing/linspace spacing, set_alpha_to_one, PNDM with and without PRK; random model
/// outputs fed through the scheduler, every intermediate sample compared.
#[test]
fn scheduler_cases_match_diffusers() {
    let dir = fixture("scheduler-cases");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let data = load_f32(&dir.join("cases.safetensors"));
    for case in meta["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let kind = SchedulerKind::from_cli_name(case["scheduler"].as_str().unwrap()).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let overrides = &case["overrides"];
        let mut config = tiny_config();
        if let Some(p) = overrides["prediction_type"].as_str() {
            config.prediction_type = Some(p.into());
        }
        if let Some(s) = overrides["timestep_spacing"].as_str() {
            config.timestep_spacing = Some(s.into());
        }
        if let Some(b) = overrides["set_alpha_to_one"].as_bool() {
            config.set_alpha_to_one = Some(b);
        }
        if let Some(b) = overrides["skip_prk_steps"].as_bool() {
            config.skip_prk_steps = Some(b);
        }
        let mut s = scheduler::build(kind, &config, steps).unwrap();
        let want_t: Vec<f32> =
            case["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{key} {kind:?} {overrides}: timesteps");
        let sigma = case["init_noise_sigma"].as_f64().unwrap() as f32;
        assert!((s.init_noise_sigma() - sigma).abs() <= 1e-6 * sigma, "{key}: init_noise_sigma");

        let (shape, init) = &data[&format!("{key}_init")];
        let (_, outs) = &data[&format!("{key}_model_out")];
        let (_, inputs) = &data[&format!("{key}_model_in")];
        let (_, samples) = &data[&format!("{key}_samples")];
        let per = init.len();
        let mut x = Tensor::from_vec(init.clone(), shape).unwrap();
        let mut worst = 0.0f64;
        for i in 0..want_t.len() {
            let scaled = s.scale_model_input(&x, i).unwrap();
            worst = worst.max(rel_err(scaled.as_slice().unwrap(), &inputs[i * per..(i + 1) * per]));
            let m = Tensor::from_vec(outs[i * per..(i + 1) * per].to_vec(), shape).unwrap();
            x = s.step(&m, i, &x).unwrap();
            worst = worst.max(rel_err(x.as_slice().unwrap(), &samples[i * per..(i + 1) * per]));
        }
        println!("{key} {kind:?} {overrides}: worst rel err {worst:.3e}");
        assert!(worst < 1e-5, "{key} {kind:?} {overrides}: rel err {worst}");
    }
}

/// SD2.1-base as published ships PNDM with `skip_prk_steps: true` and no
/// `timestep_spacing`; every scheduler built from it takes its own default spacing, as
/// diffusers' `from_config` (values from diffusers 0.42.1).
#[test]
fn published_sd21_base_pndm_config() {
    let config = SchedulerConfig::from_json(
        r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#,
    )
    .unwrap();
    assert_eq!(config.kind().unwrap(), SchedulerKind::Pndm);
    let pndm = scheduler::build(SchedulerKind::Pndm, &config, 10).unwrap();
    assert_eq!(
        pndm.timesteps(),
        &[901.0, 801.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    );
    let euler = scheduler::build(SchedulerKind::Euler, &config, 10).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0]);
    assert!((euler.init_noise_sigma() as f64 - 14.614646911621094).abs() < 1e-5);
    let ddim = scheduler::build(SchedulerKind::Ddim, &config, 10).unwrap();
    assert_eq!(ddim.timesteps(), &[901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
}
