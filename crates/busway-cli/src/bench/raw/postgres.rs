//! The raw sqlx baseline for `postgres://`: the statements the transport
//! runs, without busway around them, on a table of its own in a scratch
//! schema (dropped afterwards).
//!
//! - Each publisher inserts its `window` of messages with one multi-row
//!   `INSERT ... SELECT FROM unnest(...)` that also sends a `NOTIFY`,
//!   committed on its own (the transport groups concurrent publishes the
//!   same way).
//! - Each consumer leases up to `prefetch` rows with the transport's
//!   `FOR UPDATE SKIP LOCKED` update, then deletes them with one `DELETE`
//!   (its acks, batched). When nothing is ready it sleeps 1 ms instead of
//!   listening.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::postgres::PostgresConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::bench::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

const SCHEMA_SQL: &str = "
CREATE TABLE raw_messages (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        TEXT NOT NULL,
    id           UUID NOT NULL,
    kind         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    timestamp    BIGINT NOT NULL,
    lane         SMALLINT NOT NULL DEFAULT 0,
    payload      BYTEA NOT NULL,
    enqueued_at  BIGINT NOT NULL,
    visible_at   BIGINT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    lease_token  BIGINT
);
CREATE INDEX raw_messages_ready ON raw_messages (queue, lane DESC, visible_at, seq);
";

const NOW: &str = "(extract(epoch FROM now()) * 1000)::bigint";

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<Measured> {
    let (url, config) = PostgresConfig::from_url(&args.url)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let schema = format!("bench_raw_{}", &id[..12]);
    let options = PgConnectOptions::from_str(&url)?.options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections.max(2))
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to {}", busway::redact_url(&url)))?;
    sqlx::raw_sql(&format!(r#"CREATE SCHEMA "{schema}""#))
        .execute(&pool)
        .await?;
    let measured = measure(args, &pool).await;
    sqlx::raw_sql(&format!(r#"DROP SCHEMA "{schema}" CASCADE"#))
        .execute(&pool)
        .await?;
    pool.close().await;
    measured
}

async fn measure(args: &BenchArgs, pool: &PgPool) -> anyhow::Result<Measured> {
    sqlx::raw_sql(SCHEMA_SQL).execute(pool).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let consume = || {
        let (pool, acked, total) = (pool.clone(), acked.clone(), args.messages);
        let prefetch = i64::from(args.prefetch);
        async move {
            let mut latencies = new_histogram()?;
            let mut idle_since = Instant::now();
            let lease = format!(
                "WITH picked AS (
                     SELECT seq, visible_at AS was_visible_at FROM raw_messages
                     WHERE queue = 'bench' AND visible_at <= {NOW}
                     ORDER BY lane DESC, visible_at, seq LIMIT $1 FOR UPDATE SKIP LOCKED
                 )
                 UPDATE raw_messages m SET visible_at = {NOW} + 30000,
                     attempt = m.attempt + 1, lease_token = $2
                 FROM picked WHERE m.seq = picked.seq
                 RETURNING m.seq, m.id::text AS id, m.kind, m.payload, picked.was_visible_at"
            );
            let mut token = 0i64;
            while acked.load(Ordering::Relaxed) < total {
                token += 1;
                let rows = sqlx::query(&lease)
                    .bind(prefetch)
                    .bind(token)
                    .fetch_all(&pool)
                    .await?;
                if rows.is_empty() {
                    if idle_since.elapsed() > Duration::from_secs(30) {
                        bail!("raw consumer made no progress for 30 s");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                idle_since = Instant::now();
                let mut seqs = Vec::with_capacity(rows.len());
                for row in &rows {
                    let payload: Vec<u8> = row.try_get("payload")?;
                    latencies.record(latency_us(start, &payload))?;
                    seqs.push(row.try_get::<i64, _>("seq")?);
                }
                let tokens = vec![token; seqs.len()];
                sqlx::query(
                    "DELETE FROM raw_messages m \
                     USING unnest($1::bigint[], $2::bigint[]) AS a(seq, token) \
                     WHERE m.seq = a.seq AND m.lease_token = a.token",
                )
                .bind(&seqs)
                .bind(&tokens)
                .execute(&pool)
                .await?;
                acked.fetch_add(seqs.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(latencies)
        }
    };
    let mut consumers = Vec::new();
    if !args.sequential {
        consumers = (0..args.consumers)
            .map(|_| tokio::spawn(consume()))
            .collect();
    }
    let insert = format!(
        "WITH ins AS (
             INSERT INTO raw_messages (queue, id, kind, content_type, timestamp, payload,
                 enqueued_at, visible_at)
             SELECT 'bench', t.id::uuid, 'bench', 'application/octet-stream', t.ts, t.payload,
                 {NOW}, {NOW}
             FROM unnest($1::text[], $2::bigint[], $3::bytea[]) WITH ORDINALITY
                  AS t(id, ts, payload, ord)
             ORDER BY t.ord
             RETURNING queue
         )
         SELECT pg_notify('bench_raw', q.queue) FROM (SELECT DISTINCT queue FROM ins) q"
    );
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (pool, n, insert) = (pool.clone(), args.share_of(p), insert.clone());
            let (size, window) = (args.size, args.window as u64);
            tokio::spawn(async move {
                let mut sent = 0;
                while sent < n {
                    let batch = window.min(n - sent);
                    let ids: Vec<String> = (0..batch)
                        .map(|_| uuid::Uuid::now_v7().hyphenated().to_string())
                        .collect();
                    let now = busway::unix_millis(std::time::SystemTime::now());
                    let stamps = vec![now; ids.len()];
                    let payloads: Vec<Vec<u8>> = (0..batch)
                        .map(|_| stamped_payload(start, size).to_vec())
                        .collect();
                    sqlx::query(&insert)
                        .bind(&ids)
                        .bind(&stamps)
                        .bind(&payloads)
                        .execute(&pool)
                        .await?;
                    sent += batch;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for p in publishers {
        p.await??;
    }
    let publish_elapsed = start.elapsed();
    let consume_start = Instant::now();
    if args.sequential {
        consumers = (0..args.consumers)
            .map(|_| tokio::spawn(consume()))
            .collect();
    }
    let mut latencies = new_histogram()?;
    for c in consumers {
        latencies.add(c.await??)?;
    }
    Ok(Measured::stop(
        start,
        publish_elapsed,
        args.sequential.then_some(consume_start),
        latencies,
    ))
}
