//! The envelope: one message as the framework sees it, and the outgoing [`Message`].

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;

/// Header map of an envelope: string keys to string values, in a stable order.
pub type Headers = BTreeMap<String, String>;

/// A message as delivered to a consumer.
///
/// The id is kept across retries and replay; `attempt` is 1 on first delivery
/// and grows by one with every delayed retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Message id: a UUID for messages published by ticketrail, or the
    /// broker's message id for foreign messages (C17).
    pub id: String,
    /// The routing key the message was published with.
    pub routing_key: String,
    /// The payload bytes, unchanged.
    pub payload: Bytes,
    /// The payload's content type, if the publisher set one.
    pub content_type: Option<String>,
    /// Application headers. Framework bookkeeping is never mixed in here.
    pub headers: Headers,
    /// When the message was first published (for foreign messages without a
    /// timestamp: when it was first received).
    pub published_at: SystemTime,
    /// 1 on first delivery; grows with each delayed retry; reset by replay.
    pub attempt: u32,
}

/// A message to publish: routing key, payload and optional metadata.
///
/// ```
/// use ticketrail_core::Message;
///
/// let msg = Message::new("user.welcome", br#"{"to":"ada@example.com"}"#.to_vec())
///     .content_type("application/json")
///     .header("tenant", "acme");
/// assert_eq!(msg.routing_key, "user.welcome");
/// assert_eq!(msg.id.len(), 36); // a fresh UUID
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id; a fresh UUID v4 unless set with [`Message::id`].
    pub id: String,
    /// Routing key within the topic space, e.g. `user.welcome`.
    pub routing_key: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Content type of the payload.
    pub content_type: Option<String>,
    /// Application headers.
    pub headers: Headers,
}

impl Message {
    /// A message with a fresh id, no content type and no headers.
    pub fn new(routing_key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: crate::id::new_message_id(),
            routing_key: routing_key.into(),
            payload: payload.into(),
            content_type: None,
            headers: Headers::new(),
        }
    }

    /// Sets the id (e.g. an idempotency key chosen by the application).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds one header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Checks what every broker checks before publishing: the topic space
    /// and routing key are valid (C16), the id is 1 to 255 bytes without
    /// control characters, and the payload is at most `limit` bytes, the
    /// limit of `broker` (named in the error).
    pub fn check(&self, topic_space: &str, limit: usize, broker: &str) -> crate::Result<()> {
        crate::topology::validate_name("topic space", topic_space)?;
        self.check_contents(limit, broker)
    }

    /// [`Message::check`] but for the topic space: for a broker that finds
    /// the space among those declared (each checked when it was declared)
    /// and checks its name only when it is not there.
    pub fn check_contents(&self, limit: usize, broker: &str) -> crate::Result<()> {
        crate::topology::validate_routing_key(&self.routing_key)?;
        crate::wire::validate_id(&self.id)?;
        if self.payload.len() > limit {
            return Err(crate::Error::new(
                crate::ErrorKind::PayloadTooLarge,
                format!(
                    "payload of {} bytes is over {broker}'s limit of {limit} bytes",
                    self.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// The envelope this message becomes on its first delivery.
    pub fn into_envelope(self, published_at: SystemTime) -> Envelope {
        Envelope {
            id: self.id,
            routing_key: self.routing_key,
            payload: self.payload,
            content_type: self.content_type,
            headers: self.headers,
            published_at,
            attempt: 1,
        }
    }
}

impl Envelope {
    /// The message to publish again when replaying this envelope: same id,
    /// payload, headers and routing key.
    pub fn to_message(&self) -> Message {
        Message {
            id: self.id.clone(),
            routing_key: self.routing_key.clone(),
            payload: self.payload.clone(),
            content_type: self.content_type.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch, the wire form of times in headers.
pub fn to_unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The inverse of [`to_unix_millis`].
pub fn from_unix_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}
