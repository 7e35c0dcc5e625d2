//! The CLIP tokenizer against transformers' CLIPTokenizer (the ids diffusers feeds SD2):
//! every case in `tests/fixtures/sd2-tokenizer/` and the tiny pipeline's reference ids.

use sdsparse::model::tokenizer::ClipTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sd2_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join("sd2-tokenizer")).expect("load the SD2 tokenizer fixture")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture")).expect("valid JSON")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("integer id") as u32).collect()
}

/// Checks every case of a fixture file and reports all mismatches at once.
fn check_cases(file: &str) {
    let tok = sd2_tokenizer();
    let cases = read_json(&fixtures().join("sd2-tokenizer").join(file));
    let cases = cases.as_array().expect("a list of cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want = ids_of(&case["input_ids"]);
        let got = tok.encode_with_info(prompt);
        let want_len = case["n_tokens_unpadded"].as_u64().expect("n_tokens_unpadded") as usize;
        let want_truncated = case["truncated"].as_bool().expect("truncated");
        if got.ids != want || got.n_tokens != want_len || got.truncated != want_truncated {
            failures.push(format!(
                "{prompt:?}\n  want {want:?} (len {want_len}, truncated {want_truncated})\n   got {:?} (len {}, truncated {})",
                got.ids, got.n_tokens, got.truncated
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn matches_transformers_on_every_reference_case() {
    check_cases("tokenizer_cases.json");
}

#[test]
fn follows_transformers_where_open_clip_differs() {
    check_cases("tokenizer_cases_divergence.json");
}

#[test]
fn special_tokens_come_from_the_files() {
    let tok = sd2_tokenizer();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (49406, 49407, 0, 77));
    assert_eq!(tok.vocab_size(), 49408);
}

#[test]
fn truncation_keeps_bos_first_75_tokens_and_eos() {
    let tok = sd2_tokenizer();
    let prompt = vec!["cat"; 100].join(" ");
    let cat = tok.tokenize("cat");
    assert_eq!(cat.len(), 1);
    let enc = tok.encode_with_info(&prompt);
    assert!(enc.truncated);
    assert_eq!(enc.n_tokens, 102);
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.ids[0], 49406);
    assert!(enc.ids[1..76].iter().all(|&id| id == cat[0]));
    assert_eq!(enc.ids[76], 49407);
    // Exactly 75 tokens fit without truncation.
    let fits = tok.encode_with_info(&vec!["cat"; 75].join(" "));
    assert!(!fits.truncated);
    assert_eq!(fits.ids, enc.ids);
}

#[test]
fn typed_special_tokens_map_to_their_ids() {
    let tok = sd2_tokenizer();
    // `tokenizers` matches the (normalized) special tokens inside the text.
    assert_eq!(tok.tokenize("a<|endoftext|>b"), vec![320, 49407, 321]);
    assert_eq!(tok.tokenize("<|startoftext|>"), vec![49406]);
}

#[test]
fn repeated_calls_use_the_cache_consistently() {
    let tok = sd2_tokenizer();
    let first = tok.encode("a photograph of an astronaut riding a horse");
    let second = tok.encode("a photograph of an astronaut riding a horse");
    assert_eq!(first, second);
}

#[test]
fn tiny_pipeline_reference_ids() {
    let reference = read_json(&fixtures().join("tiny-sd2-eps/reference/reference.json"));
    let tok = ClipTokenizer::from_dir(&fixtures().join("tiny-sd2-eps/tokenizer")).expect("load tokenizer");
    let prompt = reference["prompt"].as_str().expect("prompt");
    let negative = reference["negative_prompt"].as_str().expect("negative prompt");
    let tensors = &reference["tensors"];
    assert_eq!(tok.encode(prompt), ids_of(&tensors["prompt_input_ids"]["values"][0]));
    assert_eq!(tok.encode(negative), ids_of(&tensors["negative_input_ids"]["values"][0]));
}

#[test]
fn missing_folder_is_a_clear_error() {
    let err = ClipTokenizer::from_dir(Path::new("/nonexistent/tokenizer")).err().expect("must fail");
    assert!(err.to_string().contains("tokenizer folder not found"), "{err}");
}

/// Edge cases (NFC, odd whitespace, typed special tokens, control characters, seeded random
/// strings) with transformers' ids, made by `tools/make_tokenizer_cases.py`.
#[test]
fn matches_transformers_on_edge_cases() {
    let tok = sd2_tokenizer();
    let cases = read_json(&fixtures().join("tokenizer-extra/cases.json"));
    let cases = cases.as_array().expect("a list of cases");
    assert!(cases.len() > 100);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want = ids_of(&case["ids"]);
        let mut got = vec![tok.bos_id()];
        got.extend(tok.tokenize(prompt));
        got.push(tok.eos_id());
        if got != want {
            failures.push(format!("{prompt:?}\n  want {want:?}\n   got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn vocab_and_merges() -> (Value, String) {
    let dir = fixtures().join("sd2-tokenizer");
    let merges = std::fs::read_to_string(dir.join("merges.txt")).expect("merges");
    (read_json(&dir.join("vocab.json")), merges)
}

/// The original SD2 files disagree on the pad token; transformers lets
/// special_tokens_map.json win (sd2.1-configs/NOTES.md, point 9).
#[test]
fn special_tokens_map_overrides_tokenizer_config() {
    let (vocab, merges) = vocab_and_merges();
    let map = serde_json::json!({"pad_token": "!"});
    let config = serde_json::json!({"pad_token": "<|endoftext|>", "model_max_length": 77});
    let tok = ClipTokenizer::from_parts(&vocab, &merges, Some(&map), Some(&config)).expect("build");
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.tokenize("wow!"), vec![2781, 0]);

    // Without the map, tokenizer_config.json's pad token applies and "!" is ordinary text.
    let tok = ClipTokenizer::from_parts(&vocab, &merges, None, Some(&config)).expect("build");
    assert_eq!(tok.pad_id(), 49407);
    assert_eq!(tok.encode("a")[..4], [49406, 320, 49407, 49407]);
    assert_eq!(tok.tokenize("wow!").len(), 2);
    assert_ne!(tok.tokenize("wow!")[1], 0);

    // Neither file: CLIP's defaults (SD1-style padding with <|endoftext|>, length 77).
    let tok = ClipTokenizer::from_parts(&vocab, &merges, None, None).expect("build");
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (49406, 49407, 49407, 77));
}

#[test]
fn malformed_files_are_clear_errors() {
    let (vocab, merges) = vocab_and_merges();
    let bad_pad = serde_json::json!({"pad_token": "<|nope|>"});
    let err = ClipTokenizer::from_parts(&vocab, &merges, Some(&bad_pad), None).err().expect("must fail");
    assert!(err.to_string().contains("pad_token \"<|nope|>\" is not in vocab.json"), "{err}");
    let err =
        ClipTokenizer::from_parts(&vocab, "#version: 0.2\na b c\n", None, None).err().expect("must fail");
    assert!(err.to_string().contains("malformed line"), "{err}");
    let err =
        ClipTokenizer::from_parts(&vocab, "#version: 0.2\nzzzq qqqz\n", None, None).err().expect("must fail");
    assert!(err.to_string().contains("not in vocab.json"), "{err}");
    let err =
        ClipTokenizer::from_parts(&serde_json::json!([1, 2]), &merges, None, None).err().expect("must fail");
    assert!(err.to_string().contains("not a JSON object"), "{err}");
}
