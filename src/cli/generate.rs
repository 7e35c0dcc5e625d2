//! `sdsparse generate`.

/// Flags of `sdsparse generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse generate is not implemented yet")
}
