//! Payload compression, chosen by content encoding, with a bound on the
//! decompressed size.

use std::io::Read;

use crate::error::ProtectError;

/// A payload compression, named by the
/// [`CONTENT_ENCODING`](crate::headers::CONTENT_ENCODING) header.
///
/// ```
/// use busway_protect::ContentEncoding;
/// let text = "hello ".repeat(100);
/// let packed = ContentEncoding::Zstd.compress(text.as_bytes(), 3)?;
/// assert!(packed.len() < text.len());
/// assert_eq!(ContentEncoding::Zstd.decompress(&packed, 1 << 20)?, text.as_bytes());
/// // A bound below the real size rejects the payload instead of allocating it.
/// assert!(ContentEncoding::Zstd.decompress(&packed, 10).is_err());
/// # Ok::<(), busway_protect::ProtectError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ContentEncoding {
    /// Zstandard frames (`zstd`): a good ratio at a moderate cost.
    Zstd,
    /// LZ4 block with its decompressed size as a 4-byte little-endian
    /// prefix (`lz4`): very fast, a lower ratio.
    Lz4,
}

/// The largest zstd window a payload may ask for (8 MiB), so a frame cannot
/// make the decoder allocate more than that for its window.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

impl ContentEncoding {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
        }
    }

    /// The encoding named `name` (exact match).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "zstd" => Some(Self::Zstd),
            "lz4" => Some(Self::Lz4),
            _ => None,
        }
    }

    /// Compresses `data`; `level` applies to zstd (1–22, 3 is its default).
    pub fn compress(self, data: &[u8], level: i32) -> Result<Vec<u8>, ProtectError> {
        match self {
            Self::Zstd => {
                zstd::bulk::compress(data, level).map_err(|e| ProtectError::CorruptCompression {
                    encoding: "zstd",
                    problem: e.to_string(),
                })
            }
            Self::Lz4 => {
                if u32::try_from(data.len()).is_err() {
                    return Err(ProtectError::TooLarge {
                        size: data.len(),
                        max: u32::MAX as usize,
                    });
                }
                Ok(lz4_flex::block::compress_prepend_size(data))
            }
        }
    }

    /// Decompresses `data`, failing with
    /// [`ProtectError::DecompressedTooLarge`] as soon as the output would
    /// pass `max` bytes: never allocates more than `max` for the output.
    pub fn decompress(self, data: &[u8], max: usize) -> Result<Vec<u8>, ProtectError> {
        match self {
            Self::Zstd => decompress_zstd(data, max),
            Self::Lz4 => decompress_lz4(data, max),
        }
    }
}

impl std::fmt::Display for ContentEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn corrupt(encoding: &'static str, problem: impl ToString) -> ProtectError {
    ProtectError::CorruptCompression {
        encoding,
        problem: problem.to_string(),
    }
}

fn decompress_zstd(data: &[u8], max: usize) -> Result<Vec<u8>, ProtectError> {
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(data).map_err(|e| corrupt("zstd", e))?;
    decoder
        .window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|e| corrupt("zstd", e))?;
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(max));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    decoder
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| corrupt("zstd", e))?;
    if out.len() > max {
        return Err(ProtectError::DecompressedTooLarge { max });
    }
    Ok(out)
}

fn decompress_lz4(data: &[u8], max: usize) -> Result<Vec<u8>, ProtectError> {
    let Some((prefix, block)) = data.split_first_chunk::<4>() else {
        return Err(corrupt("lz4", "shorter than its size prefix"));
    };
    let size = usize::try_from(u32::from_le_bytes(*prefix)).unwrap_or(usize::MAX);
    if size > max {
        return Err(ProtectError::DecompressedTooLarge { max });
    }
    let out = lz4_flex::block::decompress(block, size).map_err(|e| corrupt("lz4", e))?;
    if out.len() != size {
        return Err(corrupt("lz4", "the size prefix does not match the data"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn both_round_trip() {
        let data = b"abcabcabcabcabcabcabcabc".repeat(50);
        for encoding in [ContentEncoding::Zstd, ContentEncoding::Lz4] {
            let packed = encoding.compress(&data, 3).unwrap();
            assert_eq!(encoding.decompress(&packed, data.len()).unwrap(), data);
            assert_eq!(
                encoding.decompress(&packed, data.len() - 1),
                Err(ProtectError::DecompressedTooLarge {
                    max: data.len() - 1
                })
            );
        }
    }

    #[test]
    fn lz4_lying_size_prefix_is_rejected() {
        let data = vec![0u8; 4096];
        let mut packed = ContentEncoding::Lz4.compress(&data, 0).unwrap();
        packed[..4].copy_from_slice(&16u32.to_le_bytes());
        assert!(ContentEncoding::Lz4.decompress(&packed, 1 << 20).is_err());
        packed[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            ContentEncoding::Lz4.decompress(&packed, 1 << 20),
            Err(ProtectError::DecompressedTooLarge { max: 1 << 20 })
        );
    }
}
