//! Tests of the parts the conformance suite does not reach: leases across
//! processes, crashes, limits, the query plan.

use std::path::Path;
use std::time::{Duration, Instant};

use busway_core::{
    ConsumeOptions, Delivery, DeliveryStream, Durability, Message, Publish, PublishError,
    QueueName, QueueSpec, SettleError, Transport,
};
use futures::StreamExt;

use crate::{SqliteConfig, SqliteTransport};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(10);

fn open(path: &Path, lease: Duration) -> Result<SqliteTransport, busway_core::ConnectError> {
    SqliteTransport::open_with(
        path,
        SqliteConfig {
            lease,
            ..SqliteConfig::default()
        },
    )
}

async fn next(stream: &mut DeliveryStream) -> Result<Delivery, Box<dyn std::error::Error>> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(delivery)) => Ok(delivery?),
        Ok(None) => Err("the stream ended".into()),
        Err(_) => Err("no delivery in time".into()),
    }
}

async fn nothing_within(stream: &mut DeliveryStream, wait: Duration) -> TestResult {
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) => Ok(()),
        Ok(other) => Err(format!("expected nothing, got {other:?}").into()),
    }
}

async fn declared(
    t: &SqliteTransport,
    name: &str,
) -> Result<QueueName, Box<dyn std::error::Error>> {
    let q = QueueName::new(name)?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    Ok(q)
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_without_close_keeps_messages() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let t = SqliteTransport::open(&path)?;
    let q = declared(&t, "keep").await?;
    for i in 0..3 {
        t.publish(Publish::to_queue(
            q.clone(),
            Message::new("k", i.to_string()),
        ))
        .await?;
    }
    drop(t);
    let t = SqliteTransport::open(&path)?;
    // Declaring again with the same spec is a no-op.
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    assert_eq!(t.queue_stats(&q).await?.ready, 3);
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(3)).await?;
    for i in 0..3 {
        let d = next(&mut s).await?;
        assert_eq!(text(&d), i.to_string());
        assert_eq!(d.attempt(), 1);
        d.ack().await?;
    }
    t.close().await;
    Ok(())
}

/// A process that dies holding a delivery: another process gets it once the
/// lease runs out, with the attempt counted; the dead one's ack fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_redelivers_with_next_attempt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let lease = Duration::from_millis(600);
    let a = open(&path, lease)?;
    let q = declared(&a, "crash").await?;
    a.publish(Publish::to_queue(q.clone(), Message::new("job", "held")))
        .await?;
    let mut sa = a.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let held = next(&mut sa).await?;
    let leased_at = Instant::now();
    assert_eq!(held.attempt(), 1);
    a.crash();

    let b = open(&path, lease)?;
    let stats = b.queue_stats(&q).await?;
    assert_eq!((stats.ready, stats.in_flight), (0, 1), "{stats:?}");
    let mut sb = b.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let d = next(&mut sb).await?;
    assert!(
        leased_at.elapsed() >= lease - Duration::from_millis(50),
        "redelivered after {:?}, before the lease ran out",
        leased_at.elapsed()
    );
    assert_eq!(text(&d), "held");
    assert_eq!(d.attempt(), 2);
    assert!(held.ack().await.is_err());
    d.ack().await?;
    b.close().await;
    Ok(())
}

/// A live consumer slower than its lease keeps the delivery: renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_slow_consumer_keeps_its_lease() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let lease = Duration::from_millis(300);
    let a = open(&path, lease)?;
    let b = open(&path, lease)?;
    let q = declared(&a, "slow").await?;
    a.publish(Publish::to_queue(q.clone(), Message::new("job", "slow")))
        .await?;
    let mut sa = a.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let d = next(&mut sa).await?;
    let mut sb = b.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    nothing_within(&mut sb, lease * 4).await?;
    d.ack().await?;
    nothing_within(&mut sb, Duration::from_millis(100)).await?;
    assert_eq!(b.queue_stats(&q).await?.consumers, 2);
    a.close().await;
    b.close().await;
    Ok(())
}

