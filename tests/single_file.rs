//! Single-file checkpoints (original SD2 layout, `.safetensors` and torch.save `.ckpt`):
//! name mapping against diffusers' loader, exact equivalence with the diffusers folder they
//! came from (tensors, conversion, generation), `export --format single-file`, and clean
//! refusals of malicious and malformed files.
//!
//! Fixtures (`tests/fixtures/single-file/`) come from `tools/make_single_file.py` (checked
//! there with diffusers' `from_single_file`) and `tools/single_file_names_oracle.py`.

mod format_util;

use format_util::*;
use sdsparse::checkpoint::single_file::{NameMap, TextLayout};
use sdsparse::checkpoint::{ModelSource, SingleFileModel, SingleFileOptions};
use sdsparse::convert::{convert, export_single_file, ConvertOptions};
use sdsparse::pipeline::{GenerateRequest, StableDiffusion};
use sdsparse::{DType, Device};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn sf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file")
}
fn st_fixture() -> PathBuf {
    sf_dir().join("tiny-sd2-eps.f16.safetensors")
}
fn ckpt_fixture() -> PathBuf {
    sf_dir().join("tiny-sd2-eps.f16.ckpt")
}
/// The tiny model is not a standard SD2.x architecture: its configs come from its folder.
fn tiny_opts() -> SingleFileOptions {
    SingleFileOptions { config: Some(fixture()), ..Default::default() }
}
fn open(path: &Path, opts: &SingleFileOptions) -> SingleFileModel {
    SingleFileModel::open(path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of the single file, under its diffusers name, equals the folder's tensor
/// rounded to f16 (exactly), for the safetensors and the torch.save file.
#[test]
fn every_tensor_equals_the_folder_tensor() {
    for path in [st_fixture(), ckpt_fixture()] {
        let m = open(&path, &tiny_opts());
        for c in ["text_encoder", "unet", "vae"] {
            let single = m.store(c).unwrap();
            let folder = sdsparse::checkpoint::ComponentStore::open(&fixture().join(c)).unwrap();
            let names = folder.names();
            assert_eq!(single.names().len(), names.len(), "{c}: tensor count");
            for n in names {
                let want: Vec<f32> = folder
                    .tensor_f32(&n)
                    .unwrap()
                    .to_vec()
                    .unwrap()
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect();
                let got = single.tensor_f32(&n).unwrap_or_else(|e| panic!("{c} {n}: {e}"));
                assert_eq!(got.shape(), folder.tensor_f32(&n).unwrap().shape(), "{c} {n}");
                assert_eq!(got.to_vec().unwrap(), want, "{}: {c} {n}", path.display());
            }
        }
    }
}

/// The full-size SD2.1 name map equals the table that diffusers' own loader
/// (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`)
/// maps back, for all 1306 tensors.
#[test]
fn sd21_names_match_diffusers_loader() {
    let table: BTreeMap<String, BTreeMap<String, (String, Option<usize>)>> =
        serde_json::from_str(&std::fs::read_to_string(sf_dir().join("sd21-names.json")).unwrap()).unwrap();
    let cfg = |c: &str| -> serde_json::Value {
        let p = configs().join("stable-diffusion-2-1").join(c).join("config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let map = NameMap::new(&cfg("unet"), &cfg("vae"), TextLayout::OpenClip, 0).unwrap();
    let mut n = 0;
    for (c, names) in &table {
        for (d, (orig, third)) in names {
            let o = map.original(c, d).unwrap_or_else(|| panic!("{c} {d}: unmapped"));
            assert_eq!((&o.names[0], o.third), (orig, *third), "{c} {d}");
            n += 1;
        }
    }
    assert_eq!(n, 1306);
}

fn f16_opts() -> ConvertOptions {
    ConvertOptions { dtype: Some(DType::F16), ..Default::default() }
}

fn generate(model: &Path) -> (Vec<f32>, Vec<f32>) {
    let sd = StableDiffusion::load(model, &Device::Cpu).unwrap();
    let mut req = GenerateRequest::new("a photograph of an astronaut riding a horse");
    req.steps = 2;
    let g = sd.generate(&req, &mut |_, _| {}).unwrap();
    (g.latents.to_vec().unwrap(), g.image.to_vec().unwrap())
}

/// A sparse checkpoint converted from a single file generates exactly what one converted
/// from the equivalent diffusers folder does (same f16 weights: `--dtype f16` there).
#[test]
fn converted_single_file_generates_exactly_like_the_converted_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let from_folder = tmp.path().join("folder");
    convert(&fixture(), &from_folder, &f16_opts(), &mut |_| {}).unwrap();
    let reference = generate(&from_folder);
    for (name, path) in [("st", st_fixture()), ("ckpt", ckpt_fixture())] {
        let out = tmp.path().join(name);
        let opts = ConvertOptions { single_file: tiny_opts(), ..Default::default() };
        let r = convert(&path, &out, &opts, &mut |_| {}).unwrap();
        assert!(r.components.iter().any(|c| c.name == "unet" && c.pruned > 0));
        assert!(
            out.join("tokenizer/vocab.json").is_file()
                && out.join("scheduler/scheduler_config.json").is_file()
        );
        let got = generate(&out);
        assert!(got == reference, "{name}: generation differs from the folder's");
    }
}

/// `export --format single-file` writes exactly the original layout: exporting the single
/// file itself gives back every tensor of the Python-made fixture, bit for bit; exporting a
/// sparse folder gives its dense weights (zeros in place), which load back.
#[test]
fn export_single_file_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rt.safetensors");
    export_single_file(&st_fixture(), &out, false, &tiny_opts(), &mut |_| {}).unwrap();
    let (want, _) = read_file(&st_fixture());
    let (got, _) = read_file(&out);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (k, v) in &want {
        assert_eq!(&got[k], v, "{k}");
    }
    // Refuses to overwrite without force, leaves no temporary file.
    assert!(export_single_file(&st_fixture(), &out, false, &tiny_opts(), &mut |_| {}).is_err());

    let sparse = tmp.path().join("sparse");
    convert(&fixture(), &sparse, &ConvertOptions::default(), &mut |_| {}).unwrap();
    let exported = tmp.path().join("pruned.safetensors");
    export_single_file(&sparse, &exported, false, &SingleFileOptions::default(), &mut |_| {}).unwrap();
    let back = open(&exported, &tiny_opts());
    let src = ModelSource::open(&sparse, &SingleFileOptions::default()).unwrap();
    for c in ["text_encoder", "unet"] {
        let (a, b) = (src.store(c).unwrap(), back.store(c).unwrap());
        for n in b.names() {
            assert_eq!(
                a.tensor_f32(&n).unwrap().to_vec().unwrap(),
                b.tensor_f32(&n).unwrap().to_vec().unwrap(),
                "{c} {n}"
            );
        }
    }
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains("sdsparse-tmp")), "{names:?}");
}

