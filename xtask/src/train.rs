//! `cargo xtask train`.

use anyhow::Result;

/// Options of `cargo xtask train`.
#[derive(clap::Args)]
pub struct TrainArgs {}

pub fn run(_args: TrainArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
