//! Receiving streams: reassembly, spilling, verification.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{Future, IntoFuture};
use std::io::SeekFrom;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use busway_core::{ConsumeOptions, Delivery, Headers, QueueName, QueueSpec};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Mutex};

use super::wire::{hex, sha256_hex, Chunk};
use super::StreamError;
use crate::bus::{settle_logged, Bus, Counters, SetupError};
use crate::handler::{reject, DeadLetterReason::Invalid};

/// The default number of bytes of one stream kept in memory before it spills to disk: 8 MiB.
pub const DEFAULT_MEMORY_LIMIT: usize = 8 * 1024 * 1024;

/// A stream that arrived whole and verified: read it as an [`AsyncRead`].
pub struct ReceivedStream {
    stream_id: String,
    headers: Headers,
    size: u64,
    sha256: String,
    spilled: bool,
    body: Body,
}

enum Body {
    Memory(std::io::Cursor<Bytes>),
    File(tokio::fs::File),
}

impl std::fmt::Debug for ReceivedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceivedStream")
            .field("stream_id", &self.stream_id)
            .field("size", &self.size)
            .field("spilled", &self.spilled)
            .finish_non_exhaustive()
    }
}

impl ReceivedStream {
    /// The stream's id.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }
    /// The headers of its last chunk (the sender's own headers included).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The payload's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The payload's SHA-256 (hex), verified.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
    /// Whether the payload went to a temporary file (past the memory limit).
    pub fn is_spilled(&self) -> bool {
        self.spilled
    }
}

impl AsyncRead for ReceivedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.body {
            Body::Memory(cursor) => Pin::new(cursor).poll_read(cx, buf),
            Body::File(file) => Pin::new(file).poll_read(cx, buf),
        }
    }
}

/// How far a stream has come.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamProgress {
    /// Chunks stored so far.
    pub received: u64,
    /// The number of chunks, once the last one has arrived.
    pub chunks: Option<u64>,
    /// The first chunk not yet stored: resume sending from here.
    pub first_missing: u64,
}

/// One stream being put back together.
struct Partial {
    chunk_size: u64,
    received: BTreeSet<u64>,
    /// Chunks held in memory, until the stream spills.
    memory: BTreeMap<u64, Bytes>,
    memory_bytes: usize,
    file: Option<tokio::fs::File>,
    /// From the last chunk: (chunks, size, sha256), and its headers.
    last: Option<(u64, u64, String)>,
    headers: Headers,
}

impl Partial {
    fn progress(&self) -> StreamProgress {
        let first_missing = (0..)
            .zip(self.received.iter())
            .find(|(expected, got)| expected != *got)
            .map_or(self.received.len() as u64, |(expected, _)| expected);
        StreamProgress {
            received: self.received.len() as u64,
            chunks: self.last.as_ref().map(|(n, _, _)| *n),
            first_missing,
        }
    }
    fn is_complete(&self) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(n, _, _)| self.received.len() as u64 == *n)
    }
}

/// How many finished streams are remembered, so late duplicates of their
/// chunks are dropped instead of starting a stream that never completes.
const REMEMBERED_FINISHED: usize = 1024;

struct Receiving {
    partial: HashMap<String, Partial>,
    finished: std::collections::VecDeque<String>,
    memory_limit: usize,
    spill_dir: Option<PathBuf>,
}

/// Streams arriving on a queue; see the [`stream`](crate::stream) module.
#[derive(Debug)]
pub struct StreamReceiver {
    results: mpsc::UnboundedReceiver<Result<ReceivedStream, StreamError>>,
    state: Arc<Mutex<Receiving>>,
}

impl std::fmt::Debug for Receiving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiving")
            .field("streams", &self.partial.len())
            .finish_non_exhaustive()
    }
}

impl StreamReceiver {
    /// The next stream that arrived whole and verified, or the next problem
    /// with a stream (a corrupted chunk, a checksum mismatch). `None` once
    /// the bus shuts down.
    pub async fn next(&mut self) -> Option<Result<ReceivedStream, StreamError>> {
        self.results.recv().await
    }
    /// How far the stream `stream_id` has come, while it is incomplete.
    pub async fn progress(&self, stream_id: &str) -> Option<StreamProgress> {
        self.state
            .lock()
            .await
            .partial
            .get(stream_id)
            .map(Partial::progress)
    }
}

