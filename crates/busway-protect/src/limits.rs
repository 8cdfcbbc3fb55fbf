//! Size and count limits, enforced on publish and on receive.

use busway_core::{Message, DEFAULT_MAX_PAYLOAD_BYTES};

use crate::error::ProtectError;

/// Limits on what a message may carry.
///
/// On publish a message beyond them is refused with an error; on receive it
/// is dead-lettered with the reason. The defaults suit most services:
///
/// ```
/// use busway_protect::Limits;
/// let limits = Limits::default().with_max_message_bytes(64 * 1024).with_max_headers(16);
/// assert_eq!(limits.max_message_bytes, 64 * 1024);
/// assert_eq!(limits.max_decompressed_bytes, 16 * 1024 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest payload on the wire (after compression and encryption).
    /// Default: the transports' default, 4 MiB.
    pub max_message_bytes: usize,
    /// Largest payload once decompressed, and largest plain payload accepted
    /// for publishing. Default 16 MiB.
    pub max_decompressed_bytes: usize,
    /// Most headers a message may have. Default 64.
    pub max_headers: usize,
    /// Largest total size of the headers' names and values. Default 16 KiB.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_decompressed_bytes: 16 * 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// Sets [`max_message_bytes`](Self::max_message_bytes).
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }
    /// Sets [`max_decompressed_bytes`](Self::max_decompressed_bytes).
    pub fn with_max_decompressed_bytes(mut self, max: usize) -> Self {
        self.max_decompressed_bytes = max;
        self
    }
    /// Sets [`max_headers`](Self::max_headers).
    pub fn with_max_headers(mut self, max: usize) -> Self {
        self.max_headers = max;
        self
    }
    /// Sets [`max_header_bytes`](Self::max_header_bytes).
    pub fn with_max_header_bytes(mut self, max: usize) -> Self {
        self.max_header_bytes = max;
        self
    }

    /// Checks the header count and size and the payload against `max_payload`.
    ///
    /// ```
    /// use busway_core::Message;
    /// use busway_protect::{Limits, ProtectError};
    /// let limits = Limits::default().with_max_headers(1);
    /// let message = Message::new("ping", "hi").with_header("a", "1").with_header("b", "2");
    /// assert_eq!(limits.check(&message, 1024), Err(ProtectError::TooManyHeaders { count: 2, max: 1 }));
    /// ```
    pub fn check(&self, message: &Message, max_payload: usize) -> Result<(), ProtectError> {
        let size = message.payload.len();
        if size > max_payload {
            return Err(ProtectError::TooLarge {
                size,
                max: max_payload,
            });
        }
        let count = message.headers.len();
        if count > self.max_headers {
            return Err(ProtectError::TooManyHeaders {
                count,
                max: self.max_headers,
            });
        }
        let size = message
            .headers
            .iter()
            .map(|(k, v)| k.len().saturating_add(v.len()))
            .fold(0usize, usize::saturating_add);
        if size > self.max_header_bytes {
            return Err(ProtectError::HeadersTooLarge {
                size,
                max: self.max_header_bytes,
            });
        }
        Ok(())
    }
}
