//! `busway`: the command line for busway.

use clap::{Parser, Subcommand};

mod bench;
mod dlq;

/// busway: messaging patterns for Rust microservices.
#[derive(Parser)]
#[command(name = "busway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure publish, consume and end-to-end throughput and latency of a backend.
    Bench(bench::BenchArgs),
    /// Inspect, replay and purge dead letters (on every backend).
    Dlq(dlq::DlqArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Dlq(args) => runtime.block_on(dlq::run(args)),
    }
}
