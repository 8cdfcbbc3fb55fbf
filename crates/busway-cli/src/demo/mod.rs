//! `busway demo` and `busway demo serve`: the reference e-commerce system.
//!
//! Services, on one [`Bus`](busway::Bus), with the reference names and
//! message shapes (so the reference Python clients talk to them on RabbitMQ):
//!
//! - `user_service` (queue `rpc_user_service`): `register_user`,
//!   `get_user_info`, `list_users`; users are event-sourced, `get_user_info`
//!   and `list_users` read the users read model.
//! - notifications (group `notification_service`): a welcome `send_email`
//!   task on `user.registered`, one on `order.paid` and `order.shipped`.
//! - workers on `task_queue`: `send_email` (publishes
//!   `notification.email_sent`; `@bounce.test` always fails and is
//!   dead-lettered, `@flaky.test` fails twice then succeeds) and
//!   `generate_report` (publishes `report.generated`).
//! - `order_service` (queue `rpc_order_service`): `create_order` starts the
//!   order saga, `get_order` reads its status.
//! - `audit_service`: every event appended to the audit log; `get_audit_log`.
//! - `stats_service`: `get_stats`.
//!
//! The event store, the read models, the audit log and the saga store are
//! SQLite tables: in the same file as the queues on `sqlite://`, in the
//! `--store` file on any other transport (RabbitMQ keeps only messages).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[path = "../../../busway/examples/event_sourcing/domain.rs"]
#[allow(dead_code, missing_docs, unreachable_pub)]
mod domain;
mod orders;
mod scenario;
mod services;

/// Where `busway demo serve` keeps its queues when no URL is given.
pub(crate) const SERVE_URL: &str = "sqlite://busway-demo.db";
/// Where the stores go when the transport is not SQLite and no `--store` is given.
pub(crate) const SERVE_STORE_URL: &str = "sqlite://busway-demo-store.db";

/// `busway demo`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = false)]
pub(crate) struct DemoArgs {
    #[command(subcommand)]
    command: Option<DemoCommand>,
    /// The transport. `busway demo` defaults to a fresh SQLite file in a
    /// temporary directory (removed at exit); `busway demo serve` to
    /// `sqlite://busway-demo.db` in the working directory.
    #[arg(long, global = true)]
    url: Option<String>,
    /// Where the event store, read models, audit log and sagas are kept
    /// (a `sqlite://PATH` URL). Default: the `--url` file on SQLite; on
    /// other transports a file next to the temporary queues (`busway demo`)
    /// or `sqlite://busway-demo-store.db` (`busway demo serve`).
    #[arg(long, global = true)]
    store: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DemoCommand {
    /// Run the services until Ctrl-C (SIGINT) or SIGTERM; work in flight finishes first.
    Serve,
}

/// Runs `busway demo` or `busway demo serve`.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    match args.command {
        Some(DemoCommand::Serve) => {
            let url = args.url.unwrap_or_else(|| SERVE_URL.to_owned());
            let store = store_url(&url, args.store, || SERVE_STORE_URL.to_owned());
            serve(&url, store.as_deref()).await
        }
        None => {
            let temp = tempfile::tempdir().context("creating a temporary directory")?;
            let in_temp = |name: &str| -> PathBuf { temp.path().join(name) };
            let url = args
                .url
                .unwrap_or_else(|| format!("sqlite://{}", in_temp("busway-demo.db").display()));
            let store = store_url(&url, args.store, || {
                format!("sqlite://{}", in_temp("busway-demo-store.db").display())
            });
            let report = scenario::run(&url, store.as_deref()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            anyhow::ensure!(
                report.is_consistent(),
                "the demo ended inconsistent: {}",
                report.problems().join("; ")
            );
            Ok(())
        }
    }
}

/// The store URL: `None` means "the transport's own SQLite file".
fn store_url(url: &str, store: Option<String>, default: impl FnOnce() -> String) -> Option<String> {
    match store {
        Some(store) => Some(store),
        None if url.starts_with("sqlite://") => None,
        None => Some(default()),
    }
}

/// `busway demo serve`: the services until a signal.
async fn serve(url: &str, store: Option<&str>) -> anyhow::Result<()> {
    let system = services::System::start(url, store).await?;
    eprintln!(
        "busway demo: serving on {} (stores: {}); Ctrl-C to stop",
        busway::redact_url(url),
        store.unwrap_or("the same SQLite file")
    );
    eprintln!(
        "  RPC queues: rpc_user_service, rpc_order_service, rpc_audit_service, rpc_stats_service; \
         tasks: task_queue; events: exchange event_bus"
    );
    wait_for_signal().await?;
    eprintln!("busway demo: stopping; finishing the work in flight");
    let stats = system.stop().await?;
    eprintln!("busway demo: stopped ({stats})");
    Ok(())
}

#[cfg(unix)]
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}