/// Rewrites the fixture's tensors (name → new name / dropped) into `path`.
fn rewrite(path: &Path, f: impl Fn(&str, &Raw) -> Vec<(String, Raw)>) {
    let (t, meta) = read_file(&st_fixture());
    let mut out = BTreeMap::new();
    for (k, v) in &t {
        for (nk, nv) in f(k, v) {
            out.insert(nk, nv);
        }
    }
    write_file(path, &out, meta);
}

fn same_tensors(a: &SingleFileModel, b: &SingleFileModel, c: &str) {
    let (sa, sb) = (a.store(c).unwrap(), b.store(c).unwrap());
    for n in sa.names() {
        assert_eq!(
            sa.tensor_f32(&n).unwrap().to_vec().unwrap(),
            sb.tensor_f32(&n).unwrap().to_vec().unwrap(),
            "{c} {n}"
        );
    }
}

/// What diffusers' `convert_diffusers_to_original_stable_diffusion.py` writes for the tiny
/// model (checked against the script's real output by hand, see docs/SINGLE_FILE.md): VAE
/// decoder levels numbered as if there were 4 (`up.{3-i}`), and, for a text encoder saved by
/// transformers 5 (no `text_model.` prefix), OpenCLIP names its renames miss
/// (`transformer.encoder.layers.N.attn.in_proj_weight`, `transformer.embeddings.*`,
/// `transformer.final_layer_norm.*`). Such a file loads the same tensors.
#[test]
fn diffusers_script_layout_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("script.safetensors");
    rewrite(&p, |k, v| {
        let mut nk = match k.strip_prefix("first_stage_model.decoder.up.") {
            Some(rest) => {
                let (i, r) = rest.split_once('.').unwrap();
                format!("first_stage_model.decoder.up.{}.{r}", i.parse::<usize>().unwrap() + 2)
            }
            None => k.to_string(),
        };
        for (a, b) in [
            ("model.transformer.resblocks.", "model.transformer.encoder.layers."),
            ("model.token_embedding.", "model.transformer.embeddings.token_embedding."),
            ("model.positional_embedding", "model.transformer.embeddings.position_embedding.weight"),
            ("model.ln_final.", "model.transformer.final_layer_norm."),
        ] {
            nk = nk.replace(a, b);
        }
        vec![(nk, v.clone())]
    });
    let m = open(&p, &tiny_opts());
    assert!(m.notes.iter().any(|n| n.contains("numbered from 2")), "{:?}", m.notes);
    assert!(m.ignored.is_empty(), "{:?}", m.ignored);
    let reference = open(&st_fixture(), &tiny_opts());
    for c in ["vae", "text_encoder", "unet"] {
        same_tensors(&m, &reference, c);
    }
}

