//! Pruning: which layers are prunable, magnitude / random scores (Wanda / OWL scores and
//! the shared per-layer decisions in [`wanda`]), layer or global scope, unstructured or 2:4
//! patterns. Produces the masks and compressed weights `format/` stores.
//!
//! Every element gets a `u32` key that orders it (magnitude: the bits of `|w|` as f32,
//! which sort like the values; random: a seeded hash). A layer pruned to sparsity `s`
//! zeroes exactly `floor(s * numel)` elements: the smallest keys, ties broken by index
//! (lower index zeroed first). The cut is found by a two-pass radix select on the key
//! bits (no sort, no copy of the layer), which also gives global scope an exact
//! threshold over a whole component without holding all its keys in memory.

use crate::error::{Error, Result};
use crate::format::{bitmap_row_bytes, DType, HostData};
use std::sync::OnceLock;

pub mod wanda;

/// Sparsity pattern of a pruned layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Any `floor(s * numel)` elements may be zero.
    Unstructured,
    /// In each group of 4 consecutive weights along a row, 2 are zero.
    Sparse24,
}

/// How elements are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Smallest `|w|` first.
    Magnitude,
    /// Seeded random order (a baseline).
    Random,
    /// `|w| · ‖x_j‖` from calibration activations, compared within each output row
    /// (Sun et al. 2023); see [`wanda`].
    Wanda,
    /// Wanda with per-block sparsities from outlier ratios (Yin et al. 2024); see [`wanda`].
    Owl,
}

impl Method {
    /// Whether the method needs calibration activations ([`wanda::ActivationStats`]).
    pub fn needs_calibration(self) -> bool {
        matches!(self, Method::Wanda | Method::Owl)
    }
}

/// Where the target applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each layer reaches the target on its own.
    Layer,
    /// One threshold over all prunable layers of a component.
    Global,
}

impl std::str::FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "unstructured" => Ok(Pattern::Unstructured),
            "2:4" | "24" | "sparse24" => Ok(Pattern::Sparse24),
            _ => Err(Error::Invalid(format!("unknown pattern '{s}' (expected unstructured or 2:4)"))),
        }
    }
}
impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "magnitude" => Ok(Method::Magnitude),
            "random" => Ok(Method::Random),
            "wanda" => Ok(Method::Wanda),
            "owl" => Ok(Method::Owl),
            _ => Err(Error::Invalid(format!(
                "unknown method '{s}' (expected magnitude, random, wanda or owl)"
            ))),
        }
    }
}
impl std::str::FromStr for Scope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "layer" => Ok(Scope::Layer),
            "global" => Ok(Scope::Global),
            _ => Err(Error::Invalid(format!("unknown scope '{s}' (expected layer or global)"))),
        }
    }
}
impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Unstructured => "unstructured",
            Pattern::Sparse24 => "2:4",
        }
    }
}
impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Random => "random",
            Method::Wanda => "wanda",
            Method::Owl => "owl",
        }
    }
}
impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Layer => "layer",
            Scope::Global => "global",
        }
    }
}

/// The components a diffusers SD2 folder holds, by folder name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    TextEncoder,
    Unet,
    Vae,
    Other,
}

impl ComponentKind {
    pub fn from_folder(name: &str) -> Self {
        match name {
            "text_encoder" => ComponentKind::TextEncoder,
            "unet" => ComponentKind::Unet,
            "vae" => ComponentKind::Vae,
            _ => ComponentKind::Other,
        }
    }
}

/// A shell-style name pattern: `*` matches any run of characters (dots included), `?` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Glob(pattern.to_string())
    }
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with single-star backtracking (linear in practice).
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The weight of a `Linear` layer: a 2-D `*.weight` that is not an embedding table.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else { return false };
    let last = module.rsplit('.').next().unwrap_or(module);
    shape.len() == 2 && !last.ends_with("embedding") && !last.ends_with("embeddings")
}

/// The weight of a 2-D convolution: a 4-D `*.weight`.
pub fn is_conv_weight(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && shape.len() == 4
}

