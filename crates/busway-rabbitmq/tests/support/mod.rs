//! Shared by the broker tests: where the broker is, or why the test skips.

#![allow(dead_code)]

/// The broker URL from `BUSWAY_TEST_AMQP_URL`; `None` means skip (see
/// `busway_conformance::environment::broker_url`).
pub(crate) fn amqp_url() -> anyhow::Result<Option<String>> {
    busway_conformance::environment::broker_url("BUSWAY_TEST_AMQP_URL")
}
