//! Codecs: how typed messages become payload bytes and back.

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};

/// Turns typed messages into payload bytes and back.
pub trait Codec: Clone + Send + Sync + 'static {
    /// The content type this codec writes, e.g. `application/json`.
    fn content_type(&self) -> &'static str;

    /// Encodes a message.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>>;

    /// Decodes a payload; the error text goes into the DLQ record of an
    /// undecodable message (C9).
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, String>;
}

/// The largest encoding buffer a thread keeps between messages.
const SCRATCH_KEPT: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// JSON via serde_json: the default codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

impl Codec for Json {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    /// Encodes into a buffer kept per thread and returns an exact-size
    /// copy: one allocation per message instead of the doublings of a
    /// growing `Vec`, and a payload that becomes `Bytes` without another.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let encoded = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                let written = serde_json::to_writer(&mut *buffer, value).map(|()| buffer.to_vec());
                if buffer.capacity() > SCRATCH_KEPT {
                    *buffer = Vec::new();
                }
                written
            }
            // A `Serialize` impl that encodes another message in turn.
            Err(_) => serde_json::to_vec(value),
        });
        encoded.map_err(|e| {
            Error::new(ErrorKind::Encode, "message cannot be encoded as JSON").with_source(e)
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "payload is not valid JSON for {}: {e}",
                std::any::type_name::<T>()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_a_decode_error_that_says_why() {
        let bytes = Json.encode(&vec![1u32, 2]).unwrap();
        assert_eq!(Json.decode::<Vec<u32>>(&bytes).unwrap(), vec![1, 2]);
        assert_eq!(
            bytes.len(),
            bytes.capacity(),
            "exact size: no copy into Bytes"
        );
        let err = Json.decode::<Vec<u32>>(b"not json").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        assert!(err.contains("Vec<u32>"), "{err}");
    }
}
