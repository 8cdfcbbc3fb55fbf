//! Shared by the broker tests: where the broker is, or why the test skips.

#![allow(dead_code)]

/// The broker URL from `BUSWAY_TEST_AMQP_URL`. When it is unset the test is
/// skipped (`Ok(None)`), unless `BUSWAY_REQUIRE_BROKERS=1`, which makes it fail.
pub(crate) fn amqp_url() -> anyhow::Result<Option<String>> {
    match std::env::var("BUSWAY_TEST_AMQP_URL") {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if std::env::var("BUSWAY_REQUIRE_BROKERS").as_deref() == Ok("1") => anyhow::bail!(
            "BUSWAY_TEST_AMQP_URL is not set but BUSWAY_REQUIRE_BROKERS=1 requires the RabbitMQ tests to run"
        ),
        _ => {
            eprintln!("skipped: BUSWAY_TEST_AMQP_URL is not set");
            Ok(None)
        }
    }
}
