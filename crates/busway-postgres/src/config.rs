//! Settings of the PostgreSQL transport and the `postgres://` URL that carries them.

use std::time::Duration;

use busway_core::{redact_url, ConnectError, DEFAULT_MAX_PAYLOAD_BYTES};

/// Settings of a [`PostgresTransport`](crate::PostgresTransport).
///
/// Build one with struct update syntax so later additions do not break you:
///
/// ```
/// use busway_postgres::PostgresConfig;
/// use std::time::Duration;
///
/// let config = PostgresConfig {
///     schema: "billing".into(),
///     lease: Duration::from_secs(10),
///     ..PostgresConfig::default()
/// };
/// assert_eq!(config.max_connections, 10);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The PostgreSQL schema holding busway's tables (created if missing).
    /// Default `public`. Letters, digits and `_`, at most 40 characters,
    /// not starting with a digit.
    pub schema: String,
    /// How long a delivery stays reserved for its consumer. The transport
    /// renews the leases it holds every `lease / 3`, so this only bounds how
    /// long the deliveries of a crashed process stay invisible. Default
    /// 30 s; at least 30 ms.
    pub lease: Duration,
    /// Largest payload accepted. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// Most connections the pool opens, for the transport (its wake-up
    /// listener holds one for good) and the stores sharing it. Default 10;
    /// at least 2.
    pub max_connections: u32,
    /// Most messages inserted by one publish transaction, and most
    /// settlements applied by one settle transaction. Default 1024.
    pub max_batch: usize,
    /// How long opening a connection may take. Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            lease: Duration::from_secs(30),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_connections: 10,
            max_batch: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The query parameters `from_url` takes for itself; the others go to the
/// PostgreSQL driver (`sslmode`, `application_name`, ...).
const BUSWAY_PARAMETERS: &str =
    "schema, lease_ms, max_payload_bytes, max_connections, max_batch, connect_timeout_ms";

impl PostgresConfig {
    /// Splits a `postgres://` (or `postgresql://`) URL into the URL the
    /// driver connects with and busway's settings, taken from these query
    /// parameters: `schema`, `lease_ms`, `max_payload_bytes`,
    /// `max_connections`, `max_batch`, `connect_timeout_ms`. Every other
    /// parameter (`sslmode`, `application_name`, ...) is left for the driver.
    ///
    /// ```
    /// use busway_postgres::PostgresConfig;
    /// use std::time::Duration;
    ///
    /// let (url, config) = PostgresConfig::from_url(
    ///     "postgres://app@db.internal/orders?schema=bus&sslmode=require&lease_ms=5000",
    /// )?;
    /// assert_eq!(url, "postgres://app@db.internal/orders?sslmode=require");
    /// assert_eq!(config.schema, "bus");
    /// assert_eq!(config.lease, Duration::from_millis(5000));
    /// assert!(PostgresConfig::from_url("postgres://h/db?schema=no-dashes").is_err());
    /// # Ok::<(), busway_core::ConnectError>(())
    /// ```
    pub fn from_url(url: &str) -> Result<(String, PostgresConfig), ConnectError> {
        let invalid = |reason: String| ConnectError::InvalidUrl {
            url: redact_url(url),
            reason,
        };
        let Some((scheme, _)) = url.split_once("://") else {
            // Not a URL: do not echo it, it may hold a password.
            return Err(ConnectError::InvalidUrl {
                url: "(not shown)".into(),
                reason: "expected `postgres://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE`".into(),
            });
        };
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(invalid(format!(
                "the scheme `{scheme}` is not `postgres` or `postgresql`"
            )));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut config = PostgresConfig::default();
        let mut passed: Vec<&str> = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
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
                "schema" => config.schema = value.to_owned(),
                "lease_ms" => config.lease = millis()?,
                "connect_timeout_ms" => config.connect_timeout = millis()?,
                "max_payload_bytes" => config.max_payload_bytes = count()?,
                "max_batch" => config.max_batch = count()?,
                "max_connections" => {
                    config.max_connections = u32::try_from(count()?).unwrap_or(u32::MAX)
                }
                _ => passed.push(pair),
            }
        }
        config.validate().map_err(invalid)?;
        let url = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        Ok((url, config))
    }

    /// Checks the settings; the reason names the offending one.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let s = &self.schema;
        let valid_schema = !s.is_empty()
            && s.len() <= 40
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit());
        if !valid_schema {
            return Err(format!(
                "schema `{s}` must be 1 to 40 letters, digits or `_`, not starting with a digit \
                 (busway parameters: {BUSWAY_PARAMETERS})"
            ));
        }
        if self.max_connections < 2 {
            return Err(
                "max_connections must be at least 2 (the wake-up listener holds one)".into(),
            );
        }
        Ok(())
    }

    /// The settings with out-of-range values raised to their minimum.
    pub(crate) fn normalized(mut self) -> Self {
        self.lease = self.lease.max(Duration::from_millis(30));
        self.max_batch = self.max_batch.max(1);
        self.max_connections = self.max_connections.max(2);
        self
    }

    /// The LISTEN/NOTIFY channel of this schema's queues.
    pub(crate) fn channel(&self) -> String {
        format!("busway_wake_{}", self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parameters_and_passes_the_rest_on() -> Result<(), ConnectError> {
        let (url, c) = PostgresConfig::from_url("postgres://postgres@127.0.0.1:5432/test")?;
        assert_eq!(url, "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(c, PostgresConfig::default());
        let (url, c) = PostgresConfig::from_url(
            "postgresql://u:pw@h/db?application_name=x&schema=t_1&max_connections=3&max_batch=9&max_payload_bytes=99&connect_timeout_ms=100",
        )?;
        assert_eq!(url, "postgresql://u:pw@h/db?application_name=x");
        assert_eq!(c.schema, "t_1");
        assert_eq!(c.max_connections, 3);
        assert_eq!(c.max_batch, 9);
        assert_eq!(c.max_payload_bytes, 99);
        assert_eq!(c.connect_timeout, Duration::from_millis(100));
        Ok(())
    }

    #[test]
    fn refuses_bad_urls_without_leaking_the_password() {
        for url in [
            "postgres://u:secret@h/db?schema=a-b",
            "postgres://u:secret@h/db?schema=",
            "postgres://u:secret@h/db?schema=1abc",
            "postgres://u:secret@h/db?lease_ms=soon",
            "postgres://u:secret@h/db?max_connections=0",
            "mysql://u:secret@h/db",
            "u:secret@h/db",
        ] {
            match PostgresConfig::from_url(url) {
                Err(e @ ConnectError::InvalidUrl { .. }) => {
                    assert!(!e.to_string().contains("secret"), "{e}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
