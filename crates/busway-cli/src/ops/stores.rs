//! Opening the saga and event stores named by `--store`.

use std::sync::Arc;

use anyhow::Context;
use busway::event_store::EventStore;
use busway::saga_store::SagaStore;
use futures::FutureExt;

use super::exit::{Exit, Failure};

enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

/// The stores in one database.
pub(crate) struct Stores {
    pub(crate) sagas: Arc<dyn SagaStore>,
    pub(crate) events: Arc<dyn EventStore>,
    /// Where they are, for what the store traits do not offer.
    location: Location,
    /// Closes what the stores were opened on.
    close: Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
}

impl Stores {
    /// Opens the saga and event stores at `url` (sqlite:// or postgres://).
    pub(crate) async fn open(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        let context = || format!("opening the stores at {}", busway::redact_url(url));
        match scheme {
            "sqlite" => {
                let (path, config) = busway::sqlite::SqliteConfig::from_url(url)
                    .map_err(|e| Failure::wrap(Exit::Usage, e.into()))?;
                let location = Location::Sqlite(path.clone());
                let transport = busway::sqlite::SqliteTransport::open_with(path, config)
                    .with_context(context)?;
                let sagas = busway::sqlite::SqliteSagaStore::open(transport.clone())
                    .await
                    .with_context(context)?;
                let events = busway::sqlite::SqliteEventStore::open(transport.clone())
                    .await
                    .with_context(context)?;
                Ok(Self {
                    sagas: Arc::new(sagas),
                    events: Arc::new(events),
                    location,
                    close: Box::new(move || {
                        async move { busway::Transport::close(&transport).await }.boxed()
                    }),
                })
            }
            "postgres" | "postgresql" => {
                let transport = busway::postgres::PostgresTransport::connect(url)
                    .await
                    .with_context(context)?;
                let sagas = busway::postgres::PostgresSagaStore::open(transport.clone())
                    .await
                    .with_context(context)?;
                let events = busway::postgres::PostgresEventStore::open(transport.clone())
                    .await
                    .with_context(context)?;
                Ok(Self {
                    sagas: Arc::new(sagas),
                    events: Arc::new(events),
                    location: Location::Postgres(url.to_owned()),
                    close: Box::new(move || {
                        async move { busway::Transport::close(&transport).await }.boxed()
                    }),
                })
            }
            _ => Err(Failure::msg(
                Exit::Usage,
                format!(
                    "--store must be sqlite://PATH or postgres://…, not {}",
                    busway::redact_url(url)
                ),
            )),
        }
    }

    /// The projections that have a checkpoint in the event store, sorted.
    pub(crate) async fn projection_names(&self) -> anyhow::Result<Vec<String>> {
        const SQL: &str = "SELECT projection FROM busway_checkpoints ORDER BY projection";
        match &self.location {
            Location::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
                    let conn = rusqlite::Connection::open_with_flags(
                        path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    let mut statement = conn.prepare(SQL)?;
                    let names = statement.query_map([], |r| r.get::<_, String>(0))?;
                    Ok(names.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Location::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                let names = sqlx::query_scalar::<_, String>(SQL).fetch_all(&pool).await;
                pool.close().await;
                Ok(names?)
            }
        }
    }

    /// Closes the connection the stores use.
    pub(crate) async fn close(self) {
        (self.close)().await;
    }
}
