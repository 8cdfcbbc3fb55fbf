//! Dead-letter inspection, replay and purge on every backend.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use busway::dead_letters::{DeadLetterFilter, Replay, REPLAYED};
use busway::{Bus, HandlerError, QueueName, RetryPolicy, Transport};
use support::{unique, PATIENCE};

type T = Arc<dyn Transport>;

/// Waits until `queue`'s dead-letter queue holds `n` messages.
async fn wait_for_dead_letters(bus: &Bus, queue: &str, n: u64) -> anyhow::Result<()> {
    let dead = bus.dead_letters(queue)?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let count = dead.count().await?;
        if count == n {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{count} dead letters, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tasks that bounce are dead-lettered; list and filter them, purge some,
/// replay the rest once the handler is fixed: each runs exactly once more.
async fn list_filter_replay_and_purge(t: T) -> anyhow::Result<()> {
    let queue = unique("dlq");
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&queue)?;
    let fixed = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    {
        let fixed = fixed.clone();
        let handled = handled.clone();
        tasks.register_handler("send_email", move |p: serde_json::Value| {
            let fixed = fixed.clone();
            let handled = handled.clone();
            async move {
                if fixed.load(Ordering::SeqCst) == 0 {
                    let to = p["email"].as_str().unwrap_or_default().to_owned();
                    return Err(HandlerError::permanent(format!("bounced: {to}")));
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
    }
    tasks.register_handler("generate_report", |_p: serde_json::Value| async {
        Err::<(), _>(HandlerError::permanent("report engine down"))
    });
    tasks
        .start_workers()
        .retry(RetryPolicy::default().with_max_attempts(1))
        .await?;
    for i in 0..5 {
        tasks
            .submit(
                "send_email",
                &serde_json::json!({"email": format!("u{i}@bounce.test")}),
            )
            .await?;
    }
    tasks
        .submit(
            "generate_report",
            &serde_json::json!({"report_type": "daily"}),
        )
        .await?;
    wait_for_dead_letters(&bus, &queue, 6).await?;

    let dead = bus.dead_letters(&queue)?;
    ensure!(dead.queue() == &QueueName::new(&queue)?.dead_letter_queue());
    let all = dead.list(&DeadLetterFilter::default()).await?;
    ensure!(all.len() == 6, "{all:?}");
    // Listing leaves them where they are (a broker may take a moment to
    // requeue them).
    wait_for_dead_letters(&bus, &queue, 6).await?;
    let emails = dead
        .list(&DeadLetterFilter::default().kind("send_email"))
        .await?;
    ensure!(emails.len() == 5, "{emails:?}");
    wait_for_dead_letters(&bus, &queue, 6).await?;
    for e in &emails {
        ensure!(
            e.reason.as_deref().is_some_and(|r| r.contains("bounced: ")),
            "{e:?}"
        );
        ensure!(e.original_queue.as_deref() == Some(queue.as_str()), "{e:?}");
    }
    let by_reason = dead
        .list(&DeadLetterFilter::default().reason("engine down"))
        .await?;
    ensure!(by_reason.len() == 1 && by_reason[0].message.kind == "generate_report");
    wait_for_dead_letters(&bus, &queue, 6).await?;
    let old = dead
        .list(&DeadLetterFilter::default().older_than(Duration::from_secs(3600)))
        .await?;
    ensure!(old.is_empty(), "{old:?}");
    wait_for_dead_letters(&bus, &queue, 6).await?;

    // A dry run changes nothing.
    let would = dead
        .purge(&DeadLetterFilter::default().kind("generate_report"), true)
        .await?;
    ensure!(would.moved == 1 && would.kept == 5, "{would:?}");
    wait_for_dead_letters(&bus, &queue, 6).await?;
    let purged = dead
        .purge(&DeadLetterFilter::default().kind("generate_report"), false)
        .await?;
    ensure!(purged.moved == 1, "{purged:?}");
    wait_for_dead_letters(&bus, &queue, 5).await?;

    // Fix the handler, replay two, then the rest.
    fixed.store(1, Ordering::SeqCst);
    let first = dead
        .replay(&DeadLetterFilter::default().limit(2), &Replay::default())
        .await?;
    ensure!(first.moved == 2 && first.kept == 3, "{first:?}");
    wait_for_dead_letters(&bus, &queue, 3).await?;
    let rest = dead
        .replay(&DeadLetterFilter::default(), &Replay::default())
        .await?;
    ensure!(rest.moved == 3, "{rest:?}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while handled.load(Ordering::SeqCst) < 5 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "replayed tasks not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_dead_letters(&bus, &queue, 0).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        handled.load(Ordering::SeqCst) == 5,
        "a replayed task ran twice"
    );
    bus.shutdown().await;
    Ok(())
}

/// `--to` sends dead letters to another queue, marked as replayed.
async fn replay_to_another_queue(t: T) -> anyhow::Result<()> {
    let queue = unique("dlq_src");
    let parking = QueueName::new(unique("dlq_parking"))?;
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&queue)?;
    tasks.register_handler("charge", |_p: serde_json::Value| async {
        Err::<(), _>(HandlerError::permanent("card declined"))
    });
    tasks
        .start_workers()
        .retry(RetryPolicy::default().with_max_attempts(1))
        .await?;
    tasks
        .submit("charge", &serde_json::json!({"amount": 5}))
        .await?;
    wait_for_dead_letters(&bus, &queue, 1).await?;
    t.declare_queue(&busway::QueueSpec::new(parking.clone()))
        .await?;
    let dead = bus.dead_letters(&queue)?;
    let report = dead
        .replay(
            &DeadLetterFilter::default(),
            &Replay::default().to(parking.clone()),
        )
        .await?;
    ensure!(report.moved == 1, "{report:?}");
    let moved = support::next_message(&t, &parking).await?;
    ensure!(moved.message().kind == "charge");
    ensure!(moved.message().headers.get(REPLAYED) == Some("1"));
    ensure!(moved
        .message()
        .headers
        .get(busway::headers::DEAD_LETTER_REASON)
        .is_none());
    moved.ack().await?;
    ensure!(dead.count().await? == 0);
    bus.shutdown().await;
    Ok(())
}

/// A queue nobody ever dead-lettered to reads as empty.
async fn empty_and_missing_queues(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let dead = bus.dead_letters(&unique("never_used"))?;
    ensure!(dead.count().await? == 0);
    ensure!(dead.list(&DeadLetterFilter::default()).await?.is_empty());
    let report = dead
        .replay(&DeadLetterFilter::default(), &Replay::default())
        .await?;
    ensure!(report.moved == 0 && report.kept == 0);
    bus.shutdown().await;
    Ok(())
}

support::on_every_backend!(
    list_filter_replay_and_purge,
    replay_to_another_queue,
    empty_and_missing_queues,
);
