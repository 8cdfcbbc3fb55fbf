//! NATS-specific behaviour: errors that name the server, and recovery
//! after the transport's connection is cut.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_nats::{NatsConfig, NatsTransport};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[tokio::test]
async fn unreachable_server_is_named_without_its_password() -> anyhow::Result<()> {
    let err = NatsTransport::connect("nats://bob:hunter2@127.0.0.1:1")
        .await
        .err()
        .context("nothing listens on port 1")?;
    let text = format!("{err} / {:?}", std::error::Error::source(&err));
    ensure!(text.contains("127.0.0.1:1"), "{text}");
    ensure!(text.contains("nats"), "{text}");
    ensure!(!text.contains("hunter2"), "{text}");
    ensure!(err.is_retryable(), "a refused connection may succeed later");
    Ok(())
}

/// A TCP relay to the server that can cut every connection through it.
struct Relay {
    address: String,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let held = pumps.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                if let Ok(mut p) = held.lock() {
                    p.push(tokio::spawn(pump(cr, sw)));
                    p.push(tokio::spawn(pump(sr, cw)));
                }
            }
        });
        Ok(Self { address, pumps })
    }

    /// Closes every connection through the relay; new ones are accepted.
    fn cut(&self) -> usize {
        let pumps: Vec<_> = self
            .pumps
            .lock()
            .map(|mut p| p.drain(..).collect())
            .unwrap_or_default();
        let n = pumps.iter().filter(|p| !p.is_finished()).count();
        for p in pumps {
            p.abort();
        }
        n / 2
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The transport's connection is cut twice while it publishes and
/// consumes: it reconnects by itself and every confirmed message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_no_confirmed_message() -> anyhow::Result<()> {
    let Some(nats) = support::IsolatedNats::new()? else {
        return Ok(());
    };
    let upstream = nats
        .base()
        .split_once("://")
        .map_or(nats.base(), |(_, rest)| rest)
        .trim_end_matches('/')
        .to_owned();
    let relay = Relay::start(upstream).await?;
    let (_, config) = NatsConfig::from_url(&nats.url())?;
    let t = Arc::new(
        NatsTransport::connect_with(
            &format!("nats://{}", relay.address),
            config.with_ack_wait(Duration::from_secs(2)),
        )
        .await?,
    );
    let q = QueueName::new("cut")?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    let mut deliveries = t.consume(&q, ConsumeOptions::with_prefetch(50)).await?;

    let received = Arc::new(tokio::sync::Mutex::new(HashSet::new()));
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
    let mut cut = 0;
    for i in 0..N {
        if i == N / 3 || i == 2 * N / 3 {
            cut += relay.cut();
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
                    if failures > 200 {
                        bail!("publishing keeps failing: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        confirmed.insert(i.to_string());
    }
    ensure!(cut >= 2, "{cut} connections cut, expected at least 2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
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
    eprintln!("{failures} publishes failed and were retried across 2 cuts");
    Ok(())
}

/// A temporary queue's stream is deleted when the transport closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_queues_go_with_the_transport() -> anyhow::Result<()> {
    let Some(nats) = support::IsolatedNats::new()? else {
        return Ok(());
    };
    let t = NatsTransport::connect(&nats.url()).await?;
    let q = QueueName::new("reply.0f3a")?;
    t.declare_temporary_queue(&q).await?;
    ensure!(
        t.list_queues().await?.contains(&q),
        "temporary queue not listed"
    );
    t.close().await;
    let left = nats.streams_left().await?;
    ensure!(
        !left.iter().any(|s| s.contains("reply")),
        "temporary queue left behind: {left:?}"
    );
    Ok(())
}
