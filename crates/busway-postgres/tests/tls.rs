//! TLS to PostgreSQL (rustls with ring, through sqlx): `sslmode=require`
//! encrypts every pooled connection, `verify-full` checks the server's
//! certificate (against `sslrootcert` and the system's roots) and its host
//! name, and a certificate that does not name the host is refused with an
//! error that names the server, never the password.
//!
//! The server must have TLS on (`ssl = on`, as Debian's PostgreSQL has with
//! its `localhost` certificate); the verify-full case reads the server's
//! certificate file (`SHOW ssl_cert_file`), so it needs the server on this
//! machine.

mod support;

use anyhow::{bail, ensure, Context};
use busway_conformance::tls::check_certificate_refusal;
use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use busway_postgres::PostgresTransport;
use futures::StreamExt;
use support::TestSchema;

/// Whether the connection serving a query on `transport`'s pool is encrypted.
async fn encrypted(transport: &PostgresTransport) -> anyhow::Result<bool> {
    let ssl: Option<bool> =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_optional(transport.pool())
            .await?;
    Ok(ssl == Some(true))
}

async fn round_trip(transport: &PostgresTransport) -> anyhow::Result<()> {
    let queue = QueueName::new("tls_checked")?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    transport
        .publish(Publish::to_queue(
            queue.clone(),
            Message::new("secret", "over tls"),
        ))
        .await?;
    let mut deliveries = transport
        .consume(&queue, ConsumeOptions::with_prefetch(1))
        .await?;
    let delivery =
        match tokio::time::timeout(std::time::Duration::from_secs(30), deliveries.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => bail!("the stream ended"),
            Err(_) => bail!("no delivery in time"),
        };
    ensure!(&delivery.message().payload[..] == b"over tls");
    delivery.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_the_pool() -> anyhow::Result<()> {
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let schema = TestSchema::new(&url);
    let transport = PostgresTransport::connect(&schema.transport_url("&sslmode=require"))
        .await
        .context("connecting with sslmode=require")?;
    ensure!(
        encrypted(&transport).await?,
        "sslmode=require gave a plain connection"
    );
    round_trip(&transport).await?;
    transport.close().await;

    let plain = PostgresTransport::connect(&schema.transport_url("&sslmode=disable")).await?;
    ensure!(
        !encrypted(&plain).await?,
        "pg_stat_ssl reports TLS on a connection made with sslmode=disable"
    );
    plain.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_trusts_the_servers_certificate_and_refuses_another_ca() -> anyhow::Result<()> {
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let schema = TestSchema::new(&url);
    let plain = PostgresTransport::connect(&schema.transport_url("")).await?;
    let cert_file: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(plain.pool())
        .await?;
    plain.close().await;
    ensure!(
        std::path::Path::new(&cert_file).exists(),
        "the server's certificate {cert_file} is not on this machine"
    );

    // The server's own certificate as the root, checked against the host name.
    let localhost = schema
        .transport_url(&format!("&sslmode=verify-full&sslrootcert={cert_file}"))
        .replace("@127.0.0.1:", "@localhost:");
    let verified = PostgresTransport::connect(&localhost)
        .await
        .context("connecting with verify-full")?;
    ensure!(
        encrypted(&verified).await?,
        "verify-full gave a plain connection"
    );
    round_trip(&verified).await?;
    verified.close().await;

    // The same certificate does not name 127.0.0.1: verify-full refuses it.
    let password = "s3cret-not-for-logs";
    let by_address = schema
        .transport_url(&format!("&sslmode=verify-full&sslrootcert={cert_file}"))
        .replace("postgres@", &format!("postgres:{password}@"));
    ensure!(by_address.contains("@127.0.0.1:"), "{by_address}");
    let Err(error) = PostgresTransport::connect(&by_address).await else {
        bail!("verify-full accepted a certificate that does not name the host");
    };
    check_certificate_refusal(&error, "localhost", password)?;
    Ok(())
}
