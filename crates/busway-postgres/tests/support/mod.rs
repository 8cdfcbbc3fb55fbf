//! What the PostgreSQL tests share: the gated server URL and a schema of
//! their own per test, dropped afterwards.

#![allow(dead_code)]

use std::sync::Arc;

use busway_core::Transport;
use busway_postgres::PostgresTransport;
use sqlx::Connection;

/// The server from `BUSWAY_TEST_POSTGRES_URL` (skip when unset, fail when
/// `BUSWAY_REQUIRE_BROKERS=1`).
pub(crate) fn postgres_url() -> anyhow::Result<Option<String>> {
    busway_conformance::environment::broker_url("BUSWAY_TEST_POSTGRES_URL")
}

/// A schema for one test: random name, dropped with everything in it when
/// the value is dropped.
pub(crate) struct TestSchema {
    pub(crate) url: String,
    pub(crate) name: String,
}

impl TestSchema {
    pub(crate) fn new(url: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url: url.to_owned(),
            name: format!("busway_test_{}", &id[..12]),
        }
    }

    /// The transport URL with this schema and a small pool.
    pub(crate) fn transport_url(&self, extra: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}schema={}&max_connections=6{extra}",
            self.url, self.name
        )
    }

    pub(crate) async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(
            PostgresTransport::connect(&self.transport_url("")).await?,
        ))
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query(&format!(r#"DROP SCHEMA IF EXISTS "{name}" CASCADE"#))
                    .execute(&mut conn)
                    .await?;
                Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test schema {}", self.name);
        }
    }
}