/// EMA weights (`model_ema.` + the UNet name without dots, diffusers' rule) are used when
/// present, the training weights with `no_ema`.
#[test]
fn ema_weights_are_preferred_unless_told_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("ema.safetensors");
    rewrite(&p, |k, v| {
        let mut out = vec![(k.to_string(), v.clone())];
        if let Some(rest) = k.strip_prefix("model.") {
            let flat: String = rest.split('.').collect();
            out.push((format!("model_ema.{flat}"), Raw { bytes: vec![0; v.bytes.len()], ..v.clone() }));
        }
        out
    });
    let ema = open(&p, &tiny_opts());
    let w = ema.store("unet").unwrap().tensor_f32("conv_in.weight").unwrap().to_vec().unwrap();
    assert!(w.iter().all(|&x| x == 0.0), "EMA copy not used");
    assert!(ema.notes.iter().any(|n| n.contains("EMA")));
    let train = open(&p, &SingleFileOptions { no_ema: true, ..tiny_opts() });
    same_tensors(&train, &open(&st_fixture(), &tiny_opts()), "unet");
}

/// A text encoder in transformers' CLIP layout (`cond_stage_model.transformer.text_model.*`,
/// unfused q/k/v) is accepted for an SD2-family file.
#[test]
fn hf_clip_text_layout_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("hf.safetensors");
    let (te, _) = read_file(&weight_file(&fixture(), "text_encoder"));
    rewrite(&p, |k, v| {
        if k.starts_with("cond_stage_model.") {
            return vec![];
        }
        let mut out = vec![(k.to_string(), v.clone())];
        if k == "model.diffusion_model.input_blocks.0.0.weight" {
            for (n, t) in &te {
                out.push((format!("cond_stage_model.transformer.text_model.{n}"), t.clone()));
            }
        }
        out
    });
    let m = open(&p, &tiny_opts());
    let folder = sdsparse::checkpoint::ComponentStore::open(&fixture().join("text_encoder")).unwrap();
    let s = m.store("text_encoder").unwrap();
    for n in folder.names() {
        assert_eq!(
            s.tensor_f32(&n).unwrap().to_vec().unwrap(),
            folder.tensor_f32(&n).unwrap().to_vec().unwrap(),
            "{n}"
        );
    }
}

