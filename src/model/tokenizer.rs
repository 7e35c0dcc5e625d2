//! The CLIP BPE tokenizer as SD2 uses it (transformers' CLIPTokenizer behaviour).
//!
//! diffusers calls `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
//! transformers' CLIPTokenizer is backed by the `tokenizers` library, whose pipeline we
//! reproduce step by step:
//!
//! 1. Special ("added") tokens are split out first and map straight to their ids. SD2's pad
//!    token is "!" (id 0, `"normalized": false`), so every "!" in a prompt becomes id 0
//!    instead of being BPE-merged (diffusers#4153).
//! 2. Normalisation of the text between them: Unicode NFC, every whitespace run → one space,
//!    per-character lowercase. No ftfy and no HTML unescaping (that is open_clip, not
//!    transformers). Normalized special tokens (`<|startoftext|>`, `<|endoftext|>`) are then
//!    split out of the normalised text, so a typed `<|EndOfText|>` is id 49407.
//! 3. Pre-tokenisation by the CLIP regex (`'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`,
//!    whitespace dropped), then GPT-2 byte-to-unicode mapping of each piece. (transformers'
//!    ByteLevel step also splits by GPT-2's regex, which never cuts a CLIP piece further.)
//! 4. Byte-level BPE with `</w>` appended to the last symbol of each piece.
//! 5. `bos + first (max_length - 2) tokens + eos`, padded with the pad id to `max_length`.
//!
//! The special tokens come from `special_tokens_map.json` (which wins, as in transformers)
//! and `tokenizer_config.json`, with CLIP's defaults when neither names them.

use crate::error::{Error, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

/// The CLIP pre-tokenizer pattern (transformers' fast CLIPTokenizer `Split` pattern).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;
const CACHE_CAPACITY: usize = 10_000;

/// Token ids of one prompt as the text encoder receives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Exactly `max_length` ids: bos, tokens, eos, then pad.
    pub ids: Vec<u32>,
    /// Length of the whole prompt as ids (bos and eos included) before truncation and
    /// padding; more than `max_length` means the end of the prompt was dropped.
    pub n_tokens: usize,
    /// Whether tokens were dropped to fit `max_length`.
    pub truncated: bool,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// Merge of two adjacent token ids → (rank, merged id); lower ranks merge first.
    merges: HashMap<(u32, u32), (usize, u32)>,
    /// GPT-2's reversible byte → printable-char table.
    byte_chars: [char; 256],
    /// Special tokens matched in the raw text (`"normalized": false`, e.g. SD2's "!").
    raw_specials: SpecialTokens,
    /// Special tokens matched after normalisation (`"normalized": true`, e.g. `<|endoftext|>`,
    /// so a typed `<|ENDOFTEXT|>` matches too).
    normalized_specials: SpecialTokens,
    pre_tokenizer: Regex,
    whitespace: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
    /// BPE result per pre-tokenised piece; prompts repeat words a lot.
    cache: Mutex<HashMap<String, Vec<u32>>>,
    /// A folder with only `tokenizer.json` (transformers 5's format) is tokenized by the
    /// `tokenizers` library, the reference reader of that format; `None`: our BPE above.
    json: Option<Box<tokenizers::Tokenizer>>,
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the rest to
/// code points from 256 upwards, so every byte string becomes a printable string.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(code).expect("code points below 512 are valid chars");
    }
    table
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: invalid JSON ({e})", path.display())))
}

/// A token entry of a tokenizer JSON file, `"text"` or `{"content": "text", "normalized": b, ..}`,
/// as (content, matched after normalisation). transformers makes a plain-string special token
/// a non-normalized one, as `tokenizers` does for a missing flag.
fn token_entry(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            Some((content, o.get("normalized").and_then(|n| n.as_bool()).unwrap_or(false)))
        }
        _ => None,
    }
}

/// A piece of text after special tokens were split out.
enum Segment<'a> {
    Text(&'a str),
    Special(u32),
}

