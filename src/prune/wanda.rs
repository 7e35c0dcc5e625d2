//! Activation-aware pruning: Wanda (Sun et al. 2023, arXiv:2306.11695) and OWL (Yin et al.
//! 2024, arXiv:2310.05175), plus the per-layer decisions every method shares when a whole
//! component is pruned in one go (layer or global scope, unstructured or 2:4).
//!
//! - Wanda scores weight `W_ij` of a Linear layer `y = x·Wᵀ` by `|W_ij| · ‖X_j‖`, where `X_j`
//!   is input feature `j` over the calibration tokens, and prunes the lowest scores of each
//!   output row (2:4: the 2 lowest of each group of 4). We use the RMS over the `T` tokens the
//!   layer saw, `sqrt(Σ_t X_tj² / T)`, instead of the plain 2-norm: a per-layer constant, so
//!   every per-row choice is the paper's, while scores of layers that saw different numbers
//!   of tokens (UNet levels, cross-attention keys) stay comparable for global scope and OWL.
//! - OWL gives each layer group `l` (a transformer block, as in the official code) the
//!   outlier ratio `D_l` = share of its Wanda scores above `M ×` the group's mean score, maps
//!   the ratios linearly onto `[0, 2λ]`, centres them on the target and prunes group `l` at
//!   `S_l = S + mean(D') − D'_l` (more outliers → less pruning), Wanda within each layer.
//!   See `docs/PRUNING.md` for the exact formula and where we differ from the official code.
//!
//! The activation statistics come from `crate::calibrate`; this module only sees numbers.

use super::{find_cuts, layer_cut, sparse24_mask, unstructured_mask, Cut, Keys, Method, Pattern, Scope};
use crate::error::{Error, Result};
use crate::format::bitmap_row_bytes;
use std::collections::BTreeMap;

/// Per-input-feature sums of squares of one Linear layer's inputs over calibration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureStats {
    /// `Σ_t X_tj²` for each input feature `j` (accumulated in f64).
    pub sum_sq: Vec<f64>,
    /// Number of token rows `T` seen.
    pub tokens: u64,
}

impl FeatureStats {
    pub fn new(features: usize) -> Self {
        FeatureStats { sum_sq: vec![0.0; features], tokens: 0 }
    }

    /// Adds token rows `x` (row-major, `features` values each).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let n = self.sum_sq.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(Error::Shape(format!("{} values are not rows of {n} features", x.len())));
        }
        for row in x.chunks_exact(n) {
            for (s, &v) in self.sum_sq.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
        }
        self.tokens += (x.len() / n) as u64;
        Ok(())
    }

    /// `sqrt(Σ_t X_tj² / T)` per feature, as f32 (the factor Wanda multiplies `|W_ij|` by).
    pub fn rms(&self) -> Vec<f32> {
        let t = self.tokens.max(1) as f64;
        self.sum_sq.iter().map(|&s| (s / t).sqrt() as f32).collect()
    }
}

/// Statistics of every observed Linear layer of one component, by weight name.
pub type ActivationStats = BTreeMap<String, FeatureStats>;

/// The statistics of weight `name`, also under the name without transformers 4's
/// `text_model.` prefix (checkpoints may use either; the model uses the short one).
pub fn lookup<'a>(stats: &'a ActivationStats, name: &str) -> Option<&'a FeatureStats> {
    stats.get(name).or_else(|| name.strip_prefix("text_model.").and_then(|n| stats.get(n)))
}

/// Wanda scores `|W_ij| · rms_j` of a row-major `[rows, cols]` weight (f32, like the
/// reference implementations).
pub fn scores(values: &[f32], cols: usize, rms: &[f32]) -> Vec<f32> {
    debug_assert_eq!(rms.len(), cols);
    values.chunks_exact(cols).flat_map(|row| row.iter().zip(rms).map(|(&w, &r)| w.abs() * r)).collect()
}

/// Ordering keys of non-negative f32 scores: their bits (which sort like the values; NaN
/// sorts above +inf, so it is never pruned).
pub fn score_keys(scores: &[f32]) -> Vec<u32> {
    scores.iter().map(|s| s.to_bits() & 0x7fff_ffff).collect()
}

