//! Publish-subscribe: two subscription groups with different patterns, each
//! getting its own copy of the events that match.

use std::time::Duration;

use busway::{Bus, Event};
use serde::Deserialize;
use tokio::sync::mpsc;

#[derive(Debug, Deserialize)]
struct OrderCreated {
    items: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let bus = Bus::connect(&url).await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();

    let tx = seen_tx.clone();
    bus.register_event_handler(
        "order.created",
        "inventory_service",
        move |e: Event<OrderCreated>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(format!("inventory: reserve {:?}", e.data.items));
                Ok(())
            }
        },
    )
    .await?;
    let tx = seen_tx;
    bus.register_event_handler("#", "audit_log", move |e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(format!("audit: {} on {}", e.event_type, e.aggregate_id));
            Ok(())
        }
    })
    .await?;

    bus.publish_event(&Event::new(
        "user.registered",
        "user_123",
        serde_json::json!({"email": "user@example.com"}),
    ))
    .await?;
    bus.publish_event(&Event::new(
        "order.created",
        "order_456",
        serde_json::json!({"order_id": "order_456", "items": ["item1", "item2"]}),
    ))
    .await?;

    // Two events to the audit group, one to inventory.
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), seen.recv()).await? {
            Some(line) => println!("{line}"),
            None => break,
        }
    }
    bus.shutdown().await;
    Ok(())
}
