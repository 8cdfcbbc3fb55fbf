//! A process for the event-store crash tests to kill (see the crate docs):
//! `append URL` appends forever, printing each confirmed append;
//! `project URL` runs the [`Balances`] projection until killed.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use busway::es::{EventStore, ExpectedVersion, NewEvent, ProjectionRunner};
use busway::sqlite::{SqliteConfig, SqliteEventStore, SqliteTransport};
use busway_faults::{Balances, ES_STREAMS};

const WRITERS: usize = 16;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (role, url) = match args.as_slice() {
        [role, url] => (role.as_str(), url.as_str()),
        _ => bail!("usage: busway-es-crash-child append|project URL"),
    };
    let (path, config) = SqliteConfig::from_url(url)?;
    let transport = SqliteTransport::open_with(path, config)?;
    let store = SqliteEventStore::open(transport).await?;
    match role {
        "append" => append(store).await,
        "project" => {
            let balances = Arc::new(Balances::new(store.clone()).printing_progress());
            balances.create_table().await?;
            let handle = ProjectionRunner::new(Arc::new(store))
                .with_batch_size(25)
                .spawn(balances);
            let ended = handle.join().await;
            bail!("the projection stopped: {ended:?}")
        }
        other => bail!("unknown role `{other}`"),
    }
}

/// 16 tasks, each owning every 16th stream, append batches of 1 to 5
/// events at the version they know, forever.
async fn append(store: SqliteEventStore) -> anyhow::Result<()> {
    let store = Arc::new(store);
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let stdout = stdout.clone();
            tokio::spawn(async move {
                let streams: Vec<String> = (w..ES_STREAMS)
                    .step_by(WRITERS)
                    .map(|s| format!("es-{s}"))
                    .collect();
                let mut versions = Vec::with_capacity(streams.len());
                for stream in &streams {
                    let info = store.stream_info(stream).await?;
                    versions.push(info.map_or(0, |i| i.version));
                }
                for round in 0u64.. {
                    let k = (round as usize + w) % streams.len();
                    let count = 1 + (round as usize * 7 + w) % 5;
                    let batch = uuid_like(w, round);
                    let events = (0..count)
                        .map(|i| {
                            let version = versions[k] + 1 + i as u64;
                            NewEvent::json(
                                "crash.deposited",
                                &serde_json::json!({"version": version, "amount": (version % 13) + 1}),
                            )
                            .map(|e| {
                                e.with_metadata("batch", batch.clone())
                                    .with_metadata("index", i)
                                    .with_metadata("size", count)
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let outcome = store
                        .append(&streams[k], ExpectedVersion::Exact(versions[k]), events)
                        .await
                        .with_context(|| format!("appending to {}", streams[k]))?;
                    let first = versions[k] + 1;
                    versions[k] = outcome.version;
                    let mut out = stdout
                        .lock()
                        .map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
                    writeln!(
                        out,
                        "A {} {first} {count} {} {batch}",
                        streams[k], outcome.position
                    )?;
                    out.flush()?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A batch id unique across runs: the run's start time, the writer, the round.
fn uuid_like(writer: usize, round: u64) -> String {
    static RUN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    format!("{run}-{writer}-{round}")
}
