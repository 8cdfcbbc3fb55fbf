//! Settings of the Redis transport.

use std::time::Duration;

use busway_core::{ConnectError, DEFAULT_MAX_PAYLOAD_BYTES};

/// Settings of a [`RedisTransport`](crate::RedisTransport).
///
/// The URL's query may set the key prefix (`redis://host:6379/0?prefix=app1`)
/// and, for `rediss://`, a CA to trust (`tls_ca=/path/ca.pem`); see
/// [`from_url`](Self::from_url).
///
/// ```
/// use busway_redis::RedisConfig;
/// use std::time::Duration;
///
/// let (url, config) = RedisConfig::from_url("redis://127.0.0.1:6379/0?prefix=orders")?;
/// assert_eq!(url, "redis://127.0.0.1:6379/0");
/// assert_eq!(config.prefix, "orders");
/// let config = config.with_lease(Duration::from_secs(10));
/// assert_eq!(config.lease, Duration::from_secs(10));
/// # Ok::<(), busway_core::ConnectError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Every key this transport uses starts with `{prefix}:` (default `busway`).
    pub prefix: String,
    /// How long a delivery may stay unsettled without its consumer renewing
    /// it before another consumer claims it (`XAUTOCLAIM` idle time). Live
    /// consumers renew their deliveries every third of this.
    pub lease: Duration,
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
    /// How long a blocking read waits before it checks for shutdown.
    pub block: Duration,
    /// Certificates (PEM) to trust for `rediss://` instead of the system's
    /// roots: a private CA or a self-signed server certificate.
    pub tls_ca_pem: Option<String>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("block", &self.block)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            prefix: "busway".into(),
            lease: Duration::from_secs(30),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            block: Duration::from_millis(500),
            tls_ca_pem: None,
        }
    }
}

impl RedisConfig {
    /// Splits the busway options off a `redis://` or `rediss://` URL;
    /// returns the URL to hand to the client and the settings. Every other
    /// parameter stays in the URL.
    ///
    /// | parameter | setting |
    /// |---|---|
    /// | `prefix=NAME` | [`prefix`](Self::prefix) |
    /// | `tls_ca=/path/ca.pem` | [`tls_ca_pem`](Self::tls_ca_pem), read from the file (`rediss://` only) |
    pub fn from_url(url: &str) -> Result<(String, Self), ConnectError> {
        let mut config = Self::default();
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), config));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", value)) => {
                    if value.is_empty() || value.contains(['{', '}', ' ']) {
                        return Err(ConnectError::InvalidUrl {
                            url: busway_core::redact_url(url),
                            reason: format!("invalid key prefix `{value}`"),
                        });
                    }
                    config.prefix = value.to_owned();
                }
                Some(("tls_ca", _)) => {
                    let path = url::form_urlencoded::parse(pair.as_bytes())
                        .next()
                        .map(|(_, path)| path.into_owned())
                        .unwrap_or_default();
                    let pem =
                        std::fs::read_to_string(&path).map_err(|e| ConnectError::InvalidUrl {
                            url: busway_core::redact_url(url),
                            reason: format!("reading the CA certificates `tls_ca={path}`: {e}"),
                        })?;
                    config.tls_ca_pem = Some(pem);
                }
                _ => kept.push(pair),
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, config))
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Sets the lease of unsettled deliveries.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(300));
        self
    }
    /// Trusts these PEM certificates (instead of the system's roots) for
    /// `rediss://` connections.
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }
    /// Sets the largest payload accepted.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }
}
