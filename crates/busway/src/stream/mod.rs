//! Streams: a large payload sent as ordered chunks and put back together.
//!
//! [`Bus::send_stream`](crate::Bus::send_stream) reads a file or any
//! [`AsyncRead`](tokio::io::AsyncRead) and publishes it to a queue as
//! chunks of a fixed size. Each chunk carries the stream id, its index, the
//! chunk size and its own SHA-256; the last one also carries the SHA-256
//! and size of the whole payload. [`Bus::receive_streams`](crate::Bus::receive_streams)
//! consumes the queue and, for each stream:
//!
//! - stores every chunk at its place, so chunks may arrive in any order and
//!   more than once (duplicates are dropped);
//! - keeps at most a configured number of bytes in memory, then spills the
//!   stream to an unnamed temporary file (removed when the result is dropped);
//! - dead-letters a chunk whose bytes do not match its checksum, and reports
//!   it ([`StreamError::CorruptChunk`]); the stream stays open, so the sender
//!   can send that chunk again;
//! - once every chunk is in, verifies the SHA-256 of the whole payload and
//!   hands out a [`ReceivedStream`], an `AsyncRead` over the payload — or
//!   [`StreamError::ChecksumMismatch`].
//!
//! A transfer the sender could not finish is resumed by sending again with
//! the same stream id: [`SendStream::resume_from`] skips (but still hashes)
//! the chunks before the first one the receiver is missing
//! ([`StreamReceiver::progress`]); duplicates are harmless either way.
//!
//! Chunks are acknowledged once stored by the receiver: a receiver that
//! restarts has lost the partial streams it held, and their senders send
//! them again.
//!
//! ```
//! use busway::Bus;
//! use tokio::io::AsyncReadExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect("memory://").await?;
//! let mut incoming = bus.receive_streams("uploads").await?;
//! let payload = vec![7u8; 100_000];
//! let sent = bus.send_stream("uploads", std::io::Cursor::new(payload.clone())).chunk_size(16 * 1024).await?;
//! assert_eq!(sent.chunks, 7);
//!
//! let mut received = incoming.next().await.expect("a stream")?;
//! assert_eq!(received.stream_id(), sent.stream_id);
//! let mut bytes = Vec::new();
//! received.read_to_end(&mut bytes).await?;
//! assert_eq!(bytes, payload);
//! # bus.shutdown().await;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

mod receiver;
mod sender;
pub(crate) mod wire;

pub use receiver::DEFAULT_MEMORY_LIMIT;
pub use receiver::{ReceiveStreams, ReceivedStream, StreamProgress, StreamReceiver};
pub use sender::{SendStream, StreamReceipt, DEFAULT_CHUNK_SIZE};

/// Sending or receiving a stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading the payload (sender) or the spill file (receiver) failed.
    #[error("stream I/O failed")]
    Io(#[from] std::io::Error),
    /// Publishing a chunk failed.
    #[error("publishing chunk {index} of stream `{stream_id}` failed")]
    Publish {
        /// The stream.
        stream_id: String,
        /// The chunk that was not sent (resume from it).
        index: u64,
        /// Why.
        #[source]
        source: busway_core::PublishError,
    },
    /// Declaring the stream queue failed.
    #[error("declaring the stream queue failed")]
    Declare(#[from] busway_core::DeclareError),
    /// The queue name is not valid.
    #[error(transparent)]
    InvalidName(#[from] busway_core::NameError),
    /// A chunk's bytes do not match its checksum: it was dead-lettered; the
    /// stream waits for that chunk to be sent again.
    #[error("chunk {index} of stream `{stream_id}` is corrupted (SHA-256 mismatch); it was dead-lettered")]
    CorruptChunk {
        /// The stream.
        stream_id: String,
        /// The corrupted chunk.
        index: u64,
    },
    /// Every chunk arrived, but the payload's SHA-256 is not the one the sender computed.
    #[error(
        "stream `{stream_id}` is corrupted: SHA-256 {actual} where the sender sent {expected}"
    )]
    ChecksumMismatch {
        /// The stream.
        stream_id: String,
        /// The sender's checksum (hex).
        expected: String,
        /// The checksum of what arrived (hex).
        actual: String,
    },
    /// A chunk is not a valid stream chunk (missing or contradictory headers); it was dead-lettered.
    #[error("invalid stream chunk: {0}")]
    InvalidChunk(String),
    /// The bus has been shut down.
    #[error("the bus has been shut down")]
    ShutDown,
}

impl StreamError {
    /// Whether trying again may succeed (sending again, or resending the chunk).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io(_) | Self::CorruptChunk { .. } | Self::ChecksumMismatch { .. } => true,
            Self::Publish { source, .. } => source.is_retryable(),
            Self::Declare(e) => e.is_retryable(),
            _ => false,
        }
    }
}
