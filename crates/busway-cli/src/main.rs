//! `busway`: the command line for busway.

use clap::{CommandFactory, Parser, Subcommand};

mod bench;
mod demo;
mod dlq;
mod ops;
mod serve;

/// busway: messaging patterns for Rust microservices.
#[derive(Parser)]
#[command(
    name = "busway",
    version,
    about,
    after_help = ops::EXAMPLES,
    after_long_help = ops::LONG_HELP
)]
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
    #[command(flatten)]
    Ops(ops::OpsCommand),
    /// Run the reference e-commerce system: a scripted scenario with a report, or `serve`.
    Demo(demo::DemoArgs),
    /// A live web dashboard with a JSON API, Prometheus metrics and health checks.
    Serve(serve::ServeArgs),
}

/// mimalloc: the bus allocates and frees many small buffers across threads
/// (messages, headers, batches), where it is markedly faster than the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    ops::exit::report(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Dlq(args) => runtime.block_on(dlq::run(args)),
        Command::Ops(command) => runtime.block_on(ops::run(command, Cli::command)),
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Serve(args) => runtime.block_on(serve::run(args)),
    }
}
