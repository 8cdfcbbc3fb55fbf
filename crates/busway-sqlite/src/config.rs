//! Settings of the SQLite transport and the `sqlite://` URL that carries them.

use std::path::PathBuf;
use std::time::Duration;

use busway_core::{ConnectError, DEFAULT_MAX_PAYLOAD_BYTES};

/// How hard the transport works to make what it confirms survive a power cut.
///
/// Every transaction is in the operating system when its commit returns, so
/// whatever the transport confirmed survives the death of the process with
/// either setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Durable publishes, declarations and bindings are answered only once
    /// the WAL is fsynced: they survive a power cut. The fsync runs on a
    /// thread of its own while the next batch is written, and one fsync
    /// covers everything committed before it. Settlements (ack, nack,
    /// dead-letter) are answered after their commit and reach the disk with
    /// the next fsync: a power cut right after an ack may deliver that
    /// message again, never lose one. The default.
    #[default]
    Full,
    /// Nothing waits for an fsync (SQLite syncs at checkpoints): after a
    /// power cut the last confirmed publishes may be missing. Faster on
    /// disks with slow fsyncs.
    Normal,
}

impl Synchronous {
    /// The `PRAGMA synchronous` of connections other than the writer's.
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Settings of a [`SqliteTransport`](crate::SqliteTransport).
///
/// Build one with struct update syntax so later additions do not break you:
///
/// ```
/// use busway_sqlite::{SqliteConfig, Synchronous};
/// use std::time::Duration;
///
/// let config = SqliteConfig {
///     synchronous: Synchronous::Normal,
///     lease: Duration::from_secs(10),
///     ..SqliteConfig::default()
/// };
/// assert_eq!(config.poll_interval, Duration::from_millis(10));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteConfig {
    /// Durability of each commit. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long a delivery stays reserved for its consumer. The transport
    /// renews the leases of live consumers every `lease / 3`, so this only
    /// bounds how long the deliveries of a crashed process stay invisible.
    /// Default 30 s; at least 3 ms.
    pub lease: Duration,
    /// Largest payload accepted. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// How often waiting consumers look for commits made by other processes
    /// (`PRAGMA data_version`, a cheap read). Commits made through the same
    /// transport wake consumers at once. Default 10 ms; at least 1 ms.
    pub poll_interval: Duration,
    /// Most commands (publishes, acks, leases, ...) committed in one
    /// transaction (group commit). Default 1024; at least 1.
    pub max_batch: usize,
    /// How long a write waits for another process holding the write lock
    /// before it fails with a retryable error. Default 5 s.
    pub busy_timeout: Duration,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            lease: Duration::from_secs(30),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            poll_interval: Duration::from_millis(10),
            max_batch: 1024,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The query parameters `from_url` understands.
const KNOWN_PARAMETERS: &str =
    "synchronous, lease_ms, poll_ms, max_payload_bytes, max_batch, busy_timeout_ms";

impl SqliteConfig {
    /// Parses a `sqlite://` URL into the database path and the settings.
    ///
    /// `sqlite://busway.db` is relative to the working directory,
    /// `sqlite:///var/lib/app/busway.db` is absolute. Query parameters:
    /// `synchronous=full|normal`, `lease_ms`, `poll_ms`, `max_payload_bytes`,
    /// `max_batch`, `busy_timeout_ms`. In-memory databases (`sqlite::memory:`)
    /// are refused: this backend exists to be durable and shared between
    /// processes; use the memory transport instead.
    ///
    /// ```
    /// use busway_sqlite::{SqliteConfig, Synchronous};
    /// use std::path::Path;
    /// use std::time::Duration;
    ///
    /// let (path, config) =
    ///     SqliteConfig::from_url("sqlite:///var/lib/app/busway.db?synchronous=normal&lease_ms=5000")?;
    /// assert_eq!(path, Path::new("/var/lib/app/busway.db"));
    /// assert_eq!(config.synchronous, Synchronous::Normal);
    /// assert_eq!(config.lease, Duration::from_millis(5000));
    ///
    /// let (path, _) = SqliteConfig::from_url("sqlite://busway.db")?;
    /// assert_eq!(path, Path::new("busway.db"));
    /// assert!(SqliteConfig::from_url("sqlite::memory:").is_err());
    /// # Ok::<(), busway_core::ConnectError>(())
    /// ```
    pub fn from_url(url: &str) -> Result<(PathBuf, SqliteConfig), ConnectError> {
        let invalid = |reason: String| ConnectError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let scheme_end = url
            .find(':')
            .ok_or_else(|| invalid("expected `sqlite://PATH`".into()))?;
        if !url[..scheme_end].eq_ignore_ascii_case("sqlite") {
            return Err(invalid(format!(
                "the scheme `{}` is not `sqlite`",
                &url[..scheme_end]
            )));
        }
        let rest = &url[scheme_end + 1..];
        if rest.contains(":memory:") || rest.contains("mode=memory") {
            return Err(invalid(
                "in-memory SQLite databases are not supported: the SQLite transport is durable and \
                 shared between processes; use `memory://` for an in-process transport"
                    .into(),
            ));
        }
        let rest = rest.strip_prefix("//").ok_or_else(|| {
            invalid("expected `sqlite://PATH` (relative) or `sqlite:///PATH` (absolute)".into())
        })?;
        if rest.contains('#') {
            return Err(invalid("a fragment (`#...`) is not allowed".into()));
        }
        let (raw_path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let path = percent_decode(raw_path).map_err(invalid)?;
        if path.is_empty() {
            return Err(invalid("the database path is empty".into()));
        }
        let mut config = SqliteConfig::default();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value).map_err(invalid)?;
            let millis = || {
                value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| {
                        invalid(format!(
                            "`{key}` must be a whole number of milliseconds, not `{value}`"
                        ))
                    })
            };
            let count = || {
                value
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("`{key}` must be a whole number, not `{value}`")))
            };
            match key {
                "synchronous" => {
                    config.synchronous = match value.to_ascii_lowercase().as_str() {
                        "full" => Synchronous::Full,
                        "normal" => Synchronous::Normal,
                        _ => {
                            return Err(invalid(format!(
                                "`synchronous` must be `full` or `normal`, not `{value}`"
                            )))
                        }
                    }
                }
                "lease_ms" => config.lease = millis()?,
                "poll_ms" | "poll_interval_ms" => config.poll_interval = millis()?,
                "busy_timeout_ms" => config.busy_timeout = millis()?,
                "max_payload_bytes" => config.max_payload_bytes = count()?,
                "max_batch" => config.max_batch = count()?,
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter `{key}`; known parameters: {KNOWN_PARAMETERS}"
                    )))
                }
            }
        }
        Ok((PathBuf::from(path), config))
    }

    /// The settings with out-of-range values raised to their minimum.
    pub(crate) fn normalized(mut self) -> Self {
        self.lease = self.lease.max(Duration::from_millis(3));
        self.poll_interval = self.poll_interval.max(Duration::from_millis(1));
        self.max_batch = self.max_batch.max(1);
        self
    }
}

