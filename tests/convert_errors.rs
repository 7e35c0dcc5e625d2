//! Every bad input of `sdsparse convert` / `export` / `inspect` ends as one clear line on
//! stderr, a non-zero exit, no panic, and no output folder (not even a partial one).

mod format_util;

use format_util::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Runs the binary and checks the failure contract; returns stderr.
fn expect_failure(args: &[&str], out: &Path, needle: &str) -> String {
    let (code, _, err) = run_bin(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!out.exists(), "no output folder may be left: {}", out.display());
    if let Some(parent) = out.parent() {
        for e in std::fs::read_dir(parent).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            assert!(!n.contains("sdsparse-tmp"), "temporary folder left behind: {n}");
        }
    }
    err
}

fn convert_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["convert", "--model", model, "--out", out, "-q"];
    v.extend_from_slice(extra);
    v
}

fn broken_copy() -> (tempfile::TempDir, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture(), &model);
    let out = tmp.path().join("out");
    (tmp, model.display().to_string(), out.display().to_string())
}

#[test]
fn missing_component_folder() {
    let (_t, model, out) = broken_copy();
    std::fs::remove_dir_all(Path::new(&model).join("unet")).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "component folder not found");
}

#[test]
fn not_a_diffusers_folder() {
    let (_t, model, out) = broken_copy();
    std::fs::remove_file(Path::new(&model).join("model_index.json")).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "model_index.json");
}

fn edit_unet(model: &str, f: impl FnOnce(&mut BTreeMap<String, Raw>)) {
    let path = weight_file(Path::new(model), "unet");
    let (mut t, meta) = read_file(&path);
    f(&mut t);
    write_file(&path, &t, meta);
}

#[test]
fn missing_tensor() {
    let (_t, model, out) = broken_copy();
    edit_unet(&model, |t| {
        t.remove("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight");
    });
    expect_failure(
        &convert_args(&model, &out, &[]),
        Path::new(&out),
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight is missing",
    );
}

#[test]
fn wrong_shape() {
    let (_t, model, out) = broken_copy();
    edit_unet(&model, |t| {
        t.get_mut("time_embedding.linear_1.weight").unwrap().shape = vec![32, 128];
    });
    expect_failure(
        &convert_args(&model, &out, &[]),
        Path::new(&out),
        "time_embedding.linear_1.weight has shape [32, 128]",
    );
}

#[test]
fn truncated_safetensors() {
    let (_t, model, out) = broken_copy();
    let path = weight_file(Path::new(&model), "unet");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1000).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "not a valid safetensors file");
}

#[test]
fn corrupt_safetensors_header() {
    let (_t, model, out) = broken_copy();
    let path = weight_file(Path::new(&model), "text_encoder");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, bytes).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "not a valid safetensors file");
}

#[test]
fn tiny_file_and_absurd_header_length() {
    let (_t, model, out) = broken_copy();
    let path = weight_file(Path::new(&model), "vae");
    std::fs::write(&path, [0xffu8; 12]).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "not a valid safetensors file");
}

#[test]
fn header_lies_about_offsets() {
    let (_t, model, out) = broken_copy();
    let path = weight_file(Path::new(&model), "unet");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Claim that conv_in.bias ends 16 bytes later than it does (same header length).
    let mut v: serde_json::Value = serde_json::from_str(header).unwrap();
    let offs = v["conv_in.bias"]["data_offsets"].as_array().unwrap().clone();
    let end = offs[1].as_u64().unwrap();
    v["conv_in.bias"]["data_offsets"] = serde_json::json!([offs[0], end + 16]);
    let mut new = serde_json::to_vec(&v).unwrap();
    assert!(new.len() <= n);
    new.resize(n, b' ');
    let mut out_bytes = bytes[..8].to_vec();
    out_bytes.extend(new);
    out_bytes.extend(&bytes[8 + n..]);
    std::fs::write(&path, out_bytes).unwrap();
    expect_failure(&convert_args(&model, &out, &[]), Path::new(&out), "not a valid safetensors file");
}

#[test]
fn sparsity_outside_unit_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (m, o) = (fixture().display().to_string(), out.display().to_string());
    for bad in
        ["--unet-sparsity=1", "--unet-sparsity=1.5", "--text-encoder-sparsity=-0.1", "--unet-sparsity=NaN"]
    {
        expect_failure(&convert_args(&m, &o, &[bad]), &out, "outside [0, 1)");
    }
}

