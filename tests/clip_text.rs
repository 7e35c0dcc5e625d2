//! The CLIP text encoder against diffusers' prompt embeddings for the tiny SD2 pipeline, and
//! its structure against the real SD2.1 text encoder's config and tensor manifest.

use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::model::clip_text::{Activation, ClipTextConfig, ClipTextModel};
use sdsparse::model::tokenizer::ClipTokenizer;
use sdsparse::Tensor;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-sd2-eps")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture")).expect("valid JSON")
}

/// One f32 tensor of `tests/fixtures/tiny-sd2-eps/reference/reference.safetensors`.
fn reference_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(tiny_dir().join("reference/reference.safetensors")).expect("read reference");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let t = st.tensor(name).expect("reference tensor");
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let values = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (t.shape().to_vec(), values)
}

fn reference_ids(name: &str) -> Vec<u32> {
    let reference = read_json(&tiny_dir().join("reference/reference.json"));
    let values = &reference["tensors"][name]["values"][0];
    values.as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

/// ‖got − want‖ / ‖want‖ in f64; NaN (which never passes a `<` check) if `got` holds one.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    (diff / norm).sqrt()
}

fn tiny_model() -> ClipTextModel {
    ClipTextModel::from_dir(&tiny_dir().join("text_encoder")).expect("load the tiny text encoder")
}

/// The tiny encoder's tensors renamed as transformers 4.x saved them (`text_model.` prefix).
fn prefixed_tiny_store() -> ComponentStore {
    let store = ComponentStore::open(&tiny_dir().join("text_encoder")).expect("open tiny text encoder");
    let tensors: HashMap<String, Tensor> = store
        .names()
        .into_iter()
        .map(|name| {
            let t = store.tensor_f32(&name).expect("read tensor");
            (format!("text_model.{name}"), t)
        })
        .collect();
    assert!(tensors.keys().all(|n| n.starts_with("text_model.")));
    ComponentStore::from_tensors("tiny text encoder with text_model. names", tensors)
}

