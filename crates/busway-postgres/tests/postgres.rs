//! PostgreSQL-specific behaviour: connection errors, publishing inside the
//! caller's transaction (outbox), and recovery after the server drops the
//! transport's connections.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_core::{
    ConnectError, ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport,
};
use busway_postgres::PostgresTransport;
use futures::StreamExt;
use sqlx::Connection;
use support::TestSchema;

/// The full error chain, as an operator would read it.
fn chain(e: ConnectError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

#[tokio::test]
async fn connection_errors_name_the_server_and_the_cause_without_the_password() -> anyhow::Result<()>
{
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let host = options.get_host().to_owned();
    let port = options.get_port();

    // Nothing listens on port 1.
    let unreachable = "postgres://postgres:hunter2secret@127.0.0.1:1/test?connect_timeout_ms=3000";
    let e = PostgresTransport::connect(unreachable)
        .await
        .err()
        .context("connected to port 1")?;
    ensure!(
        e.is_retryable(),
        "an unreachable server may come back: {e:?}"
    );
    let text = chain(e);
    ensure!(
        text.contains("127.0.0.1:1"),
        "does not name the server: {text}"
    );
    ensure!(
        !text.contains("hunter2secret"),
        "leaks the password: {text}"
    );

    let bad_role = format!("postgres://busway_no_such_role:hunter2secret@{host}:{port}/test");
    let e = PostgresTransport::connect(&bad_role)
        .await
        .err()
        .context("unknown role accepted")?;
    ensure!(!e.is_retryable(), "bad credentials stay bad: {e:?}");
    let text = chain(e);
    ensure!(
        text.contains(&format!("{host}:{port}")),
        "does not name the server: {text}"
    );
    ensure!(
        text.contains("busway_no_such_role"),
        "does not say what was refused: {text}"
    );
    ensure!(
        !text.contains("hunter2secret"),
        "leaks the password: {text}"
    );

    let bad_database = format!("postgres://postgres:hunter2secret@{host}:{port}/busway_no_such_db");
    let e = PostgresTransport::connect(&bad_database)
        .await
        .err()
        .context("unknown database accepted")?;
    ensure!(!e.is_retryable(), "a missing database stays missing: {e:?}");
    let text = chain(e);
    ensure!(
        text.contains("busway_no_such_db"),
        "does not name the database: {text}"
    );
    ensure!(
        text.contains("does not exist"),
        "does not give the cause: {text}"
    );
    ensure!(
        !text.contains("hunter2secret"),
        "leaks the password: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn publish_in_commits_with_the_callers_transaction() -> anyhow::Result<()> {
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let schema = TestSchema::new(&url);
    let transport = PostgresTransport::connect(&schema.transport_url("")).await?;
    let queue = QueueName::new("outbox")?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    sqlx::query("CREATE TABLE orders (id BIGINT PRIMARY KEY)")
        .execute(transport.pool())
        .await?;

    // Rolled back: neither the row nor the message.
    let mut tx = transport.pool().begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (1)")
        .execute(&mut *tx)
        .await?;
    let placed = Publish::to_queue(queue.clone(), Message::new("order.placed", "1"));
    transport.publish_in(&mut tx, &[placed]).await?;
    tx.rollback().await?;
    ensure!(
        transport.queue_stats(&queue).await?.ready == 0,
        "a rolled-back publish was stored"
    );

    // Committed: both, and a waiting consumer is woken by the commit.
    let mut deliveries = transport.consume(&queue, ConsumeOptions::default()).await?;
    let mut tx = transport.pool().begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (2)")
        .execute(&mut *tx)
        .await?;
    let placed = Publish::to_queue(queue.clone(), Message::new("order.placed", "2"));
    transport.publish_in(&mut tx, &[placed]).await?;
    tx.commit().await?;
    let delivery = tokio::time::timeout(Duration::from_secs(15), deliveries.next())
        .await
        .context("the commit did not wake the consumer")?
        .context("stream ended")??;
    ensure!(&delivery.message().payload[..] == b"2");
    delivery.ack().await?;
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(transport.pool())
        .await?;
    ensure!(orders == 1, "{orders} orders");

    // Unknown queues are refused inside the transaction too.
    let mut tx = transport.pool().begin().await?;
    let lost = Publish::to_queue(QueueName::new("no_such_queue")?, Message::new("x", "y"));
    ensure!(
        matches!(
            transport.publish_in(&mut tx, &[lost]).await,
            Err(busway_core::PublishError::QueueNotFound(_))
        ),
        "publish_in to a missing queue"
    );
    tx.rollback().await?;
    transport.close().await;
    Ok(())
}

/// Terminates every backend of `application_name`; returns how many.
async fn terminate(url: &str, application_name: &str) -> anyhow::Result<i64> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1) t",
    )
    .bind(application_name)
    .fetch_one(&mut conn)
    .await?;
    Ok(killed)
}

#[tokio::test]
async fn recovers_after_its_connections_are_terminated_and_loses_nothing() -> anyhow::Result<()> {
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let schema = TestSchema::new(&url);
    let application = format!("busway_reconnect_{}", &schema.name[12..]);
    let transport: Arc<dyn Transport> = Arc::new(
        PostgresTransport::connect(
            &schema.transport_url(&format!("&application_name={application}&lease_ms=2000")),
        )
        .await?,
    );
    let queue = QueueName::new("reconnect")?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;

    // The consumer records every message it acknowledged.
    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut deliveries = transport
        .consume(&queue, ConsumeOptions::with_prefetch(50))
        .await?;
    let consumer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(delivery) = deliveries.next().await {
                let Ok(delivery) = delivery else { continue };
                let text = String::from_utf8_lossy(&delivery.message().payload).into_owned();
                // A failed ack means the message comes back: count it then.
                if delivery.ack().await.is_ok() {
                    acked.lock().unwrap().insert(text);
                }
            }
        })
    };

    // Publish in rounds; between rounds the server drops every connection
    // of the transport. A publish that fails is retried until confirmed.
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 300;
    let mut confirmed = HashSet::new();
    let mut killed = 0;
    let mut failed_publishes = 0;
    for round in 0..ROUNDS {
        let publishes: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                let transport = transport.clone();
                let queue = queue.clone();
                async move {
                    let text = format!("{round}:{i}");
                    let mut failures = 0;
                    for _ in 0..100 {
                        let m = Message::new("job", text.clone());
                        match transport.publish(Publish::to_queue(queue.clone(), m)).await {
                            Ok(()) => return Ok((text, failures)),
                            Err(e) if e.is_retryable() => {
                                failures += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                    bail!("publish of {text} never succeeded")
                }
            })
            .collect();
        let publishing = tokio::spawn(
            futures::stream::iter(publishes)
                .buffer_unordered(32)
                .collect::<Vec<_>>(),
        );
        // Once while the round is publishing, once after it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        killed += terminate(&url, &application).await?;
        for result in publishing.await? {
            let (text, failures) = result?;
            failed_publishes += failures;
            confirmed.insert(text);
        }
        killed += terminate(&url, &application).await?;
    }
    ensure!(
        killed >= ROUNDS as i64,
        "only {killed} connections were terminated"
    );

    // Everything confirmed arrives, through the recovered connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing = confirmed.difference(&acked.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{missing} of {} confirmed messages never arrived",
                confirmed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} confirmed, all received; {killed} connections terminated, {failed_publishes} publishes retried by the caller",
        confirmed.len()
    );
    transport.close().await;
    consumer.await?;
    Ok(())
}