/// Decodes `%XX` escapes.
fn percent_decode(s: &str) -> Result<String, String> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent escape in `{s}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_paths_and_parameters() -> Result<(), ConnectError> {
        let (p, c) = SqliteConfig::from_url("sqlite://data/bus.db")?;
        assert_eq!(p, Path::new("data/bus.db"));
        assert_eq!(c, SqliteConfig::default());
        let (p, c) = SqliteConfig::from_url(
            "sqlite:///tmp/my%20bus.db?synchronous=NORMAL&poll_ms=5&max_batch=10&busy_timeout_ms=100&max_payload_bytes=99",
        )?;
        assert_eq!(p, Path::new("/tmp/my bus.db"));
        assert_eq!(c.synchronous, Synchronous::Normal);
        assert_eq!(c.poll_interval, Duration::from_millis(5));
        assert_eq!(c.max_batch, 10);
        assert_eq!(c.busy_timeout, Duration::from_millis(100));
        assert_eq!(c.max_payload_bytes, 99);
        Ok(())
    }

    #[test]
    fn refuses_bad_urls() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://",
            "sqlite:busway.db",
            "postgres://x",
            "sqlite://a.db?lease_ms=soon",
            "sqlite://a.db?synchronous=off",
            "sqlite://a.db?colour=blue",
            "sqlite://a%zz.db",
            "busway.db",
        ] {
            match SqliteConfig::from_url(url) {
                Err(ConnectError::InvalidUrl { reason, .. }) => assert!(!reason.is_empty()),
                other => panic!("{url}: {other:?}"),
            }
        }
        let memory = SqliteConfig::from_url("sqlite::memory:")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(memory.contains("memory://"), "{memory}");
    }
}
