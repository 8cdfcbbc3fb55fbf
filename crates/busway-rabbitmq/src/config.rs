//! Settings of the RabbitMQ transport.

use std::time::Duration;

use busway_core::DEFAULT_MAX_PAYLOAD_BYTES;

/// How a [`RabbitMqTransport`](crate::RabbitMqTransport) names its exchanges
/// and behaves during outages. The defaults speak the reference wire format.
///
/// ```
/// use busway_rabbitmq::RabbitMqConfig;
/// use std::time::Duration;
///
/// let config = RabbitMqConfig::default()
///     .with_topic_exchange("events")
///     .with_reconnect_timeout(Duration::from_secs(30));
/// assert_eq!(config.topic_exchange, "events");
/// assert_eq!(config.dead_letter_exchange, "dead_letter_exchange");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitMqConfig {
    /// The durable topic exchange topics are published to (`event_bus`).
    pub topic_exchange: String,
    /// The durable direct exchange dead letters go through (`dead_letter_exchange`).
    pub dead_letter_exchange: String,
    /// How many confirm-mode channels publishes are spread over.
    pub publisher_channels: usize,
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
    /// How long a call waits for the broker to come back during an outage
    /// before failing with a retryable error.
    pub reconnect_timeout: Duration,
    /// The connection name shown in the management UI.
    pub connection_name: String,
    /// The longest any one operation (connecting, declaring, publishing
    /// until confirmed, starting a consumer, reading stats, closing) may
    /// take, waiting for a reconnect included. Past it the operation fails
    /// with a retryable error, so a broker that accepts connections but no
    /// longer answers cannot hang its callers.
    pub operation_timeout: Duration,
    /// The management HTTP API, used to list queues (AMQP cannot). `None`
    /// means `http://{amqp host}:15672` (`https://…:15671` for `amqps`),
    /// with the AMQP user and password.
    pub management_url: Option<String>,
    /// The type of the durable queues this transport declares (work queues,
    /// subscription groups and their dead-letter queues). Temporary and
    /// delay queues stay classic.
    pub queue_type: QueueType,
    /// Certificates (PEM) to trust for `amqps://`, besides the system's
    /// roots: a private CA or a self-signed broker certificate.
    pub tls_ca_pem: Option<String>,
}

/// The kind of RabbitMQ queue declared for durable queues.
///
/// Quorum queues are replicated (Raft) and suit clustered deployments; the
/// broker also enforces the queue's attempt limit (`x-delivery-limit`) for
/// consumers that crash mid-message. They do not support priorities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// Classic queues, as the reference code declares them.
    #[default]
    Classic,
    /// Quorum queues (`x-queue-type: quorum`).
    Quorum,
}

impl QueueType {
    /// The name RabbitMQ uses (`classic`, `quorum`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            other => Err(format!(
                "unknown queue type `{other}` (expected `classic` or `quorum`)"
            )),
        }
    }
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            topic_exchange: "event_bus".into(),
            dead_letter_exchange: "dead_letter_exchange".into(),
            publisher_channels: 4,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            reconnect_timeout: Duration::from_secs(10),
            connection_name: "busway".into(),
            operation_timeout: Duration::from_secs(30),
            management_url: None,
            queue_type: QueueType::Classic,
            tls_ca_pem: None,
        }
    }
}

impl RabbitMqConfig {
    /// Sets the topic exchange.
    pub fn with_topic_exchange(mut self, name: impl Into<String>) -> Self {
        self.topic_exchange = name.into();
        self
    }
    /// Sets the dead-letter exchange.
    pub fn with_dead_letter_exchange(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_exchange = name.into();
        self
    }
    /// Sets the number of publisher channels (at least 1).
    pub fn with_publisher_channels(mut self, n: usize) -> Self {
        self.publisher_channels = n.max(1);
        self
    }
    /// Sets the largest payload accepted.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }
    /// Sets how long calls wait for the broker during an outage.
    pub fn with_reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.reconnect_timeout = timeout;
        self
    }
    /// Sets the time limit of each operation (see [`operation_timeout`](Self::operation_timeout)).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }
    /// Sets the management API's base URL (`http://rabbit:15672`).
    pub fn with_management_url(mut self, url: impl Into<String>) -> Self {
        self.management_url = Some(url.into());
        self
    }
    /// Sets the connection name.
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }
    /// Declares durable queues as quorum queues (see [`QueueType`]).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }
    /// Trusts these PEM certificates for `amqps://` connections.
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Reads the busway settings in a URL's query string, leaving the
    /// connection settings (`heartbeat`, `frame_max`, …) to the AMQP URI:
    ///
    /// | parameter | setting |
    /// |---|---|
    /// | `queue_type=quorum` | [`queue_type`](Self::queue_type) |
    /// | `tls_ca=/path/ca.pem` | [`tls_ca_pem`](Self::tls_ca_pem), read from the file |
    /// | `topic_exchange=NAME` | [`topic_exchange`](Self::topic_exchange) |
    ///
    /// ```
    /// use busway_rabbitmq::{QueueType, RabbitMqConfig};
    ///
    /// let config = RabbitMqConfig::default()
    ///     .with_url_settings("amqp://guest:guest@127.0.0.1:5672/%2f?queue_type=quorum&heartbeat=10")
    ///     .unwrap();
    /// assert_eq!(config.queue_type, QueueType::Quorum);
    /// ```
    pub fn with_url_settings(mut self, url: &str) -> Result<Self, String> {
        let Some((_, query)) = url.split_once('?') else {
            return Ok(self);
        };
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "queue_type" => self.queue_type = value.parse()?,
                "tls_ca" => {
                    let pem = std::fs::read_to_string(value.as_ref()).map_err(|e| {
                        format!("reading the CA certificates `tls_ca={value}`: {e}")
                    })?;
                    self.tls_ca_pem = Some(pem);
                }
                "topic_exchange" => self.topic_exchange = value.into_owned(),
                _ => {}
            }
        }
        Ok(self)
    }
}