/// Keep bitmap (`[rows, ceil(cols/8)]`, LSB first) that prunes the `per_row` smallest keys
/// of every row (ties: lower index first), and the number pruned.
pub fn rowwise_mask(keys: &[u32], rows: usize, cols: usize, per_row: usize) -> (Vec<u8>, usize) {
    let rb = bitmap_row_bytes(cols);
    let mut mask = vec![0u8; rows * rb];
    let per_row = per_row.min(cols);
    let mut order: Vec<(u32, u32)> = Vec::with_capacity(cols);
    for (r, mrow) in mask.chunks_exact_mut(rb).enumerate() {
        for c in 0..cols {
            mrow[c / 8] |= 1 << (c % 8);
        }
        if per_row == 0 {
            continue;
        }
        order.clear();
        order.extend(keys[r * cols..(r + 1) * cols].iter().enumerate().map(|(c, &k)| (k, c as u32)));
        // (key, index) pairs are distinct, so the first `per_row` after selection are exactly
        // the smallest keys with ties going to lower indices.
        if per_row < cols {
            order.select_nth_unstable(per_row - 1);
        }
        for &(_, c) in &order[..per_row] {
            let c = c as usize;
            mrow[c / 8] &= !(1 << (c % 8));
        }
    }
    (mask, rows * per_row)
}

/// OWL's hyper-parameters (the paper's defaults: `M = 5`, `λ = 0.08`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OwlParams {
    /// A score is an outlier when above `m ×` its group's mean score.
    pub m: f64,
    /// Group sparsities spread over at most `2λ` around the target.
    pub lambda: f64,
}

impl Default for OwlParams {
    fn default() -> Self {
        OwlParams { m: 5.0, lambda: 0.08 }
    }
}

impl OwlParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.m.is_finite() && self.m > 0.0) {
            return Err(Error::Invalid(format!("--owl-m {} must be a positive number", self.m)));
        }
        if !(self.lambda.is_finite() && (0.0..0.5).contains(&self.lambda)) {
            return Err(Error::Invalid(format!("--owl-lambda {} must be in [0, 0.5)", self.lambda)));
        }
        Ok(())
    }
}

/// The OWL group of a weight: the transformer block it belongs to (the name up to
/// `layers.N` or `transformer_blocks.N`, as the official code's decoder layers), else the
/// layer itself (UNet time embedding, resnet `time_emb_proj`, `proj_in` / `proj_out`).
pub fn owl_group(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 0..parts.len().saturating_sub(1) {
        let numeric = !parts[i + 1].is_empty() && parts[i + 1].bytes().all(|b| b.is_ascii_digit());
        if (parts[i] == "layers" || parts[i] == "transformer_blocks") && numeric {
            return parts[..i + 2].join(".");
        }
    }
    name.strip_suffix(".weight").unwrap_or(name).to_string()
}

/// OWL's per-group sparsities from outlier ratios `ratios` (any unit: they are min-max
/// normalised) and group sizes `params`: `D' = (D − min D) / (max D − min D) · 2λ`, then
/// `S_l = S + mean_w(D') − D'_l` with `mean_w` weighted by group size, so the component's
/// parameter-weighted sparsity stays `target` (the official code takes the plain mean,
/// which is the same for its equal-sized blocks). Equal ratios give every group `target`.
/// Results are clamped to `[0, 0.99]`.
pub fn owl_sparsities(ratios: &[f64], params: &[usize], target: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &r| (a.min(r), b.max(r)));
    if ratios.is_empty() || hi <= lo {
        return vec![target; ratios.len()];
    }
    let d: Vec<f64> = ratios.iter().map(|&r| (r - lo) / (hi - lo) * 2.0 * lambda).collect();
    let total: f64 = params.iter().map(|&p| p as f64).sum();
    let mean = d.iter().zip(params).map(|(&x, &p)| x * p as f64).sum::<f64>() / total.max(1.0);
    d.iter().map(|&x| (target + mean - x).clamp(0.0, 0.99)).collect()
}

/// One prunable matrix `[rows, cols]` as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