/// A text-encoder tensor inside the transformer layers (with or without `text_model.`).
fn in_text_encoder_layers(name: &str) -> bool {
    let n = name.strip_prefix("text_model.").unwrap_or(name);
    n.strip_prefix("encoder.layers.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(idx, _)| !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()))
}

/// Which tensors of a component get pruned.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Also prune the UNet's convolution weights.
    pub include_conv: bool,
    /// Tensors matching any of these are pruned too (biases, embeddings, ...).
    pub include: Vec<Glob>,
    /// Tensors matching any of these stay dense (wins over everything else).
    pub exclude: Vec<Glob>,
}

impl Selection {
    /// Whether tensor `name` of a component of `kind` is pruned. The VAE always stays
    /// dense; the text encoder's prunable default is its encoder layers' Linears; the
    /// UNet's every Linear (and its convolutions with `include_conv`).
    pub fn is_prunable(&self, kind: ComponentKind, name: &str, shape: &[usize]) -> bool {
        if !matches!(kind, ComponentKind::TextEncoder | ComponentKind::Unet) || shape.is_empty() {
            return false;
        }
        if self.exclude.iter().any(|g| g.matches(name)) {
            return false;
        }
        if self.include.iter().any(|g| g.matches(name)) {
            return true;
        }
        match kind {
            ComponentKind::TextEncoder => is_linear_weight(name, shape) && in_text_encoder_layers(name),
            ComponentKind::Unet => {
                is_linear_weight(name, shape) || (self.include_conv && is_conv_weight(name, shape))
            }
            _ => false,
        }
    }
}

/// Number of elements a layer of `numel` loses at sparsity `s`: `floor(s * numel)`.
pub fn prune_count(s: f64, numel: usize) -> usize {
    ((s * numel as f64).floor() as usize).min(numel)
}

