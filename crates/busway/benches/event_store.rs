//! Event store throughput: `cargo bench -p busway --bench event_store`.
//!
//! On SQLite with `synchronous=FULL` (the default): 16 concurrent writers
//! appending to distinct streams, 1 event per append and 10 events per
//! append; then a projection catching up over the whole log (1,000,000
//! events by default, `BUSWAY_BENCH_PROJECTION_EVENTS` to change). The
//! in-memory store runs the same appends as a reference point.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::es::{Envelope, EventStore, ExpectedVersion, NewEvent, Projection, ProjectionRunner};
use busway::memory::MemoryEventStore;
use busway::sqlite::{SqliteEventStore, SqliteTransport};
use busway::Transport;

const WRITERS: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 16 writers, each appending `batch` events per append to its own stream, for `duration`.
async fn appends(store: Arc<dyn EventStore>, batch: usize, duration: Duration) -> (u64, f64) {
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            let appended = appended.clone();
            tokio::spawn(async move {
                let stream = format!("bench-{batch}-{w}-{}", uuid::Uuid::new_v4().simple());
                let mut version = 0u64;
                while started.elapsed() < duration {
                    let events = (0..batch)
                        .map(|i| {
                            NewEvent::new("bench.happened", format!("{{\"n\":{i},\"writer\":{w}}}"))
                        })
                        .collect();
                    let outcome = store
                        .append(&stream, ExpectedVersion::Exact(version), events)
                        .await
                        .expect("append");
                    version = outcome.version;
                    appended.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let secs = started.elapsed().as_secs_f64();
    (appended.load(Ordering::Relaxed), secs)
}

#[derive(serde::Deserialize)]
struct AnyEvent {
    #[serde(rename = "type")]
    _kind: String,
    #[serde(rename = "data")]
    _data: serde_json::Value,
}

#[derive(Default)]
struct Count(AtomicU64);

#[async_trait::async_trait]
impl Projection for Count {
    type Event = AnyEvent;
    fn name(&self) -> &str {
        "bench_count"
    }
    async fn apply(&self, events: Vec<Envelope<AnyEvent>>, _: u64) -> Result<(), String> {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn reset(&self) -> Result<(), String> {
        self.0.store(0, Ordering::Relaxed);
        Ok(())
    }
}

async fn fill(store: &Arc<dyn EventStore>, total: usize) {
    let per_append = 500;
    let mut written = 0;
    let mut stream = 0;
    while written < total {
        let n = per_append.min(total - written);
        let events = (0..n)
            .map(|i| NewEvent::new("bench.happened", format!("{{\"n\":{i}}}")))
            .collect();
        store
            .append(&format!("fill-{stream}"), ExpectedVersion::NoStream, events)
            .await
            .expect("fill");
        written += n;
        stream += 1;
    }
}

async fn run(name: &str, store: Arc<dyn EventStore>, duration: Duration) {
    let (n, secs) = appends(store.clone(), 1, duration).await;
    println!(
        "{name:<8} 16 writers x 1 event/append:   {:>9.0} appends/s  ({n} appends in {secs:.1} s)",
        n as f64 / secs
    );
    let (n, secs) = appends(store, 10, duration).await;
    println!(
        "{name:<8} 16 writers x 10 events/append: {:>9.0} events/s   ({} events in {secs:.1} s)",
        (n * 10) as f64 / secs,
        n * 10
    );
}

#[tokio::main]
async fn main() {
    let duration = Duration::from_secs(env_usize("BUSWAY_BENCH_SECONDS", 5) as u64);
    let dir = tempfile::tempdir().expect("tempdir");

    let transport = SqliteTransport::open(dir.path().join("appends.db")).expect("open");
    let sqlite: Arc<dyn EventStore> = Arc::new(
        SqliteEventStore::open(transport.clone())
            .await
            .expect("store"),
    );
    run("sqlite", sqlite, duration).await;
    transport.close().await;
    run("memory", Arc::new(MemoryEventStore::new()), duration).await;

    let total = env_usize("BUSWAY_BENCH_PROJECTION_EVENTS", 1_000_000);
    let transport = SqliteTransport::open(dir.path().join("projection.db")).expect("open");
    let store: Arc<dyn EventStore> = Arc::new(
        SqliteEventStore::open(transport.clone())
            .await
            .expect("store"),
    );
    let started = Instant::now();
    fill(&store, total).await;
    println!(
        "sqlite   filled {total} events in {:.1} s (500 events/append, one writer)",
        started.elapsed().as_secs_f64()
    );
    let count = Count::default();
    let started = Instant::now();
    let position = ProjectionRunner::new(store)
        .catch_up(&count)
        .await
        .expect("catch up");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(count.0.load(Ordering::Relaxed), total as u64);
    println!(
        "sqlite   projection catch-up: {:>9.0} events/s  ({position} events in {secs:.1} s, batches of 1000, checkpoint per batch)",
        total as f64 / secs
    );
    transport.close().await;
}
