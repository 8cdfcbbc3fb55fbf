//! Event store throughput: `cargo bench -p busway --bench event_store
//! [-- --store sqlite|postgres|all] [--postgres-url URL]`.
//!
//! `--store sqlite` (the default), with `synchronous=FULL`: 16 concurrent
//! writers appending to distinct streams, 1 event per append and 10 events
//! per append; then a projection catching up over the whole log (1,000,000
//! events by default, `BUSWAY_BENCH_PROJECTION_EVENTS` to change). The
//! in-memory store runs the same appends as a reference point.
//!
//! `--store postgres` (server from `--postgres-url` or
//! `BUSWAY_BENCH_POSTGRES_URL`, in a fresh schema dropped afterwards): the
//! same appends through `PostgresEventStore`, each beside its baseline in
//! the same run: plain sqlx `INSERT`s of the same rows (one statement per
//! append, `unnest` for 10 rows) into a table with the same keys, by the
//! same 16 writers on the same pool, printed with the ratio (target: the
//! store at ≥ 0.8× the raw inserts). The two take turns in slices (raw,
//! store, store, raw, ...: `BUSWAY_BENCH_ROUNDS` rounds of two slices, 4
//! by default), each writing for the whole duration in all. Then a
//! catch-up over 100,000 events (`BUSWAY_BENCH_PROJECTION_EVENTS`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::es::{Envelope, EventStore, ExpectedVersion, NewEvent, Projection, ProjectionRunner};
use busway::memory::MemoryEventStore;
use busway::sqlite::{SqliteEventStore, SqliteTransport};
use busway::Transport;
use busway_postgres::{PostgresEventStore, PostgresTransport};

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

