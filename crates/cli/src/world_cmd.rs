//! `vdit world` and `vdit eval` (in progress).

#[derive(clap::Args)]
pub struct WorldArgs {}

#[derive(clap::Args)]
pub struct EvalArgs {}

pub fn run_world(_: WorldArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vdit world` is not built yet")
}

pub fn run_eval(_: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vdit eval` is not built yet")
}
