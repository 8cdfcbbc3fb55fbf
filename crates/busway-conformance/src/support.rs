//! Helpers shared by the cases.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use busway_core::{Delivery, DeliveryStream, QueueName, QueueSpec, Topic, TopicPattern, Transport};
use futures::StreamExt;

/// How long a case waits for a delivery that must come.
pub(crate) const RECEIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// A name unique to this test run: `{prefix}_{random}`.
pub(crate) fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("conf_{prefix}_{}", &id[..12])
}

pub(crate) fn queue(name: &str) -> anyhow::Result<QueueName> {
    Ok(QueueName::new(unique(name))?)
}

/// Declares a fresh queue with `spec` adjustments.
pub(crate) async fn declare(
    t: &dyn Transport,
    name: &str,
    adjust: impl FnOnce(QueueSpec) -> QueueSpec,
) -> anyhow::Result<QueueName> {
    let q = queue(name)?;
    t.declare_queue(&adjust(QueueSpec::new(q.clone())))
        .await
        .with_context(|| format!("declaring {q}"))?;
    Ok(q)
}

/// A topic prefix unique to this case, so cases sharing a broker do not see each other.
pub(crate) fn topic_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("conf{}", &id[..12])
}

pub(crate) fn topic(s: &str) -> anyhow::Result<Topic> {
    Ok(Topic::new(s)?)
}

pub(crate) fn pattern(s: &str) -> anyhow::Result<TopicPattern> {
    Ok(TopicPattern::new(s)?)
}

/// The next delivery, or an error if none arrives in time or the stream fails.
pub(crate) async fn next(stream: &mut DeliveryStream) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(RECEIVE_TIMEOUT, stream.next()).await {
        Err(_) => bail!("no delivery within {RECEIVE_TIMEOUT:?}"),
        Ok(None) => bail!("the delivery stream ended"),
        Ok(Some(Err(e))) => Err(anyhow!(e).context("the delivery stream failed")),
        Ok(Some(Ok(d))) => Ok(d),
    }
}

/// Fails if a delivery arrives within `wait`.
pub(crate) async fn nothing_within(
    stream: &mut DeliveryStream,
    wait: Duration,
) -> anyhow::Result<()> {
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) => Ok(()),
        Ok(None) => bail!("the delivery stream ended"),
        Ok(Some(Err(e))) => Err(anyhow!(e).context("the delivery stream failed")),
        Ok(Some(Ok(d))) => bail!(
            "expected no delivery within {wait:?}, got {:?} (attempt {})",
            d.message().payload,
            d.attempt()
        ),
    }
}

/// Polls `check` until it returns true, for counts that settle asynchronously.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
