//! `vdit generate` (in progress).

#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vdit generate` is not built yet")
}
