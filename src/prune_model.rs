//! Pruning a loaded model in memory (no files written): the decisions `convert` makes
//! (`prune::wanda::decide`, any method, scope and pattern), applied to the Linear layers of
//! a loaded text encoder or UNet, which then run compressed. For experiments that prune many
//! times (quality sweeps, the mixed plan's sensitivity probes).

use crate::error::{Error, Result};
use crate::format::{BitmapWeight, HostData, Sparse24Weight, Weight};
use crate::model::linear::Linear;
use crate::prune::wanda::{self, ActivationStats, Decision, Layer, OwlGroup, OwlParams, Rule, Spec};
use crate::prune::{Keys, Method, Pattern, Scope};

/// What to prune a component to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneOptions {
    pub method: Method,
    pub pattern: Pattern,
    pub scope: Scope,
    /// Target sparsity (2:4 is always 0.5).
    pub sparsity: f64,
    /// Seed of the random method.
    pub seed: u64,
    pub owl: OwlParams,
}

impl PruneOptions {
    fn spec(&self) -> Spec {
        Spec {
            method: self.method,
            pattern: self.pattern,
            scope: self.scope,
            sparsity: self.sparsity,
            owl: self.owl,
        }
    }
}

/// One pruned layer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunedLayer {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub pruned: usize,
    /// The layer's target (OWL: its group's sparsity).
    pub target: f64,
}

/// What [`prune_linears`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneResult {
    pub layers: Vec<PrunedLayer>,
    /// OWL's groups (unstructured OWL only).
    pub owl_groups: Vec<OwlGroup>,
    /// Layers left dense, with the reason.
    pub kept_dense: Vec<(String, String)>,
}

impl PruneResult {
    pub fn sparsity(&self) -> f64 {
        let n: usize = self.layers.iter().map(|l| l.rows * l.cols).sum();
        self.layers.iter().map(|l| l.pruned).sum::<usize>() as f64 / n.max(1) as f64
    }
}

/// The ordering keys of one dense layer for a method (`rms`: Wanda's activation factor).
pub fn layer_keys(
    method: Method,
    seed: u64,
    name: &str,
    values: &[f32],
    cols: usize,
    rms: Option<&[f32]>,
) -> Vec<u32> {
    match (method, rms) {
        (Method::Wanda | Method::Owl, Some(r)) => wanda::score_keys(&wanda::scores(values, cols, r)),
        (Method::Random, _) => Keys::random(seed, name, values.len()).to_vec(),
        _ => values.iter().map(|v| v.to_bits() & 0x7fff_ffff).collect(),
    }
}

/// Prunes every dense layer of `linears` in place (one component: global scope and OWL work
/// across all of them). Wanda and OWL need `stats` with every layer's inputs. Layers that
/// are already compressed, or cannot take 2:4 (`in_features % 4 != 0`), stay as they are
/// and are listed in `kept_dense`. Pass the layers `convert` would prune: a text encoder's
/// and a UNet's `linears_mut()` match its defaults, except that a UNet stored with
/// `use_linear_projection: false` also lists its 1x1-convolution `proj_in` / `proj_out`,
/// which `convert` treats as convolutions (filter them out by name to match).
pub fn prune_linears(
    mut linears: Vec<&mut Linear>,
    opts: &PruneOptions,
    stats: Option<&ActivationStats>,
) -> Result<PruneResult> {
    if !(0.0..1.0).contains(&opts.sparsity) {
        return Err(Error::Invalid(format!("sparsity {} is outside [0, 1)", opts.sparsity)));
    }
    let mut result = PruneResult::default();
    let mut chosen = Vec::new();
    let mut layers = Vec::new();
    let mut rms: Vec<Option<Vec<f32>>> = Vec::new();
    for (i, l) in linears.iter().enumerate() {
        let Weight::Dense(w) = l.weight() else {
            result.kept_dense.push((l.name().to_string(), "already compressed".into()));
            continue;
        };
        let (rows, cols) = w.dims2()?;
        if opts.pattern == Pattern::Sparse24 && !cols.is_multiple_of(4) {
            result.kept_dense.push((
                l.name().to_string(),
                format!("input dimension {cols} is not a multiple of 4, so it cannot be 2:4"),
            ));
            continue;
        }
        let r = if opts.method.needs_calibration() {
            let s = stats.and_then(|s| wanda::lookup(s, l.name())).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no calibration statistics for --method {}",
                    l.name(),
                    opts.method.name()
                ))
            })?;
            if s.sum_sq.len() != cols {
                return Err(Error::Shape(format!(
                    "{}: calibration saw {} input features, the weight has {cols}",
                    l.name(),
                    s.sum_sq.len()
                )));
            }
            Some(s.rms())
        } else {
            None
        };
        chosen.push(i);
        layers.push(Layer { name: l.name().to_string(), rows, cols });
        rms.push(r);
    }
    fn values(l: &Linear) -> Result<Vec<f32>> {
        match l.weight() {
            Weight::Dense(w) => w.to_vec(),
            _ => Err(Error::Msg(format!("{}: weight changed while pruning", l.name()))),
        }
    }
    let mut keys_of = |i: usize| -> Result<Vec<u32>> {
        let v = values(linears[chosen[i]])?;
        Ok(layer_keys(opts.method, opts.seed, &layers[i].name, &v, layers[i].cols, rms[i].as_deref()))
    };
    let (decisions, groups): (Vec<Decision>, Vec<OwlGroup>) =
        wanda::decide(&layers, &opts.spec(), &mut keys_of)?;
    result.owl_groups = groups;
    for (n, d) in decisions.iter().enumerate() {
        let v = values(linears[chosen[n]])?;
        let (rows, cols) = (layers[n].rows, layers[n].cols);
        let keys = layer_keys(opts.method, opts.seed, &layers[n].name, &v, cols, rms[n].as_deref());
        let (mask, pruned) = wanda::apply(d.rule, &keys, rows, cols);
        let dense = HostData::F32(v);
        let weight = match d.rule {
            Rule::Sparse24 => Weight::Sparse24(Sparse24Weight::from_dense(&dense, rows, cols, &mask)?),
            _ => Weight::Bitmap(BitmapWeight::from_dense(&dense, rows, cols, &mask)?),
        };
        linears[chosen[n]].set_weight(weight)?;
        result.layers.push(PrunedLayer {
            name: layers[n].name.clone(),
            rows,
            cols,
            pruned,
            target: d.target,
        });
    }
    Ok(result)
}
