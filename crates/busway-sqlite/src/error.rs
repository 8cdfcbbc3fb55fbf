//! Mapping SQLite failures onto busway's per-operation errors.

use busway_core::{ConsumeError, DeclareError, PublishError, SettleError, StatsError};
use rusqlite::ErrorCode;

/// Whether an SQLite failure may go away on its own (a lock held by another
/// process, a full disk, an I/O hiccup).
pub(crate) fn is_retryable(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::OutOfMemory
                | ErrorCode::CannotOpen
        )
    )
}

/// A busway error type with a `Backend` variant.
pub(crate) trait FromSqlite {
    /// Wraps an SQLite failure.
    fn from_sqlite(e: rusqlite::Error) -> Self;
    /// The error for "the transport is closed".
    fn closed() -> Self;
}

macro_rules! from_sqlite {
    ($($t:ident),*) => {$(
        impl FromSqlite for $t {
            fn from_sqlite(e: rusqlite::Error) -> Self {
                let retryable = is_retryable(&e);
                $t::Backend { source: Box::new(e), retryable }
            }
            fn closed() -> Self {
                $t::Closed
            }
        }
    )*};
}
from_sqlite!(
    PublishError,
    DeclareError,
    ConsumeError,
    SettleError,
    StatsError
);

/// The failure of one command inside the writer: either SQLite failed, or
/// the operation itself was refused. `?` works on both.
#[derive(Debug)]
pub(crate) enum Fail<E> {
    Sql(rusqlite::Error),
    Op(E),
}

impl<E> From<rusqlite::Error> for Fail<E> {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

macro_rules! from_op {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail<$t> {
            fn from(e: $t) -> Self {
                Fail::Op(e)
            }
        }
    )*};
}
from_op!(PublishError, DeclareError, ConsumeError, SettleError);

impl<E: FromSqlite> Fail<E> {
    /// The busway error.
    pub(crate) fn into_error(self) -> E {
        match self {
            Fail::Sql(e) => E::from_sqlite(e),
            Fail::Op(e) => e,
        }
    }
}