/// 16 writers, each inserting `batch` rows per statement into the raw
/// table, for `duration`: the baseline of the PostgreSQL store.
async fn raw_inserts(pool: sqlx::PgPool, batch: usize, duration: Duration) -> (u64, f64) {
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = pool.clone();
            let appended = appended.clone();
            tokio::spawn(async move {
                let stream = format!("raw-{batch}-{w}-{}", uuid::Uuid::new_v4().simple());
                let mut version = 0i64;
                while started.elapsed() < duration {
                    let versions: Vec<i64> = (1..=batch as i64).map(|i| version + i).collect();
                    let ids: Vec<String> = (0..batch)
                        .map(|_| uuid::Uuid::now_v7().to_string())
                        .collect();
                    let data: Vec<Vec<u8>> = (0..batch)
                        .map(|i| format!("{{\"n\":{i},\"writer\":{w}}}").into_bytes())
                        .collect();
                    if batch == 1 {
                        sqlx::query(
                            "INSERT INTO bench_raw_events (stream, version, event_id, event_type, \
                             schema_version, data, metadata, recorded_at_ms) \
                             VALUES ($1, $2, $3::uuid, 'bench.happened', 1, $4, NULL, busway_now_ms())",
                        )
                        .bind(&stream)
                        .bind(versions[0])
                        .bind(&ids[0])
                        .bind(&data[0])
                        .execute(&pool)
                        .await
                        .expect("raw insert");
                    } else {
                        sqlx::query(
                            "INSERT INTO bench_raw_events (stream, version, event_id, event_type, \
                             schema_version, data, metadata, recorded_at_ms) \
                             SELECT $1, v, id::uuid, 'bench.happened', 1, d, NULL, busway_now_ms() \
                             FROM unnest($2::bigint[], $3::text[], $4::bytea[]) AS t (v, id, d)",
                        )
                        .bind(&stream)
                        .bind(&versions)
                        .bind(&ids)
                        .bind(&data)
                        .execute(&pool)
                        .await
                        .expect("raw insert");
                    }
                    version += batch as i64;
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

/// The value after `flag` on the command line.
fn arg(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn catch_up(name: &str, store: Arc<dyn EventStore>, total: usize) {
    let started = Instant::now();
    fill(&store, total).await;
    println!(
        "{name:<8} filled {total} events in {:.1} s (500 events/append, one writer)",
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
        "{name:<8} projection catch-up: {:>9.0} events/s  ({total} events to position {position} in {secs:.1} s, batches of 1000, checkpoint per batch)",
        total as f64 / secs
    );
}

async fn postgres(url: &str, duration: Duration) {
    let schema = format!(
        "busway_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    // 16 writers plus the wake-up listener.
    let transport = PostgresTransport::connect(&format!(
        "{url}{sep}schema={schema}&max_connections={}",
        WRITERS + 2
    ))
    .await
    .expect("connect to PostgreSQL");
    let store = PostgresEventStore::open(transport.clone())
        .await
        .expect("event store");
    let pool = transport.pool().clone();
    sqlx::query(
        "CREATE TABLE bench_raw_events (
             position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             stream TEXT NOT NULL,
             version BIGINT NOT NULL,
             event_id UUID NOT NULL UNIQUE,
             event_type TEXT NOT NULL,
             schema_version INTEGER NOT NULL,
             data BYTEA NOT NULL,
             metadata TEXT,
             recorded_at_ms BIGINT NOT NULL,
             UNIQUE (stream, version)
         )",
    )
    .execute(&pool)
    .await
    .expect("raw table");
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .expect("synchronous_commit");
    println!("postgres synchronous_commit = {synchronous_commit}, schema {schema}");
    let store: Arc<dyn EventStore> = Arc::new(store);
    // The two take turns in short slices, in the order raw, store, store,
    // raw, ... (ABBA), so drifts of the server (checkpoints, autovacuum,
    // other load on the machine) weigh on both alike.
    let rounds = env_usize("BUSWAY_BENCH_ROUNDS", 4).max(1);
    let slice = duration / u32::try_from(rounds).unwrap_or(1);
    for batch in [1, 10] {
        let (mut raw_n, mut raw_secs, mut n, mut secs) = (0, 0.0, 0, 0.0);
        for round in 0..rounds {
            for raw in [round % 2 == 0, round % 2 != 0] {
                if raw {
                    let (done, took) = raw_inserts(pool.clone(), batch, slice).await;
                    raw_n += done;
                    raw_secs += took;
                } else {
                    let (done, took) = appends(store.clone(), batch, slice).await;
                    n += done;
                    secs += took;
                }
            }
        }
        let raw_rate = (raw_n * batch as u64) as f64 / raw_secs;
        let rate = (n * batch as u64) as f64 / secs;
        println!(
            "raw      16 writers x {batch:>2} rows/insert:    {raw_rate:>9.0} events/s  ({raw_n} INSERTs in {raw_secs:.1} s)"
        );
        println!(
            "postgres 16 writers x {batch:>2} events/append:  {rate:>9.0} events/s  ({n} appends in {secs:.1} s) = {:.2}x raw (target >= 0.80x)",
            rate / raw_rate
        );
    }
    drop(store);
    // The catch-up reads a log of its own, in a second fresh schema.
    let total = env_usize("BUSWAY_BENCH_PROJECTION_EVENTS", 100_000);
    let log_schema = format!("{schema}_log");
    let log_transport =
        PostgresTransport::connect(&format!("{url}{sep}schema={log_schema}&max_connections=4"))
            .await
            .expect("connect to PostgreSQL");
    let log: Arc<dyn EventStore> = Arc::new(
        PostgresEventStore::open(log_transport.clone())
            .await
            .expect("event store"),
    );
    catch_up("postgres", log, total).await;
    log_transport.close().await;
    for schema in [&schema, &log_schema] {
        sqlx::query(&format!(r#"DROP SCHEMA "{schema}" CASCADE"#))
            .execute(&pool)
            .await
            .expect("drop a bench schema");
    }
    transport.close().await;
}

#[tokio::main]
async fn main() {
    let duration = Duration::from_secs(env_usize("BUSWAY_BENCH_SECONDS", 5) as u64);
    let which = arg("--store").unwrap_or_else(|| "sqlite".into());
    if which == "postgres" || which == "all" {
        let url = arg("--postgres-url")
            .or_else(|| std::env::var("BUSWAY_BENCH_POSTGRES_URL").ok())
            .expect("--store postgres needs --postgres-url URL or BUSWAY_BENCH_POSTGRES_URL");
        postgres(&url, duration).await;
    }
    if which == "sqlite" || which == "all" {
        sqlite(duration).await;
    }
}

async fn sqlite(duration: Duration) {
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
    catch_up("sqlite", store, total).await;
    transport.close().await;
}
