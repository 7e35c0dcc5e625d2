//! `sdsparse convert`.

/// Flags of `sdsparse convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse convert is not implemented yet")
}
