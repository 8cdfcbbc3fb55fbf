//! Exit codes scripts can rely on.

use std::process::ExitCode;

/// What the process exit code says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Something else failed.
    Error = 1,
    /// Bad flags, arguments or settings file (clap uses 2 as well).
    Usage = 2,
    /// The queue, saga, stream or dead letter does not exist, or an RPC
    /// answered with an error reply.
    NotFound = 3,
    /// The backend could not be reached.
    Unreachable = 4,
    /// No reply in time.
    Timeout = 5,
}

/// An error with the exit code it calls for.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) exit: Exit,
    error: anyhow::Error,
}

impl Failure {
    /// A failure with a message.
    pub(crate) fn msg(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Self {
            exit,
            error: anyhow::anyhow!(message.into()),
        })
    }

    /// Gives `error` an exit code.
    pub(crate) fn wrap(exit: Exit, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Self { exit, error })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `{:#}` prints the whole chain of the wrapped error on one line.
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Failure {}

/// The exit code an error calls for.
pub(crate) fn classify(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return failure.exit;
        }
        if cause.downcast_ref::<busway::ConnectError>().is_some() {
            return Exit::Unreachable;
        }
        if let Some(e) = cause.downcast_ref::<busway::RpcError>() {
            return match e {
                busway::RpcError::Timeout { .. } => Exit::Timeout,
                busway::RpcError::Remote { .. } | busway::RpcError::NoSuchService(_) => {
                    Exit::NotFound
                }
                _ => Exit::Error,
            };
        }
        if let Some(busway::StatsError::QueueNotFound(_)) =
            cause.downcast_ref::<busway::StatsError>()
        {
            return Exit::NotFound;
        }
        if let Some(busway::saga::SagaQueryError::NotFound(_)) =
            cause.downcast_ref::<busway::saga::SagaQueryError>()
        {
            return Exit::NotFound;
        }
    }
    Exit::Error
}

/// Prints `result`'s error, if any, and picks the exit code.
pub(crate) fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(classify(&error) as u8)
        }
    }
}
