//! Tensor names and shapes against real SD2.1: the layer list derived from the shipped
//! configs equals the manifests made by instantiating the models in diffusers /
//! transformers, and the prunable-layer selection equals the manifests' Linear modules.
//! Also: real-world file layouts (legacy names, shards, fp16 variant files, bf16).

mod format_util;

use format_util::*;
use sdsparse::checkpoint::expected;
use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::convert::{convert, export, ConvertOptions};
use sdsparse::prune::{ComponentKind, Selection};
use sdsparse::Weight;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn manifest(component: &str) -> Value {
    let p = configs().join("manifests").join(format!("{component}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn manifest_tensors(m: &Value) -> BTreeMap<String, Vec<usize>> {
    m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (t["name"].as_str().unwrap().to_string(), shape)
        })
        .collect()
}

fn modules_of_type(m: &Value, ty: &str) -> BTreeSet<String> {
    m["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["type"] == ty)
        .map(|x| format!("{}.weight", x["name"].as_str().unwrap()))
        .collect()
}

fn config(variant: &str, component: &str) -> Value {
    let p = configs().join(variant).join(component).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn layer_lists_from_the_real_configs_equal_the_manifests() {
    for variant in ["stable-diffusion-2-1", "stable-diffusion-2-1-base"] {
        for component in ["text_encoder", "unet", "vae"] {
            let cfg = config(variant, component);
            let got: BTreeMap<String, Vec<usize>> = match component {
                "text_encoder" => expected::clip_text(&cfg, "cfg"),
                "unet" => expected::unet(&cfg, "cfg"),
                _ => expected::vae(&cfg, "cfg"),
            }
            .unwrap()
            .into_iter()
            .collect();
            let m = manifest(component);
            let want = manifest_tensors(&m);
            assert_eq!(
                got.len(),
                m["state_dict_tensors"].as_u64().unwrap() as usize,
                "{variant}/{component}"
            );
            assert_eq!(got, want, "{variant}/{component}");
            let numel: u64 = got.values().map(|s| s.iter().product::<usize>() as u64).sum();
            assert_eq!(numel, m["total_parameters"].as_u64().unwrap(), "{variant}/{component}");
        }
    }
}

#[test]
fn prunable_selection_equals_the_manifest_linear_modules() {
    let sel = Selection::default();
    // UNet: every Linear (216), nothing else.
    let m = manifest("unet");
    let tensors = manifest_tensors(&m);
    let prunable: BTreeSet<String> = tensors
        .iter()
        .filter(|(n, s)| sel.is_prunable(ComponentKind::Unet, n, s))
        .map(|(n, _)| n.clone())
        .collect();
    let linear = modules_of_type(&m, "Linear");
    assert_eq!(linear.len(), 216);
    assert_eq!(prunable, linear);
    let numel: usize = prunable.iter().map(|n| tensors[n].iter().product::<usize>()).sum();
    assert_eq!(numel as u64, m["linear"]["weight_numel"].as_u64().unwrap());
    // --include-conv adds exactly the 66 Conv2d weights.
    let with_conv = Selection { include_conv: true, ..Default::default() };
    let prunable_c: BTreeSet<String> = tensors
        .iter()
        .filter(|(n, s)| with_conv.is_prunable(ComponentKind::Unet, n, s))
        .map(|(n, _)| n.clone())
        .collect();
    let conv = modules_of_type(&m, "Conv2d");
    assert_eq!(conv.len(), 66);
    assert_eq!(prunable_c, linear.union(&conv).cloned().collect());

    // Text encoder: 138 Linears, all inside the encoder layers; embeddings/norms stay dense.
    let m = manifest("text_encoder");
    let tensors = manifest_tensors(&m);
    let linear = modules_of_type(&m, "Linear");
    assert_eq!(linear.len(), 138);
    let in_layers: BTreeSet<String> =
        linear.iter().filter(|n| n.starts_with("encoder.layers.")).cloned().collect();
    let prunable: BTreeSet<String> = tensors
        .iter()
        .filter(|(n, s)| sel.is_prunable(ComponentKind::TextEncoder, n, s))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(prunable, in_layers);
    assert_eq!(prunable.len(), 138);
    // The same with transformers 4.x names.
    let legacy = tensors
        .iter()
        .filter(|(n, s)| sel.is_prunable(ComponentKind::TextEncoder, &format!("text_model.{n}"), s))
        .count();
    assert_eq!(legacy, 138);

    // VAE: nothing, even with --include-conv.
    let m = manifest("vae");
    assert!(manifest_tensors(&m).iter().all(|(n, s)| !with_conv.is_prunable(ComponentKind::Vae, n, s)));
}

#[test]
fn tiny_fixture_matches_its_configs() {
    for component in ["text_encoder", "unet", "vae"] {
        let dir = fixture().join(component);
        let store = ComponentStore::open(&dir).unwrap();
        let want: BTreeSet<String> = expected::expected_for_dir(&dir, component)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let have: BTreeSet<String> = store.names().into_iter().collect();
        assert_eq!(want, have, "{component}");
        expected::validate_component(&store, component).unwrap();
    }
}

/// A copy of the tiny fixture as older tools wrote it: `text_model.` prefixes, deprecated
/// VAE attention names, the UNet sharded in two files, the text encoder as an fp16 variant
/// file only, the VAE in bf16.
fn legacy_copy(root: &Path) -> std::path::PathBuf {
    let model = root.join("legacy");
    copy_dir(&fixture(), &model);
    // Text encoder: prefixed names, f16, as model.fp16.safetensors.
    let te = weight_file(&model, "text_encoder");
    let (t, meta) = read_file(&te);
    let t16: BTreeMap<String, Raw> = t
        .into_iter()
        .map(|(n, r)| {
            let h = sdsparse::HostData::F32(f32s(&r.bytes)).to_dtype(sdsparse::DType::F16);
            (
                format!("text_model.{n}"),
                Raw { dtype: safetensors::Dtype::F16, shape: r.shape, bytes: h.as_bytes().to_vec() },
            )
        })
        .collect();
    // transformers 4.x also saved the int64 position_ids buffer.
    let mut t16 = t16;
    let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    t16.insert(
        "text_model.embeddings.position_ids".into(),
        Raw { dtype: safetensors::Dtype::I64, shape: vec![1, 77], bytes: ids },
    );
    std::fs::remove_file(&te).unwrap();
    write_file(&model.join("text_encoder/model.fp16.safetensors"), &t16, meta);
    // VAE: deprecated attention names, bf16.
    let vae = weight_file(&model, "vae");
    let (t, meta) = read_file(&vae);
    let renamed: BTreeMap<String, Raw> = t
        .into_iter()
        .map(|(n, r)| {
            let n = n
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            let h = sdsparse::HostData::F32(f32s(&r.bytes)).to_dtype(sdsparse::DType::BF16);
            (n, Raw { dtype: safetensors::Dtype::BF16, shape: r.shape, bytes: h.as_bytes().to_vec() })
        })
        .collect();
    write_file(&vae, &renamed, meta);
    // UNet: two shards plus an index.
    let unet = weight_file(&model, "unet");
    let (t, meta) = read_file(&unet);
    std::fs::remove_file(&unet).unwrap();
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (n, r)) in t.into_iter().enumerate() {
        let file = if i.is_multiple_of(2) {
            "diffusion_pytorch_model-00001-of-00002.safetensors"
        } else {
            "diffusion_pytorch_model-00002-of-00002.safetensors"
        };
        weight_map.insert(n.clone(), Value::String(file.into()));
        if i.is_multiple_of(2) {
            a.insert(n, r)
        } else {
            b.insert(n, r)
        };
    }
    write_file(&model.join("unet/diffusion_pytorch_model-00001-of-00002.safetensors"), &a, meta.clone());
    write_file(&model.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"), &b, meta);
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(model.join("unet/diffusion_pytorch_model.safetensors.index.json"), index.to_string())
        .unwrap();
    model
}

#[test]
fn legacy_names_shards_fp16_variants_and_bf16_convert_and_keep_their_names() {
    let tmp = tempfile::tempdir().unwrap();
    let model = legacy_copy(tmp.path());
    let sparse = tmp.path().join("sparse");
    let report = convert(&model, &sparse, &ConvertOptions::default(), &mut |_| {}).unwrap();
    let te = report.components.iter().find(|c| c.name == "text_encoder").unwrap();
    assert_eq!(te.layers.len(), 30);
    assert!(te.layers.iter().all(|l| l.name.starts_with("text_model.encoder.layers.") && l.dtype == "f16"));
    let unet = report.components.iter().find(|c| c.name == "unet").unwrap();
    assert_eq!(unet.layers.len(), 86);

    // Models ask for current names; the store finds the legacy ones, compressed or dense.
    let vb = VarBuilder::from_dir(&sparse.join("text_encoder")).unwrap();
    let w = vb.get_weight("encoder.layers.0.self_attn.q_proj.weight", 32, 32).unwrap();
    assert!(matches!(w, Weight::Bitmap(_)));
    assert_eq!(vb.get("final_layer_norm.weight", &[32]).unwrap().shape(), &[32]);
    let vae = VarBuilder::from_dir(&sparse.join("vae")).unwrap();
    assert!(matches!(
        vae.get_weight("decoder.mid_block.attentions.0.to_q.weight", 64, 64).unwrap(),
        Weight::Dense(_)
    ));

    // Export keeps the names and dtypes the input had, with zeros in place.
    let dense = tmp.path().join("dense");
    export(&sparse, &dense, false, &mut |_| {}).unwrap();
    let (orig, _) = read_file(&model.join("text_encoder/model.fp16.safetensors"));
    let (exp, _) = read_file(&weight_file(&dense, "text_encoder"));
    assert_eq!(orig.keys().collect::<Vec<_>>(), exp.keys().collect::<Vec<_>>());
    assert_eq!(exp["text_model.embeddings.position_ids"], orig["text_model.embeddings.position_ids"]);
    for (n, o) in orig.iter().filter(|(n, _)| !n.ends_with("position_ids")) {
        assert_eq!(exp[n].dtype, safetensors::Dtype::F16);
        let (a, b) = (f16s_as_f32(&o.bytes), f16s_as_f32(&exp[n].bytes));
        let stripped = n.trim_start_matches("text_model.");
        if default_prunable("text_encoder", stripped, &o.shape) {
            let k = floor_count(0.475, a.len());
            let pruned = reference_pruned(&a, k);
            for i in 0..a.len() {
                assert_eq!(b[i], if pruned[i] { 0.0 } else { a[i] }, "{n}[{i}]");
            }
        } else {
            assert_eq!(o.bytes, exp[n].bytes, "{n}");
        }
    }
    let (vae_exp, _) = read_file(&weight_file(&dense, "vae"));
    assert!(vae_exp.contains_key("encoder.mid_block.attentions.0.query.weight"));
    assert!(vae_exp.values().all(|r| r.dtype == safetensors::Dtype::BF16));
    let (unet_exp, _) = read_file(&weight_file(&dense, "unet"));
    assert_eq!(unet_exp.len(), 304);
}
