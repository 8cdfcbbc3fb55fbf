//! Event sourcing and CQRS: aggregates and their [`Repository`], snapshots,
//! [`Upcasters`], projections with checkpoints ([`ProjectionRunner`]), the
//! outbox relay, the [`CommandBus`] and [`QueryBus`], and a given/when/then
//! [`TestFramework`].
//!
//! The store is any [`EventStore`]: [`MemoryEventStore`](crate::memory::MemoryEventStore)
//! for tests, [`SqliteEventStore`](crate::sqlite::SqliteEventStore) in the
//! same file as the SQLite queues (the default), or PostgreSQL.
//!
//! How the pieces fit:
//! - a command goes through the [`CommandBus`] to a handler, which runs it
//!   on an aggregate with [`Repository::execute`]: load (snapshot + later
//!   events), decide, append at the loaded version (a concurrent writer
//!   makes it a conflict, retried on fresh state by
//!   [`Repository::execute_retrying`]);
//! - the events are committed with the messages announcing them (the
//!   outbox, [`Repository::announcing`]): on SQLite straight into the queue
//!   in the same transaction, elsewhere into an outbox an [`OutboxRelay`]
//!   drains;
//! - projections read the global log from their checkpoint and keep read
//!   models; queries through the [`QueryBus`] read them, cached until an
//!   event or a command through a linked command bus invalidates them.
//!
//! `examples/event_sourcing.rs` has the reference domain (users, orders,
//! a users read model, `get_user` / `list_users`).

mod aggregate;
mod codec;
mod cqrs;
mod outbox;
mod projection;
mod testing;

pub use aggregate::{Aggregate, Executed, Loaded, Repository, RepositoryError, SnapshotPolicy};
pub use busway_core::event_store::{
    AppendError, AppendOutcome, EventStore, ExpectedVersion, NewEvent, ParkedEvent, ReadError,
    Snapshot, StoreWriteError, StoredEvent, StreamInfo, StreamRead,
};
pub use codec::{decode_event, encode_event, upcast_stored, DecodeError, EncodeError, Upcasters};
pub use cqrs::{CommandBus, QueryBus, QueryCacheStats, COMMAND_SERVICE, QUERY_SERVICE};
pub use outbox::{OutboxRelay, RelayError, RelayHandle};
pub use projection::{
    Envelope, OnUndecodable, Projection, ProjectionError, ProjectionHandle, ProjectionRunner,
    ProjectionStatus,
};
pub use testing::{TestFramework, Then};
