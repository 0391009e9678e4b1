//! `midas-worker bench`: placeholder until the benchmark lands.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_a: BenchArgs, _s: crate::config::Settings) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
