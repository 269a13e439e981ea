//! `vdit bench` (in progress).

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vdit bench` is not built yet")
}