/// Overrides reach the configs: prediction type into the scheduler, upcast into the UNet.
#[test]
fn prediction_type_and_upcast_overrides() {
    let m = open(
        &st_fixture(),
        &SingleFileOptions {
            prediction_type: Some("v_prediction".into()),
            upcast_attention: Some(true),
            ..tiny_opts()
        },
    );
    let s: serde_json::Value =
        serde_json::from_str(m.config_text("scheduler/scheduler_config.json").unwrap()).unwrap();
    assert_eq!(s["prediction_type"], "v_prediction");
    let u: serde_json::Value = serde_json::from_str(m.config_text("unet/config.json").unwrap()).unwrap();
    assert_eq!(u["upcast_attention"], true);
    assert!(SingleFileModel::open(
        &st_fixture(),
        &SingleFileOptions { prediction_type: Some("x".into()), ..tiny_opts() }
    )
    .is_err());
}

/// Runs the binary expecting one `error:` line containing `needle` and no output.
fn refuses(args: &[&str], needle: &str) {
    let (code, _, err) = run_bin(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("note:")).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: ") && err.contains(needle), "expected {needle:?} in: {err}");
}

fn inspect_refuses(path: &Path, needle: &str) {
    let cfg = fixture().display().to_string();
    refuses(&["inspect", &path.display().to_string(), "--config", &cfg], needle);
}

#[test]
fn malicious_pickles_are_refused_and_never_run() {
    let marker = Path::new("/tmp/sdsparse-pwned");
    let _ = std::fs::remove_file(marker);
    inspect_refuses(&sf_dir().join("malicious-os-system.ckpt"), "calls posix.system");
    inspect_refuses(&sf_dir().join("malicious-os-system.pkl"), "calls posix.system");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (m, o) = (sf_dir().join("malicious-os-system.ckpt").display().to_string(), out.display().to_string());
    refuses(&["convert", "--model", &m, "--out", &o, "-q"], "refusing");
    assert!(!out.exists());
    assert!(!marker.exists(), "the pickle ran");
}

#[test]
fn truncated_and_corrupt_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = std::fs::read(ckpt_fixture()).unwrap();
    for cut in [10, 1000, ckpt.len() / 2, ckpt.len() - 30] {
        let p = tmp.path().join(format!("cut{cut}.ckpt"));
        std::fs::write(&p, &ckpt[..cut]).unwrap();
        inspect_refuses(&p, &p.display().to_string());
    }
    let st = std::fs::read(st_fixture()).unwrap();
    let p = tmp.path().join("cut.safetensors");
    std::fs::write(&p, &st[..st.len() / 2]).unwrap();
    inspect_refuses(&p, "not a valid safetensors file");
    let p = tmp.path().join("garbage.ckpt");
    std::fs::write(&p, b"PK\x03\x04 this is not a zip at all").unwrap();
    inspect_refuses(&p, "garbage.ckpt");
}

#[test]
fn wrong_shapes_and_missing_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("shape.safetensors");
    rewrite(&p, |k, v| {
        let mut v = v.clone();
        if k == "model.diffusion_model.time_embed.0.weight" {
            v.shape = vec![v.shape[1], v.shape[0]];
        }
        vec![(k.to_string(), v)]
    });
    inspect_refuses(&p, "time_embed.0.weight has shape");
    let p = tmp.path().join("missing.safetensors");
    rewrite(&p, |k, v| {
        if k.contains("resblocks.3.attn.in_proj_weight") {
            vec![]
        } else {
            vec![(k.to_string(), v.clone())]
        }
    });
    inspect_refuses(&p, "resblocks.3.attn.in_proj_weight");
    let p = tmp.path().join("qkv.safetensors");
    rewrite(&p, |k, v| {
        let mut v = v.clone();
        if k.ends_with("resblocks.0.attn.in_proj_bias") {
            v.shape = vec![v.shape[0] - 3];
            v.bytes.truncate(v.bytes.len() - 6);
        }
        vec![(k.to_string(), v)]
    });
    inspect_refuses(&p, "in_proj_bias has shape");
}

