//! The universal conformance suite for busway transports.
//!
//! Every backend implements [`Harness`] and invokes [`conformance_tests!`] in
//! one of its integration tests; the macro expands to one `#[tokio::test]`
//! per case, so cases run in parallel and fail by name. Each case uses its
//! own queue names and topics, so backends that share a broker can run them
//! concurrently.
//!
//! Features a backend lacks are read from [`Transport::capabilities`]; a case
//! for an unsupported feature checks that the backend refuses it with a clear
//! error instead of passing silently.
//!
//! Each backend runs the suite from its `tests/conformance.rs`; the memory
//! backend's is this (compiled there, shown here):
//!
//! ```text
//! struct MemoryHarness(busway_memory::MemoryTransport);
//!
//! #[async_trait::async_trait]
//! impl busway_conformance::Harness for MemoryHarness {
//!     async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn busway_core::Transport>> {
//!         Ok(std::sync::Arc::new(self.0.clone()))
//!     }
//! }
//!
//! busway_conformance::conformance_tests!(MemoryHarness(Default::default()));
//! ```
//! The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) among
//! its dev-dependencies.

use std::sync::Arc;

use async_trait::async_trait;
use busway_core::Transport;

pub mod cases;
pub mod environment;
pub mod event_store;
mod support;
pub mod tls;

pub use anyhow::Error;

/// How the suite reaches the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the backend. After the transport was closed, calling this again
    /// must reopen the same storage, so persistent backends can show that
    /// messages survive.
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>>;

    /// How many messages each of the 8 concurrent publishers sends in the
    /// bulk case (10,000 unless a backend says otherwise).
    fn messages_per_publisher(&self) -> usize {
        10_000
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh
/// harness built by evaluating `$harness`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
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
            priority_order,
            ttl_expiry_dead_letters,
            topic_wildcards,
            concurrent_publishers_lose_nothing,
            oversized_payload_is_refused,
            invalid_names_and_unknown_queues_are_errors,
            conflicting_declare_names_both_specs,
            durable_across_reopen,
            in_flight_redelivered_after_reopen,
            queue_stats_are_exact,
            list_queues_with_stats,
            close_ends_consumers
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> ::std::result::Result<(), $crate::Error> {
                let harness = $harness;
                $crate::cases::$case(&harness).await
            }
        )*
    };
}
