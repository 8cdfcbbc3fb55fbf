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
}
