//! Real-world inputs, one test (or a few) per kind of fault (issue 11, docs/INPUTS.md). Every
//! input is built here, at run time, in a temporary folder from the tiny fixture; references
//! come from diffusers (`tools/make_scheduler_edges.py`, `tools/make_odd_size_reference.py`).

mod format_util;
mod reference_util;

use format_util::{copy_dir, fixture, read_file, run_bin, weight_file, write_file, Raw};
use reference_util::{load_f32, rel_err};
use safetensors::Dtype;
use sdsparse::backend::{ops, Device};
use sdsparse::model::tokenizer::ClipTokenizer;
use sdsparse::pipeline::{GenerateRequest, StableDiffusion};
use sdsparse::scheduler::{self, SchedulerConfig, SchedulerKind};
use sdsparse::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A copy of the tiny fixture in a temporary folder: (guard, model dir).
fn model_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture(), &model);
    (tmp, model)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The one-line failure contract: non-zero exit, one `error:` line, no panic; returns it.
fn expect_one_line_error(args: &[&str], needle: &str) -> String {
    let (code, _, err) = run_bin(args);
    assert_ne!(code, 0, "{args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert!(errors[0].contains(needle), "expected '{needle}' in: {err}");
    errors[0].to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    load_f32(&reference_util::fixture("tiny-sd2-eps/reference/reference.safetensors"))
}

fn request(steps: usize) -> GenerateRequest {
    let mut req = GenerateRequest::new("a photograph of an astronaut riding a horse");
    req.steps = steps;
    req.init_latents = Some(reference()["init_latents"].clone());
    req
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

// ---- 1. Old or incomplete scheduler configs -------------------------------------------

/// An old-style DDIM config (no steps_offset, clip_sample, prediction_type, timestep_spacing)
/// is corrected on load as diffusers' StableDiffusionPipeline corrects it, with a note, and
/// then gives diffusers' own latents for the fixture (whose real config is the corrected one).
#[test]
fn old_scheduler_config_is_corrected_as_diffusers_does() {
    let (_t, model) = model_copy();
    let path = model.join("scheduler/scheduler_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for k in ["steps_offset", "clip_sample", "prediction_type", "timestep_spacing"] {
        cfg.as_object_mut().unwrap().remove(k);
    }
    write_json(&path, &cfg);
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    assert_eq!(sd.notes().len(), 1, "one note: {:?}", sd.notes());
    assert!(
        sd.notes()[0].contains("steps_offset") && sd.notes()[0].contains("clip_sample"),
        "{:?}",
        sd.notes()
    );
    let g = sd.generate(&request(4), &mut |_, _| {}).unwrap();
    assert_eq!(g.timesteps, [751.0, 501.0, 251.0, 1.0]);
    let e = rel_err(&g.latents.to_vec().unwrap(), reference()["ddim_final_latents"].as_slice().unwrap());
    assert!(e < 1e-4, "relative error vs diffusers {e}");

    // Spelled-out old values are corrected too; an explicit --scheduler is diffusers'
    // from_config: values the file names are kept (corrected), missing ones take that
    // class's defaults (PNDM: steps_offset 0).
    let mut old =
        SchedulerConfig::from_json(r#"{"_class_name":"DDIMScheduler","steps_offset":0,"clip_sample":true}"#)
            .unwrap();
    let notes = old.apply_pipeline_corrections();
    assert_eq!(notes, ["steps_offset 0 -> 1", "clip_sample true -> false"]);
    let mut missing = SchedulerConfig::from_json(r#"{"_class_name":"DDIMScheduler"}"#).unwrap();
    missing.apply_pipeline_corrections();
    let pndm = |c: &SchedulerConfig| scheduler::build(SchedulerKind::Pndm, c, 4).unwrap().timesteps()[0];
    assert_eq!(pndm(&old), 751.0);
    assert_eq!(pndm(&missing), 750.0);
    let ddim = scheduler::build(SchedulerKind::Ddim, &missing.for_kind(SchedulerKind::Ddim), 4).unwrap();
    assert_eq!(ddim.timesteps(), [751.0, 501.0, 251.0, 1.0]);
    // An up-to-date config needs nothing.
    let mut current =
        SchedulerConfig::from_file(&reference_util::fixture("tiny-sd2-eps/scheduler/scheduler_config.json"))
            .unwrap();
    assert!(current.apply_pipeline_corrections().is_empty());
}

/// diffusers' other load-time correction: a UNet config from diffusers < 0.9 with
/// `sample_size` below 64 gets 64 (the default image size follows), with a note.
#[test]
fn old_unet_sample_size_is_corrected_as_diffusers_does() {
    let (_t, model) = model_copy();
    let path = model.join("unet/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["_diffusers_version"] = "0.8.1".into();
    write_json(&path, &cfg);
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    assert_eq!(sd.default_size(), (128, 128), "sample_size 32 -> 64, VAE factor 2");
    assert!(sd.notes().iter().any(|n| n.contains("sample_size 32")), "{:?}", sd.notes());
    // From diffusers 0.9 on, the value is taken as written.
    cfg["_diffusers_version"] = "0.9.0".into();
    write_json(&path, &cfg);
    assert_eq!(StableDiffusion::load(&model, &Device::Cpu).unwrap().default_size(), (64, 64));
}

// ---- 2. Degenerate schedules ----------------------------------------------------------

/// Every scheduler x spacing x edge step count (1, 2, 3, 4, half, all-but-one, all training
/// timesteps; 20- and 1000-timestep configs): diffusers' final sample where diffusers gives
/// one, a clear refusal where diffusers raises or returns NaN. Never NaN.
#[test]
fn degenerate_schedules_match_diffusers_or_refuse() {
    let path = reference_util::fixture("scheduler-edges.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(reference_util::fixture("tiny-sd2-eps/scheduler/scheduler_config.json"))
            .unwrap(),
    )
    .unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 150);
    let mut failures = Vec::new();
    for c in cases {
        let mut cfg = base.clone();
        for (k, val) in c["overrides"].as_object().unwrap() {
            cfg[k] = val.clone();
        }
        let config = SchedulerConfig::from_json(&cfg.to_string()).unwrap();
        let kind = SchedulerKind::from_cli_name(c["scheduler"].as_str().unwrap()).unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let label = format!("{} {} steps {}", c["scheduler"], c["overrides"], steps);
        let ours = (|| -> sdsparse::Result<Vec<f32>> {
            let mut sch = scheduler::build(kind, &config, steps)?;
            let n = 16;
            let sigma = sch.init_noise_sigma();
            let mut x = Tensor::from_vec(
                (0..n).map(|j| (0.37 * j as f64).cos() as f32 * sigma).collect(),
                &[1, 4, 2, 2],
            )?;
            for i in 0..sch.timesteps().len() {
                let m: Vec<f32> =
                    (0..n).map(|j| (1.3 * i as f64 + 0.7 * j as f64 + 0.1).sin() as f32).collect();
                x = sch.step(&Tensor::from_vec(m, &[1, 4, 2, 2])?, i, &x)?;
            }
            x.to_vec()
        })();
        match (c["outcome"].as_str().unwrap(), ours) {
            ("ok", Ok(x)) => {
                let want: Vec<f32> =
                    c["final"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                let e = rel_err(&x, &want);
                let calls = c["calls"].as_u64().unwrap() as usize;
                let sched = scheduler::build(kind, &config, steps).unwrap();
                let head: Vec<f32> = c["timesteps_head"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                if e.is_nan()
                    || e >= 1e-4
                    || sched.timesteps().len() != calls
                    || sched.timesteps()[..head.len()] != head[..]
                {
                    failures.push(format!(
                        "{label}: rel err {e:.2e}, timesteps {:?} vs {head:?}",
                        &sched.timesteps()[..head.len().min(sched.timesteps().len())]
                    ));
                }
            }
            ("ok", Err(e)) => failures.push(format!("{label}: diffusers samples, we refuse: {e}")),
            (_, Ok(x)) => failures.push(format!(
                "{label}: diffusers refuses/NaN, we return (finite: {})",
                x.iter().all(|v| v.is_finite())
            )),
            (_, Err(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The CLI refuses the Q04 corner (20 steps on a 20-timestep DPM++ schedule) with one line
/// and writes nothing.
#[test]
fn degenerate_schedule_is_refused_before_any_work() {
    let (t, model) = model_copy();
    let path = model.join("scheduler/scheduler_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["num_train_timesteps"] = 20.into();
    write_json(&path, &cfg);
    let out = t.path().join("o.png");
    expect_one_line_error(
        &[
            "generate",
            "--model",
            &s(&model),
            "--prompt",
            "x",
            "--steps",
            "20",
            "--scheduler",
            "dpm++2m",
            "--out",
            &s(&out),
            "--device",
            "cpu",
        ],
        "repeat a timestep",
    );
    assert!(!out.exists());
}

// ---- 3. Image sizes -------------------------------------------------------------------

/// 17x15 latents (34x30 pixels: a multiple of the VAE factor, odd at every UNet level) give
/// diffusers' latents: each upsampler takes its skip connection's size.
#[test]
fn odd_latent_sizes_match_diffusers() {
    let refs = load_f32(&reference_util::fixture("odd-size/reference.safetensors"));
    // The op alone, against torch's interpolate(size=(5, 9), mode="nearest").
    let up = ops::upsample_nearest_to(&refs["upsample_in"], 5, 9).unwrap();
    assert_eq!(up.to_vec().unwrap(), refs["upsample_out_5x9"].to_vec().unwrap());

    let sd = StableDiffusion::load(&reference_util::fixture("tiny-sd2-eps"), &Device::Cpu).unwrap();
    let mut req = request(3);
    req.init_latents = Some(refs["init_latents"].clone());
    let g = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(g.image.shape(), [1, 3, 30, 34]);
    let e = rel_err(&g.latents.to_vec().unwrap(), refs["final_latents"].as_slice().unwrap());
    assert!(e < 1e-4, "relative error vs diffusers {e}");
}

/// Sizes are checked in pixels before any work; not a multiple of the VAE factor, zero, or
/// too large for memory is one line naming the flag's value.
#[test]
fn size_errors_speak_in_pixels() {
    let m = s(&fixture());
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("o.png"));
    let base = ["generate", "--model", &m, "--prompt", "x", "--steps", "1", "--out", &out, "--device", "cpu"];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|x| x.to_string()).collect() };
    let run = |extra: &[&str], needle: &str| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        expect_one_line_error(&args, needle)
    };
    run(&["--width", "71"], "width 71 must be a positive multiple of 2 pixels");
    run(&["--height", "0"], "height 0");
    run(&["--width", "400000", "--height", "400000"], "400000x400000 pixels need about");
    assert!(files_in(dir.path()).is_empty());
}

/// A component folder (`unet/`) given where the pipeline folder belongs: the error names it
/// and the folder to give instead (not the tokenizer it lacks), for generate and convert.
#[test]
fn a_component_folder_is_named_as_such() {
    let unet = fixture().join("unet");
    let m = s(&unet);
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("o.png"));
    let parent = s(&fixture());
    let e = expect_one_line_error(
        &["generate", "--model", &m, "--prompt", "x", "--steps", "1", "--out", &out, "--device", "cpu"],
        "one component (unet) of a pipeline",
    );
    assert!(e.contains(&parent), "{e}");
    let conv = s(&dir.path().join("sparse"));
    expect_one_line_error(&["convert", "--model", &m, "--out", &conv], "one component (unet) of a pipeline");
    assert!(files_in(dir.path()).is_empty());
}

// ---- 4. tokenizer.json-only folders, whole-checkpoint validation -----------------------

/// `tokenizer/` as transformers 5 saves it: only tokenizer.json (+ tokenizer_config.json),
/// built from the committed skeleton and the SD2 vocabulary.
fn tokenizer_json_folder(dir: &Path) {
    let fixtures = reference_util::fixture("");
    let mut tok: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tokenizer-json/tokenizer.skeleton.json")).unwrap(),
    )
    .unwrap();
    let vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("sd2-tokenizer/vocab.json")).unwrap())
            .unwrap();
    let merges: Vec<Value> = std::fs::read_to_string(fixtures.join("sd2-tokenizer/merges.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            Value::Array(vec![a.into(), b.into()])
        })
        .collect();
    tok["model"]["vocab"] = vocab;
    tok["model"]["merges"] = Value::Array(merges);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(fixtures.join("tokenizer-json/tokenizer_config.json"), dir.join("tokenizer_config.json"))
        .unwrap();
}

/// The `tokenizers` reader of tokenizer.json gives transformers' ids, the same as our BPE,
/// on every tokenizer case of the repo.
#[test]
fn tokenizer_json_gives_the_same_ids_as_our_bpe() {
    let dir = tempfile::tempdir().unwrap();
    tokenizer_json_folder(dir.path());
    let json = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert!(json.is_tokenizer_json());
    let bpe = ClipTokenizer::from_dir(&reference_util::fixture("sd2-tokenizer")).unwrap();
    let mut n = 0;
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    };
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(reference_util::fixture(f)).unwrap()).unwrap()
    };
    for file in ["sd2-tokenizer/tokenizer_cases.json", "sd2-tokenizer/tokenizer_cases_divergence.json"] {
        for case in read(file).as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let want = ids(&case["input_ids"]);
            assert_eq!(json.encode(prompt), want, "tokenizer.json: {prompt:?}");
            assert_eq!(bpe.encode(prompt), want, "BPE: {prompt:?}");
            n += 1;
        }
    }
    // Edge cases (untruncated ids): NFC, odd whitespace, typed special tokens, control
    // characters, seeded random strings.
    for case in read("tokenizer-extra/cases.json").as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["ids"]);
        for (which, tok) in [("tokenizer.json", &json), ("BPE", &bpe)] {
            let mut got = vec![tok.bos_id()];
            got.extend(tok.tokenize(prompt));
            got.push(tok.eos_id());
            assert_eq!(got, want, "{which}: {prompt:?}");
        }
        n += 1;
    }
    assert!(n > 100, "{n} cases");
}