#[test]
fn sparse24_target_other_than_half() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (m, o) = (fixture().display().to_string(), out.display().to_string());
    let err = expect_failure(
        &convert_args(&m, &o, &["--pattern", "2:4", "--unet-sparsity", "0.35"]),
        &out,
        "--unet-sparsity 0.35 cannot be used with the 2:4 pattern",
    );
    assert!(err.contains("50%"));
    expect_failure(&convert_args(&m, &o, &["--pattern", "3:4"]), &out, "unknown pattern");
    expect_failure(&convert_args(&m, &o, &["--dtype", "f8"]), &out, "unknown dtype");
}

#[test]
fn output_exists_unless_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let (m, o) = (fixture().display().to_string(), out.display().to_string());
    let (code, _, err) = run_bin(&convert_args(&m, &o, &[]));
    assert_eq!(code, 1);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert!(out.join("keep.txt").exists(), "existing output untouched");
    // --force replaces only a model folder (or an empty one): not a folder of other work, not a file.
    let (code, _, err) = run_bin(&convert_args(&m, &o, &["--force"]));
    assert_eq!(code, 1);
    assert!(err.contains("is not a model folder"), "{err}");
    assert!(out.join("keep.txt").exists(), "--force must not delete other work");
    let file = tmp.path().join("picture.png");
    std::fs::write(&file, "png").unwrap();
    let (code, _, err) = run_bin(&convert_args(&m, &file.display().to_string(), &["--force"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"png");
    // An earlier output (a model folder) is replaced.
    std::fs::write(out.join("model_index.json"), "{}").unwrap();
    let (code, stdout, err) = run_bin(&convert_args(&m, &o, &["--force"]));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("text_encoder") && stdout.contains("x of dense"), "{stdout}");
    assert!(!out.join("keep.txt").exists() && out.join("sdsparse.json").exists());
}

#[test]
fn output_inside_input_is_refused() {
    let (_t, model, _) = broken_copy();
    let inside = Path::new(&model).join("sparse");
    expect_failure(
        &convert_args(&model, &inside.display().to_string(), &[]),
        &inside,
        "must not be the input",
    );
}

#[test]
fn input_is_never_modified() {
    let (_t, model, out) = broken_copy();
    let snapshot = |dir: &Path| {
        let mut v = Vec::new();
        for c in ["text_encoder", "unet", "vae"] {
            v.push(std::fs::read(weight_file(dir, c)).unwrap());
        }
        v
    };
    let before = snapshot(Path::new(&model));
    let (code, _, err) = run_bin(&convert_args(&model, &out, &["--include-conv"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(before, snapshot(Path::new(&model)));
}

#[test]
fn corrupt_sparse_checkpoint_fails_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let sparse = tmp.path().join("sparse");
    let (m, s) = (fixture().display().to_string(), sparse.display().to_string());
    assert_eq!(run_bin(&convert_args(&m, &s, &[])).0, 0);
    // Flip one byte inside a compressed tensor's values.
    let path = weight_file(&sparse, "unet");
    let (t, _) = read_file(&path);
    let target = t.keys().find(|k| k.ends_with(".bitmap.values")).unwrap().clone();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = v[&target]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bytes = bytes;
    bytes[8 + n + start] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let out = tmp.path().join("dense");
    let o = out.display().to_string();
    expect_failure(&["export", "--model", &s, "--out", &o, "-q"], &out, "checksum mismatch");
    // A dense folder is not a sparse one.
    let out2 = tmp.path().join("again");
    expect_failure(
        &convert_args(&s, &out2.display().to_string(), &[]),
        &out2,
        "already an sdsparse checkpoint",
    );
}

#[test]
fn inspect_reports_dense_and_sparse_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let sparse = tmp.path().join("sparse");
    let (m, s) = (fixture().display().to_string(), sparse.display().to_string());
    assert_eq!(run_bin(&convert_args(&m, &s, &["--pattern", "2:4"])).0, 0);
    let (code, out, err) = run_bin(&["inspect", &m]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("== unet [dense]") && out.contains("conv_in.weight"), "{out}");
    let (code, out, err) = run_bin(&["inspect", &s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sparse (format v1"), "{out}");
    assert!(out.contains("2:4") && out.contains("50.00%"), "{out}");
    assert!(out.contains("kept dense: input dimension 37"), "{out}");
    let (code, out, _) = run_bin(&["inspect", &sparse.join("unet").display().to_string(), "--summary"]);
    assert_eq!(code, 0);
    assert!(out.contains("== unet"));
    let missing = tmp.path().join("nope");
    let (code, _, err) = run_bin(&["inspect", &missing.display().to_string()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
}
