//! Work queues: tasks on the reference `task_queue`, run by competing
//! workers; a flaky task is retried with backoff, a task of unknown type is
//! dead-lettered at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busway::{Bus, HandlerError, RetryPolicy};
use serde::Deserialize;
use tokio::sync::mpsc;

#[derive(Deserialize)]
struct SendEmail {
    email: String,
    subject: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let bus = Bus::connect(&url).await?;
    let (done_tx, mut done) = mpsc::unbounded_channel::<String>();
    let failures = Arc::new(AtomicU32::new(0));

    bus.register_task_handler("send_email", move |task: SendEmail| {
        let done = done_tx.clone();
        let failures = failures.clone();
        async move {
            // The mail server refuses the first try.
            if failures.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::new("smtp: try again later"));
            }
            let _ = done.send(format!("sent `{}` to {}", task.subject, task.email));
            Ok(())
        }
    });
    bus.start_task_workers()
        .workers(4)
        .retry(
            RetryPolicy::default()
                .with_max_attempts(5)
                .with_backoff(Duration::from_millis(50), Duration::from_secs(2)),
        )
        .await?;

    bus.submit_task(
        "send_email",
        &serde_json::json!({"email": "user1@example.com", "subject": "welcome"}),
    )
    .priority(5)
    .await?;
    bus.submit_task(
        "generate_report",
        &serde_json::json!({"report_type": "daily_sales"}),
    )
    .await?;

    if let Some(line) = tokio::time::timeout(Duration::from_secs(5), done.recv()).await? {
        println!("{line}");
    }
    let stats = bus
        .transport()
        .queue_stats(&busway::QueueName::new("task_queue")?)
        .await?;
    println!("{:?}; dead letters: {}", bus.stats(), stats.dead_lettered);
    bus.shutdown().await;
    Ok(())
}
