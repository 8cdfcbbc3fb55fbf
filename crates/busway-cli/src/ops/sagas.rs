//! `busway sagas`: the saga operator API from the shell.

use anyhow::Context;
use busway::saga::{OrchestratorConfig, SagaDetails, SagaOrchestrator, SagaQueryError};
use busway::saga_store::{
    SagaEvent, SagaEventKind, SagaQuery, SagaRecord, SagaStatus, SagaStore, StepStatus,
    UpdateSagaError,
};
use busway::Bus;
use clap::{Args, Subcommand};

use super::exit::{Exit, Failure};
use super::settings::Conn;
use super::stores::Stores;

/// `busway sagas`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway sagas list --status failed
  busway sagas show order-1042 --json
  busway sagas retry order-1042
  busway sagas abort order-1042 --reason 'refunded by hand'
  busway sagas list --store postgres://postgres@127.0.0.1:5432/app")]
pub(crate) struct SagasArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: SagasCommand,
}

#[derive(Subcommand, Debug)]
enum SagasCommand {
    /// List sagas, oldest first.
    List {
        /// Only sagas with this status (pending, running, completed, failed,
        /// compensating, compensated).
        #[arg(long)]
        status: Option<SagaStatus>,
        /// Only sagas that are not finished.
        #[arg(long)]
        active: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one saga: its steps and its history.
    Show {
        /// The saga id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a FAILED saga's compensation again; a running orchestrator
    /// (any process with the saga's definition) picks it up at once.
    Retry {
        /// The saga id.
        id: String,
    },
    /// Close a FAILED saga for good, recording the reason.
    Abort {
        /// The saga id.
        id: String,
        /// Why (kept in the saga's error and history).
        #[arg(long, default_value = "aborted from the command line")]
        reason: String,
    },
}

pub(crate) async fn run(args: SagasArgs) -> anyhow::Result<()> {
    let settings = args.conn.settings()?;
    let stores = Stores::open(&settings.store_url()?).await?;
    // Operator calls only touch the store; the orchestrator needs a bus but
    // sends nothing on it, and does not poll (recovery off).
    let bus = Bus::new(busway::connect("memory://").await?);
    let orchestrator = SagaOrchestrator::with_config(
        bus.clone(),
        stores.sagas.clone(),
        OrchestratorConfig::default().with_recovery(false),
    );
    let result = match args.command {
        SagasCommand::List {
            status,
            active,
            limit,
            json,
        } => {
            let mut query = SagaQuery::default().limit(limit);
            query.status = status;
            query.active_only = active;
            let sagas = orchestrator.list(&query).await?;
            if json {
                for saga in &sagas {
                    println!("{}", serde_json::to_string(&summary(saga))?);
                }
            } else {
                print!("{}", table(&sagas));
            }
            Ok(())
        }
        SagasCommand::Show { id, json } => {
            let details = orchestrator.show(&id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "saga": details.saga,
                        "history": details.history,
                    }))?
                );
            } else {
                print!("{}", details_text(&details));
            }
            Ok(())
        }
        SagasCommand::Retry { id } => retry(&*stores.sagas, &id, "from the command line")
            .await
            .map(|()| {
                println!("saga {id} is compensating again; a running orchestrator resumes it");
            }),
        SagasCommand::Abort { id, reason } => orchestrator
            .abort(&id, &reason)
            .await
            .map_err(anyhow::Error::new)
            .map(|()| println!("saga {id} aborted: {reason}")),
    };
    orchestrator.shutdown().await;
    bus.shutdown().await;
    stores.close().await;
    result.map_err(|e| match e.downcast_ref::<SagaQueryError>() {
        Some(SagaQueryError::NotFailed { .. }) => Failure::wrap(Exit::Error, e),
        _ => e,
    })
}

/// What `SagaOrchestrator::retry` stores, without driving the saga in this
/// process (it has no definitions): the orchestrators that have the
/// definition find it due now and drive it.
pub(crate) async fn retry(store: &dyn SagaStore, id: &str, origin: &str) -> anyhow::Result<()> {
    let mut saga = store
        .load(id)
        .await
        .context("loading the saga")?
        .ok_or_else(|| SagaQueryError::NotFound(id.to_owned()))?;
    if saga.status != SagaStatus::Failed {
        return Err(SagaQueryError::NotFailed {
            id: saga.id,
            status: saga.status,
        }
        .into());
    }
    for step in &mut saga.steps {
        if step.status == StepStatus::Failed && step.compensation_attempts > 0 {
            step.status = StepStatus::Compensating;
            step.compensation_attempts = 0;
        }
    }
    let now = busway::unix_millis(std::time::SystemTime::now());
    let expected = saga.version;
    saga.status = SagaStatus::Compensating;
    saga.due_at_ms = Some(now);
    saga.version += 1;
    saga.updated_at_ms = now;
    let event = SagaEvent::new(now, SagaEventKind::Retried).detail(origin);
    match store.update(&saga, expected, &[event]).await {
        Ok(()) => Ok(()),
        Err(UpdateSagaError::NotFound { id }) => Err(SagaQueryError::NotFound(id).into()),
        Err(e) => Err(anyhow::Error::new(e).context("saving the saga")),
    }
}

pub(crate) fn summary(saga: &SagaRecord) -> serde_json::Value {
    let done = saga
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Completed)
        .count();
    serde_json::json!({
        "id": saga.id,
        "definition": saga.definition,
        "status": saga.status,
        "steps_completed": done,
        "steps": saga.steps.len(),
        "error": saga.error,
        "created_at_ms": saga.created_at_ms,
        "updated_at_ms": saga.updated_at_ms,
        "version": saga.version,
    })
}

fn table(sagas: &[SagaRecord]) -> String {
    use std::fmt::Write;
    if sagas.is_empty() {
        return "no sagas\n".into();
    }
    let id_width = sagas.iter().map(|s| s.id.len()).max().unwrap_or(0).max(2);
    let def_width = sagas
        .iter()
        .map(|s| s.definition.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<id_width$}  {:<def_width$}  {:<12}  {:>5}  ERROR",
        "ID", "DEFINITION", "STATUS", "STEPS"
    );
    for saga in sagas {
        let done = saga
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Completed)
            .count();
        let _ = writeln!(
            out,
            "{:<id_width$}  {:<def_width$}  {:<12}  {:>5}  {}",
            saga.id,
            saga.definition,
            saga.status.as_str(),
            format!("{done}/{}", saga.steps.len()),
            saga.error.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out, "{} saga(s)", sagas.len());
    out
}

fn details_text(details: &SagaDetails) -> String {
    use std::fmt::Write;
    let saga = &details.saga;
    let mut out = String::new();
    let _ = writeln!(out, "id:          {}", saga.id);
    let _ = writeln!(out, "definition:  {}", saga.definition);
    let _ = writeln!(out, "status:      {}", saga.status.as_str());
    let _ = writeln!(out, "version:     {}", saga.version);
    let _ = writeln!(out, "error:       {}", saga.error.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "input:       {}", saga.input);
    let _ = writeln!(out, "steps:");
    for step in &saga.steps {
        let _ = writeln!(
            out,
            "  {:<20} {:<13} attempts {} compensations {}{}",
            step.step_id,
            step.status.as_str(),
            step.attempts,
            step.compensation_attempts,
            step.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "history:");
    for event in &details.history {
        let _ = writeln!(
            out,
            "  {} {:<22} {}{}",
            event.at_ms,
            event.kind.as_str(),
            event.step_id.as_deref().unwrap_or(""),
            event
                .detail
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default()
        );
    }
    out
}
