//! The `sdsparse` binary. Every error ends as one line on stderr and a non-zero exit.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sdsparse",
    version,
    about = "Pruned Stable Diffusion 2: convert, inspect, export, generate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prune a dense SD2 diffusers checkpoint and write a compact sparse checkpoint.
    Convert(cli::convert::ConvertArgs),
    /// Per-layer format, shape, sparsity and bytes of a dense or sparse checkpoint.
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
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Export(a) => cli::inspect::run_export(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Synth(a) => cli::demo::run_synth(a),
        Command::Sweep(a) => cli::sweep::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
