//! Listing queues through the RabbitMQ management HTTP API, which AMQP
//! 0-9-1 itself cannot do.

use busway_core::{QueueName, StatsError};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::config::RabbitMqConfig;

/// What `rabbitmq-plugins` says to make the management API available.
const ENABLE_HINT: &str = "enable the management plugin on the broker \
    (`rabbitmq-plugins enable rabbitmq_management`), or point \
    `RabbitMqConfig::management_url` (CLI: `--management-url`, `BUSWAY_MANAGEMENT_URL`) \
    at it";

/// One queue as the management API reports it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ManagementQueue {
    /// The queue.
    pub name: QueueName,
    /// Messages ready for delivery (`messages_ready`).
    pub ready: u64,
    /// Messages delivered and not yet acknowledged, by any connection
    /// (`messages_unacknowledged`).
    pub unacknowledged: u64,
    /// Consumers attached, by any connection.
    pub consumers: u64,
    /// Messages acknowledged per second, as the broker measures it, when it
    /// has measured it (`message_stats.ack_details.rate`).
    pub ack_rate: Option<f64>,
}

/// The management API's base URL: the configured one, or
/// `http://{amqp host}:15672` (`https://…:15671` for `amqps`).
pub(crate) fn base_url(uri: &AMQPUri, config: &RabbitMqConfig) -> String {
    match &config.management_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let (scheme, port) = match uri.scheme {
                AMQPScheme::AMQPS => ("https", 15671),
                AMQPScheme::AMQP => ("http", 15672),
            };
            format!("{scheme}://{}:{port}", uri.authority.host)
        }
    }
}

/// Percent-encodes a vhost for a URL path segment.
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn failure(message: String, retryable: bool) -> StatsError {
    StatsError::Backend {
        source: message.into(),
        retryable,
    }
}

/// The queues of the URI's vhost, sorted by name, without busway's delay
/// queues, server-named (`amq.…`) and exclusive queues (another
/// connection's exclusive queue cannot be inspected over AMQP).
pub(crate) async fn list(
    uri: &AMQPUri,
    config: &RabbitMqConfig,
) -> Result<Vec<ManagementQueue>, StatsError> {
    let base = base_url(uri, config);
    let url = format!(
        "{base}/api/queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers,exclusive,message_stats.ack_details.rate",
        encode_segment(&uri.vhost)
    );
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(config.operation_timeout)
        .build()
        .map_err(|e| failure(format!("building the HTTP client: {e}"), false))?;
    let response = client
        .get(&url)
        .basic_auth(
            &uri.authority.userinfo.username,
            Some(&uri.authority.userinfo.password),
        )
        .send()
        .await
        .map_err(|e| {
            failure(
                format!(
                    "the RabbitMQ management API at {base} is unreachable ({}); {ENABLE_HINT}",
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
                ),
                false,
            )
        })?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(failure(
            format!(
                "the RabbitMQ management API at {base} refused user `{}` (401); \
                 the user needs the `management` or `monitoring` tag, and `guest` may only \
                 log in from localhost",
                uri.authority.userinfo.username
            ),
            false,
        ));
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(failure(
            format!(
                "the RabbitMQ management API at {base} answered 404 for vhost `{}`; \
                 is it the management API? {ENABLE_HINT}",
                uri.vhost
            ),
            false,
        ));
    }
    if !status.is_success() {
        return Err(failure(
            format!("the RabbitMQ management API at {base} answered {status}"),
            status.is_server_error(),
        ));
    }
    let body = response.bytes().await.map_err(|e| {
        failure(
            format!("reading the management API's answer from {base}: {e}"),
            true,
        )
    })?;
    parse(&body).map_err(|e| {
        failure(
            format!("the management API at {base} answered something else than a queue list: {e}"),
            false,
        )
    })
}

/// Parses the answer of `GET /api/queues/{vhost}`.
fn parse(body: &[u8]) -> Result<Vec<ManagementQueue>, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let items = value.as_array().ok_or("not a JSON array")?;
    let count = |item: &serde_json::Value, field: &str| item[field].as_u64().unwrap_or(0);
    let mut queues: Vec<ManagementQueue> = items
        .iter()
        .filter(|item| !item["exclusive"].as_bool().unwrap_or(false))
        .filter_map(|item| {
            let name = item["name"].as_str()?;
            if name.starts_with("busway.delay.") || name.starts_with("amq.") {
                return None;
            }
            Some(ManagementQueue {
                name: QueueName::new(name).ok()?,
                ready: count(item, "messages_ready"),
                unacknowledged: count(item, "messages_unacknowledged"),
                consumers: count(item, "consumers"),
                ack_rate: item["message_stats"]["ack_details"]["rate"].as_f64(),
            })
        })
        .collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(queues)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhosts_are_encoded() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("prod-1"), "prod-1");
    }

    #[test]
    fn default_url_follows_the_amqp_host() -> Result<(), String> {
        let uri: AMQPUri = "amqp://u:p@rabbit.internal:5672/%2f".parse()?;
        assert_eq!(
            base_url(&uri, &RabbitMqConfig::default()),
            "http://rabbit.internal:15672"
        );
        let config = RabbitMqConfig::default().with_management_url("http://ops:8080/");
        assert_eq!(base_url(&uri, &config), "http://ops:8080");
        Ok(())
    }

    #[test]
    fn internal_and_exclusive_queues_are_left_out() -> Result<(), String> {
        let body = br#"[
            {"name":"task_queue","messages_ready":3,"messages_unacknowledged":1,"consumers":2,"exclusive":false,
             "message_stats":{"ack_details":{"rate":1.5}}},
            {"name":"busway.delay.1000.task_queue","messages_ready":1,"exclusive":false},
            {"name":"amq.gen-abc","exclusive":true},
            {"name":"rpc_reply_1","exclusive":true},
            {"name":"dead_letter_task_queue","messages_ready":0,"messages_unacknowledged":0,"consumers":0,"exclusive":false}
        ]"#;
        let queues = parse(body)?;
        let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["dead_letter_task_queue", "task_queue"]);
        assert_eq!(
            (
                queues[1].ready,
                queues[1].unacknowledged,
                queues[1].consumers
            ),
            (3, 1, 2)
        );
        assert_eq!(queues[1].ack_rate, Some(1.5));
        Ok(())
    }
}
