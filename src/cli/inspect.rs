//! `sdsparse inspect`.

/// Flags of `sdsparse inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse inspect is not implemented yet")
}

/// Flags of `sdsparse export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {}

pub fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse export is not implemented yet")
}