/// f16 bit pattern (sign cleared) → f32 bit pattern, as a table (the magnitude key of f16).
fn f16_key_table() -> &'static [u32] {
    static TABLE: OnceLock<Vec<u32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..0x8000u16).map(|b| half::f16::from_bits(b).to_f32().to_bits()).collect())
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[inline]
fn random_key(base: u64, i: usize) -> u32 {
    (splitmix64(base.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 32) as u32
}

/// The ordering keys of a tensor, computed on the fly (no per-element buffer):
/// magnitude keys are the f32 bits of `|w|` read from the stored bytes (ordered like
/// `|w|`; NaN sorts above +inf, so it is never pruned by magnitude); random keys are a
/// hash of (seed, tensor name, index), so a layer's order does not depend on which other
/// layers are pruned.
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    /// Little-endian f32 values.
    F32(&'a [u8]),
    /// Little-endian f16 values.
    F16(&'a [u8]),
    /// Little-endian bf16 values.
    BF16(&'a [u8]),
    /// Seeded random keys for `n` elements.
    Random { base: u64, n: usize },
    /// Keys given explicitly.
    Slice(&'a [u32]),
}

impl<'a> Keys<'a> {
    /// Magnitude keys of values stored as `dtype` in `bytes`.
    pub fn magnitude(dtype: DType, bytes: &'a [u8]) -> Keys<'a> {
        match dtype {
            DType::F32 => Keys::F32(bytes),
            DType::F16 => Keys::F16(bytes),
            DType::BF16 => Keys::BF16(bytes),
        }
    }
    /// Random keys of tensor `name` with `n` elements.
    pub fn random(seed: u64, name: &str, n: usize) -> Keys<'static> {
        Keys::Random { base: splitmix64(seed ^ fnv1a(name)), n }
    }
    /// The keys of a tensor for a method. Wanda and OWL also need activations: here they
    /// get their weight-only part, `|w|` (callers with statistics use [`wanda::scores`]).
    pub fn new(method: Method, seed: u64, name: &str, dtype: DType, bytes: &'a [u8]) -> Keys<'a> {
        match method {
            Method::Magnitude | Method::Wanda | Method::Owl => Keys::magnitude(dtype, bytes),
            Method::Random => Keys::random(seed, name, bytes.len() / dtype.size_in_bytes()),
        }
    }
    pub fn len(&self) -> usize {
        match *self {
            Keys::F32(b) => b.len() / 4,
            Keys::F16(b) | Keys::BF16(b) => b.len() / 2,
            Keys::Random { n, .. } => n,
            Keys::Slice(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` with the keys of elements `start..end`, in order.
    #[inline]
    pub fn for_range(&self, start: usize, end: usize, mut f: impl FnMut(u32)) {
        match *self {
            Keys::F32(b) => b[4 * start..4 * end]
                .chunks_exact(4)
                .for_each(|c| f(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff)),
            Keys::F16(b) => {
                let t = f16_key_table();
                b[2 * start..2 * end]
                    .chunks_exact(2)
                    .for_each(|c| f(t[(u16::from_le_bytes([c[0], c[1]]) & 0x7fff) as usize]))
            }
            Keys::BF16(b) => b[2 * start..2 * end]
                .chunks_exact(2)
                .for_each(|c| f(((u16::from_le_bytes([c[0], c[1]]) & 0x7fff) as u32) << 16)),
            Keys::Random { base, .. } => (start..end).for_each(|i| f(random_key(base, i))),
            Keys::Slice(s) => s[start..end].iter().for_each(|&k| f(k)),
        }
    }
    /// Every key, in order.
    pub fn for_each(&self, f: impl FnMut(u32)) {
        self.for_range(0, self.len(), f)
    }
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len());
        self.for_each(|k| v.push(k));
        v
    }
}

/// Magnitude keys of a buffer, materialised.
pub fn magnitude_keys(values: &HostData) -> Vec<u32> {
    Keys::magnitude(values.dtype(), values.as_bytes()).to_vec()
}

/// Random keys, materialised.
pub fn random_keys(seed: u64, name: &str, n: usize) -> Vec<u32> {
    Keys::random(seed, name, n).to_vec()
}

/// The keys of a tensor for a method, materialised.
pub fn keys(method: Method, seed: u64, name: &str, values: &HostData) -> Vec<u32> {
    Keys::new(method, seed, name, values.dtype(), values.as_bytes()).to_vec()
}

/// Where a layer is cut: every element with `key < threshold` is pruned, plus the first
/// `ties` (by index) with `key == threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub threshold: u32,
    pub ties: usize,
}

/// Finds the cut that prunes exactly the `k` smallest of a sequence of key sets taken in
/// order (one set per layer for global scope; ties go to earlier sets, then lower
/// indices). `key_sets` is called once per pass and must yield the same keys each time.
/// Returns one cut per set and the number each prunes (`None` cuts when `k == 0`).
pub fn find_cuts<F>(n_sets: usize, k: usize, mut key_sets: F) -> Result<Vec<(Option<Cut>, usize)>>
where
    F: FnMut(&mut dyn FnMut(usize, Keys<'_>)) -> Result<()>,
{
    if k == 0 {
        return Ok(vec![(None, 0); n_sets]);
    }
    // Pass 1: histogram of the high 16 bits; find the bucket holding the k-th smallest.
    let mut hist = vec![0u64; 1 << 16];
    let mut total = 0usize;
    key_sets(&mut |_, keys| {
        total += keys.len();
        keys.for_each(|key| hist[(key >> 16) as usize] += 1);
    })?;
    if k > total {
        return Err(Error::Invalid(format!("cannot prune {k} of {total} elements")));
    }
    let target = (k - 1) as u64; // 0-based rank of the last pruned element
    let (hi, before_hi) = bucket_of(&hist, target);
    // Pass 2: histogram of the low 16 bits inside that bucket.
    hist.iter_mut().for_each(|h| *h = 0);
    key_sets(&mut |_, keys| {
        keys.for_each(|key| {
            if key >> 16 == hi as u32 {
                hist[(key & 0xffff) as usize] += 1;
            }
        })
    })?;
    let (lo, before_lo) = bucket_of(&hist, target - before_hi);
    let threshold = (hi as u32) << 16 | lo as u32;
    let ties_total = (target - before_hi - before_lo + 1) as usize;
    if n_sets == 1 {
        return Ok(vec![(Some(Cut { threshold, ties: ties_total }), k)]);
    }
    // Pass 3: per set, how many are below and at the threshold; ties go to earlier sets.
    let mut counts = vec![(0usize, 0usize); n_sets];
    key_sets(&mut |i, keys| {
        let (mut less, mut eq) = (0, 0);
        keys.for_each(|key| {
            less += (key < threshold) as usize;
            eq += (key == threshold) as usize;
        });
        counts[i].0 += less;
        counts[i].1 += eq;
    })?;
    let mut ties_left = ties_total;
    Ok(counts
        .into_iter()
        .map(|(less, eq)| {
            let ties = ties_left.min(eq);
            ties_left -= ties;
            (Some(Cut { threshold, ties }), less + ties)
        })
        .collect())
}

/// The bucket containing 0-based rank `target`, and the count before it.
fn bucket_of(hist: &[u64], target: u64) -> (usize, u64) {
    let mut before = 0u64;
    for (b, &h) in hist.iter().enumerate() {
        if before + h > target {
            return (b, before);
        }
        before += h;
    }
    (hist.len() - 1, before)
}

/// The cut of one layer that prunes its `k` smallest keys.
pub fn layer_cut<'a>(keys: impl Into<Keys<'a>>, k: usize) -> Result<Option<Cut>> {
    let keys = keys.into();
    let cuts = find_cuts(1, k, |f| {
        f(0, keys);
        Ok(())
    })?;
    Ok(cuts[0].0)
}

impl<'a> From<&'a [u32]> for Keys<'a> {
    fn from(s: &'a [u32]) -> Self {
        Keys::Slice(s)
    }
}
impl<'a> From<&'a Vec<u32>> for Keys<'a> {
    fn from(s: &'a Vec<u32>) -> Self {
        Keys::Slice(s)
    }
}

/// Keep bitmap (`[rows, ceil(cols/8)]`, LSB first) of an unstructured cut, and the number
/// of pruned elements.
pub fn unstructured_mask<'a>(
    keys: impl Into<Keys<'a>>,
    rows: usize,
    cols: usize,
    cut: Option<Cut>,
) -> (Vec<u8>, usize) {
    let keys = keys.into();
    let rb = bitmap_row_bytes(cols);
    let mut mask = vec![0u8; rows * rb];
    let Some(cut) = cut else {
        for r in 0..rows {
            for c in 0..cols {
                mask[r * rb + c / 8] |= 1 << (c % 8);
            }
        }
        return (mask, 0);
    };
    let mut ties = cut.ties;
    let mut pruned = 0;
    for (r, mrow) in mask.chunks_exact_mut(rb).enumerate() {
        let mut c = 0;
        keys.for_range(r * cols, (r + 1) * cols, |key| {
            let keep = key > cut.threshold || (key == cut.threshold && ties == 0);
            if key == cut.threshold && ties > 0 {
                ties -= 1;
            }
            mrow[c / 8] |= (keep as u8) << (c % 8);
            pruned += !keep as usize;
            c += 1;
        });
    }
    (mask, pruned)
}

/// Keep bitmap of the 2:4 pattern: in each group of 4 along a row, the 2 smallest keys
/// (ties: lower index) are pruned. Needs `cols % 4 == 0`.
pub fn sparse24_mask<'a>(keys: impl Into<Keys<'a>>, rows: usize, cols: usize) -> Vec<u8> {
    let keys = keys.into();
    debug_assert_eq!(cols % 4, 0);
    let rb = bitmap_row_bytes(cols);
    let mut mask = vec![0u8; rows * rb];
    let mut row = Vec::with_capacity(cols);
    for (r, mrow) in mask.chunks_exact_mut(rb).enumerate() {
        row.clear();
        keys.for_range(r * cols, (r + 1) * cols, |k| row.push(k));
        for (g, k) in row.chunks_exact(4).enumerate() {
            for j in 0..4 {
                // rank of (k[j], j) within the group; ranks 2 and 3 are kept
                let rank = (0..4).filter(|&i| (k[i], i) < (k[j], j)).count();
                if rank >= 2 {
                    let c = 4 * g + j;
                    mrow[c / 8] |= 1 << (c % 8);
                }
            }
        }
    }
    mask
}
