//! Quorum queues (`queue_type=quorum`): the conformance suite on them, the
//! declared arguments as the broker reports them, and a clear error for a
//! priority queue.
//!
//! Two cases of the suite do not apply: `priority_order` (quorum queues have
//! no priorities) and `queue_stats_are_exact`, which expects the consumer
//! count to drop when a consumer is cancelled while it still holds an
//! unsettled delivery; a quorum queue keeps counting such a consumer until
//! its deliveries are settled.

mod support;

use std::sync::Arc;

use anyhow::{ensure, Context};
use busway_core::{DeclareError, QueueName, QueueSpec, Transport};
use busway_rabbitmq::{QueueType, RabbitMqTransport};

/// The broker URL with `queue_type=quorum` added to its query string.
fn quorum_url(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}queue_type=quorum")
}

struct QuorumHarness(String);

#[async_trait::async_trait]
impl busway_conformance::Harness for QuorumHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(RabbitMqTransport::connect(&self.0).await?))
    }

    fn messages_per_publisher(&self) -> usize {
        1_000
    }
}

macro_rules! harness {
    () => {
        match support::amqp_url()? {
            Some(url) => QuorumHarness(quorum_url(&url)),
            None => return Ok(()),
        }
    };
}

busway_conformance::conformance_tests!(@cases harness!();
    publish_consume,
    fan_out_to_groups,
    competing_consumers,
    per_consumer_ordering,
    nack_redelivers_with_next_attempt,
    nack_with_delay_is_not_delivered_early,
    delayed_publish_is_not_delivered_early,
    dropped_delivery_is_redelivered,
    max_attempts_dead_letters_with_reason,
    explicit_dead_letter_keeps_reason,
    ttl_expiry_dead_letters,
    topic_wildcards,
    concurrent_publishers_lose_nothing,
    oversized_payload_is_refused,
    invalid_names_and_unknown_queues_are_errors,
    conflicting_declare_names_both_specs,
    durable_across_reopen,
    in_flight_redelivered_after_reopen,
    list_queues_with_stats,
    close_ends_consumers,
);

fn unique(prefix: &str) -> anyhow::Result<QueueName> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Ok(QueueName::new(format!("rmq_{prefix}_{}", &id[..12]))?)
}

/// What the management API says of a queue.
async fn describe(url: &str, queue: &str) -> anyhow::Result<serde_json::Value> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(anyhow::Error::msg)?;
    let api = format!("http://{}:15672/api/queues/%2f/{queue}", uri.authority.host);
    let response = reqwest::Client::new()
        .get(&api)
        .basic_auth(
            &uri.authority.userinfo.username,
            Some(&uri.authority.userinfo.password),
        )
        .send()
        .await
        .with_context(|| format!("GET {api}"))?;
    ensure!(
        response.status().is_success(),
        "GET {api}: {}",
        response.status()
    );
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_their_dead_letter_queues_are_quorum_queues() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&quorum_url(&url)).await?;
    ensure!(t.config().queue_type == QueueType::Quorum);
    let q = unique("quorum")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(4))
        .await?;

    let queue = describe(&url, q.as_str()).await?;
    ensure!(queue["type"] == "quorum", "queue type: {}", queue["type"]);
    ensure!(
        queue["arguments"]["x-delivery-limit"] == 4,
        "arguments: {}",
        queue["arguments"]
    );
    ensure!(
        queue["arguments"]["x-dead-letter-routing-key"] == format!("dead_letter_{q}"),
        "arguments: {}",
        queue["arguments"]
    );
    let dead = describe(&url, q.dead_letter_queue().as_str()).await?;
    ensure!(
        dead["type"] == "quorum",
        "dead-letter queue type: {}",
        dead["type"]
    );

    let prioritised = unique("quorum_prio")?;
    match t
        .declare_queue(&QueueSpec::new(prioritised.clone()).with_max_priority(9))
        .await
    {
        Err(e @ DeclareError::InvalidSpec { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains(prioritised.as_str()) && text.contains("priorit"),
                "{text}"
            );
        }
        other => anyhow::bail!("expected an invalid spec, got {other:?}"),
    }
    ensure!(
        describe(&url, prioritised.as_str()).await.is_err(),
        "the priority queue was declared anyway"
    );

    let connection =
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for name in [q.to_string(), q.dead_letter_queue().to_string()] {
        channel
            .queue_delete(name.as_str().into(), Default::default())
            .await?;
    }
    t.close().await;
    Ok(())
}
