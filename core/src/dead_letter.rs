//! Dead-letter records (C10), walking a DLQ one record at a time, and the
//! replay selection (C11).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::trace::PublishSpan;

/// The longest last-error text kept in a dead-letter record, in bytes.
pub const MAX_ERROR_LEN: usize = 4096;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The retry policy gave up after its maximum number of attempts (C8).
    Exhausted,
    /// The handler returned a permanent error (C9).
    Permanent,
    /// The payload could not be decoded (C9).
    Undecodable,
    /// The broker's delivery limit was reached: the message kept killing its
    /// consumer before it could be settled (C13).
    DeliveryLimit,
    /// The broker client could not read the message at all (malformed
    /// headers or properties that a plain or raw client wrote); the record
    /// says what was wrong with it.
    Unreadable,
    /// The broker dead-lettered it for a reason of its own, before any
    /// handler saw it: a message TTL its publisher or a policy set, a queue
    /// length limit, a reject by a client other than ticketrail. The last
    /// error says which.
    Broker,
}

impl DeadLetterReason {
    /// Every reason, in wire-form order.
    pub const ALL: [DeadLetterReason; 6] = [
        DeadLetterReason::Exhausted,
        DeadLetterReason::Permanent,
        DeadLetterReason::Undecodable,
        DeadLetterReason::DeliveryLimit,
        DeadLetterReason::Unreadable,
        DeadLetterReason::Broker,
    ];

    /// The wire form: `exhausted`, `permanent`, `undecodable`,
    /// `delivery-limit`, `unreadable`, `broker`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::DeliveryLimit => "delivery-limit",
            DeadLetterReason::Unreadable => "unreadable",
            DeadLetterReason::Broker => "broker",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadLetterReason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        DeadLetterReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown dead-letter reason `{s}` (one of exhausted, permanent, \
                     undecodable, delivery-limit, unreadable, broker)"
                ))
            })
    }
}

/// A message in a dead-letter queue, with why it is there (C10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original message: payload, headers, id and routing key unchanged.
    /// `attempt` is the attempt that failed last.
    pub envelope: Envelope,
    /// The work queue the message came from, and where replay sends it.
    pub queue: String,
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The last error, at most [`MAX_ERROR_LEN`] bytes.
    pub last_error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: SystemTime,
    /// When the last attempt failed.
    pub last_failed_at: SystemTime,
    /// What was odd about the message: values its publisher set that were
    /// set aside or bounded when it was read. Empty for a well-formed one.
    pub notes: Vec<String>,
}

impl DeadLetter {
    /// The envelope a replay publishes: the same message, attempt 1 (C11).
    pub fn replay_envelope(&self) -> Envelope {
        let mut envelope = self.envelope.clone();
        envelope.attempt = 1;
        envelope
    }
}

/// Which dead letters to replay (C11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every message in the dead-letter queue.
    All,
    /// The message with this id.
    Id(String),
}

impl Replay {
    /// Whether this selection takes the message with `id`.
    pub fn selects(&self, id: &str) -> bool {
        match self {
            Replay::All => true,
            Replay::Id(wanted) => wanted == id,
        }
    }
}

/// Cuts `text` to at most [`MAX_ERROR_LEN`] bytes on a character boundary,
/// marking the cut with `…`.
pub fn truncate_error_text(text: &str) -> String {
    truncate_text(text, MAX_ERROR_LEN)
}

/// Cuts `text` to at most `max` bytes (at least 4) on a character boundary,
/// marking the cut with `…`.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One record of a DLQ met by a [`DeadLetterCursor`], and what can be done
/// with it: replayed, removed, or kept (dropped).
pub struct DeadLetterEntry {
    backend: &'static str,
    record: DeadLetter,
    handle: Box<dyn DeadLetterHandle>,
}

