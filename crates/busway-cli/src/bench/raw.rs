//! Baselines: the bare storage doing the same work as busway, in the same run.
//!
//! - `sqlite://`: plain rusqlite on a scratch file next to the database, with
//!   the same journal and sync settings. Each publisher commits its window of
//!   messages in one transaction; the consumer selects and deletes up to
//!   `prefetch` rows per transaction. One connection is shared (SQLite has one
//!   writer at a time; contending connections would only add busy waits).
//! - `memory://`: a bounded tokio channel.
//! - `amqp://`: plain lapin on a queue of its own: persistent publishes with
//!   publisher confirms, `window` in flight per publisher; consumers with
//!   `basic.qos(prefetch)` acknowledging each message.
//! - `redis://`: plain redis-rs on a stream of its own (see `redis_streams`).
//! - `postgres://`: plain sqlx running the transport's statements on a table
//!   of its own (see `postgres`).
//! - `nats://`: plain async-nats JetStream on a stream of its own (see
//!   `nats_jetstream`).
//!
//! For `--pattern rpc`:
//! - `amqp://`: plain lapin RPC with direct reply-to (see `amqp_rpc`).
//! - `memory://`: a tokio channel of requests, each answered on a oneshot.
//! - `sqlite://`: none (SQLite has no request-response of its own to compare with).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use busway::sqlite::{SqliteConfig, Synchronous};
use rusqlite::{params, Connection};

mod amqp;
mod amqp_rpc;
mod nats_jetstream;
mod postgres;
mod redis_streams;

use super::rpc::{echo_text, timed_calls, RpcMeasured};
use super::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

/// The outcome of an RPC baseline.
pub(super) enum RpcBaseline {
    /// The baseline's name and figures.
    Measured(&'static str, RpcMeasured),
    /// Why the backend has none.
    None(String),
}

pub(super) async fn run_rpc(args: &BenchArgs) -> anyhow::Result<RpcBaseline> {
    let scheme = args.url.split_once("://").map_or("", |(s, _)| s);
    Ok(match scheme {
        "amqp" | "amqps" => {
            RpcBaseline::Measured("raw lapin direct reply-to", amqp_rpc::run(args).await?)
        }
        "memory" => RpcBaseline::Measured("tokio mpsc + oneshot", raw_channel_rpc(args).await?),
        other => RpcBaseline::None(format!(
            "no raw RPC baseline for `{other}://`: its storage has no request-response of its own"
        )),
    })
}

/// Deletes a queue a bench run left (RabbitMQ keeps non-durable queues until it restarts).
pub(super) async fn delete_rpc_queue(url: &str, queue: &str) {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        if let Err(e) = amqp_rpc::delete_queue(url, queue).await {
            eprintln!("could not delete the bench queue {queue}: {e:#}");
        }
    }
}

/// In-process RPC with nothing in between: a channel of requests served by
/// one task, each reply sent back on its own oneshot.
async fn raw_channel_rpc(args: &BenchArgs) -> anyhow::Result<RpcMeasured> {
    type Call = (String, tokio::sync::oneshot::Sender<String>);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Call>(args.in_flight.max(1));
    let server = tokio::spawn(async move {
        while let Some((text, reply)) = rx.recv().await {
            let _ = reply.send(text);
        }
    });
    let text = echo_text(args.size);
    let measured = timed_calls(args.messages, args.in_flight, || {
        let (tx, text) = (tx.clone(), text.clone());
        async move {
            let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
            tx.send((text, reply_tx)).await?;
            let reply = reply_rx.await?;
            anyhow::ensure!(!reply.is_empty(), "empty echo");
            Ok(())
        }
    })
    .await;
    drop(tx);
    let _ = server.await;
    measured
}

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<(&'static str, Measured)> {
    let scheme = args.url.split_once("://").map_or("", |(s, _)| s);
    match scheme {
        "sqlite" => {
            let (path, config) = SqliteConfig::from_url(&args.url)?;
            let args = args.clone();
            let measured =
                tokio::task::spawn_blocking(move || raw_sqlite(&args, &path, &config)).await??;
            Ok(("raw rusqlite", measured))
        }
        "memory" => Ok(("tokio mpsc", raw_channel(args).await?)),
        "amqp" | "amqps" => Ok(("raw lapin", amqp::run(args).await?)),
        "redis" | "rediss" => Ok(("raw redis-rs", redis_streams::run(args).await?)),
        "postgres" | "postgresql" => Ok(("raw sqlx", postgres::run(args).await?)),
        "nats" => Ok(("raw async-nats", nats_jetstream::run(args).await?)),
        other => bail!("no raw baseline for `{other}://` yet"),
    }
}