impl Layer {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// How one layer's keys become a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 2 of each 4 along a row (the 2 smallest keys).
    Sparse24,
    /// The `n` smallest keys of every row (Wanda's per-output comparison).
    PerRow(usize),
    /// An exact cut (layer scope of magnitude / random, or global scope).
    Cut(Option<Cut>),
}

/// The decision for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub rule: Rule,
    /// The layer's (or its OWL group's) target sparsity.
    pub target: f64,
    /// Elements the rule prunes.
    pub pruned: usize,
}

/// One OWL group: its outlier ratio and the sparsity it was given.
#[derive(Debug, Clone, PartialEq)]
pub struct OwlGroup {
    pub name: String,
    pub params: usize,
    /// Share (0..1) of the group's scores above `M ×` their mean.
    pub outlier_ratio: f64,
    pub sparsity: f64,
}

/// What a whole-component pruning asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    pub method: Method,
    pub pattern: Pattern,
    pub scope: Scope,
    /// Target sparsity (ignored by 2:4, which is exactly 0.5).
    pub sparsity: f64,
    pub owl: OwlParams,
}

/// Decides how every layer of a component is cut. `keys_of(i)` returns layer `i`'s keys
/// (magnitude bits, random keys, or [`score_keys`] of Wanda scores for wanda / owl); it may
/// be called more than once per layer and must return the same keys each time. Layers must
/// suit the pattern (2:4: `cols % 4 == 0`). Returns the decisions and, for OWL with the
/// unstructured pattern, its groups.
pub fn decide(
    layers: &[Layer],
    spec: &Spec,
    keys_of: &mut dyn FnMut(usize) -> Result<Vec<u32>>,
) -> Result<(Vec<Decision>, Vec<OwlGroup>)> {
    let s = spec.sparsity;
    if spec.pattern == Pattern::Sparse24 {
        // 2:4 is 50% in every layer: scope and OWL's allocation have nothing to choose.
        let d = layers
            .iter()
            .map(|l| Decision { rule: Rule::Sparse24, target: 0.5, pruned: l.numel() / 2 })
            .collect();
        return Ok((d, Vec::new()));
    }
    let activation_aware = matches!(spec.method, Method::Wanda | Method::Owl);
    // Per-layer target: OWL's group sparsity, else the component target.
    let mut groups = Vec::new();
    let mut group_of = vec![0usize; layers.len()];
    let mut targets = vec![s; layers.len()];
    if spec.method == Method::Owl {
        spec.owl.validate()?;
        let mut names: Vec<String> = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let g = owl_group(&l.name);
            group_of[i] = match names.iter().position(|n| *n == g) {
                Some(p) => p,
                None => {
                    names.push(g);
                    names.len() - 1
                }
            };
        }
        let n = names.len();
        let (mut sum, mut count) = (vec![0f64; n], vec![0usize; n]);
        for i in 0..layers.len() {
            for k in keys_of(i)? {
                sum[group_of[i]] += f32::from_bits(k) as f64;
            }
            count[group_of[i]] += layers[i].numel();
        }
        let mut above = vec![0usize; n];
        for (i, &g) in group_of.iter().enumerate() {
            let threshold = sum[g] / count[g].max(1) as f64 * spec.owl.m;
            above[g] += keys_of(i)?.into_iter().filter(|&k| f32::from_bits(k) as f64 > threshold).count();
        }
        let ratios: Vec<f64> = (0..n).map(|g| above[g] as f64 / count[g].max(1) as f64).collect();
        let sp = owl_sparsities(&ratios, &count, s, spec.owl.lambda);
        groups = (0..n)
            .map(|g| OwlGroup {
                name: names[g].clone(),
                params: count[g],
                outlier_ratio: ratios[g],
                sparsity: sp[g],
            })
            .collect();
        for i in 0..layers.len() {
            targets[i] = sp[group_of[i]];
        }
    }
    let mut out = Vec::with_capacity(layers.len());
    match spec.scope {
        Scope::Layer => {
            for (i, l) in layers.iter().enumerate() {
                let t = targets[i];
                out.push(if activation_aware {
                    let n = super::prune_count(t, l.cols);
                    Decision { rule: Rule::PerRow(n), target: t, pruned: n * l.rows }
                } else {
                    let k = super::prune_count(t, l.numel());
                    let keys = keys_of(i)?;
                    Decision { rule: Rule::Cut(layer_cut(&keys, k)?), target: t, pruned: k }
                });
            }
        }
        Scope::Global => {
            // One exact cut over the scores of all layers (OWL: of each group).
            out = vec![Decision { rule: Rule::Cut(None), target: s, pruned: 0 }; layers.len()];
            let n_groups = if spec.method == Method::Owl { groups.len() } else { 1 };
            for g in 0..n_groups {
                let members: Vec<usize> =
                    (0..layers.len()).filter(|&i| spec.method != Method::Owl || group_of[i] == g).collect();
                let total: usize = members.iter().map(|&i| layers[i].numel()).sum();
                let t = members.first().map(|&i| targets[i]).unwrap_or(s);
                let k = super::prune_count(t, total);
                let cuts = find_cuts(members.len(), k, |f| {
                    for (n, &i) in members.iter().enumerate() {
                        let keys = keys_of(i)?;
                        f(n, Keys::Slice(&keys));
                    }
                    Ok(())
                })?;
                for (&i, (cut, pruned)) in members.iter().zip(cuts) {
                    out[i] = Decision { rule: Rule::Cut(cut), target: t, pruned };
                }
            }
        }
    }
    Ok((out, groups))
}

