//! `amqps://`: the transport speaks TLS (rustls) to the broker, trusting a
//! private CA given in the configuration or the URL, and refuses a
//! certificate it cannot verify with an error that names the host.
//!
//! The broker on the test machine listens in plain AMQP, so the tests put a
//! TLS-terminating relay in front of it: a real TLS server (a fresh CA and a
//! `localhost` certificate) forwarding the decrypted stream to the broker.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_conformance::tls::{check_certificate_refusal, tls_relay, CaFile, TestPki};
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use futures::StreamExt;

/// `host:port` of the plain AMQP broker, and its user and password.
fn broker(url: &str) -> anyhow::Result<(String, String, String)> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(anyhow::Error::msg)?;
    let a = uri.authority;
    Ok((
        format!("{}:{}", a.host, a.port),
        a.userinfo.username,
        a.userinfo.password,
    ))
}

/// Declares, publishes, consumes and acks through `t`, then deletes the
/// queue over the plain connection at `plain_url`.
async fn round_trip(t: &RabbitMqTransport, plain_url: &str) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let q = QueueName::new(format!("rmq_tls_{}", &id[..12]))?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    t.publish(Publish::to_queue(
        q.clone(),
        Message::new("secret", "over tls"),
    ))
    .await?;
    let mut deliveries = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let delivery = match tokio::time::timeout(Duration::from_secs(30), deliveries.next()).await {
        Ok(Some(d)) => d?,
        Ok(None) => bail!("the stream ended"),
        Err(_) => bail!("no delivery in time"),
    };
    ensure!(&delivery.message().payload[..] == b"over tls");
    delivery.ack().await?;
    drop(deliveries);
    t.close().await;
    let connection = lapin::Connection::connect(plain_url, Default::default()).await?;
    let channel = connection.create_channel().await?;
    for name in [q.to_string(), q.dead_letter_queue().to_string()] {
        channel
            .queue_delete(name.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_from_the_config_or_the_url() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let (address, user, password) = broker(&url)?;
    let pki = TestPki::generate()?;
    let (port, handshakes) = tls_relay(pki.server, address).await?;
    let amqps = format!("amqps://{user}:{password}@localhost:{port}/%2f");

    let config = RabbitMqConfig::default().with_tls_ca_pem(pki.ca_pem.clone());
    let t = RabbitMqTransport::connect_with(&amqps, config)
        .await
        .context("connecting over TLS with the CA in the config")?;
    round_trip(&t, &url).await?;
    let after_config = handshakes.load(Ordering::SeqCst);
    ensure!(after_config >= 1, "no TLS handshake reached the relay");

    let ca_file = CaFile::write(&pki.ca_pem)?;
    let with_file = format!("{amqps}?tls_ca={}", ca_file.path().display());
    let connected = RabbitMqTransport::connect(&with_file).await;
    drop(ca_file);
    let connected = connected.context("connecting over TLS with tls_ca= in the URL")?;
    round_trip(&connected, &url).await?;
    ensure!(
        handshakes.load(Ordering::SeqCst) > after_config,
        "the second connection made no TLS handshake"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_naming_the_host() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let (address, user, _) = broker(&url)?;
    let pki = TestPki::generate()?;
    let (port, handshakes) = tls_relay(pki.server, address).await?;
    let password = "s3cret-not-for-logs";
    let amqps = format!("amqps://{user}:{password}@localhost:{port}/%2f");
    let config = RabbitMqConfig::default().with_operation_timeout(Duration::from_secs(10));
    let Err(error) = RabbitMqTransport::connect_with(&amqps, config).await else {
        bail!("connected although the broker's certificate is signed by an unknown CA");
    };
    check_certificate_refusal(&error, "localhost", password)?;
    ensure!(
        handshakes.load(Ordering::SeqCst) == 0,
        "a handshake completed with an untrusted certificate"
    );
    Ok(())
}