/// A pipeline folder with a tokenizer.json-only tokenizer generates and converts, and the
/// converted folder generates; a folder generate cannot load is refused by convert before
/// anything is written.
#[test]
fn tokenizer_json_folder_converts_and_convert_validates_everything() {
    let (t, model) = model_copy();
    std::fs::remove_dir_all(model.join("tokenizer")).unwrap();
    tokenizer_json_folder(&model.join("tokenizer"));
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let g = sd.generate(&request(4), &mut |_, _| {}).unwrap();
    let e = rel_err(&g.latents.to_vec().unwrap(), reference()["ddim_final_latents"].as_slice().unwrap());
    assert!(e < 1e-4, "tokenizer.json folder vs diffusers: {e}");
    let out = t.path().join("sparse");
    let (code, _, err) = run_bin(&["convert", "--model", &s(&model), "--out", &s(&out), "-q"]);
    assert_eq!(code, 0, "{err}");
    StableDiffusion::load(&out, &Device::Cpu).unwrap();

    // Broken pieces generate would trip on: convert refuses, nothing written.
    type Breakage = (&'static str, fn(&Path));
    let breakages: [Breakage; 3] = [
        ("merges.txt", |m| std::fs::remove_file(m.join("tokenizer/merges.txt")).unwrap()),
        ("scheduler_config.json", |m| {
            std::fs::write(m.join("scheduler/scheduler_config.json"), "{").unwrap()
        }),
        ("timestep_spacing", |m| {
            let p = m.join("scheduler/scheduler_config.json");
            let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            c["timestep_spacing"] = "sideways".into();
            write_json(&p, &c);
        }),
    ];
    for (needle, brk) in breakages {
        let (t2, m2) = model_copy();
        brk(&m2);
        let out = t2.path().join("sparse");
        expect_one_line_error(&["convert", "--model", &s(&m2), "--out", &s(&out), "-q"], needle);
        assert_eq!(files_in(t2.path()), ["model"], "{needle}: nothing written");
    }
}

// ---- 5. Every safetensors dtype -------------------------------------------------------

fn cast_unet(model: &Path, dtype: Dtype) {
    let path = weight_file(model, "unet");
    let (mut t, meta) = read_file(&path);
    for r in t.values_mut() {
        if r.dtype == Dtype::F32 {
            let v = format_util::f32s(&r.bytes);
            r.bytes = match dtype {
                Dtype::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
                Dtype::F8_E4M3 => vec![0u8; v.len()],
                _ => unreachable!(),
            };
            r.dtype = dtype;
        }
    }
    write_file(&path, &t, meta);
}

/// F64 weights are read everywhere (cast to f32 on load): generate gives the f32 result,
/// convert prunes them at the target and `--dtype` applies to them.
#[test]
fn f64_weights_load_prune_and_cast() {
    let (t, model) = model_copy();
    cast_unet(&model, Dtype::F64);
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let g = sd.generate(&request(2), &mut |_, _| {}).unwrap();
    let sd32 = StableDiffusion::load(&fixture(), &Device::Cpu).unwrap();
    let g32 = sd32.generate(&request(2), &mut |_, _| {}).unwrap();
    assert_eq!(
        g.latents.to_vec().unwrap(),
        g32.latents.to_vec().unwrap(),
        "f64 weights read as their f32 values"
    );

    let out = t.path().join("sparse");
    let (code, stdout, err) =
        run_bin(&["convert", "--model", &s(&model), "--out", &s(&out), "--dtype", "f16", "-q"]);
    assert_eq!(code, 0, "{err}");
    let unet_line = stdout.lines().find(|l| l.starts_with("unet")).unwrap();
    assert!(unet_line.contains("34.9") || unet_line.contains("35.0"), "UNet pruned at 35%: {unet_line}");
    let (tensors, _) = read_file(&weight_file(&out, "unet"));
    for (name, r) in &tensors {
        assert!(
            !matches!(r.dtype, Dtype::F64 | Dtype::F32),
            "{name} stored as {:?} despite --dtype f16",
            r.dtype
        );
    }
    StableDiffusion::load(&out, &Device::Cpu).unwrap();
}

/// A float dtype sdsparse cannot read is refused clearly at convert and at load, naming the
/// tensor; sparsity asked for a component with nothing to prune is an error.
#[test]
fn unreadable_dtypes_and_empty_selections_are_refused() {
    let (t, model) = model_copy();
    cast_unet(&model, Dtype::F8_E4M3);
    let out = t.path().join("sparse");
    expect_one_line_error(&["convert", "--model", &s(&model), "--out", &s(&out), "-q"], "has dtype F8_E4M3");
    let png = t.path().join("o.png");
    expect_one_line_error(
        &[
            "generate",
            "--model",
            &s(&model),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            &s(&png),
            "--device",
            "cpu",
        ],
        "F8_E4M3",
    );
    assert_eq!(files_in(t.path()), ["model"]);

    let (t, model) = model_copy();
    let out = t.path().join("sparse");
    expect_one_line_error(
        &["convert", "--model", &s(&model), "--out", &s(&out), "-q", "--exclude", "*"],
        "no tensor matches the layer selection",
    );
    assert!(!out.exists());
}

// ---- 6. Non-finite numbers ------------------------------------------------------------

fn poison_unet(model: &Path, name: &str, value: f32) {
    let path = weight_file(model, "unet");
    let (mut t, meta) = read_file(&path);
    let r: &mut Raw = t.get_mut(name).unwrap();
    r.bytes[..4].copy_from_slice(&value.to_le_bytes());
    write_file(&path, &t, meta);
}

/// An infinite weight is reported by name at convert and at load; NaN / inf appearing in the
/// latents mid-run stops the run naming the step and component, and no image is written.
#[test]
fn non_finite_weights_and_latents_stop_with_one_line() {
    let (t, model) = model_copy();
    poison_unet(&model, "mid_block.resnets.0.conv1.weight", f32::INFINITY);
    let out = t.path().join("sparse");
    expect_one_line_error(
        &["convert", "--model", &s(&model), "--out", &s(&out), "-q"],
        "mid_block.resnets.0.conv1.weight holds 1 NaN/infinite",
    );
    let png = t.path().join("o.png");
    let g = [
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        &s(&png),
        "--device",
        "cpu",
    ];
    expect_one_line_error(&g, "mid_block.resnets.0.conv1.weight holds 1 NaN/infinite");
    assert_eq!(files_in(t.path()), ["model"]);

    // Finite weights, overflowing run (a careless cast's huge-but-finite values): the UNet's
    // last convolution overflows f32 at the first step.
    let (t, model) = model_copy();
    let path = weight_file(&model, "unet");
    let (mut w, meta) = read_file(&path);
    let r = w.get_mut("conv_out.weight").unwrap();
    r.bytes = (0..r.bytes.len() / 4).flat_map(|_| 1e38f32.to_le_bytes()).collect();
    write_file(&path, &w, meta);
    let png = t.path().join("o.png");
    let lat = t.path().join("l.safetensors");
    let args = [
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        &s(&png),
        "--save-latents",
        &s(&lat),
        "--device",
        "cpu",
    ];
    let line = expect_one_line_error(&args, "step 1/2 (timestep");
    assert!(line.contains("UNet") && line.contains("no image written"), "{line}");
    assert_eq!(files_in(t.path()), ["model"], "no PNG, no latents");

    // A narrowing cast that overflows is refused at convert (a finite 1e5 is inf in f16).
    let (t, model) = model_copy();
    poison_unet(&model, "conv_in.weight", 1e5);
    let out = t.path().join("sparse");
    expect_one_line_error(
        &["convert", "--model", &s(&model), "--out", &s(&out), "-q", "--dtype", "f16"],
        "overflow f16",
    );
}

// ---- 7. Output files ------------------------------------------------------------------

/// Bad output paths are refused before any work (the model folder is not even read), and a
/// failed command leaves no output at all.
#[test]
fn output_paths_are_checked_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let m = s(&dir.path().join("no-model-here")); // would fail later: proves the order
    let png = s(&dir.path().join("o.png"));
    let missing = s(&dir.path().join("missing/l.safetensors"));
    expect_one_line_error(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--out",
            &png,
            "--save-latents",
            &missing,
            "--device",
            "cpu",
        ],
        "--save-latents",
    );
    let folder = s(dir.path());
    expect_one_line_error(
        &["generate", "--model", &m, "--prompt", "x", "--out", &format!("{folder}/"), "--device", "cpu"],
        "--out",
    );
    std::fs::create_dir(dir.path().join("a.png")).unwrap();
    expect_one_line_error(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--out",
            &s(&dir.path().join("a.png")),
            "--device",
            "cpu",
        ],
        "is a folder",
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    expect_one_line_error(
        &["convert", "--model", &s(&fixture()), "--out", &s(&file.join("sub")), "-q"],
        "is not a folder",
    );
    assert_eq!(files_in(dir.path()), ["a.png", "file"]);
}

