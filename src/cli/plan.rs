//! `sdsparse plan`: measure every prunable layer's sensitivity and choose dense / 2:4 /
//! unstructured per layer within a quality budget (see `sdsparse::plan`), and the table
//! `inspect plan.json` prints.

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::plan::{make_plan, MixedPlan, PlanOptions};
use std::path::PathBuf;

/// Flags of `sdsparse plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Dense diffusers folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Plan file to write (JSON; must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Quality budget: the summed relative deviation ‖z'−z‖²/‖z‖² of the final latents.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub budget: f64,
    /// Unstructured sparsities offered to each layer, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7", allow_negative_numbers = true)]
    pub sparsities: Vec<f64>,
    /// Captions of the evaluation run (the task's prompts for a model with task.json, e.g. the toy;
    /// else the default calibration captions).
    #[arg(long, default_value_t = 1)]
    pub captions: usize,
    /// DDIM steps of the evaluation run.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Components to plan: text_encoder, unet (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "text_encoder,unet")]
    pub components: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace the plan file if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    // `sweep` spells the text encoder `text-encoder`; both spellings are accepted here too.
    let components: Vec<String> = args.components.iter().map(|c| c.replace('-', "_")).collect();
    for c in &components {
        if c != "text_encoder" && c != "unet" {
            anyhow::bail!("invalid argument: --components: unknown component '{c}' (text-encoder, unet)");
        }
    }
    if args.out.exists() && !args.force {
        anyhow::bail!("invalid argument: {} already exists (use --force to replace it)", args.out.display());
    }
    // The output location is checked before the (long) sensitivity measurement.
    sdsparse::output::check_output_file(&args.out, "--out")?;
    let opts = PlanOptions {
        budget: args.budget,
        sparsities: args.sparsities.clone(),
        captions: args.captions,
        steps: args.steps,
        seed: args.seed,
        text_encoder: components.iter().any(|c| c == "text_encoder"),
        unet: components.iter().any(|c| c == "unet"),
        ..PlanOptions::default()
    };
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} measuring sensitivities [{bar:40}] {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let b = bar.clone();
    let plan = make_plan(&args.model, &opts, &mut |done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    plan.save(&args.out, args.force)?;
    print_plan(&plan, false)?;
    outln!("wrote {}", args.out.display());
    Ok(())
}

/// The plan as a table (per layer unless `summary`) and its totals.
pub fn print_plan(plan: &MixedPlan, summary: bool) -> anyhow::Result<()> {
    outln!("plan for {} ({} pruning, budget {:.3e})", plan.model, plan.method, plan.budget);
    if !summary {
        outln!(
            "{:<14} {:<64} {:>12} {:>18} {:>11} {:>8}",
            "component",
            "layer",
            "shape",
            "choice",
            "deviation",
            "cost"
        );
        for l in &plan.layers {
            let o = l.options.iter().find(|o| o.choice == l.chosen);
            outln!(
                "{:<14} {:<64} {:>12} {:>18} {:>11.3e} {:>7.1}%",
                l.component,
                l.name,
                format!("{}x{}", l.shape[0], l.shape[1]),
                l.chosen.describe(),
                o.map_or(0.0, |o| o.deviation),
                100.0 * o.map_or(0.0, |o| o.cost) / l.options[0].cost.max(f64::MIN_POSITIVE),
            );
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for l in &plan.layers {
        *counts.entry(l.chosen.describe()).or_insert(0) += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    outln!("layers: {}", counts.join(", "));
    outln!(
        "cost {:.3} of dense; deviation predicted {:.3e} (sum of single-layer deviations), measured {:.3e}",
        plan.cost / plan.dense_cost.max(f64::MIN_POSITIVE),
        plan.predicted_deviation,
        plan.measured_deviation
    );
    if plan.measured_deviation > plan.budget {
        eprintln!(
            "note: the measured deviation {:.3e} is above the budget {:.3e}: single-layer deviations do not add \
             up exactly (docs/PRUNING.md); give a smaller --budget to stay under it",
            plan.measured_deviation, plan.budget
        );
    }
    Ok(())
}
