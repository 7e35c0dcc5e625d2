//! The `sdsparse` binary. Every error ends as one line on stderr and a non-zero exit.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sdsparse",
    version,
    about = "Pruned Stable Diffusion 2: convert, plan, inspect, export, generate, sweep, synth, demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prune a dense SD2 diffusers checkpoint and write a compact sparse checkpoint.
    Convert(cli::convert::ConvertArgs),
    /// Choose dense / 2:4 / unstructured per layer from measured sensitivity (a mixed plan).
    Plan(cli::plan::PlanArgs),
    /// Per-layer format, shape, sparsity and bytes of a dense or sparse checkpoint (or a plan file).
    Inspect(cli::inspect::InspectArgs),
    /// Write a dense diffusers folder (zeros in place) from a sparse checkpoint.
    Export(cli::inspect::ExportArgs),
    /// Generate an image from a prompt with a dense or sparse SD2 checkpoint.
    Generate(cli::generate::GenerateArgs),
    /// With no checkpoint at hand: build the embedded tiny SD2 model, convert it, generate.
    Demo(cli::demo::DemoArgs),
    /// Measure quality against sparsity (pruned in memory): results.csv/.json, curves.png, grid.png.
    Sweep(cli::sweep::SweepArgs),
    /// Synthesise a random-weight SD2-architecture checkpoint (tiny, or full SD2.1 sizes).
    Synth(cli::demo::SynthArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(a) => cli::convert::run(a),
        Command::Plan(a) => cli::plan::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Export(a) => cli::inspect::run_export(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Synth(a) => cli::demo::run_synth(a),
        Command::Sweep(a) => cli::sweep::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each message once: a cause whose text the line
/// already holds (an OS message a wrapper repeated) is not printed again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line += ": ";
        }
        line += &text;
    }
    line.replace('\n', " ")
}