/// An existing output file is never replaced without `--force` (refused before any work,
/// the file left as it was); with `--force` it is replaced.
#[test]
fn generate_never_overwrites_without_force() {
    let m = s(&fixture());
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("image.png");
    let lat = dir.path().join("latents.safetensors");
    std::fs::write(&png, b"keep me").unwrap();
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["generate", "--model", &m, "--prompt", "x", "--steps", "1", "--device", "cpu"]
                .iter()
                .map(|x| x.to_string())
                .collect();
        v.extend(["--out".to_string(), s(out)]);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let refuse = |a: Vec<String>, needle: &str| {
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        expect_one_line_error(&a, needle);
    };
    refuse(args(&png, &[]), "--out");
    assert_eq!(std::fs::read(&png).unwrap(), b"keep me");
    std::fs::write(&lat, b"keep me too").unwrap();
    refuse(args(&dir.path().join("new.png"), &["--save-latents", &s(&lat)]), "--save-latents");
    assert_eq!(std::fs::read(&lat).unwrap(), b"keep me too");
    assert_eq!(files_in(dir.path()), ["image.png", "latents.safetensors"]);
    let a = args(&png, &["--force"]);
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    let (code, _, err) = run_bin(&a);
    assert_eq!(code, 0, "{err}");
    assert!(image::open(&png).is_ok(), "--force should replace the file with a PNG");
}