#[test]
fn configs_parse() {
    let tiny = ClipTextConfig::from_file(&tiny_dir().join("text_encoder/config.json")).expect("tiny config");
    assert_eq!((tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads), (32, 5, 4));
    assert_eq!((tiny.intermediate_size, tiny.hidden_act), (37, Activation::Gelu));
    for variant in ["stable-diffusion-2-1", "stable-diffusion-2-1-base"] {
        let path = fixtures().join("sd2.1-configs").join(variant).join("text_encoder/config.json");
        assert_eq!(
            ClipTextConfig::from_file(&path).expect("SD2.1 config"),
            ClipTextConfig::v2_1(),
            "{variant}"
        );
    }
    let quick = ClipTextConfig::from_json(r#"{"hidden_act": "quick_gelu"}"#).expect("defaults");
    assert_eq!((quick.hidden_size, quick.hidden_act), (512, Activation::QuickGelu));
}

#[test]
fn bad_configs_are_clear_errors() {
    let err = ClipTextConfig::from_json(r#"{"hidden_act": "relu"}"#).unwrap_err().to_string();
    assert!(err.contains("hidden_act \"relu\""), "{err}");
    let err = ClipTextConfig::from_json(r#"{"hidden_size": 30, "num_attention_heads": 4}"#).unwrap_err();
    assert!(err.to_string().contains("not divisible"), "{err}");
    let err = ClipTextConfig::from_json("{").unwrap_err();
    assert!(err.to_string().contains("invalid JSON"), "{err}");
    let err = ClipTextConfig::from_file(Path::new("/nonexistent/config.json")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/config.json"), "{err}");
}

/// Every tensor the full-size SD2.1 text encoder asks for exists in the real manifest with
/// the manifest's shape, and the model uses all of the manifest's parameters.
#[test]
fn sd2_1_structure_matches_manifest() {
    let manifest = read_json(&fixtures().join("sd2.1-configs/manifests/text_encoder.json"));
    let mut tensors = HashMap::new();
    let mut numel = 0usize;
    for t in manifest["tensors"].as_array().expect("tensor list") {
        let shape: Vec<usize> =
            t["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        numel += shape.iter().product::<usize>();
        // Zero pages are mapped lazily: 1.3 GB of zeros costs next to nothing.
        tensors.insert(t["name"].as_str().expect("name").to_string(), Tensor::zeros(&shape));
    }
    assert_eq!(numel as u64, manifest["total_parameters"].as_u64().expect("total_parameters"));
    let config = ClipTextConfig::from_file(
        &fixtures().join("sd2.1-configs/stable-diffusion-2-1/text_encoder/config.json"),
    )
    .expect("SD2.1 text encoder config");
    let n_tensors = tensors.len();
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("SD2.1 manifest", tensors)));
    let model = ClipTextModel::new(&vb, &config).expect("every tensor present with the manifest's shape");
    assert_eq!(model.config().num_hidden_layers, 23);
    // The model asks for 16 tensors per layer plus 2 embeddings and the final norm's 2, and the
    // manifest holds exactly those: nothing in the checkpoint is left unused.
    assert_eq!(n_tensors, 16 * config.num_hidden_layers + 4);
    assert_eq!(model.parameter_count(), numel);
}

#[test]
fn loads_transformers_4_names() {
    let vb = VarBuilder::new(Arc::new(prefixed_tiny_store()));
    let config = ClipTextConfig::from_file(&tiny_dir().join("text_encoder/config.json")).expect("config");
    ClipTextModel::new(&vb, &config).expect("text_model.-prefixed names resolve");
}

#[test]
fn missing_or_misshapen_tensors_are_clear_errors() {
    let store = ComponentStore::open(&tiny_dir().join("text_encoder")).expect("open");
    let mut tensors: HashMap<String, Tensor> =
        store.names().into_iter().map(|n| (n.clone(), store.tensor_f32(&n).expect("read"))).collect();
    let config = ClipTextConfig::from_file(&tiny_dir().join("text_encoder/config.json")).expect("config");

    let mut missing = tensors.clone();
    missing.remove("encoder.layers.3.mlp.fc2.bias");
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("broken", missing)));
    let err = ClipTextModel::new(&vb, &config).err().expect("must fail").to_string();
    assert!(err.contains("encoder.layers.3.mlp.fc2.bias") && err.contains("not found"), "{err}");

    tensors.insert("final_layer_norm.weight".into(), Tensor::zeros(&[31]));
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("broken", tensors)));
    let err = ClipTextModel::new(&vb, &config).err().expect("must fail").to_string();
    assert!(err.contains("final_layer_norm.weight") && err.contains("[31]"), "{err}");
}

#[test]
fn bad_token_ids_are_clear_errors() {
    let model = tiny_model();
    let err = model.forward(&[vec![49408u32; 77]]).unwrap_err().to_string();
    assert!(err.contains("token id 49408"), "{err}");
    let err = model.forward(&[vec![0u32; 78]]).unwrap_err().to_string();
    assert!(err.contains("sequence length 78"), "{err}");
    let err = model.forward(&[vec![0u32; 77], vec![0u32; 76]]).unwrap_err().to_string();
    assert!(err.contains("different lengths"), "{err}");
    let empty: [Vec<u32>; 0] = [];
    assert!(model.forward(&empty).is_err());
}