/// The keep bitmap of one layer under `rule`, and the number pruned.
pub fn apply(rule: Rule, keys: &[u32], rows: usize, cols: usize) -> (Vec<u8>, usize) {
    match rule {
        Rule::Sparse24 => (sparse24_mask(keys, rows, cols), rows * cols / 2),
        Rule::PerRow(n) => rowwise_mask(keys, rows, cols, n),
        Rule::Cut(cut) => unstructured_mask(keys, rows, cols, cut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowwise_prunes_the_smallest_of_each_row_ties_to_lower_index() {
        // row 0: 3 1 2 1 -> prune two: the 1s at 1 and 3; row 1: 5 5 5 5 -> indices 0, 1
        let keys = [3, 1, 2, 1, 5, 5, 5, 5];
        let (mask, pruned) = rowwise_mask(&keys, 2, 4, 2);
        assert_eq!(pruned, 4);
        assert_eq!(mask, vec![0b0101, 0b1100]);
    }

    #[test]
    fn owl_sparsities_spread_2lambda_and_keep_the_weighted_mean() {
        let sp = owl_sparsities(&[1.0, 3.0, 2.0], &[10, 10, 20], 0.5, 0.08);
        // D' = [0, 0.16, 0.08]; weighted mean 0.08 -> S = [0.58, 0.42, 0.5]
        for (a, b) in sp.iter().zip([0.58, 0.42, 0.5]) {
            assert!((a - b).abs() < 1e-12, "{sp:?}");
        }
        assert_eq!(owl_sparsities(&[2.0, 2.0], &[1, 1], 0.3, 0.08), vec![0.3, 0.3]);
    }

    #[test]
    fn owl_groups_are_transformer_blocks() {
        assert_eq!(owl_group("encoder.layers.3.mlp.fc1.weight"), "encoder.layers.3");
        assert_eq!(
            owl_group("text_model.encoder.layers.12.self_attn.q_proj.weight"),
            "text_model.encoder.layers.12"
        );
        assert_eq!(
            owl_group("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
            "down_blocks.0.attentions.1.transformer_blocks.0"
        );
        assert_eq!(
            owl_group("down_blocks.0.resnets.1.time_emb_proj.weight"),
            "down_blocks.0.resnets.1.time_emb_proj"
        );
    }

    #[test]
    fn feature_stats_accumulate_sums_of_squares() {
        let mut s = FeatureStats::new(2);
        s.add(&[1.0, 2.0, 3.0, -4.0]).unwrap();
        assert_eq!(s.sum_sq, vec![10.0, 20.0]);
        assert_eq!(s.tokens, 2);
        assert_eq!(s.rms(), vec![5f32.sqrt(), 10f32.sqrt()]);
        assert!(s.add(&[1.0]).is_err());
    }
}