/// Runs the binary with a per-file size limit (a full disk, as EFBIG instead of ENOSPC).
fn run_with_file_limit(kib: u32, args: &[&str]) -> (i32, String) {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f {kib}; exec '{}' {}",
        env!("CARGO_BIN_EXE_sdsparse"),
        quoted.join(" ")
    );
    let out = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

/// A write that fails midway (full disk) names the OUTPUT file, says the OS message once,
/// and leaves neither a truncated file nor a temporary one.
#[test]
fn failed_writes_name_the_output_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("o.png");
    let lat = dir.path().join("l.safetensors");
    let m = s(&fixture());
    let (code, err) = run_with_file_limit(
        8,
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            &s(&png),
            "--save-latents",
            &s(&lat),
            "--device",
            "cpu",
        ],
    );
    assert_ne!(code, 0);
    let line = err.lines().find(|l| l.starts_with("error")).unwrap();
    assert!(line.contains("o.png") && line.contains("os error 27"), "{line}");
    assert_eq!(line.matches("os error").count(), 1, "OS message once: {line}");
    assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));

    let out = dir.path().join("sparse");
    let (code, err) = run_with_file_limit(100, &["convert", "--model", &m, "--out", &s(&out), "-q"]);
    assert_ne!(code, 0);
    let line = err.lines().find(|l| l.starts_with("error")).unwrap();
    assert!(
        line.contains(&s(&out)) && !line.contains("tiny-sd2-eps"),
        "names the output, not the input: {line}"
    );
    assert_eq!(line.matches("os error").count(), 1, "{line}");
    assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));
}