/// Prompt and negative-prompt embeddings vs diffusers (`text_encoder(ids)[0]`), f32.
#[test]
fn embeddings_match_diffusers() {
    let model = tiny_model();
    let tokenizer = ClipTokenizer::from_dir(&tiny_dir().join("tokenizer")).expect("tokenizer");
    let reference = read_json(&tiny_dir().join("reference/reference.json"));
    for (prompt_key, ids_name, embeds_name) in [
        ("prompt", "prompt_input_ids", "cond_embeds"),
        ("negative_prompt", "negative_input_ids", "uncond_embeds"),
    ] {
        let ids = tokenizer.encode(reference[prompt_key].as_str().expect("prompt"));
        assert_eq!(ids, reference_ids(ids_name));
        let (shape, want) = reference_tensor(embeds_name);
        let got = model.forward(&[&ids]).expect("forward");
        assert_eq!(got.shape(), shape.as_slice());
        let err = relative_error(&got.to_vec().expect("host copy"), &want);
        eprintln!("{embeds_name}: relative error {err:.3e}");
        assert!(err < 1e-5, "{embeds_name}: relative error {err:.3e}");
    }
}

/// The pipeline's CFG batch `[negative, prompt]` in one call gives each row's embedding, and
/// the `text_model.`-named store gives the same numbers.
#[test]
fn batched_and_prefixed_forward_match() {
    let (_, cond) = reference_tensor("cond_embeds");
    let (_, uncond) = reference_tensor("uncond_embeds");
    let batch = [reference_ids("negative_input_ids"), reference_ids("prompt_input_ids")];
    let want: Vec<f32> = uncond.iter().chain(&cond).copied().collect();

    let got = tiny_model().forward(&batch).expect("batched forward");
    assert_eq!(got.shape(), &[2, 77, 32]);
    let err = relative_error(&got.to_vec().expect("host copy"), &want);
    assert!(err < 1e-5, "batched: relative error {err:.3e}");

    let vb = VarBuilder::new(Arc::new(prefixed_tiny_store()));
    let config = ClipTextConfig::from_file(&tiny_dir().join("text_encoder/config.json")).expect("config");
    let prefixed = ClipTextModel::new(&vb, &config).expect("load").forward(&batch).expect("forward");
    let err = relative_error(&prefixed.to_vec().expect("host copy"), &want);
    assert!(err < 1e-5, "text_model. names: relative error {err:.3e}");
}

/// A text encoder converted by `sdsparse convert` (unstructured and 2:4) runs from its
/// compressed weights and gives the same embeddings as its `sdsparse export` dense copy.
#[test]
fn sparse_checkpoint_matches_its_dense_export() {
    use sdsparse::convert::{convert, export, ConvertOptions};
    use sdsparse::prune::Pattern;

    let ids = [reference_ids("negative_input_ids"), reference_ids("prompt_input_ids")];
    for pattern in [Pattern::Unstructured, Pattern::Sparse24] {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (sparse, dense) = (tmp.path().join("sparse"), tmp.path().join("dense"));
        let opts = ConvertOptions { pattern, ..ConvertOptions::default() };
        convert(&tiny_dir(), &sparse, &opts, &mut |_| {}).expect("convert");
        export(&sparse, &dense, false, &mut |_| {}).expect("export");

        let sparse_model = ClipTextModel::from_dir(&sparse.join("text_encoder")).expect("load sparse");
        let mut formats: Vec<&str> = sparse_model.linear_weights().map(|w| w.format_name()).collect();
        formats.dedup();
        let want_format = if pattern == Pattern::Sparse24 { "2:4" } else { "unstructured" };
        assert!(formats.contains(&want_format), "{pattern:?}: weights loaded as {formats:?}");
        let dense_model = ClipTextModel::from_dir(&dense.join("text_encoder")).expect("load dense export");
        assert!(dense_model.linear_weights().all(|w| w.format_name() == "dense"));

        let got = sparse_model.forward(&ids).expect("sparse forward").to_vec().expect("host");
        let want = dense_model.forward(&ids).expect("dense forward").to_vec().expect("host");
        let err = relative_error(&got, &want);
        assert!(err < 1e-6, "{pattern:?}: relative error {err:.3e} vs the dense export");
        // Pruning really changed the model.
        let (_, original) = reference_tensor("uncond_embeds");
        assert!(relative_error(&got[..original.len()], &original) > 1e-4, "{pattern:?}: nothing was pruned?");
    }
}
