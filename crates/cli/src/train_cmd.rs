//! `vdit train` (in progress).

#[derive(clap::Args)]
pub struct TrainArgs {}

pub fn run(_: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vdit train` is not built yet")
}
