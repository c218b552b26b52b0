//! `cargo xtask corpus-check` and `cargo xtask corpus-stats`.

use anyhow::Result;

/// Options of `cargo xtask corpus-check`.
#[derive(clap::Args)]
pub struct CheckArgs {}

/// Options of `cargo xtask corpus-stats`.
#[derive(clap::Args)]
pub struct StatsArgs {}

pub fn check(_args: CheckArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}

pub fn stats(_args: StatsArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
