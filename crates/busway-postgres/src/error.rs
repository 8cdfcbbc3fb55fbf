//! Mapping PostgreSQL failures onto busway's per-operation errors.

use busway_core::{ConsumeError, DeclareError, PublishError, SettleError, StatsError};

/// Whether a failure may go away on its own: a lost or refused connection,
/// a pool with no free connection, a server shutting down or starting, a
/// serialization failure or deadlock.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_retryable_code(&code)),
        _ => false,
    }
}

/// SQLSTATEs worth retrying: connection exceptions (08), serialization
/// failure and deadlock (40001, 40P01), too many connections (53300),
/// operator intervention such as `pg_terminate_backend` or a restart (57P01,
/// 57P02, 57P03).
fn is_retryable_code(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03"
        )
}

/// Whether the failure means the connection is gone (its transaction, if
/// any, did not commit unless the failure came from the commit itself).
pub(crate) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// A busway error type with a `Backend` variant.
pub(crate) trait FromSql {
    /// Wraps a PostgreSQL failure.
    fn from_sql(e: sqlx::Error) -> Self;
}

macro_rules! from_sql {
    ($($t:ident),*) => {$(
        impl FromSql for $t {
            fn from_sql(e: sqlx::Error) -> Self {
                let retryable = is_retryable(&e);
                $t::Backend { source: Box::new(e), retryable }
            }
        }
    )*};
}
from_sql!(
    PublishError,
    DeclareError,
    ConsumeError,
    SettleError,
    StatsError
);

/// The failure of one operation: either PostgreSQL failed, or the operation
/// itself was refused. `?` works on both.
#[derive(Debug)]
pub(crate) enum Fail<E> {
    Sql(sqlx::Error),
    Op(E),
}

impl<E> From<sqlx::Error> for Fail<E> {
    fn from(e: sqlx::Error) -> Self {
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
from_op!(
    PublishError,
    DeclareError,
    ConsumeError,
    SettleError,
    StatsError
);

impl<E: FromSql> Fail<E> {
    /// The busway error.
    pub(crate) fn into_error(self) -> E {
        match self {
            Fail::Sql(e) => E::from_sql(e),
            Fail::Op(e) => e,
        }
    }
}
