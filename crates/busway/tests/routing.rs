//! Content-based routing on memory and SQLite.

#[allow(unused_macros, unused_imports)]
mod support;

use std::sync::Arc;

use anyhow::{ensure, Context};
use busway::headers::DEAD_LETTER_REASON;
use busway::middleware::{MethodRequest, TaskRequest};
use busway::routing::{handler, ContentRouter, Predicate};
use busway::{Bus, Event, HandlerError, Message, Publish, QueueName, Transport};
use support::{next_dead_letter, unique, PATIENCE};
use tokio::sync::mpsc;

type T = Arc<dyn Transport>;

async fn tasks_route_by_header_and_body(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let queue = bus.task_queue(&unique("ship"))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(&'static str, String)>();
    let default_tx = tx.clone();
    queue.register_handler("ship", move |p: serde_json::Value| {
        let _ = default_tx.send(("standard", p["order"].as_str().unwrap_or("").to_owned()));
        async { Ok(()) }
    });
    let route = |name: &'static str| {
        let tx = tx.clone();
        handler(move |task: TaskRequest| {
            let _ = tx.send((name, task.body["order"].as_str().unwrap_or("").to_owned()));
            async { Ok::<_, HandlerError>(()) }
        })
    };
    let router = ContentRouter::new()
        .route(Predicate::header_eq("tier", "gold"), route("express"))
        .route(
            Predicate::body(|b| b["weight_kg"].as_f64().is_some_and(|w| w > 30.0)),
            route("freight"),
        );
    queue.start_workers().workers(1).layer(router).await?;
    let task = |order: &str, extra: serde_json::Value| -> anyhow::Result<Message> {
        let mut params = serde_json::json!({"order": order});
        if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        Ok(Message::json(
            "ship",
            &serde_json::json!({"type": "ship", "params": params}),
        )?)
    };
    let name = queue.name().clone();
    let sends = [
        task("o1", serde_json::json!({}))?.with_header("tier", "gold"),
        task("o2", serde_json::json!({"weight_kg": 45.0}))?,
        task("o3", serde_json::json!({"weight_kg": 2.0}))?,
    ];
    for m in sends {
        t.publish(Publish::to_queue(name.clone(), m)).await?;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = tokio::time::timeout(PATIENCE, rx.recv())
            .await?
            .context("closed")?;
        seen.push(got);
    }
    seen.sort();
    let expected = vec![
        ("express", "o1".to_owned()),
        ("freight", "o2".to_owned()),
        ("standard", "o3".to_owned()),
    ];
    ensure!(seen == expected, "{seen:?}");
    bus.shutdown().await;
    Ok(())
}

async fn rpc_routes_by_params(t: T) -> anyhow::Result<()> {
    let service = unique("quotes");
    let bus = Bus::new(t);
    let vip = handler(|_: MethodRequest| async { Ok::<_, HandlerError>(serde_json::json!(0.0)) });
    bus.register_request_handler(&service, "fee", |_: serde_json::Value| async { Ok(5.0) })
        .layer(ContentRouter::new().route(Predicate::body_eq("/vip", true), vip))
        .await?;
    let normal: f64 = bus
        .request(&service, "fee", &serde_json::json!({"vip": false}))
        .timeout(PATIENCE)
        .await?;
    let waived: f64 = bus
        .request(&service, "fee", &serde_json::json!({"vip": true}))
        .timeout(PATIENCE)
        .await?;
    ensure!(normal == 5.0 && waived == 0.0, "{normal} {waived}");
    bus.shutdown().await;
    Ok(())
}

async fn events_route_to_topics(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let prefix = unique("orders");
    let router_group = unique("router");
    let placed = format!("{prefix}.placed");
    let topics = ContentRouter::new()
        .route(
            Predicate::body(|d| d["total"].as_f64().is_some_and(|t| t >= 1000.0)),
            format!("{prefix}.large"),
        )
        .route(
            Predicate::header_eq("channel", "shop"),
            format!("{prefix}.shop"),
        );
    bus.route_events(&placed, &router_group, topics).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    for kind in ["large", "shop"] {
        let tx = tx.clone();
        bus.register_event_handler(
            &format!("{prefix}.{kind}"),
            &unique(kind),
            move |e: Event| {
                let _ = tx.send((kind.to_owned(), e.aggregate_id.clone()));
                async { Ok(()) }
            },
        )
        .await?;
    }
    bus.publish_event(&Event::new(
        &placed,
        "big",
        serde_json::json!({"total": 5000.0}),
    ))
    .await?;
    // A header route: published by hand with the header set.
    let shop = Event::new(&placed, "small", serde_json::json!({"total": 10.0}));
    let message = Message::json(placed.clone(), &shop)?.with_header("channel", "shop");
    t.publish(Publish::to_topic(busway::Topic::new(&placed)?, message))
        .await?;
    // No route: dead-lettered with the reason.
    bus.publish_event(&Event::new(
        &placed,
        "stray",
        serde_json::json!({"total": 1.0}),
    ))
    .await?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(
            tokio::time::timeout(PATIENCE, rx.recv())
                .await?
                .context("closed")?,
        );
    }
    seen.sort();
    ensure!(
        seen == vec![
            ("large".to_owned(), "big".to_owned()),
            ("shop".to_owned(), "small".to_owned())
        ],
        "{seen:?}"
    );
    let dead = next_dead_letter(&t, &QueueName::new(&router_group)?).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("no route"), "{reason}");
    dead.ack().await?;
    bus.shutdown().await;
    Ok(())
}

macro_rules! on_memory_and_sqlite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::memory();
                    super::$case(backend.transport.clone()).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::sqlite().await?;
                    let result = super::$case(backend.transport.clone()).await;
                    backend.transport.close().await;
                    result
                }
            )*
        }
    };
}

on_memory_and_sqlite!(
    tasks_route_by_header_and_body,
    rpc_routes_by_params,
    events_route_to_topics,
);
