//! `rediss://`: the transport speaks TLS (rustls) to the server, trusting a
//! private CA given in the configuration or the URL, and refuses a
//! certificate it cannot verify with an error that names the host.
//!
//! The server on the test machine listens in plain RESP, so the tests put a
//! TLS-terminating relay in front of it: a real TLS server (a fresh CA and a
//! `localhost` certificate) forwarding the decrypted stream to the server.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_conformance::tls::{check_certificate_refusal, tls_relay, CaFile, TestPki};
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_redis::{RedisConfig, RedisTransport};
use futures::StreamExt;
use support::IsolatedRedis;

/// `host:port` of the plain Redis server of `url`.
fn upstream(url: &str) -> anyhow::Result<String> {
    let client = redis::Client::open(url)?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => Ok(format!("{host}:{port}")),
        other => bail!("the test server is not plain TCP: {other:?}"),
    }
}

/// The `rediss://` URL of the relay, with the test's key prefix.
fn rediss_url(redis: &IsolatedRedis, port: u16, password: Option<&str>) -> String {
    let auth = password.map_or(String::new(), |p| format!(":{p}@"));
    format!("rediss://{auth}localhost:{port}/?prefix={}", redis.prefix())
}

/// Declares, publishes, consumes and acks a few messages through `t`.
async fn round_trip(t: &RedisTransport) -> anyhow::Result<()> {
    let q = QueueName::new("tls_round_trip")?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    for i in 0..3 {
        t.publish(Publish::to_queue(
            q.clone(),
            Message::new("secret", format!("over tls {i}")),
        ))
        .await?;
    }
    let mut deliveries = t.consume(&q, ConsumeOptions::with_prefetch(3)).await?;
    for i in 0..3 {
        let delivery = match tokio::time::timeout(Duration::from_secs(30), deliveries.next()).await
        {
            Ok(Some(d)) => d?,
            Ok(None) => bail!("the stream ended"),
            Err(_) => bail!("no delivery in time"),
        };
        let expected = format!("over tls {i}");
        ensure!(
            delivery.message().payload[..] == *expected.as_bytes(),
            "delivery {i} carries {:?}",
            delivery.message().payload
        );
        delivery.ack().await?;
    }
    drop(deliveries);
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.ready == 0 && stats.in_flight == 0,
        "messages left after the round trip: {stats:?}"
    );
    t.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_from_the_config_or_the_url() -> anyhow::Result<()> {
    let Some(redis) = IsolatedRedis::new()? else {
        return Ok(());
    };
    let pki = TestPki::generate()?;
    let (port, handshakes) = tls_relay(pki.server, upstream(redis.base())?).await?;
    let rediss = rediss_url(&redis, port, None);

    let (url, config) = RedisConfig::from_url(&rediss)?;
    let config = config.with_tls_ca_pem(pki.ca_pem.clone());
    let t = RedisTransport::connect_with(&url, config)
        .await
        .context("connecting over TLS with the CA in the config")?;
    round_trip(&t).await?;
    let after_config = handshakes.load(Ordering::SeqCst);
    ensure!(after_config >= 1, "no TLS handshake reached the relay");

    let ca_file = CaFile::write(&pki.ca_pem)?;
    let with_file = format!("{rediss}&tls_ca={}", ca_file.path().display());
    let connected = RedisTransport::connect(&with_file).await;
    drop(ca_file);
    let connected = connected.context("connecting over TLS with tls_ca= in the URL")?;
    round_trip(&connected).await?;
    ensure!(
        handshakes.load(Ordering::SeqCst) > after_config,
        "the second connection made no TLS handshake"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_naming_the_host() -> anyhow::Result<()> {
    let Some(redis) = IsolatedRedis::new()? else {
        return Ok(());
    };
    let pki = TestPki::generate()?;
    let (port, handshakes) = tls_relay(pki.server, upstream(redis.base())?).await?;
    let password = "s3cret-not-for-logs";
    let rediss = rediss_url(&redis, port, Some(password));
    let Err(error) = RedisTransport::connect(&rediss).await else {
        bail!("connected although the server's certificate is signed by an unknown CA");
    };
    check_certificate_refusal(&error, "localhost", password)?;
    ensure!(
        handshakes.load(Ordering::SeqCst) == 0,
        "a handshake completed with an untrusted certificate"
    );
    Ok(())
}

#[test]
fn a_ca_file_that_cannot_be_read_is_an_invalid_url() {
    let missing = std::env::temp_dir().join(format!("busway-no-ca-{}.pem", uuid::Uuid::new_v4()));
    let url = format!(
        "rediss://:pw-not-shown@localhost:6380/?tls_ca={}",
        missing.display()
    );
    match RedisConfig::from_url(&url) {
        Ok(_) => panic!("a missing CA file was accepted"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("tls_ca"), "{text}");
            assert!(!text.contains("pw-not-shown"), "{text}");
        }
    }
}
