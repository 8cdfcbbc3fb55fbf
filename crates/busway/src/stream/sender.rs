//! Sending a stream.

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::pin::Pin;

use busway_core::{Message, Publish, QueueName, QueueSpec};
use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::wire::{self, hex, sha256_hex};
use super::StreamError;
use crate::middleware::MessageContext;
use crate::Bus;

/// The default chunk size: 256 KiB.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;

/// What was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamReceipt {
    /// The stream's id (give it to [`SendStream::stream_id`] to resume).
    pub stream_id: String,
    /// How many chunks the stream has.
    pub chunks: u64,
    /// How many of them this send published (fewer when resuming).
    pub published: u64,
    /// The payload's size in bytes.
    pub size: u64,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
}

/// A stream being sent: configure, then `.await` it for the [`StreamReceipt`].
#[must_use = "the stream is sent when this is awaited"]
pub struct SendStream<R> {
    bus: Bus,
    queue: String,
    reader: R,
    stream_id: String,
    chunk_size: usize,
    resume_from: u64,
    headers: Vec<(String, String)>,
}

impl<R> std::fmt::Debug for SendStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("queue", &self.queue)
            .field("stream_id", &self.stream_id)
            .field("chunk_size", &self.chunk_size)
            .field("resume_from", &self.resume_from)
            .finish_non_exhaustive()
    }
}

impl<R> SendStream<R> {
    /// The stream id (default: a new UUID). Use the id of an interrupted
    /// transfer to resume it.
    pub fn stream_id(mut self, id: impl Into<String>) -> Self {
        self.stream_id = id.into();
        self
    }
    /// The size of each chunk (default [`DEFAULT_CHUNK_SIZE`]; at least 1).
    /// A resumed transfer must use the size it started with.
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }
    /// Publishes only chunks from `index` on; the ones before are read and
    /// hashed but not sent (the receiver has them already).
    pub fn resume_from(mut self, index: u64) -> Self {
        self.resume_from = index;
        self
    }
    /// A header set on every chunk (a file name, a content type…).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }
}

impl Bus {
    /// Sends what `reader` yields to queue `queue` as a stream; see the
    /// [`stream`](crate::stream) module.
    pub fn send_stream<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        queue: &str,
        reader: R,
    ) -> SendStream<R> {
        SendStream {
            bus: self.clone(),
            queue: queue.to_owned(),
            reader,
            stream_id: uuid::Uuid::new_v4().to_string(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            resume_from: 0,
            headers: Vec::new(),
        }
    }

    /// Sends the file at `path` to queue `queue` as a stream, with its file
    /// name in header `x-stream-file-name`.
    pub async fn send_file(
        &self,
        queue: &str,
        path: impl AsRef<Path>,
    ) -> Result<SendStream<tokio::fs::File>, StreamError> {
        let path = path.as_ref();
        let file = tokio::fs::File::open(path).await?;
        let mut send = self.send_stream(queue, file);
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            send = send.header("x-stream-file-name", name);
        }
        Ok(send)
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> IntoFuture for SendStream<R> {
    type Output = Result<StreamReceipt, StreamError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(send(self))
    }
}

/// Fills `buf` with up to `size` bytes; fewer only at the end of the reader.
async fn read_chunk<R: AsyncRead + Unpin>(
    reader: &mut R,
    size: usize,
) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        let mut limited = (&mut *reader).take((size - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf)
}

async fn send<R: AsyncRead + Unpin>(mut s: SendStream<R>) -> Result<StreamReceipt, StreamError> {
    if s.bus.is_shut_down() {
        return Err(StreamError::ShutDown);
    }
    let queue = QueueName::new(&s.queue)?;
    s.bus
        .inner
        .transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    let mut whole = Sha256::new();
    let mut index = 0u64;
    let mut size = 0u64;
    let mut published = 0u64;
    // One chunk of look-ahead tells whether the current one is the last.
    let mut current = read_chunk(&mut s.reader, s.chunk_size).await?;
    loop {
        let next = if current.len() == s.chunk_size {
            Some(read_chunk(&mut s.reader, s.chunk_size).await?)
        } else {
            None
        };
        let last = next.as_ref().is_none_or(|n| n.is_empty());
        whole.update(&current);
        size += current.len() as u64;
        if index >= s.resume_from {
            let mut message = Message::new(wire::CHUNK_KIND, current.split().freeze())
                .with_header(wire::STREAM_ID, s.stream_id.clone())
                .with_header(wire::CHUNK_INDEX, index.to_string())
                .with_header(wire::CHUNK_SIZE, s.chunk_size.to_string());
            message
                .headers
                .insert(wire::CHUNK_SHA256, sha256_hex(&message.payload));
            for (k, v) in &s.headers {
                message.headers.insert(k.clone(), v.clone());
            }
            if last {
                message
                    .headers
                    .insert(wire::CHUNK_COUNT, (index + 1).to_string());
                message.headers.insert(wire::TOTAL_SIZE, size.to_string());
                message
                    .headers
                    .insert(wire::TOTAL_SHA256, hex(&whole.clone().finalize()));
            }
            let mut message = MessageContext::stamp(message);
            crate::trace::inject(&tracing::Span::current(), &mut message.headers);
            s.bus
                .inner
                .transport
                .publish(Publish::to_queue(queue.clone(), message))
                .await
                .map_err(|source| StreamError::Publish {
                    stream_id: s.stream_id.clone(),
                    index,
                    source,
                })?;
            published += 1;
        }
        if last {
            return Ok(StreamReceipt {
                stream_id: s.stream_id,
                chunks: index + 1,
                published,
                size,
                sha256: hex(&whole.finalize()),
            });
        }
        index += 1;
        current = next.unwrap_or_default();
    }
}
