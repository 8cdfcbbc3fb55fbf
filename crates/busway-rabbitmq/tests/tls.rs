//! `amqps://`: the transport speaks TLS (rustls) to the broker, trusting a
//! private CA given in the configuration or the URL, and refuses a
//! certificate it cannot verify with an error that names the host.
//!
//! The broker on the test machine listens in plain AMQP, so the tests put a
//! TLS-terminating relay in front of it: a real TLS server (a fresh CA and a
//! `localhost` certificate) forwarding the decrypted stream to the broker.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// A CA and a server certificate for `localhost` signed by it.
struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn pki() -> anyhow::Result<Pki> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "busway test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate()?;
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&server_key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![server_cert.der().clone()], key)?;
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        server,
    })
}

/// A TLS server on a free local port relaying each connection to the
/// broker; counts the TLS handshakes that completed.
async fn tls_relay(
    server: rustls::ServerConfig,
    broker: String,
) -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let broker = broker.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut upstream) = TcpStream::connect(&broker).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                }
            });
        }
    });
    Ok((port, handshakes))
}

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
    let pki = pki()?;
    let (port, handshakes) = tls_relay(pki.server, address).await?;
    let amqps = format!("amqps://{user}:{password}@localhost:{port}/%2f");

    let config = RabbitMqConfig::default().with_tls_ca_pem(pki.ca_pem.clone());
    let t = RabbitMqTransport::connect_with(&amqps, config)
        .await
        .context("connecting over TLS with the CA in the config")?;
    round_trip(&t, &url).await?;
    let after_config = handshakes.load(Ordering::SeqCst);
    ensure!(after_config >= 1, "no TLS handshake reached the relay");

    let ca_file = std::env::temp_dir().join(format!("busway-test-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, &pki.ca_pem)?;
    let with_file = format!("{amqps}?tls_ca={}", ca_file.display());
    let connected = RabbitMqTransport::connect(&with_file).await;
    std::fs::remove_file(&ca_file)?;
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
    let pki = pki()?;
    let (port, handshakes) = tls_relay(pki.server, address).await?;
    let password = "s3cret-not-for-logs";
    let amqps = format!("amqps://{user}:{password}@localhost:{port}/%2f");
    let config = RabbitMqConfig::default().with_operation_timeout(Duration::from_secs(10));
    let Err(error) = RabbitMqTransport::connect_with(&amqps, config).await else {
        bail!("connected although the broker's certificate is signed by an unknown CA");
    };
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ensure!(
        text.contains("localhost"),
        "the error does not name the host: {text}"
    );
    ensure!(
        !text.contains(password),
        "the error shows the password: {text}"
    );
    ensure!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "the error does not say the certificate is the problem: {text}"
    );
    ensure!(
        handshakes.load(Ordering::SeqCst) == 0,
        "a handshake completed with an untrusted certificate"
    );
    Ok(())
}