/// Files of other model families get a clear "not SD2" line.
#[test]
fn other_families_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |shape: Vec<usize>| Raw {
        dtype: safetensors::Dtype::F16,
        bytes: vec![0; 2 * shape.iter().product::<usize>()],
        shape,
    };
    let write = |name: &str, tensors: Vec<(&str, Vec<usize>)>| {
        let p = tmp.path().join(name);
        write_file(&p, &tensors.into_iter().map(|(k, s)| (k.to_string(), t(s))).collect(), None);
        p
    };
    let sd1 = write(
        "sd1.safetensors",
        vec![
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", vec![320, 768]),
            ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", vec![49408, 768]),
        ],
    );
    let p = sd1.display().to_string();
    refuses(&["inspect", &p], "SD1.x checkpoint");
    let sdxl = write(
        "sdxl.safetensors",
        vec![
            ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", vec![8]),
            ("model.diffusion_model.out.2.bias", vec![4]),
        ],
    );
    refuses(&["inspect", &sdxl.display().to_string()], "SDXL");
    let other = write("other.safetensors", vec![("conv_in.weight", vec![4, 4, 3, 3])]);
    refuses(&["inspect", &other.display().to_string()], "diffusers component");
    let inpaint = write(
        "inpaint.safetensors",
        vec![
            ("model.diffusion_model.input_blocks.0.0.weight", vec![320, 9, 3, 3]),
            ("cond_stage_model.model.token_embedding.weight", vec![8, 8]),
        ],
    );
    refuses(&["inspect", &inpaint.display().to_string()], "inpainting");
}

/// Without `--config`, a file that is not the standard SD2.x architecture is refused with a
/// line that names the flag; other options are checked too.
#[test]
fn non_standard_file_without_config_names_the_flag() {
    let st = st_fixture().display().to_string();
    refuses(&["inspect", &st], "--config PATH");
    refuses(
        &["generate", "--model", &st, "--prompt", "x", "--steps", "1", "--out", "/tmp/sdsparse-never.png"],
        "--config PATH",
    );
    let dir = fixture().display().to_string();
    refuses(&["inspect", &dir, "--config", &dir], "apply to single-file checkpoints");
    refuses(&["inspect", &st, "--config", "/nonexistent/x"], "--config /nonexistent/x");
    refuses(&["inspect", &st, "--config", &dir, "--prediction-type", "sample"], "--prediction-type");
    refuses(&["inspect", "/nonexistent.safetensors"], "not found");
    // A config folder lacking a component's config falls back to SD2.1's (the tiny text
    // encoder then does not match); one with none is refused.
    let tmp = tempfile::tempdir().unwrap();
    for c in ["unet", "vae"] {
        std::fs::create_dir_all(tmp.path().join(c)).unwrap();
        std::fs::copy(fixture().join(c).join("config.json"), tmp.path().join(c).join("config.json")).unwrap();
    }
    let partial = tmp.path().display().to_string();
    refuses(
        &["inspect", &st, "--config", &partial],
        "text_encoder tensor cond_stage_model.model.token_embedding.weight has shape",
    );
    let empty = tempfile::tempdir().unwrap();
    refuses(
        &["inspect", &st, "--config", &empty.path().display().to_string()],
        "no unet/, vae/ or text_encoder/ config.json",
    );
}

