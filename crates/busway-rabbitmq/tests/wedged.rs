//! A broker that stops answering (but keeps its connections open) makes
//! operations fail within `RabbitMqConfig::operation_timeout` instead of
//! hanging their callers. The wedge is a TCP relay in front of the real
//! broker that stops relaying; the broker itself is not disturbed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway_core::{Message, Publish, QueueName, Transport};
use busway_rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A relay to `upstream` on a local port; frozen, it holds every byte.
struct Relay {
    address: String,
    frozen: Arc<AtomicBool>,
}

async fn relay(upstream: String) -> anyhow::Result<Relay> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let frozen = Arc::new(AtomicBool::new(false));
    let gate = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, gate.clone()));
            tokio::spawn(pump(sr, cw, gate.clone()));
        }
    });
    Ok(Relay { address, frozen })
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A wedged broker: the bytes are taken and never answered.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its `host:port` replaced by `address`.
fn through(url: &str, address: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("no scheme")?;
    let authority_start = rest.find('@').map_or(0, |i| i + 1);
    let authority_end = rest[authority_start..]
        .find('/')
        .map_or(rest.len(), |i| authority_start + i);
    Ok(format!(
        "{scheme}://{}{address}{}",
        &rest[..authority_start],
        &rest[authority_end..]
    ))
}

fn upstream(url: &str) -> anyhow::Result<String> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    Ok(format!("{}:{}", uri.authority.host, uri.authority.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_wedged_broker_fail_in_time() -> anyhow::Result<()> {
    let Some(url) = busway_conformance::environment::broker_url("BUSWAY_TEST_AMQP_URL")? else {
        return Ok(());
    };
    let relay = relay(upstream(&url)?).await?;
    let config = RabbitMqConfig::default()
        .with_reconnect_timeout(Duration::from_secs(1))
        .with_operation_timeout(Duration::from_secs(3));
    let transport =
        RabbitMqTransport::connect_with(&through(&url, &relay.address)?, config).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    // Exclusive: the broker deletes it with the connection, whatever happens below.
    let queue = QueueName::new(format!("rmq_wedged_{}", &id[..12]))?;
    transport.declare_temporary_queue(&queue).await?;
    let publish = || Publish::to_queue(queue.clone(), Message::new("ping", "hi"));
    transport.publish(publish()).await?;

    relay.frozen.store(true, Ordering::SeqCst);
    // Bounded from outside too, so a regression fails here rather than hangs.
    let outcome = tokio::time::timeout(Duration::from_secs(20), transport.publish(publish()))
        .await
        .context("publishing to a wedged broker hung")?;
    let err = outcome
        .err()
        .context("a publish to a wedged broker succeeded")?;
    ensure!(err.is_retryable(), "{err}");
    ensure!(
        format!("{err} {:?}", std::error::Error::source(&err)).contains(&relay.address),
        "the error should name the broker: {err}"
    );
    let stats = tokio::time::timeout(Duration::from_secs(20), transport.queue_stats(&queue))
        .await
        .context("reading stats from a wedged broker hung")?;
    ensure!(stats.is_err(), "{stats:?}");
    // Closing gives up in time as well.
    tokio::time::timeout(Duration::from_secs(20), transport.close())
        .await
        .context("closing a wedged connection hung")?;
    relay.frozen.store(false, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_silent_server_fails_in_time() -> anyhow::Result<()> {
    // Accepts connections and never says a word: not even the AMQP handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let config = RabbitMqConfig::default().with_operation_timeout(Duration::from_secs(2));
    let url = format!("amqp://guest:secret@{address}/%2f");
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        RabbitMqTransport::connect_with(&url, config),
    )
    .await
    .context("connecting to a silent server hung")?;
    let err = outcome
        .err()
        .context("connected to a server that never answered")?;
    let text = format!("{err} {:?}", std::error::Error::source(&err));
    ensure!(text.contains(&address), "{text}");
    ensure!(!text.contains("secret"), "{text}");
    held.abort();
    Ok(())
}