/// Special tokens split out of the text before BPE, each mapping straight to its id.
struct SpecialTokens {
    /// The escaped tokens, longest first, so that leftmost-first alternation finds the
    /// leftmost-longest token as `tokenizers` does.
    pattern: Option<Regex>,
    ids: HashMap<String, u32>,
}

impl SpecialTokens {
    fn new(ids: HashMap<String, u32>) -> Result<Self> {
        let mut tokens: Vec<&String> = ids.keys().filter(|t| !t.is_empty()).collect();
        tokens.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        let pattern = if tokens.is_empty() {
            None
        } else {
            let alternatives: Vec<String> = tokens.iter().map(|t| regex::escape(t)).collect();
            Some(
                Regex::new(&alternatives.join("|"))
                    .map_err(|e| Error::Checkpoint(format!("special tokens: {e}")))?,
            )
        };
        Ok(SpecialTokens { pattern, ids })
    }

    fn split<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let Some(pattern) = &self.pattern else { return vec![Segment::Text(text)] };
        let mut out = Vec::new();
        let mut start = 0;
        for m in pattern.find_iter(text) {
            if m.start() > start {
                out.push(Segment::Text(&text[start..m.start()]));
            }
            out.push(Segment::Special(self.ids[m.as_str()]));
            start = m.end();
        }
        if start < text.len() {
            out.push(Segment::Text(&text[start..]));
        }
        out
    }
}