/// The CLI runs the whole path on a single file: inspect, convert, generate, export.
#[test]
fn cli_accepts_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (st, cfg) = (st_fixture().display().to_string(), fixture().display().to_string());
    let (code, out, err) = run_bin(&["inspect", &st, "--config", &cfg, "--summary"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: single-file checkpoint (safetensors)") && out.contains("== unet"), "{out}");
    let png = tmp.path().join("a.png").display().to_string();
    let (code, _, err) = run_bin(&[
        "generate", "--model", &st, "--config", &cfg, "--prompt", "a cat", "--steps", "1", "--out", &png,
        "--device", "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    let sparse = tmp.path().join("s").display().to_string();
    let ck = ckpt_fixture().display().to_string();
    let (code, _, err) = run_bin(&["convert", "--model", &ck, "--config", &cfg, "--out", &sparse, "-q"]);
    assert_eq!(code, 0, "{err}");
    let single = tmp.path().join("s.safetensors").display().to_string();
    let (code, out, err) =
        run_bin(&["export", "--model", &sparse, "--out", &single, "--format", "single-file", "-q"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote single-file checkpoint"), "{out}");
}

/// `--config` takes an original LDM yaml too, and a `model.yaml` beside the file is used as
/// A1111 does; the tiny file does not match SD2's yaml, which is said plainly.
#[test]
fn ldm_yaml_configs_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = "model:\n  params:\n    parameterization: \"v\"\n    scale_factor: 0.18215\n    unet_config:\n      params:\n        in_channels: 4\n        out_channels: 4\n        model_channels: 320\n        attention_resolutions: [4, 2, 1]\n        num_res_blocks: 2\n        channel_mult: [1, 2, 4, 4]\n        num_head_channels: 64\n        use_linear_in_transformer: True\n        context_dim: 1024\n    first_stage_config:\n      params:\n        ddconfig:\n          z_channels: 4\n          in_channels: 3\n          out_ch: 3\n          ch: 128\n          ch_mult: [1, 2, 4, 4]\n          num_res_blocks: 2\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n      params:\n        layer: \"penultimate\"\n";
    let y = tmp.path().join("v2-inference-v.yaml");
    std::fs::write(&y, yaml).unwrap();
    let st = st_fixture().display().to_string();
    refuses(&["inspect", &st, "--config", &y.display().to_string()], "does not match the configs of");
    let copy = tmp.path().join("model.safetensors");
    std::fs::copy(st_fixture(), &copy).unwrap();
    std::fs::write(tmp.path().join("model.yaml"), yaml).unwrap();
    refuses(&["inspect", &copy.display().to_string()], "model.yaml: text_encoder tensor");
}

/// An original Stability file holds one more OpenCLIP block than diffusers uses (SD2
/// conditions on the penultimate one), `text_projection` and `logit_scale`: all ignored, and
/// listed as such.
#[test]
fn extra_open_clip_block_and_projection_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("24.safetensors");
    rewrite(&p, |k, v| {
        let mut out = vec![(k.to_string(), v.clone())];
        if let Some(rest) = k.strip_prefix("cond_stage_model.model.transformer.resblocks.4.") {
            out.push((format!("cond_stage_model.model.transformer.resblocks.5.{rest}"), v.clone()));
        }
        if k == "cond_stage_model.model.ln_final.weight" {
            out.push((
                "cond_stage_model.model.text_projection".into(),
                Raw { shape: vec![32, 32], bytes: vec![0; 2048], ..v.clone() },
            ));
            out.push((
                "cond_stage_model.model.logit_scale".into(),
                Raw { shape: vec![], bytes: vec![0; 2], ..v.clone() },
            ));
        }
        out
    });
    let m = open(&p, &tiny_opts());
    assert_eq!(m.ignored.len(), 12 + 2, "{:?}", m.ignored);
    assert!(m
        .ignored
        .iter()
        .all(|n| n.contains("resblocks.5.") || n.ends_with("text_projection") || n.ends_with("logit_scale")));
    same_tensors(&m, &open(&st_fixture(), &tiny_opts()), "text_encoder");
}