impl fmt::Debug for DeadLetterEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterEntry")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl DeadLetterEntry {
    /// For backends: a record of the DLQ of `backend` (its
    /// [`Broker::backend`](crate::Broker::backend) name) and how to act on it.
    pub fn new(
        backend: &'static str,
        record: DeadLetter,
        handle: Box<dyn DeadLetterHandle>,
    ) -> Self {
        DeadLetterEntry {
            backend,
            record,
            handle,
        }
    }

    /// The record (C10).
    pub fn record(&self) -> &DeadLetter {
        &self.record
    }

    /// Takes the record out of the entry, keeping the message in the DLQ.
    pub fn into_record(self) -> DeadLetter {
        self.record
    }

    /// Publishes the message back to its work queue with the same id and
    /// attempt 1; the record leaves the DLQ only once the broker has
    /// confirmed the republish (C11). On an error the record stays.
    ///
    /// The republish is traced in a new `publish` span linked to the trace
    /// the message was in (C18), and counted in
    /// [`REPLAYS`](crate::metrics::REPLAYS).
    pub async fn replay(self) -> Result<()> {
        let mut envelope = self.record.replay_envelope();
        let span = PublishSpan::replay(self.backend, &self.record.queue, &mut envelope);
        let replayed = self.handle.replay(envelope).await;
        if replayed.is_ok() {
            crate::metrics::replayed(self.backend, &self.record.queue);
        }
        span.end(replayed.as_ref().err());
        replayed
    }

    /// [`replay`](Self::replay), but as a new message: a fresh id, and the
    /// old one in the `replayed-from` header. For a message whose effects
    /// an inbox already holds (it succeeded, then ended in the DLQ all the
    /// same) and that the operator wants run again: replayed with its own
    /// id, an inbox would skip it as a duplicate. Returns the new id.
    pub async fn replay_with_new_id(mut self) -> Result<String> {
        let old = std::mem::replace(&mut self.record.envelope.id, crate::id::new_message_id());
        self.record
            .envelope
            .headers
            .insert(REPLAYED_FROM.to_owned(), old);
        let id = self.record.envelope.id.clone();
        self.replay().await?;
        Ok(id)
    }

    /// Removes the record from the DLQ for good.
    pub async fn remove(self) -> Result<()> {
        self.handle.remove().await
    }
}

/// The application header a replay with a new id
/// ([`DeadLetterEntry::replay_with_new_id`]) names the original id in.
pub const REPLAYED_FROM: &str = "replayed-from";

/// The backend half of a [`DeadLetterEntry`]. Dropped without a call, the
/// record stays in the DLQ.
#[async_trait]
pub trait DeadLetterHandle: Send {
    /// Publishes `envelope` to the work queue this DLQ belongs to (only that
    /// queue, whatever the bindings), waits for the broker's confirm, then
    /// removes the record from the DLQ.
    async fn replay(self: Box<Self>, envelope: Envelope) -> Result<()>;

    /// Removes the record from the DLQ.
    async fn remove(self: Box<Self>) -> Result<()>;
}

/// Walks the records of one DLQ from the oldest, one at a time, holding
/// none of them in memory beyond the one in hand, so a DLQ of any size can
/// be listed, exported or replayed in part. Records met and kept stay in
/// the DLQ, in their order, once the cursor is dropped.
///
/// A cursor walks the records that were in the DLQ when it was opened: a
/// record that arrives later (a replayed message that failed again) is not
/// met, so replaying everything ends even while a consumer keeps failing.
#[async_trait]
pub trait DeadLetterCursor: Send {
    /// The next record, `None` at the end of the DLQ. An error names what
    /// blocks the walk (a record the client cannot read is returned as a
    /// record with reason [`DeadLetterReason::Unreadable`], not an error).
    async fn next(&mut self) -> Option<Result<DeadLetterEntry>>;

    /// Hands back every record met and neither replayed nor removed, and
    /// returns once the broker holds them in the DLQ again, so that what
    /// follows (a replay after a count, a listing after an interrupted
    /// replay) meets them all. A dropped cursor hands them back as well,
    /// but in the broker's own time.
    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_wire_form() {
        for reason in DeadLetterReason::ALL {
            assert_eq!(reason.as_str().parse::<DeadLetterReason>().unwrap(), reason);
        }
        assert!("nope".parse::<DeadLetterReason>().is_err());
    }

    #[test]
    fn error_text_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let bounded = truncate_error_text(&long);
        assert!(bounded.len() <= MAX_ERROR_LEN);
        assert!(bounded.ends_with('…'));
        assert_eq!(truncate_error_text("short"), "short");
        assert_eq!(truncate_text("abcdef", 5).len(), 5);
    }
}