/// transformers' CLIP normaliser: NFC, whitespace runs → one space, lowercase per character
/// (as `tokenizers` does, so a final 'Σ' becomes 'σ', not 'ς').
fn normalize(text: &str, whitespace: &Regex) -> String {
    let nfc: String = text.nfc().collect();
    whitespace.replace_all(&nfc, " ").chars().flat_map(char::to_lowercase).collect()
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json`, `merges.txt` and, when present,
    /// `special_tokens_map.json` and `tokenizer_config.json`; or, in a folder saved by
    /// transformers 5 (no `vocab.json` / `merges.txt`), `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if dir.is_dir() && !dir.join("vocab.json").is_file() && dir.join("tokenizer.json").is_file() {
            return Self::from_tokenizer_json(dir);
        }
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!("{}: tokenizer folder not found", dir.display())));
        }
        let optional = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if p.is_file() {
                read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = read_json(&vocab_path)?;
        let merges = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
        Self::from_parts(
            &vocab,
            &merges,
            optional("special_tokens_map.json")?.as_ref(),
            optional("tokenizer_config.json")?.as_ref(),
        )
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", dir.display())))
    }

    /// A `tokenizer/` folder with `tokenizer.json` (a byte-level BPE model, as transformers
    /// saves CLIP's): the `tokenizers` library tokenizes; the vocabulary, merges and special
    /// tokens are read from the same file and `tokenizer_config.json` for the ids around the
    /// tokens (bos, eos, pad) and the checks [`ClipTokenizer::from_parts`] makes.
    fn from_tokenizer_json(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bad = |why: String| Error::Checkpoint(format!("{}: {why}", path.display()));
        let json = read_json(&path)?;
        let model = json.get("model").ok_or_else(|| bad("no \"model\"".into()))?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err(bad("not a BPE tokenizer (SD2 uses CLIP's byte-level BPE)".into()));
        }
        let vocab = model.get("vocab").ok_or_else(|| bad("no model.vocab".into()))?;
        let merges =
            model.get("merges").and_then(Value::as_array).ok_or_else(|| bad("no model.merges".into()))?;
        // Merges are "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs.
        let mut merges_txt = String::new();
        for m in merges {
            let line = match m {
                Value::String(s) => s.clone(),
                Value::Array(p) if p.len() == 2 => {
                    format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())
                }
                other => return Err(bad(format!("malformed merge {other}"))),
            };
            merges_txt += &line;
            merges_txt.push('\n');
        }
        let optional = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if p.is_file() {
                read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut tok = Self::from_parts(
            vocab,
            &merges_txt,
            optional("special_tokens_map.json")?.as_ref(),
            optional("tokenizer_config.json")?.as_ref(),
        )
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", dir.display())))?;
        let reader = tokenizers::Tokenizer::from_file(&path).map_err(|e| bad(e.to_string()))?;
        tok.json = Some(Box::new(reader));
        Ok(tok)
    }

    /// Whether this tokenizer was read from `tokenizer.json` (and tokenizes with the
    /// `tokenizers` library).
    pub fn is_tokenizer_json(&self) -> bool {
        self.json.is_some()
    }

    /// Builds the tokenizer from parsed `vocab.json`, the text of `merges.txt`, and the
    /// optional special-token files.
    pub fn from_parts(
        vocab_json: &Value,
        merges_txt: &str,
        special_tokens_map: Option<&Value>,
        tokenizer_config: Option<&Value>,
    ) -> Result<Self> {
        let obj = vocab_json
            .as_object()
            .ok_or_else(|| Error::Checkpoint("vocab.json is not a JSON object".into()))?;
        let mut vocab = HashMap::with_capacity(obj.len());
        for (token, id) in obj {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| Error::Checkpoint(format!("vocab.json: token {token:?} has no integer id")))?;
            vocab.insert(token.clone(), id);
        }

        let mut merges = HashMap::new();
        let merge_lines = merges_txt.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty());
        for (rank, line) in merge_lines.enumerate() {
            let mut parts = line.split(' ');
            let (a, b) = match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => (a, b),
                _ => return Err(Error::Checkpoint(format!("merges.txt: malformed line {line:?}"))),
            };
            let lookup = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "merges.txt: merge {line:?} uses {t:?}, which is not in vocab.json"
                    ))
                })
            };
            let merged = lookup(&format!("{a}{b}"))?;
            merges.entry((lookup(a)?, lookup(b)?)).or_insert((rank, merged));
        }

        // transformers lets special_tokens_map.json override tokenizer_config.json.
        let special = |key: &str| -> Option<(String, bool)> {
            special_tokens_map
                .and_then(|m| m.get(key))
                .and_then(token_entry)
                .or_else(|| tokenizer_config.and_then(|c| c.get(key)).and_then(token_entry))
        };
        let default = |token: &str| (token.to_string(), true);
        let bos = special("bos_token").unwrap_or_else(|| default(DEFAULT_BOS));
        let eos = special("eos_token").unwrap_or_else(|| default(DEFAULT_EOS));
        let unk = special("unk_token").unwrap_or_else(|| default(DEFAULT_EOS));
        let pad = special("pad_token").unwrap_or_else(|| default(DEFAULT_EOS));
        let id_of = |role: &str, token: &str| -> Result<u32> {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| Error::Checkpoint(format!("{role} {token:?} is not in vocab.json")))
        };
        let bos_id = id_of("bos_token", &bos.0)?;
        let eos_id = id_of("eos_token", &eos.0)?;
        let pad_id = id_of("pad_token", &pad.0)?;
        let unk_id = id_of("unk_token", &unk.0)?;

        let mut specials = vec![(bos, bos_id), (eos, eos_id), (unk, unk_id), (pad, pad_id)];
        // Tokens added on top of the vocabulary (newer tokenizer_config.json files list them).
        if let Some(added) =
            tokenizer_config.and_then(|c| c.get("added_tokens_decoder")).and_then(|a| a.as_object())
        {
            for (id, tok) in added {
                if let (Ok(id), Some(entry)) = (id.parse::<u32>(), token_entry(tok)) {
                    specials.push((entry, id));
                }
            }
        }
        let whitespace = Regex::new(r"\s+").expect("valid regex");
        let (mut raw, mut normalized) = (HashMap::new(), HashMap::new());
        for ((content, is_normalized), id) in specials {
            // The first spelling of a token wins (bos/eos/unk/pad before added tokens).
            if raw.contains_key(&content) || normalized.contains_key(&normalize(&content, &whitespace)) {
                continue;
            }
            if is_normalized {
                normalized.insert(normalize(&content, &whitespace), id);
            } else {
                raw.insert(content, id);
            }
        }

        let max_length = tokenizer_config
            .and_then(|c| c.get("model_max_length"))
            .and_then(|m| m.as_u64())
            .map(|m| m as usize)
            .filter(|&m| (2..=DEFAULT_MAX_LENGTH * 1024).contains(&m))
            .unwrap_or(DEFAULT_MAX_LENGTH);

        Ok(ClipTokenizer {
            vocab,
            merges,
            byte_chars: byte_to_char_table(),
            raw_specials: SpecialTokens::new(raw)?,
            normalized_specials: SpecialTokens::new(normalized)?,
            pre_tokenizer: Regex::new(CLIP_PATTERN).expect("the CLIP pattern is a valid regex"),
            whitespace,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_length,
            cache: Mutex::new(HashMap::new()),
            json: None,
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// The text encoder's sequence length (77 for every SD2 checkpoint).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The token ids of `text` without bos/eos, untruncated.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        if let Some(json) = &self.json {
            // Without special tokens: bos / eos / truncation / padding are ours, as for the
            // BPE path. Should the library fail, our BPE over the same vocabulary and merges
            // (checked equal on every test case) answers instead.
            if let Ok(e) = json.encode(text, false) {
                return e.get_ids().to_vec();
            }
        }
        let mut ids = Vec::new();
        for raw in self.raw_specials.split(text) {
            let raw = match raw {
                Segment::Special(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(t) => t,
            };
            let normalized = normalize(raw, &self.whitespace);
            for segment in self.normalized_specials.split(&normalized) {
                match segment {
                    Segment::Special(id) => ids.push(id),
                    Segment::Text(t) => {
                        for piece in self.pre_tokenizer.find_iter(t) {
                            let mapped: String =
                                piece.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                            self.bpe_cached(&mapped, &mut ids);
                        }
                    }
                }
            }
        }
        ids
    }

    /// What diffusers feeds the text encoder: `bos + tokens[..max_length-2] + eos`, padded
    /// with the pad id to `max_length`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with_info(text).ids
    }

    /// [`encode`](Self::encode) plus the prompt's full length and whether it was truncated.
    pub fn encode_with_info(&self, text: &str) -> Encoding {
        let tokens = self.tokenize(text);
        let room = self.max_length - 2;
        let truncated = tokens.len() > room;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..tokens.len().min(room)]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Encoding { ids, n_tokens: tokens.len() + 2, truncated }
    }

    fn bpe_cached(&self, word: &str, ids: &mut Vec<u32>) {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(hit) = cache.get(word) {
            ids.extend_from_slice(hit);
            return;
        }
        let word_ids = self.bpe(word);
        ids.extend_from_slice(&word_ids);
        // Bounded, so a long-running process fed arbitrary text does not grow without limit.
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(word.to_string(), word_ids);
    }

    /// Byte-level BPE of one piece: start from its characters (the last one carrying
    /// `</w>`; a character outside the vocabulary is the unknown token) and repeatedly merge
    /// the adjacent pair with the lowest rank, every occurrence left to right, until no
    /// adjacent pair is in the merge table.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let n_chars = word.chars().count();
        let mut symbols: Vec<u32> = word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let token = if i + 1 == n_chars { format!("{c}{END_OF_WORD}") } else { c.to_string() };
                self.vocab.get(&token).copied().unwrap_or(self.unk_id)
            })
            .collect();
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|p| {
                    self.merges.get(&(p[0], p[1])).map(|&(rank, merged)| (rank, p[0], p[1], merged))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, first, second, merged_id)) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(merged_id);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}