/// Starting to receive streams: set the memory limit and spill directory, then `.await`.
#[must_use = "nothing is received until this is awaited"]
#[derive(Debug)]
pub struct ReceiveStreams {
    bus: Bus,
    queue: String,
    memory_limit: usize,
    spill_dir: Option<PathBuf>,
}

impl ReceiveStreams {
    /// Bytes of one stream kept in memory before it spills to a temporary
    /// file (default [`DEFAULT_MEMORY_LIMIT`]).
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = bytes;
        self
    }
    /// Where spill files go (default: the system's temporary directory).
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }
}

impl Bus {
    /// Receives the streams sent to queue `queue`; see the [`stream`](crate::stream) module.
    pub fn receive_streams(&self, queue: &str) -> ReceiveStreams {
        ReceiveStreams {
            bus: self.clone(),
            queue: queue.to_owned(),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            spill_dir: None,
        }
    }
}

impl IntoFuture for ReceiveStreams {
    type Output = Result<StreamReceiver, SetupError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let bus = self.bus;
            if bus.is_shut_down() {
                return Err(SetupError::ShutDown);
            }
            let queue = QueueName::new(&self.queue)?;
            let transport = &bus.inner.transport;
            transport
                .declare_queue(&QueueSpec::new(queue.clone()))
                .await?;
            let stream = transport
                .consume(&queue, ConsumeOptions::with_prefetch(16))
                .await?;
            let state = Arc::new(Mutex::new(Receiving {
                partial: HashMap::new(),
                finished: std::collections::VecDeque::new(),
                memory_limit: self.memory_limit,
                spill_dir: self.spill_dir,
            }));
            let (tx, results) = mpsc::unbounded_channel();
            let counters = bus.inner.counters.clone();
            let handler_state = state.clone();
            // One chunk at a time: the state of a stream changes in order.
            bus.spawn_consumer(queue, stream, 1, move |delivery| {
                receive(
                    handler_state.clone(),
                    tx.clone(),
                    counters.clone(),
                    delivery,
                )
            });
            Ok(StreamReceiver { results, state })
        })
    }
}

type Results = mpsc::UnboundedSender<Result<ReceivedStream, StreamError>>;

async fn receive(
    state: Arc<Mutex<Receiving>>,
    results: Results,
    counters: Arc<Counters>,
    delivery: Delivery,
) {
    let queue = delivery.queue().clone();
    let chunk = match Chunk::parse(delivery.message()) {
        Ok(chunk) => chunk,
        Err(reason) => {
            Counters::bump(&counters.malformed);
            let _ = results.send(Err(StreamError::InvalidChunk(reason.clone())));
            let reason = format!("invalid stream chunk: {reason}");
            return reject(delivery, Invalid, reason, &counters).await;
        }
    };
    if sha256_hex(&delivery.message().payload) != chunk.sha256 {
        Counters::bump(&counters.malformed);
        let error = StreamError::CorruptChunk {
            stream_id: chunk.stream_id.clone(),
            index: chunk.index,
        };
        let reason = error.to_string();
        let _ = results.send(Err(error));
        return reject(delivery, Invalid, reason, &counters).await;
    }
    let mut receiving = state.lock().await;
    match store(&mut receiving, &chunk, &delivery).await {
        Ok(None) => {}
        Ok(Some(done)) => {
            let _ = results.send(done);
        }
        Err(Stored::Io(e)) => {
            // Not acknowledged: the chunk comes back once the disk recovers.
            tracing::warn!(queue = %queue, error = %e, "storing a stream chunk failed");
            let _ = results.send(Err(StreamError::Io(e)));
            drop(receiving);
            let wait = Some(std::time::Duration::from_secs(1));
            return settle_logged(delivery.nack(wait).await, &queue, "nacking a chunk").await;
        }
        Err(Stored::Invalid(reason)) => {
            drop(receiving);
            let _ = results.send(Err(StreamError::InvalidChunk(reason.clone())));
            let reason = format!("invalid stream chunk: {reason}");
            return reject(delivery, Invalid, reason, &counters).await;
        }
    }
    drop(receiving);
    crate::handler::ack(delivery, "acking a chunk").await;
}

enum Stored {
    Io(std::io::Error),
    Invalid(String),
}

