//! Streams on memory and SQLite: round trips of every shape, spilling,
//! chunks out of order and duplicated, resuming, and corrupted chunks.
//! Chunks are tampered with by sending a stream to a staging queue, taking
//! its chunk messages off it, and publishing them (reordered, duplicated,
//! altered) to the queue a receiver listens on.

#[allow(unused_macros, unused_imports)]
mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use busway::headers::DEAD_LETTER_REASON;
use busway::stream::{ReceivedStream, StreamError, StreamReceiver};
use busway::{Bus, ConsumeOptions, Message, Publish, QueueName, Transport};
use futures::StreamExt;
use support::{next_dead_letter, unique, PATIENCE};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

type T = Arc<dyn Transport>;

/// Bytes that differ at every position (a misplaced chunk shows).
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn next_stream(receiver: &mut StreamReceiver) -> anyhow::Result<ReceivedStream> {
    let next = tokio::time::timeout(PATIENCE, receiver.next())
        .await
        .context("no stream arrived")?
        .context("receiver closed")?;
    Ok(next?)
}

async fn read_all(mut stream: ReceivedStream) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// The chunk messages of a stream of `chunks` chunks, taken off `staging`.
async fn take_chunks(t: &T, staging: &QueueName, chunks: u64) -> anyhow::Result<Vec<Message>> {
    let mut deliveries = t
        .consume(staging, ConsumeOptions::with_prefetch(64))
        .await?;
    let mut messages = Vec::new();
    while (messages.len() as u64) < chunks {
        let delivery = tokio::time::timeout(PATIENCE, deliveries.next())
            .await
            .context("chunks missing on the staging queue")?
            .context("staging stream ended")??;
        messages.push(delivery.message().clone());
        delivery.ack().await?;
    }
    Ok(messages)
}

async fn republish(t: &T, queue: &str, messages: Vec<Message>) -> anyhow::Result<()> {
    let queue = QueueName::new(queue)?;
    for message in messages {
        t.publish(Publish::to_queue(queue.clone(), message)).await?;
    }
    Ok(())
}

async fn round_trips_of_every_shape(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let queue = unique("files");
    let mut receiver = bus.receive_streams(&queue).await?;
    // Empty, smaller than a chunk, an exact multiple, and a ragged end.
    for len in [0usize, 100, 4096 * 3, 4096 * 5 + 17] {
        let data = payload(len);
        let sent = bus
            .send_stream(&queue, std::io::Cursor::new(data.clone()))
            .chunk_size(4096)
            .header("content-type", "application/x-test")
            .await?;
        ensure!(sent.size == len as u64);
        ensure!(
            sent.chunks == (len as u64).div_ceil(4096).max(1),
            "{sent:?}"
        );
        let received = next_stream(&mut receiver).await?;
        ensure!(received.stream_id() == sent.stream_id);
        ensure!(received.sha256() == sent.sha256);
        ensure!(received.headers().get("content-type") == Some("application/x-test"));
        ensure!(!received.is_spilled());
        ensure!(
            read_all(received).await? == data,
            "payload of {len} bytes differs"
        );
    }
    bus.shutdown().await;
    Ok(())
}

async fn large_stream_spills_to_disk(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let queue = unique("big");
    let spill = tempfile::tempdir()?;
    let mut receiver = bus
        .receive_streams(&queue)
        .memory_limit(64 * 1024)
        .spill_dir(spill.path())
        .await?;
    let data = payload(1024 * 1024 + 3);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &data)?;
    let sent = bus
        .send_file(&queue, file.path())
        .await?
        .chunk_size(32 * 1024)
        .await?;
    let received = next_stream(&mut receiver).await?;
    ensure!(
        received.is_spilled(),
        "a 1 MiB stream stayed in 64 KiB of memory"
    );
    ensure!(received.size() == sent.size);
    let name = file
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    ensure!(received.headers().get("x-stream-file-name") == Some(name));
    ensure!(read_all(received).await? == data);
    bus.shutdown().await;
    Ok(())
}

async fn out_of_order_and_duplicate_chunks(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let staging = unique("staging");
    let queue = unique("shuffled");
    // A small memory limit, so the spill file is written out of order too.
    let mut receiver = bus.receive_streams(&queue).memory_limit(3000).await?;
    let data = payload(1000 * 9 + 1);
    let sent = bus
        .send_stream(&staging, std::io::Cursor::new(data.clone()))
        .chunk_size(1000)
        .await?;
    let mut chunks = take_chunks(&t, &QueueName::new(&staging)?, sent.chunks).await?;
    // Last first, then the rest backwards, with some sent twice.
    chunks.reverse();
    let mut shuffled = chunks.clone();
    shuffled.insert(3, chunks[5].clone());
    shuffled.push(chunks[0].clone());
    shuffled.push(chunks[9].clone());
    republish(&t, &queue, shuffled).await?;
    let received = next_stream(&mut receiver).await?;
    ensure!(received.stream_id() == sent.stream_id);
    ensure!(read_all(received).await? == data);
    // The late duplicates produced nothing more.
    let more = tokio::time::timeout(Duration::from_millis(200), receiver.next()).await;
    ensure!(more.is_err(), "unexpected: {:?}", more.ok());
    bus.shutdown().await;
    Ok(())
}

