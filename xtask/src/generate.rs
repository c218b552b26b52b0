//! `cargo xtask generate`.

use anyhow::Result;

/// Options of `cargo xtask generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
