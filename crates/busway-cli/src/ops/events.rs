//! `busway events` and `busway projections`: event streams and the
//! projections that read them.

use std::time::Duration;

use busway::event_store::{EventStore, StoredEvent, StreamRead};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::exit::{Exit, Failure};
use super::settings::Conn;
use super::stores::Stores;

/// `busway events`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway events read order-1042
  busway events read order-1042 --from 3 --json
  busway events tail order-1042
  busway events tail --all --count 100 | jq .event_type
  busway events tail --all --store postgres://postgres@127.0.0.1:5432/app")]
pub(crate) struct EventsArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Print a stream's events in order.
    Read {
        /// The stream.
        stream: String,
        /// Start at this version (1 is the first event).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow new events as JSON lines: of one stream, or of every stream
    /// (--all) in commit order. Starts at the end; Ctrl-C stops.
    Tail {
        /// The stream (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        stream: Option<String>,
        /// Every stream, in the order of the global log.
        #[arg(long)]
        all: bool,
        /// Start from the beginning instead of the end.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `busway projections`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway projections status
  busway projections status order_totals --json
  busway projections rebuild order_totals

status: each projection's checkpoint (the global log position it has
applied up to), the log's head and the lag between them. Projections that
keep their checkpoint in their own tables are not seen here.

rebuild: sets the stored checkpoint back to 0, so the projection replays the
whole log the next time its process starts it. Its read model is the
application's: a running ProjectionRunner keeps its position in memory and
must be restarted, and `apply` must be idempotent or the read model emptied
first (ProjectionRunner::rebuild does both in-process).")]
pub(crate) struct ProjectionsArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: ProjectionsCommand,
}

#[derive(Subcommand, Debug)]
enum ProjectionsCommand {
    /// Checkpoint, head and lag of projections (all that have a checkpoint, or those named).
    Status {
        /// The projections (default: every one with a checkpoint).
        names: Vec<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reset a projection's checkpoint to 0 so it replays the log.
    Rebuild {
        /// The projection.
        name: String,
    },
}

fn event_json(event: &StoredEvent) -> Value {
    let data = event
        .data_json()
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.data).into_owned()));
    serde_json::json!({
        "stream": event.stream,
        "version": event.version,
        "position": event.position,
        "id": event.id.to_string(),
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "data": data,
        "metadata": event.metadata,
        "recorded_at_ms": event.recorded_at_ms,
    })
}

fn events_table(events: &[StoredEvent]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7}  {:>8}  {:<24}  DATA",
        "VERSION", "POSITION", "TYPE"
    );
    for e in events {
        let data = String::from_utf8_lossy(&e.data);
        let data: String = if data.chars().count() > 60 {
            data.chars().take(59).chain(['…']).collect()
        } else {
            data.into_owned()
        };
        let _ = writeln!(
            out,
            "{:>7}  {:>8}  {:<24}  {}",
            e.version, e.position, e.event_type, data
        );
    }
    out
}

pub(crate) async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let settings = args.conn.settings()?;
    let stores = Stores::open(&settings.store_url()?).await?;
    let result = run_events(&*stores.events, args.command).await;
    stores.close().await;
    result
}

async fn run_events(store: &dyn EventStore, command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::Read {
            stream,
            from,
            limit,
            json,
        } => {
            if store.stream_info(&stream).await?.is_none() {
                return Err(Failure::msg(
                    Exit::NotFound,
                    format!("stream `{stream}` does not exist"),
                ));
            }
            let mut read = StreamRead::forwards_from(from);
            if let Some(limit) = limit {
                read = read.limit(limit);
            }
            let events = store.read_stream(&stream, read).await?;
            if json {
                for event in &events {
                    println!("{}", serde_json::to_string(&event_json(event))?);
                }
            } else {
                print!("{}", events_table(&events));
                println!("{} event(s) in {stream}", events.len());
            }
            Ok(())
        }
        EventsCommand::Tail {
            stream,
            all: _,
            from_start,
            count,
        } => tail(store, stream, from_start, count).await,
    }
}

async fn tail(
    store: &dyn EventStore,
    stream: Option<String>,
    from_start: bool,
    count: Option<u64>,
) -> anyhow::Result<()> {
    const BATCH: usize = 500;
    let mut printed = 0u64;
    let done = |printed: u64| count.is_some_and(|n| printed >= n);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // Where we are: a global position (--all) or a stream version.
    let mut after = match (&stream, from_start) {
        (_, true) => 0,
        (None, false) => store.head_position().await?,
        (Some(s), false) => store.stream_info(s).await?.map_or(0, |i| i.version),
    };
    while !done(printed) {
        let batch = match &stream {
            None => store.read_all(after, BATCH).await?,
            Some(s) => {
                store
                    .read_stream(s, StreamRead::forwards_from(after + 1).limit(BATCH))
                    .await?
            }
        };
        for event in &batch {
            if done(printed) {
                break;
            }
            println!("{}", serde_json::to_string(&event_json(event))?);
            printed += 1;
            after = if stream.is_some() {
                event.version
            } else {
                event.position
            };
        }
        if batch.len() < BATCH && !done(printed) {
            // Woken by the store's hint, or polling for other processes' appends.
            let hint = store.appended_after(after);
            tokio::select! {
                _ = hint => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = &mut interrupted => return Ok(()),
            }
        }
    }
    Ok(())
}

pub(crate) async fn projections(args: ProjectionsArgs) -> anyhow::Result<()> {
    let settings = args.conn.settings()?;
    let stores = Stores::open(&settings.store_url()?).await?;
    let result = async {
        let store = &*stores.events;
        match args.command {
            ProjectionsCommand::Status { names, json } => {
                let names = if names.is_empty() {
                    stores.projection_names().await?
                } else {
                    names
                };
                let head = store.head_position().await?;
                let mut rows = Vec::new();
                for name in names {
                    let checkpoint = store.load_checkpoint(&name).await?;
                    rows.push(serde_json::json!({
                        "projection": name,
                        "checkpoint": checkpoint,
                        "head": head,
                        "lag": head.saturating_sub(checkpoint.unwrap_or(0)),
                    }));
                }
                if json {
                    for row in &rows {
                        println!("{}", serde_json::to_string(row)?);
                    }
                } else if rows.is_empty() {
                    println!("no projections with a checkpoint (log head {head})");
                } else {
                    let width = rows
                        .iter()
                        .filter_map(|r| r["projection"].as_str().map(str::len))
                        .max()
                        .unwrap_or(0)
                        .max("PROJECTION".len());
                    println!(
                        "{:<width$}  {:>10}  {:>10}  {:>10}",
                        "PROJECTION", "CHECKPOINT", "HEAD", "LAG"
                    );
                    for r in &rows {
                        println!(
                            "{:<width$}  {:>10}  {:>10}  {:>10}",
                            r["projection"].as_str().unwrap_or_default(),
                            r["checkpoint"]
                                .as_u64()
                                .map_or("-".into(), |c| c.to_string()),
                            r["head"],
                            r["lag"],
                        );
                    }
                }
                anyhow::Ok(())
            }
            ProjectionsCommand::Rebuild { name } => {
                let previous = store.load_checkpoint(&name).await?;
                store.save_checkpoint(&name, 0).await?;
                println!(
                    "projection {name}: checkpoint {} -> 0; it replays the whole log when its \
                     process starts it next",
                    previous.map_or("(none)".into(), |p| p.to_string())
                );
                Ok(())
            }
        }
    }
    .await;
    stores.close().await;
    result
}
