//! `sdsparse demo`.

/// Flags of `sdsparse demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse demo is not implemented yet")
}

/// Flags of `sdsparse synth`.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {}

pub fn run_synth(args: SynthArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse synth is not implemented yet")
}