impl From<std::io::Error> for Stored {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Stores a verified chunk; returns the finished stream (or its failure)
/// when this chunk completed it.
async fn store(
    receiving: &mut Receiving,
    chunk: &Chunk,
    delivery: &Delivery,
) -> Result<Option<Result<ReceivedStream, StreamError>>, Stored> {
    if receiving.finished.contains(&chunk.stream_id) {
        tracing::debug!(stream = %chunk.stream_id, index = chunk.index, "chunk of a finished stream dropped");
        return Ok(None);
    }
    let memory_limit = receiving.memory_limit;
    let spill_dir = receiving.spill_dir.clone();
    let partial = receiving
        .partial
        .entry(chunk.stream_id.clone())
        .or_insert_with(|| Partial {
            chunk_size: chunk.chunk_size,
            received: BTreeSet::new(),
            memory: BTreeMap::new(),
            memory_bytes: 0,
            file: None,
            last: None,
            headers: Headers::new(),
        });
    if partial.chunk_size != chunk.chunk_size {
        return Err(Stored::Invalid(format!(
            "chunk {} of stream `{}` has chunk size {}, the stream has {}",
            chunk.index, chunk.stream_id, chunk.chunk_size, partial.chunk_size
        )));
    }
    if let (Some(known), Some(new)) = (&partial.last, &chunk.last) {
        if known != new {
            return Err(Stored::Invalid(format!(
                "stream `{}` got two different last chunks",
                chunk.stream_id
            )));
        }
    }
    if let Some((count, _, _)) = partial.last.as_ref().or(chunk.last.as_ref()) {
        if chunk.index >= *count || partial.received.last().is_some_and(|i| i >= count) {
            return Err(Stored::Invalid(format!(
                "chunk {} of stream `{}` is past its last chunk {}",
                chunk.index,
                chunk.stream_id,
                count - 1
            )));
        }
    }
    if !partial.received.insert(chunk.index) {
        tracing::debug!(stream = %chunk.stream_id, index = chunk.index, "duplicate chunk dropped");
        return Ok(None);
    }
    if chunk.last.is_some() {
        partial.last = chunk.last.clone();
        partial.headers = delivery.message().headers.clone();
    }
    let payload = delivery.message().payload.clone();
    if partial.file.is_none() && partial.memory_bytes + payload.len() > memory_limit {
        // Spill: everything so far to an unnamed temporary file, at its place.
        let file = match &spill_dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let mut file = tokio::fs::File::from_std(file);
        for (index, bytes) in std::mem::take(&mut partial.memory) {
            file.seek(SeekFrom::Start(index * partial.chunk_size))
                .await?;
            file.write_all(&bytes).await?;
        }
        partial.memory_bytes = 0;
        partial.file = Some(file);
    }
    match &mut partial.file {
        Some(file) => {
            file.seek(SeekFrom::Start(chunk.index * partial.chunk_size))
                .await?;
            file.write_all(&payload).await?;
        }
        None => {
            partial.memory_bytes += payload.len();
            partial.memory.insert(chunk.index, payload);
        }
    }
    if !partial.is_complete() {
        return Ok(None);
    }
    let Some(partial) = receiving.partial.remove(&chunk.stream_id) else {
        return Ok(None);
    };
    if receiving.finished.len() == REMEMBERED_FINISHED {
        receiving.finished.pop_front();
    }
    receiving.finished.push_back(chunk.stream_id.clone());
    finish(chunk.stream_id.clone(), partial).await.map(Some)
}

/// Verifies a complete stream and turns it into a reader.
async fn finish(
    stream_id: String,
    partial: Partial,
) -> Result<Result<ReceivedStream, StreamError>, Stored> {
    let Some((_, size, expected)) = partial.last else {
        return Err(Stored::Invalid("complete without a last chunk".into()));
    };
    let mut digest = Sha256::new();
    let (body, spilled) = match partial.file {
        Some(mut file) => {
            file.flush().await?;
            file.seek(SeekFrom::Start(0)).await?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = size;
            while left > 0 {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
                digest.update(&buf[..n]);
                left -= n as u64;
            }
            file.seek(SeekFrom::Start(0)).await?;
            (Body::File(file), true)
        }
        None => {
            let mut whole = bytes::BytesMut::with_capacity(partial.memory_bytes);
            for bytes in partial.memory.values() {
                digest.update(bytes);
                whole.extend_from_slice(bytes);
            }
            (Body::Memory(std::io::Cursor::new(whole.freeze())), false)
        }
    };
    let actual = hex(&digest.finalize());
    if actual != expected {
        return Ok(Err(StreamError::ChecksumMismatch {
            stream_id,
            expected,
            actual,
        }));
    }
    Ok(Ok(ReceivedStream {
        stream_id,
        headers: partial.headers,
        size,
        sha256: actual,
        spilled,
        body,
    }))
}