/// A reader that fails after `good` bytes, like a connection that drops.
struct BreaksAfter {
    data: Vec<u8>,
    at: usize,
    good: usize,
}

impl AsyncRead for BreaksAfter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at >= self.good {
            return Poll::Ready(Err(std::io::Error::other("connection reset")));
        }
        let n = buf.remaining().min(self.good - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

async fn interrupted_transfer_resumes(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let queue = unique("resume");
    let mut receiver = bus.receive_streams(&queue).await?;
    let data = payload(1000 * 10 + 500);
    let broken = BreaksAfter {
        data: data.clone(),
        at: 0,
        good: 5 * 1000 + 10,
    };
    let failed = bus
        .send_stream(&queue, broken)
        .stream_id("upload-42")
        .chunk_size(1000)
        .await;
    ensure!(matches!(failed, Err(StreamError::Io(_))), "{failed:?}");
    // Chunks 0-3 were published (chunk 4 waited for the look-ahead that failed).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let progress = loop {
        match receiver.progress("upload-42").await {
            Some(p) if p.received == 4 => break p,
            _ if tokio::time::Instant::now() > deadline => bail!("the first chunks never arrived"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    ensure!(
        progress.first_missing == 4 && progress.chunks.is_none(),
        "{progress:?}"
    );
    let resumed = bus
        .send_stream(&queue, std::io::Cursor::new(data.clone()))
        .stream_id("upload-42")
        .chunk_size(1000)
        .resume_from(progress.first_missing)
        .await?;
    ensure!(resumed.published == resumed.chunks - 4, "{resumed:?}");
    let received = next_stream(&mut receiver).await?;
    ensure!(received.stream_id() == "upload-42");
    ensure!(read_all(received).await? == data);
    ensure!(receiver.progress("upload-42").await.is_none());
    bus.shutdown().await;
    Ok(())
}

async fn corrupted_chunk_is_reported_and_can_be_resent(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let staging = unique("staging");
    let queue = unique("corrupt");
    let mut receiver = bus.receive_streams(&queue).await?;
    let data = payload(4000);
    let sent = bus
        .send_stream(&staging, std::io::Cursor::new(data.clone()))
        .chunk_size(1000)
        .await?;
    let chunks = take_chunks(&t, &QueueName::new(&staging)?, sent.chunks).await?;
    let mut damaged = chunks[2].clone();
    let mut bytes = damaged.payload.to_vec();
    bytes[10] ^= 0xff;
    damaged.payload = bytes.into();
    republish(
        &t,
        &queue,
        vec![
            chunks[0].clone(),
            damaged,
            chunks[1].clone(),
            chunks[3].clone(),
        ],
    )
    .await?;
    let error = tokio::time::timeout(PATIENCE, receiver.next())
        .await?
        .context("receiver closed")?;
    match &error {
        Err(StreamError::CorruptChunk { stream_id, index }) => {
            ensure!(*stream_id == sent.stream_id && *index == 2, "{error:?}");
        }
        other => bail!("expected a corrupt chunk error, got {other:?}"),
    }
    let dead = next_dead_letter(&t, &QueueName::new(&queue)?).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(
        reason.contains("chunk 2") && reason.contains("corrupted"),
        "{reason}"
    );
    dead.ack().await?;
    // The sender sends the chunk again: the stream completes.
    republish(&t, &queue, vec![chunks[2].clone()]).await?;
    let received = next_stream(&mut receiver).await?;
    ensure!(read_all(received).await? == data);
    bus.shutdown().await;
    Ok(())
}

async fn whole_checksum_mismatch_is_a_clear_error(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let staging = unique("staging");
    let queue = unique("mismatch");
    let mut receiver = bus.receive_streams(&queue).await?;
    let sent = bus
        .send_stream(&staging, std::io::Cursor::new(payload(2500)))
        .chunk_size(1000)
        .await?;
    let mut chunks = take_chunks(&t, &QueueName::new(&staging)?, sent.chunks).await?;
    let last = chunks.last_mut().context("no chunks")?;
    last.headers.insert("x-stream-sha256", "00".repeat(32));
    republish(&t, &queue, chunks).await?;
    let outcome = tokio::time::timeout(PATIENCE, receiver.next())
        .await?
        .context("receiver closed")?;
    match outcome {
        Err(StreamError::ChecksumMismatch {
            stream_id, actual, ..
        }) => {
            ensure!(stream_id == sent.stream_id && actual == sent.sha256);
        }
        other => bail!("expected a checksum mismatch, got {other:?}"),
    }
    bus.shutdown().await;
    Ok(())
}

macro_rules! on_memory_and_sqlite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::memory();
                    super::$case(backend.transport.clone()).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::sqlite().await?;
                    let result = super::$case(backend.transport.clone()).await;
                    backend.transport.close().await;
                    result
                }
            )*
        }
    };
}

on_memory_and_sqlite!(
    round_trips_of_every_shape,
    large_stream_spills_to_disk,
    out_of_order_and_duplicate_chunks,
    interrupted_transfer_resumes,
    corrupted_chunk_is_reported_and_can_be_resent,
    whole_checksum_mismatch_is_a_clear_error,
);
