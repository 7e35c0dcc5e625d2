//! `sdsparse inspect` (per-layer format, shape, sparsity and bytes of a dense or sparse
//! folder) and `sdsparse export` (sparse folder → dense diffusers folder).

use sdsparse::convert::{export_single_file, export_with, inspect_with};
use std::path::PathBuf;

/// Flags of `sdsparse inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A diffusers pipeline folder (dense or sparse), one component folder, a single-file
    /// checkpoint (.safetensors / .ckpt in the original SD2 layout), or a plan file written by
    /// `sdsparse plan`.
    pub path: PathBuf,
    #[command(flatten)]
    pub single_file: super::SingleFileArgs,
    /// Only the per-component totals.
    #[arg(long)]
    pub summary: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    if args.path.is_file() && args.path.extension().is_some_and(|e| e == "json") {
        let plan = sdsparse::plan::MixedPlan::load(&args.path)?;
        super::plan::print_plan(&plan, args.summary)?;
        return Ok(());
    }
    let opts = args.single_file.options();
    for n in args.single_file.notes(&args.path)? {
        outln!("note: {n}");
    }
    let comps = inspect_with(&args.path, &opts)?;
    // How the folder was made, when `convert` wrote a summary (mixed plan, calibration).
    let summary: Option<serde_json::Value> =
        std::fs::read_to_string(args.path.join(sdsparse::convert::SUMMARY_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(v) = &summary {
        if let Some(p) = v.get("mixed_plan").filter(|p| !p.is_null()) {
            let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
            outln!(
                "mixed plan: budget {:.3e}, predicted deviation {:.3e}, measured {:.3e}, cost {:.3} of dense",
                f("budget"),
                f("predicted_deviation"),
                f("measured_deviation"),
                f("cost_vs_dense")
            );
        }
        if let Some(c) = v.get("calibration").filter(|c| !c.is_null()) {
            outln!(
                "calibration: {} captions (UNet {}), {} DDIM steps, seed {}",
                c["captions"],
                c["unet_captions"],
                c["unet_ddim_steps"],
                c["seed"]
            );
        }
    }
    for c in &comps {
        let kind = match &c.header {
            // A component written in the sparse format with nothing pruned (the VAE) is not "sparse".
            Some(h) if c.tensors.iter().all(|t| t.format == "dense") => {
                format!("sdsparse format v{}, not pruned, from {}", h.format_version, h.source)
            }
            Some(h) => {
                format!("sparse (format v{}, {} {}, from {})", h.format_version, h.method, h.scope, h.source)
            }
            None => "dense".to_string(),
        };
        outln!("== {} [{}] file {:.1} MB", c.name, kind, c.file_bytes as f64 / 1e6);
        if !args.summary {
            outln!(
                "{:<72} {:>13} {:>20} {:>5} {:>9} {:>12}",
                "tensor",
                "format",
                "shape",
                "dtype",
                "sparsity",
                "bytes"
            );
            for t in &c.tensors {
                let shape = format!("{:?}", t.shape);
                let sp = if t.numel == 0 { 0.0 } else { 100.0 * t.zeros as f64 / t.numel as f64 };
                outln!(
                    "{:<72} {:>13} {:>20} {:>5} {:>8.2}% {:>12}",
                    t.name,
                    t.format,
                    shape,
                    t.dtype,
                    sp,
                    t.bytes
                );
                if let Some(n) = &t.note {
                    outln!("    kept dense: {n}");
                }
            }
        }
        let sparse: Vec<_> = c.tensors.iter().filter(|t| t.format != "dense").collect();
        let numel: usize = sparse.iter().map(|t| t.numel).sum();
        let zeros: usize = sparse.iter().map(|t| t.zeros).sum();
        let bytes: u64 = c.tensors.iter().map(|t| t.bytes).sum();
        outln!(
            "   {} tensors, {} compressed ({} params, {:.2}% pruned), {:.1} MB of tensor data",
            c.tensors.len(),
            sparse.len(),
            numel,
            if numel == 0 { 0.0 } else { 100.0 * zeros as f64 / numel as f64 },
            bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// Flags of `sdsparse export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A sparse folder written by `sdsparse convert` (or any dense folder or single file).
    #[arg(long)]
    pub model: PathBuf,
    /// Output: a dense diffusers folder, or with --format single-file one .safetensors file
    /// (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// diffusers (a folder) or single-file (one .safetensors in the original SD2 layout, for
    /// A1111 / ComfyUI / stable-diffusion.cpp).
    #[arg(long, default_value = "diffusers", value_name = "FORMAT")]
    pub format: String,
    #[command(flatten)]
    pub single_file: super::SingleFileArgs,
    /// Replace an existing output: a model folder (model_index.json or a component's config.json)
    /// or an empty one, or with --format single-file a file; anything else is refused.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let (_bar, mut progress) = super::convert::progress_bar(args.quiet);
    let opts = args.single_file.options();
    let single = match args.format.as_str() {
        "diffusers" => false,
        "single-file" | "single_file" | "safetensors" => true,
        other => anyhow::bail!("invalid argument: --format must be diffusers or single-file, got {other:?}"),
    };
    let r = if single {
        export_single_file(&args.model, &args.out, args.force, &opts, &mut progress)?
    } else {
        export_with(&args.model, &args.out, args.force, &opts, &mut progress)?
    };
    for (c, bytes) in &r.components {
        outln!("{c:<14} {:>10.1} MB", *bytes as f64 / 1e6);
    }
    if single {
        outln!("wrote single-file checkpoint {}", r.out.display());
        // A single file carries no configs: readers infer the architecture from the tensor
        // shapes, which works for the standard SD2.x layouts only. Say so when this one is not.
        let plain = sdsparse::checkpoint::SingleFileOptions::default();
        if sdsparse::checkpoint::SingleFileModel::open(&r.out, &plain).is_err() {
            eprintln!(
                "note: {} is not a standard SD2.x architecture; reading it back needs its configs: --config {}",
                r.out.display(),
                args.model.display()
            );
        }
    } else {
        outln!("wrote dense diffusers folder {}", r.out.display());
    }
    Ok(())
}
