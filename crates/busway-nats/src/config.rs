//! Settings of the NATS transport.

use std::time::Duration;

use busway_core::{ConnectError, DEFAULT_MAX_PAYLOAD_BYTES};

/// Settings of a [`NatsTransport`](crate::NatsTransport).
///
/// The URL's query may set them: `nats://host:4222?prefix=app1&ack_wait=10s`
/// (`ack_wait` in `ms` or `s`).
///
/// ```
/// use busway_nats::NatsConfig;
/// use std::time::Duration;
///
/// let (url, config) = NatsConfig::from_url("nats://127.0.0.1:4222?prefix=orders&ack_wait=10s")?;
/// assert_eq!(url, "nats://127.0.0.1:4222");
/// assert_eq!(config.prefix, "orders");
/// assert_eq!(config.ack_wait, Duration::from_secs(10));
/// # Ok::<(), busway_core::ConnectError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Every stream this transport uses is named `{prefix}_…` or
    /// `{prefix}-…` and every subject starts with `{prefix}.` (default
    /// `busway`). ASCII letters, digits and `-` only.
    pub prefix: String,
    /// How long a delivery may stay unsettled without its consumer renewing
    /// it before JetStream delivers it again (the consumers' `ack_wait`).
    /// Live consumers renew their deliveries (`+WPI`) every third of this.
    pub ack_wait: Duration,
    /// Largest payload accepted (lowered to fit the server's `max_payload`).
    pub max_payload_bytes: usize,
    /// How long one pull request waits for messages before the consumer
    /// checks for shutdown and asks again.
    pub block: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            prefix: "busway".into(),
            ack_wait: Duration::from_secs(30),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            block: Duration::from_millis(500),
        }
    }
}

impl NatsConfig {
    /// Splits the busway options (`prefix`, `ack_wait`) off a `nats://` URL;
    /// returns the URL to hand to the client and the settings.
    pub fn from_url(url: &str) -> Result<(String, Self), ConnectError> {
        let mut config = Self::default();
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), config));
        };
        let invalid = |reason: String| ConnectError::InvalidUrl {
            url: busway_core::redact_url(url),
            reason,
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", value)) => {
                    if !valid_prefix(value) {
                        return Err(invalid(format!(
                            "invalid prefix `{value}`: ASCII letters, digits and `-` only"
                        )));
                    }
                    config.prefix = value.to_owned();
                }
                Some(("ack_wait", value)) => {
                    let wait = parse_duration(value)
                        .ok_or_else(|| invalid(format!("invalid ack_wait `{value}`")))?;
                    config = config.with_ack_wait(wait);
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

    /// Sets the prefix of stream names and subjects.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Sets how long an unsettled delivery is held before redelivery (at least 1 s).
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(Duration::from_secs(1));
        self
    }
    /// Sets the largest payload accepted.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }
}

pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn parse_duration(value: &str) -> Option<Duration> {
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    let secs = value.strip_suffix('s').unwrap_or(value);
    secs.parse().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_off_and_others_kept() -> Result<(), ConnectError> {
        let (url, c) = NatsConfig::from_url("nats://h:4222?name=x&ack_wait=1500ms&prefix=a-1")?;
        assert_eq!(url, "nats://h:4222?name=x");
        assert_eq!(c.prefix, "a-1");
        assert_eq!(c.ack_wait, Duration::from_millis(1500));
        Ok(())
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(NatsConfig::from_url("nats://h?prefix=a.b").is_err());
        assert!(NatsConfig::from_url("nats://h?prefix=a_b").is_err());
        assert!(NatsConfig::from_url("nats://h?ack_wait=soon").is_err());
    }
}
