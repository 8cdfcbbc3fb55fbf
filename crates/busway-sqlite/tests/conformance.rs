//! The shared conformance suite, each case on its own database file.

use std::sync::Arc;
use std::time::Duration;

use busway_core::Transport;
use busway_sqlite::{SqliteConfig, SqliteTransport};

/// Opens the same file each time, so reopening shows what survived.
struct SqliteHarness {
    dir: tempfile::TempDir,
}

impl SqliteHarness {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory for the test database"),
        }
    }
}

#[async_trait::async_trait]
impl busway_conformance::Harness for SqliteHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        let config = SqliteConfig {
            lease: Duration::from_secs(30),
            ..SqliteConfig::default()
        };
        let transport = SqliteTransport::open_with(self.dir.path().join("busway.db"), config)?;
        Ok(Arc::new(transport))
    }
}

busway_conformance::conformance_tests!(SqliteHarness::new());