fn scratch_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".raw-baseline");
    path.with_file_name(name)
}

fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

fn raw_sqlite(args: &BenchArgs, path: &Path, config: &SqliteConfig) -> anyhow::Result<Measured> {
    let path = scratch_path(path);
    remove_database(&path);
    let conn = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let synchronous = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        _ => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous};
         CREATE TABLE raw_messages(seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);"
    ))?;
    let conn = Arc::new(Mutex::new(conn));
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();

    let publish = |p: usize| {
        let (conn, n) = (conn.clone(), args.share_of(p));
        let (size, window) = (args.size, args.window as u64);
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut sent = 0;
            while sent < n {
                let batch = window.min(n - sent);
                let mut c = lock(&conn)?;
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                {
                    let mut insert =
                        tx.prepare_cached("INSERT INTO raw_messages(payload) VALUES (?1)")?;
                    for _ in 0..batch {
                        insert.execute(params![&stamped_payload(start, size)[..]])?;
                    }
                }
                tx.commit()?;
                sent += batch;
            }
            Ok(())
        })
    };
    let consume = || {
        let (conn, acked, total) = (conn.clone(), acked.clone(), args.messages);
        let prefetch = i64::from(args.prefetch);
        std::thread::spawn(move || -> anyhow::Result<_> {
            let mut latencies = new_histogram()?;
            let mut idle_since = Instant::now();
            while acked.load(Ordering::Relaxed) < total {
                let mut c = lock(&conn)?;
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let rows = {
                    let mut select = tx.prepare_cached(
                        "SELECT seq, payload FROM raw_messages ORDER BY seq LIMIT ?1",
                    )?;
                    let rows = select
                        .query_map([prefetch], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut delete =
                        tx.prepare_cached("DELETE FROM raw_messages WHERE seq = ?1")?;
                    for (seq, _) in &rows {
                        delete.execute([seq])?;
                    }
                    rows
                };
                tx.commit()?;
                drop(c);
                if rows.is_empty() {
                    if idle_since.elapsed() > Duration::from_secs(30) {
                        bail!("raw consumer made no progress for 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                idle_since = Instant::now();
                for (_, payload) in &rows {
                    latencies.record(latency_us(start, payload))?;
                }
                acked.fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
            Ok(latencies)
        })
    };

    let mut consumers = Vec::new();
    if !args.sequential {
        consumers = (0..args.consumers).map(|_| consume()).collect();
    }
    for p in (0..args.publishers).map(publish).collect::<Vec<_>>() {
        p.join()
            .map_err(|_| anyhow!("publisher thread panicked"))??;
    }
    let publish_elapsed = start.elapsed();
    let consume_start = Instant::now();
    if args.sequential {
        consumers = (0..args.consumers).map(|_| consume()).collect();
    }
    let mut latencies = new_histogram()?;
    for c in consumers {
        latencies.add(
            c.join()
                .map_err(|_| anyhow!("consumer thread panicked"))??,
        )?;
    }
    let measured = Measured::stop(
        start,
        publish_elapsed,
        args.sequential.then_some(consume_start),
        latencies,
    );
    drop(conn);
    remove_database(&path);
    Ok(measured)
}

fn lock(conn: &Mutex<Connection>) -> anyhow::Result<std::sync::MutexGuard<'_, Connection>> {
    conn.lock().map_err(|_| anyhow!("connection lock poisoned"))
}

async fn raw_channel(args: &BenchArgs) -> anyhow::Result<Measured> {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(
        usize::from(args.prefetch).max(1) * args.consumers,
    );
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let start = Instant::now();
    let consumers: Vec<_> = (0..args.consumers)
        .map(|_| {
            let rx = rx.clone();
            tokio::spawn(async move {
                let mut latencies = new_histogram()?;
                while let Some(payload) = rx.lock().await.recv().await {
                    latencies.record(latency_us(start, &payload))?;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (tx, n, size) = (tx.clone(), args.share_of(p), args.size);
            tokio::spawn(async move {
                for _ in 0..n {
                    tx.send(stamped_payload(start, size)).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    drop(tx);
    for p in publishers {
        p.await??;
    }
    let publish_elapsed = start.elapsed();
    let mut latencies = new_histogram()?;
    for c in consumers {
        latencies.add(c.await??)?;
    }
    // The channel's consumers always run alongside the publishers.
    Ok(Measured::stop(start, publish_elapsed, None, latencies))
}
