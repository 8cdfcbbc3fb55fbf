//! The dedup layer on a durable inbox: a message handled before a restart is
//! not handled again after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use busway_core::{Message, Transport};
use busway_middleware::{DedupLayer, LayerError};
use busway_sqlite::{SqliteInbox, SqliteTransport};
use tower::{service_fn, Layer, ServiceExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_a_restart_does_not_repeat_the_side_effect() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("busway.db");
    let charged = Arc::new(AtomicUsize::new(0));
    let charge = |charged: Arc<AtomicUsize>| {
        service_fn(move |m: Message| {
            let charged = charged.clone();
            async move {
                if m.kind == "fails" {
                    return Err(LayerError::Store("the card was declined".into()));
                }
                charged.fetch_add(1, Ordering::SeqCst);
                Ok::<_, LayerError>(())
            }
        })
    };
    let paid = Message::new("charge_card", r#"{"amount":10}"#);
    let declined = Message::new("fails", "{}");

    let transport = SqliteTransport::open(&path)?;
    let dedup = DedupLayer::new(Arc::new(SqliteInbox::open(&transport).await?));
    dedup
        .layer(charge(charged.clone()))
        .oneshot(paid.clone())
        .await?;
    let failed = dedup
        .layer(charge(charged.clone()))
        .oneshot(declined.clone())
        .await;
    assert!(failed.is_err());
    // Whatever follows the handler (its ack) commits the inbox's record too.
    transport.close().await;

    let transport = SqliteTransport::open(&path)?;
    let dedup = DedupLayer::new(Arc::new(SqliteInbox::open(&transport).await?));
    dedup.layer(charge(charged.clone())).oneshot(paid).await?;
    assert_eq!(charged.load(Ordering::SeqCst), 1, "charged twice");
    assert_eq!(dedup.duplicates_skipped(), 1);
    // The failed one was forgotten: its redelivery runs (and fails) again.
    let again = dedup.layer(charge(charged.clone())).oneshot(declined).await;
    assert!(again.is_err());
    assert_eq!(dedup.duplicates_skipped(), 1);
    Ok(())
}
