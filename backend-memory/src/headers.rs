//! Messages as a plain client of the in-process broker publishes them: any
//! headers, read the way every backend reads a delivery (core's wire
//! format), so forged bookkeeping is bounded here too.

use std::time::SystemTime;

use bytes::Bytes;
use ticketrail_core::wire::{Attempt, Decoded, Incoming};
use ticketrail_core::Headers;

/// A message as a plain client publishes it: a routing key, a payload, any
/// headers (ticketrail's own names included, as a careless or hostile
/// publisher might write them), and optionally a content type and a message
/// id of the broker's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    /// The routing key.
    pub routing_key: String,
    /// The payload.
    pub payload: Bytes,
    /// Any headers.
    pub headers: Headers,
    /// The content type, if set.
    pub content_type: Option<String>,
    /// The broker's message id, if set (C17).
    pub message_id: Option<String>,
}

impl RawMessage {
    /// A raw message with no headers, content type or id.
    pub fn new(routing_key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        RawMessage {
            routing_key: routing_key.into(),
            payload: payload.into(),
            ..RawMessage::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// Reads a raw message as it would be delivered: it came straight from a
/// publisher, so it is attempt 1 whatever its headers say.
pub(crate) fn decode(raw: RawMessage, now: SystemTime) -> Decoded {
    let mut incoming = Incoming::new(raw.routing_key, raw.payload);
    incoming.headers = raw.headers;
    incoming.content_type = raw.content_type;
    incoming.broker_id = raw.message_id;
    incoming.stored_at = Some(now);
    incoming.attempt = Attempt::Fresh;
    incoming.decode_at(now)
}
