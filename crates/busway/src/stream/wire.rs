//! The headers of a stream chunk.

use busway_core::Message;
use sha2::{Digest, Sha256};

/// The message type of every chunk.
pub(crate) const CHUNK_KIND: &str = "stream_chunk";
/// The stream's id.
pub(crate) const STREAM_ID: &str = "x-stream-id";
/// The chunk's index, from 0.
pub(crate) const CHUNK_INDEX: &str = "x-stream-chunk";
/// The size of every chunk but the last (which may be shorter).
pub(crate) const CHUNK_SIZE: &str = "x-stream-chunk-size";
/// SHA-256 of this chunk's bytes, hex.
pub(crate) const CHUNK_SHA256: &str = "x-stream-chunk-sha256";
/// On the last chunk: the number of chunks.
pub(crate) const CHUNK_COUNT: &str = "x-stream-chunks";
/// On the last chunk: the payload's size in bytes.
pub(crate) const TOTAL_SIZE: &str = "x-stream-size";
/// On the last chunk: SHA-256 of the whole payload, hex.
pub(crate) const TOTAL_SHA256: &str = "x-stream-sha256";

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A chunk as the receiver reads it from a message.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) stream_id: String,
    pub(crate) index: u64,
    pub(crate) chunk_size: u64,
    pub(crate) sha256: String,
    /// `Some` on the last chunk: (chunks, size, sha256).
    pub(crate) last: Option<(u64, u64, String)>,
}

impl Chunk {
    pub(crate) fn parse(message: &Message) -> Result<Self, String> {
        let h = &message.headers;
        let get = |key: &str| h.get(key).ok_or_else(|| format!("missing header `{key}`"));
        let number = |key: &str| -> Result<u64, String> {
            get(key)?
                .parse::<u64>()
                .map_err(|e| format!("header `{key}` is not a number: {e}"))
        };
        let stream_id = get(STREAM_ID)?.to_owned();
        let index = number(CHUNK_INDEX)?;
        let chunk_size = number(CHUNK_SIZE)?;
        if chunk_size == 0 {
            return Err("chunk size 0".into());
        }
        let sha256 = get(CHUNK_SHA256)?.to_owned();
        let last = match h.get(CHUNK_COUNT) {
            None => None,
            Some(_) => Some((
                number(CHUNK_COUNT)?,
                number(TOTAL_SIZE)?,
                get(TOTAL_SHA256)?.to_owned(),
            )),
        };
        let len = message.payload.len() as u64;
        if len > chunk_size {
            return Err(format!(
                "chunk {index} has {len} bytes, more than the chunk size {chunk_size}"
            ));
        }
        if let Some((count, size, _)) = &last {
            if *count != index + 1 {
                return Err(format!("last chunk {index} says there are {count} chunks"));
            }
            if index
                .checked_mul(chunk_size)
                .and_then(|o| o.checked_add(len))
                != Some(*size)
            {
                return Err(format!(
                    "last chunk {index} does not end the stream at {size} bytes"
                ));
            }
        } else if len != chunk_size {
            return Err(format!(
                "chunk {index} has {len} bytes but is not the last one"
            ));
        }
        Ok(Self {
            stream_id,
            index,
            chunk_size,
            sha256,
            last,
        })
    }
}
