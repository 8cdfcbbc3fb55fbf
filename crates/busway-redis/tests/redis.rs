//! Redis-specific behaviour: errors that name the server, and recovery
//! after the server drops the transport's connections.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_redis::{RedisConfig, RedisTransport};
use futures::StreamExt;
use tokio::sync::Mutex;

#[tokio::test]
async fn unreachable_server_is_named_without_its_password() {
    let err = RedisTransport::connect("redis://:hunter2@127.0.0.1:1/0")
        .await
        .expect_err("nothing listens on port 1");
    let text = format!("{err} / {:?}", std::error::Error::source(&err));
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(text.contains("redis"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(err.is_retryable(), "a refused connection may succeed later");
}

/// The ids of the server's client connections.
fn client_ids(base: &str) -> anyhow::Result<HashSet<String>> {
    let client = redis::Client::open(base)?;
    let mut conn = client.get_connection()?;
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn)?;
    Ok(list
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect())
}

fn kill_clients(base: &str, ids: &HashSet<String>) -> anyhow::Result<usize> {
    let client = redis::Client::open(base)?;
    let mut conn = client.get_connection()?;
    let mut killed = 0;
    for id in ids {
        let n: Result<(), _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query(&mut conn);
        killed += usize::from(n.is_ok());
    }
    Ok(killed)
}

/// `CLIENT KILL` on every connection of a transport while it publishes and
/// consumes: it reconnects by itself and every confirmed message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_loses_no_confirmed_message() -> anyhow::Result<()> {
    let Some(redis) = support::IsolatedRedis::new()? else {
        return Ok(());
    };
    let before = client_ids(redis.base())?;
    let (url, config) = RedisConfig::from_url(&redis.url())?;
    let t = Arc::new(
        RedisTransport::connect_with(&url, config.with_lease(Duration::from_secs(3))).await?,
    );
    let q = QueueName::new("killed")?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    let mut deliveries = t.consume(&q, ConsumeOptions::with_prefetch(50)).await?;
    let ours: HashSet<String> = client_ids(redis.base())?
        .difference(&before)
        .cloned()
        .collect();
    anyhow::ensure!(!ours.is_empty(), "no connection of the transport found");

    let received = Arc::new(Mutex::new(HashSet::new()));
    let consumer = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(d) = deliveries.next().await {
                let Ok(d) = d else { continue };
                let body = String::from_utf8_lossy(&d.message().payload).into_owned();
                // A failed ack leaves the message to come back: counted once anyway.
                let _ = d.ack().await;
                received.lock().await.insert(body);
            }
        })
    };

    const N: usize = 3000;
    let mut confirmed = HashSet::new();
    let mut failures = 0;
    for i in 0..N {
        if i == N / 3 || i == 2 * N / 3 {
            kill_clients(redis.base(), &ours)?;
        }
        loop {
            match t
                .publish(Publish::to_queue(
                    q.clone(),
                    Message::new("n", i.to_string()),
                ))
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    if failures > 100 {
                        bail!("publishing keeps failing: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        confirmed.insert(i.to_string());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let got = received.lock().await;
            confirmed.difference(&got).count()
        };
        if missing == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{missing} of {N} confirmed messages never arrived");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.close().await;
    consumer.await.context("consumer task")?;
    eprintln!("{failures} publishes failed and were retried across 2 kills");
    Ok(())
}
