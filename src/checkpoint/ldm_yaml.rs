//! Diffusers configs from an original LDM inference config (`v2-inference.yaml`,
//! `v2-inference-v.yaml`), derived as diffusers' `create_unet_diffusers_config_from_ldm`,
//! `create_vae_diffusers_config_from_ldm` and `_legacy_load_scheduler` do, on top of the
//! bundled SD2.1 configs of the variant the yaml's `parameterization` names (`v`: 768-v,
//! else 512-base) for every field the yaml does not set.

use super::single_file::Sd2Variant;
use crate::error::{Error, Result};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

fn int(y: &Yaml) -> Option<i64> {
    y.as_i64()
}

fn num(y: &Yaml) -> Option<f64> {
    y.as_f64().or_else(|| y.as_i64().map(|i| i as f64))
}

fn ints(y: &Yaml) -> Option<Vec<i64>> {
    y.as_vec()?.iter().map(int).collect()
}

/// The config files (`unet/config.json`, ...) an LDM yaml implies.
pub fn configs_from_yaml(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    configs_from_yaml_text(&text).map_err(|e| Error::Checkpoint(format!("--config {}: {e}", path.display())))
}

/// [`configs_from_yaml`] on the yaml text.
pub fn configs_from_yaml_text(text: &str) -> Result<BTreeMap<String, String>> {
    let docs =
        YamlLoader::load_from_str(text).map_err(|e| Error::Checkpoint(format!("invalid YAML ({e})")))?;
    let root = docs.first().ok_or_else(|| Error::Checkpoint("empty YAML".into()))?;
    let params = &root["model"]["params"];
    if params.is_badvalue() {
        return Err(Error::Checkpoint("no model.params (not an LDM inference config)".into()));
    }
    let v = params["parameterization"].as_str() == Some("v");
    let variant = if v { Sd2Variant::V768 } else { Sd2Variant::Base512 };
    let bundled: BTreeMap<&str, &str> = variant.configs().iter().copied().collect();
    let template = |rel: &str| -> Result<Json> {
        serde_json::from_str(bundled[rel]).map_err(|e| Error::Msg(format!("bundled {rel}: {e}")))
    };
    let missing = |what: &str| Error::Checkpoint(format!("missing or invalid {what}"));

    // UNet (unet_config, or network_config in newer yamls).
    let mut u = params["unet_config"]["params"].clone();
    if u.is_badvalue() {
        u = params["network_config"]["params"].clone();
    }
    if u.is_badvalue() {
        return Err(missing("model.params.unet_config.params"));
    }
    let mc = int(&u["model_channels"]).ok_or_else(|| missing("unet model_channels"))?;
    let mult = ints(&u["channel_mult"]).ok_or_else(|| missing("unet channel_mult"))?;
    let attn_res = ints(&u["attention_resolutions"]).ok_or_else(|| missing("unet attention_resolutions"))?;
    let boc: Vec<i64> = mult.iter().map(|m| mc * m).collect();
    let (mut down, mut up) = (Vec::new(), Vec::new());
    let mut res = 1;
    for i in 0..boc.len() {
        down.push(if attn_res.contains(&res) { "CrossAttnDownBlock2D" } else { "DownBlock2D" });
        if i + 1 != boc.len() {
            res *= 2;
        }
    }
    for _ in 0..boc.len() {
        up.push(if attn_res.contains(&res) { "CrossAttnUpBlock2D" } else { "UpBlock2D" });
        res /= 2;
    }
    // Heads per block: num_heads, or (model_channels / num_head_channels) * mult (SD2).
    let heads: Json = match (int(&u["num_heads"]), int(&u["num_head_channels"])) {
        (Some(h), _) if h > 0 => json!(h),
        (_, Some(hc)) if hc > 0 => json!(mult.iter().map(|m| (mc / hc) * m).collect::<Vec<_>>()),
        _ => return Err(missing("unet num_heads / num_head_channels")),
    };
    let mut unet = template("unet/config.json")?;
    let context = match &u["context_dim"] {
        Yaml::Array(a) => a.first().and_then(int),
        y => int(y),
    }
    .ok_or_else(|| missing("unet context_dim"))?;
    let set = |o: &mut Json, k: &str, v: Json| {
        if let Some(m) = o.as_object_mut() {
            m.insert(k.to_string(), v);
        }
    };
    set(&mut unet, "in_channels", json!(int(&u["in_channels"]).ok_or_else(|| missing("unet in_channels"))?));
    set(
        &mut unet,
        "out_channels",
        json!(int(&u["out_channels"]).ok_or_else(|| missing("unet out_channels"))?),
    );
    set(&mut unet, "block_out_channels", json!(boc));
    set(
        &mut unet,
        "layers_per_block",
        json!(int(&u["num_res_blocks"]).ok_or_else(|| missing("unet num_res_blocks"))?),
    );
    set(&mut unet, "cross_attention_dim", json!(context));
    set(&mut unet, "attention_head_dim", heads);
    set(&mut unet, "use_linear_projection", json!(u["use_linear_in_transformer"].as_bool().unwrap_or(false)));
    set(&mut unet, "transformer_layers_per_block", json!(int(&u["transformer_depth"]).unwrap_or(1)));
    set(&mut unet, "down_block_types", json!(down));
    set(&mut unet, "up_block_types", json!(up));

    // VAE.
    let dd = &params["first_stage_config"]["params"]["ddconfig"];
    let ch = int(&dd["ch"]).ok_or_else(|| missing("first_stage_config ddconfig.ch"))?;
    let ch_mult = ints(&dd["ch_mult"]).ok_or_else(|| missing("ddconfig.ch_mult"))?;
    let mut vae = template("vae/config.json")?;
    let n = ch_mult.len();
    set(&mut vae, "block_out_channels", json!(ch_mult.iter().map(|m| ch * m).collect::<Vec<_>>()));
    set(
        &mut vae,
        "layers_per_block",
        json!(int(&dd["num_res_blocks"]).ok_or_else(|| missing("ddconfig.num_res_blocks"))?),
    );
    set(
        &mut vae,
        "latent_channels",
        json!(int(&dd["z_channels"]).ok_or_else(|| missing("ddconfig.z_channels"))?),
    );
    set(&mut vae, "in_channels", json!(int(&dd["in_channels"]).unwrap_or(3)));
    set(&mut vae, "out_channels", json!(int(&dd["out_ch"]).unwrap_or(3)));
    set(&mut vae, "down_block_types", json!(vec!["DownEncoderBlock2D"; n]));
    set(&mut vae, "up_block_types", json!(vec!["UpDecoderBlock2D"; n]));
    if let Some(s) = num(&params["scale_factor"]) {
        set(&mut vae, "scaling_factor", json!(s));
    }

    // Text encoder: only the OpenCLIP ViT-H-14 tower SD2 uses has known head counts.
    let cond = &params["cond_stage_config"];
    let arch = cond["params"]["arch"].as_str().unwrap_or("ViT-H-14");
    let target = cond["target"].as_str().unwrap_or("");
    if !target.ends_with("FrozenOpenCLIPEmbedder") || arch != "ViT-H-14" {
        return Err(Error::Checkpoint(format!(
            "text encoder {target} ({arch}) is not SD2's OpenCLIP ViT-H-14; give a diffusers folder's configs instead"
        )));
    }
    let mut te = template("text_encoder/config.json")?;
    if cond["params"]["layer"].as_str() == Some("last") {
        set(&mut te, "num_hidden_layers", json!(24));
    }

    // Scheduler: the bundled one with the yaml's schedule.
    let mut sched = template("scheduler/scheduler_config.json")?;
    set(&mut sched, "prediction_type", json!(if v { "v_prediction" } else { "epsilon" }));
    if let Some(x) = num(&params["linear_start"]) {
        set(&mut sched, "beta_start", json!(x));
    }
    if let Some(x) = num(&params["linear_end"]) {
        set(&mut sched, "beta_end", json!(x));
    }
    if let Some(x) = int(&params["timesteps"]) {
        set(&mut sched, "num_train_timesteps", json!(x));
    }

    let s = |v: &Json| serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()));
    Ok(BTreeMap::from([
        ("model_index.json".to_string(), bundled["model_index.json"].to_string()),
        ("scheduler/scheduler_config.json".to_string(), s(&sched)?),
        ("text_encoder/config.json".to_string(), s(&te)?),
        ("unet/config.json".to_string(), s(&unet)?),
        ("vae/config.json".to_string(), s(&vae)?),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of Stability's `v2-inference-v.yaml` that matter here.
    const V2_INFERENCE_V: &str = "
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: \"v\"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: \"penultimate\"
";

    #[test]
    fn v2_inference_v_gives_the_sd21_configs() {
        let c = configs_from_yaml_text(V2_INFERENCE_V).unwrap();
        let bundled: BTreeMap<&str, &str> = Sd2Variant::V768.configs().iter().copied().collect();
        for rel in [
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
        ] {
            let got: Json = serde_json::from_str(&c[rel]).unwrap();
            let want: Json = serde_json::from_str(bundled[rel]).unwrap();
            for (k, v) in want.as_object().unwrap() {
                if k.starts_with('_') || k == "beta_end" {
                    continue;
                }
                assert_eq!(got.get(k), Some(v), "{rel} {k}");
            }
        }
        let eps = configs_from_yaml_text(&V2_INFERENCE_V.replace("parameterization: \"v\"", "")).unwrap();
        assert!(eps["scheduler/scheduler_config.json"].contains("\"epsilon\""));
        assert!(configs_from_yaml_text("model: {}").is_err());
        assert!(configs_from_yaml_text(": : :").is_err());
    }
}