/// Two transports on one file see each other's commits promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_transport_sees_commits_within_the_poll_interval() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let publisher = SqliteTransport::open(&path)?;
    let consumer = SqliteTransport::open(&path)?;
    let q = declared(&publisher, "shared").await?;
    let mut s = consumer
        .consume(&q, ConsumeOptions::with_prefetch(10))
        .await?;
    nothing_within(&mut s, Duration::from_millis(50)).await?;
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let sent = Instant::now();
        publisher
            .publish(Publish::to_queue(
                q.clone(),
                Message::new("x", i.to_string()),
            ))
            .await?;
        let d = next(&mut s).await?;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(text(&d), i.to_string());
        d.ack().await?;
    }
    // Generous: this machine also runs other builds.
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    // Topology declared by the other transport is seen too.
    let late = declared(&consumer, "declared_later").await?;
    publisher
        .publish(Publish::to_queue(late.clone(), Message::new("x", "y")))
        .await?;
    assert_eq!(consumer.queue_stats(&late).await?.ready, 1);
    publisher.close().await;
    consumer.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_refuses_the_whole_batch() -> TestResult {
    let dir = tempfile::tempdir()?;
    let t = SqliteTransport::open(dir.path().join("b.db"))?;
    let q = QueueName::new("bounded")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_length(3))
        .await?;
    let batch = |n: usize| {
        (0..n)
            .map(|i| Publish::to_queue(q.clone(), Message::new("m", i.to_string())))
            .collect::<Vec<_>>()
    };
    t.publish_batch(batch(2), Durability::Durable).await?;
    match t.publish_batch(batch(2), Durability::Durable).await {
        Err(PublishError::QueueFull { max_length: 3, .. }) => {}
        other => return Err(format!("expected QueueFull, got {other:?}").into()),
    }
    assert_eq!(t.queue_stats(&q).await?.ready, 2);
    // Buffered: accepted before the commit, stored shortly after.
    t.publish_batch(batch(1), Durability::Buffered).await?;
    let deadline = Instant::now() + WAIT;
    while t.queue_stats(&q).await?.ready != 3 {
        assert!(
            Instant::now() < deadline,
            "the buffered publish was not stored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.close().await;
    Ok(())
}

/// Deliveries buffered by prefetch but never handed out do not use up attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseen_buffered_deliveries_are_not_attempts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let t = SqliteTransport::open(dir.path().join("b.db"))?;
    let q = QueueName::new("once")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(1))
        .await?;
    for i in 0..3 {
        t.publish(Publish::to_queue(
            q.clone(),
            Message::new("m", i.to_string()),
        ))
        .await?;
    }
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(10)).await?;
    let first = next(&mut s).await?;
    // Let the other two reach the buffer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    first.ack().await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(10)).await?;
    for i in 1..3 {
        let d = next(&mut s).await?;
        assert_eq!(text(&d), i.to_string());
        assert_eq!(d.attempt(), 1);
        d.ack().await?;
    }
    assert_eq!(t.queue_stats(&q).await?.dead_lettered, 0);
    t.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_without_dead_letter_queue_returns_the_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let t = SqliteTransport::open(dir.path().join("b.db"))?;
    let q = QueueName::new("no_dlq")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_dead_letter(None))
        .await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("m", "stay")))
        .await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let d = next(&mut s).await?;
    match d.dead_letter("bad").await {
        Err(SettleError::NoDeadLetterQueue(name)) if name == q => {}
        other => return Err(format!("expected NoDeadLetterQueue, got {other:?}").into()),
    }
    let d = next(&mut s).await?;
    assert_eq!(text(&d), "stay");
    assert_eq!(d.attempt(), 2);
    d.ack().await?;
    t.close().await;
    Ok(())
}

/// The dequeue is an index range scan in delivery order: no table scan, no
/// sort, and it is not recompiled on every run.
#[test]
fn dequeue_uses_the_ready_index() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    drop(SqliteTransport::open(&path)?);
    let conn = rusqlite::Connection::open(&path)?;
    let plan = |sql: &str| -> Result<String, rusqlite::Error> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(3))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?.join("; "))
    };
    let sql = crate::writer::select_ready_sql()
        .replace("?1", "'q'")
        .replace("?2", "0")
        .replace("?3", "5")
        .replace("?4", "10")
        .replace("?5", "0")
        .replace("?6", "0");
    let dequeue = plan(&sql)?;
    assert!(dequeue.contains("busway_messages_ready"), "{dequeue}");
    assert!(!dequeue.contains("TEMP B-TREE"), "{dequeue}");
    let mut stmt = conn.prepare(&crate::writer::select_ready_sql())?;
    for now in 0..5 {
        stmt.query([&"q" as &dyn rusqlite::ToSql, &0, &now, &10, &0, &0])?
            .next()?;
    }
    let reprepared = stmt.get_status(rusqlite::StatementStatus::RePrepare);
    assert!(reprepared <= 1, "recompiled {reprepared} times");
    Ok(())
}

/// Closing, or dropping the last handle, returns held deliveries at once
/// (not after the lease) to another transport on the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_drop_release_leases_at_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let b = SqliteTransport::open(&path)?;
    let q = declared(&b, "handover").await?;
    b.publish(Publish::to_queue(q.clone(), Message::new("m", "x")))
        .await?;
    for (round, closing) in [true, false].into_iter().enumerate() {
        let a = SqliteTransport::open(&path)?;
        let mut sa = a.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
        let held = next(&mut sa).await?;
        assert_eq!(held.attempt(), 2 * u32::try_from(round)? + 1);
        let mut sb = b.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
        let released_at = Instant::now();
        if closing {
            a.close().await;
            drop(held);
        } else {
            // The last handle and the stream go; the delivery is still held.
            drop(sa);
            drop(a);
            std::mem::forget(held);
        }
        let d = next(&mut sb).await?;
        assert!(
            released_at.elapsed() < Duration::from_secs(5),
            "returned after {:?}, not at once",
            released_at.elapsed()
        );
        assert_eq!(d.attempt(), 2 * u32::try_from(round)? + 2);
        // Back to the queue for the next round.
        drop(d);
        drop(sb);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.close().await;
    Ok(())
}

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<SqliteTransport>();
    assert_send_sync::<SqliteConfig>();
    assert_send_sync::<crate::Synchronous>();
}