/// A closed standard output (`sdsparse inspect X | head -1`) is one error line, not a panic.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdsparse"))
        .args(["inspect", &s(&fixture())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the first line
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("standard output"), "{err}");
}

/// Every UNet depth (2, 3, 4 levels; SD2 has 4) runs any latent size, including sizes odd at
/// every level: without the skip-size upsampling the concatenation with the skip connection
/// fails. (The 4-level case was also checked against diffusers: issue 11's Q05, 2.3e-6.)
#[test]
fn every_unet_depth_runs_any_latent_size() {
    use sdsparse::checkpoint::{ComponentStore, VarBuilder};
    use sdsparse::model::config::UNetConfig;
    use sdsparse::model::unet::UNet2DConditionModel;
    let text = std::fs::read_to_string(fixture().join("unet/config.json")).unwrap();
    for levels in [2usize, 3, 4] {
        let mut cfg: Value = serde_json::from_str(&text).unwrap();
        cfg["block_out_channels"] = serde_json::json!(vec![32; levels]);
        cfg["attention_head_dim"] = serde_json::json!(vec![2; levels]);
        let mut down = vec!["CrossAttnDownBlock2D"; levels - 1];
        down.push("DownBlock2D");
        let mut up = vec!["UpBlock2D"];
        up.extend(vec!["CrossAttnUpBlock2D"; levels - 1]);
        cfg["down_block_types"] = serde_json::json!(down);
        cfg["up_block_types"] = serde_json::json!(up);
        let tensors = sdsparse::checkpoint::expected::unet(&cfg, "synthetic")
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let v = (0..n).map(|j| ((i * 31 + j) as f32 * 0.37).sin() * 0.2).collect();
                (name, Tensor::from_vec(v, &shape).unwrap())
            })
            .collect();
        let vb = VarBuilder::new(std::sync::Arc::new(ComponentStore::from_tensors("synthetic", tensors)));
        let unet =
            UNet2DConditionModel::load(&vb, &UNetConfig::from_json_str(&cfg.to_string()).unwrap()).unwrap();
        let ctx =
            Tensor::from_vec((0..77 * 32).map(|j| (j as f32 * 0.1).cos()).collect(), &[1, 77, 32]).unwrap();
        for (h, w) in [(7, 5), (9, 12), (8, 8), (1, 3)] {
            let x = Tensor::from_vec((0..4 * h * w).map(|j| (j as f32 * 0.7).sin()).collect(), &[1, 4, h, w])
                .unwrap();
            let out =
                unet.forward(&x, 500.0, &ctx).unwrap_or_else(|e| panic!("{levels} levels, {h}x{w}: {e}"));
            assert_eq!(out.shape(), [1, 4, h, w]);
            assert!(out.to_vec().unwrap().iter().all(|v| v.is_finite()), "{levels} levels, {h}x{w}");
        }
    }
}