// ---- write jobs ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_rolls_back_its_rows_and_its_messages_alone() -> TestResult {
    use crate::WriteError;
    let dir = tempfile::tempdir()?;
    let t = SqliteTransport::open(dir.path().join("b.db"))?;
    let q = declared(&t, "announcements").await?;
    t.write(|tx| {
        tx.connection()
            .execute_batch("CREATE TABLE busway_test_rows (id TEXT PRIMARY KEY)")?;
        Ok::<_, WriteError>(())
    })
    .await?;
    // Many jobs at once share commits; the failing ones leave nothing behind.
    let mut jobs = Vec::new();
    for i in 0..200 {
        let t = t.clone();
        let q = q.clone();
        jobs.push(tokio::spawn(async move {
            t.write(move |tx| {
                tx.connection().execute(
                    "INSERT INTO busway_test_rows (id) VALUES (?1)",
                    [i.to_string()],
                )?;
                tx.publish(&[Publish::to_queue(q, Message::new("row", i.to_string()))])?;
                if i % 4 == 0 {
                    return Err(WriteError::Closed);
                }
                Ok(i)
            })
            .await
        }));
    }
    let mut ok = 0;
    for (i, job) in jobs.into_iter().enumerate() {
        match job.await? {
            Ok(n) => {
                assert_eq!(n, i);
                ok += 1;
            }
            Err(WriteError::Closed) => assert_eq!(i % 4, 0),
            Err(other) => return Err(other.into()),
        }
    }
    assert_eq!(ok, 150);
    let rows: i64 = t
        .read(|c| c.query_row("SELECT count(*) FROM busway_test_rows", [], |r| r.get(0)))
        .await?;
    assert_eq!(rows, 150);
    assert_eq!(t.queue_stats(&q).await?.ready, 150);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_is_rolled_back_and_the_writer_goes_on() -> TestResult {
    use crate::WriteError;
    let dir = tempfile::tempdir()?;
    let t = SqliteTransport::open(dir.path().join("b.db"))?;
    t.write(|tx| {
        tx.connection()
            .execute_batch("CREATE TABLE busway_test_rows (id TEXT PRIMARY KEY)")?;
        Ok::<_, WriteError>(())
    })
    .await?;
    let panicked = t
        .write(|tx| -> Result<(), WriteError> {
            tx.connection()
                .execute("INSERT INTO busway_test_rows (id) VALUES ('lost')", [])?;
            panic!("a bug in a store");
        })
        .await;
    assert!(
        matches!(panicked, Err(WriteError::JobPanicked)),
        "{panicked:?}"
    );
    // A job that violates a constraint fails with SQLite's error.
    t.write(|tx| {
        tx.connection()
            .execute("INSERT INTO busway_test_rows (id) VALUES ('kept')", [])?;
        Ok::<_, WriteError>(())
    })
    .await?;
    let duplicate = t
        .write(|tx| {
            tx.connection()
                .execute("INSERT INTO busway_test_rows (id) VALUES ('kept')", [])?;
            Ok::<_, WriteError>(())
        })
        .await;
    assert!(
        matches!(duplicate, Err(WriteError::Database { .. })),
        "{duplicate:?}"
    );
    let ids: Vec<String> = t
        .read(|c| {
            let mut s = c.prepare("SELECT id FROM busway_test_rows ORDER BY id")?;
            let ids = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await?;
    assert_eq!(ids, ["kept"]);
    t.close().await;
    let closed = t.write(|_| Ok::<_, WriteError>(())).await;
    assert!(matches!(closed, Err(WriteError::Closed)), "{closed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_rows_survive_a_crash_and_reopen() -> TestResult {
    use crate::WriteError;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b.db");
    let t = SqliteTransport::open(&path)?;
    t.write(|tx| {
        tx.connection().execute_batch(
            "CREATE TABLE busway_test_rows (id TEXT PRIMARY KEY);
             INSERT INTO busway_test_rows (id) VALUES ('a'), ('b');",
        )?;
        Ok::<_, WriteError>(())
    })
    .await?;
    t.crash();
    let reopened = SqliteTransport::open(&path)?;
    let rows: i64 = reopened
        .read(|c| c.query_row("SELECT count(*) FROM busway_test_rows", [], |r| r.get(0)))
        .await?;
    assert_eq!(rows, 2);
    Ok(())
}
