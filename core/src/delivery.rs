//! One received message and its settlement.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::dead_letter::{truncate_error_text, DeadLetter, DeadLetterReason};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::wire::Decoded;

/// How a delivery is redelivered after a delay (C7): the next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRequest {
    /// How long the broker must wait before delivering again.
    pub after: Duration,
    /// The attempt number of the redelivery (the current attempt + 1).
    pub next_attempt: u32,
    /// When the first attempt failed, carried forward for the DLQ record.
    pub first_failed_at: SystemTime,
    /// The error of the attempt that just failed, bounded.
    pub last_error: String,
}

/// The backend half of a delivery: how it is settled on its broker.
///
/// A backend implements this once per delivery. Dropping it unsettled must
/// release the message for redelivery (C4, C14).
#[async_trait]
pub trait Settle: Send + Sync {
    /// Acknowledges: the message is done and never delivered again (C3).
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Acknowledges at once, where nothing need be awaited for it (an
    /// in-process broker): `None` (the default) leaves it to
    /// [`ack`](Settle::ack). After `Some`, the settlement is done and is
    /// dropped, so its `Drop` must not release the message then. Spares a
    /// consumer a boxed future per message.
    fn try_ack(&mut self) -> Option<Result<()>> {
        None
    }

    /// Releases the message for immediate redelivery.
    async fn nack(self: Box<Self>) -> Result<()>;

    /// Schedules the message again after a delay, in the broker (C7, C12).
    /// `envelope` is the message as delivered, for brokers that retry by
    /// publishing a copy.
    async fn retry(self: Box<Self>, envelope: &Envelope, request: RetryRequest) -> Result<()>;

    /// Moves the message to its queue's DLQ with this record (C10).
    async fn dead_letter(self: Box<Self>, record: DeadLetter) -> Result<()>;
}

/// A received message plus its settlement: [`ack`](Delivery::ack),
/// [`nack`](Delivery::nack), [`retry`](Delivery::retry) or
/// [`dead_letter`](Delivery::dead_letter), once. Settling twice is an
/// [`ErrorKind::AlreadySettled`] error, never a double ack. Dropping a
/// delivery unsettled releases it for redelivery.
pub struct Delivery {
    envelope: Arc<Envelope>,
    queue: Arc<str>,
    first_failed_at: Option<SystemTime>,
    attempt_counted: bool,
    notes: Vec<String>,
    settle: Option<Box<dyn Settle>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("id", &self.envelope.id)
            .field("attempt", &self.envelope.attempt)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl Delivery {
    /// For backends: a delivery of `envelope` from `queue`, settled through
    /// `settle`; its attempt was not counted by the broker and nothing
    /// earlier is known about it (set that with the builder methods).
    pub fn new(
        queue: Arc<str>,
        envelope: impl Into<Arc<Envelope>>,
        settle: Box<dyn Settle>,
    ) -> Self {
        Delivery {
            envelope: envelope.into(),
            queue,
            first_failed_at: None,
            attempt_counted: false,
            notes: Vec::new(),
            settle: Some(settle),
        }
    }

    /// For backends: a delivery of a message read with
    /// [`Incoming::decode`](crate::wire::Incoming::decode).
    pub fn decoded(queue: Arc<str>, decoded: Decoded, settle: Box<dyn Settle>) -> Self {
        Delivery {
            envelope: Arc::new(decoded.envelope),
            queue,
            first_failed_at: decoded.first_failed_at,
            attempt_counted: decoded.attempt_counted,
            notes: decoded.notes,
            settle: Some(settle),
        }
    }

    /// Sets when an earlier attempt of this message first failed.
    pub fn with_first_failed_at(mut self, at: Option<SystemTime>) -> Self {
        self.first_failed_at = at;
        self
    }

    /// Adds notes on what was odd about the message; they go into its
    /// dead-letter record if it gets one.
    pub fn with_notes(mut self, notes: Vec<String>) -> Self {
        self.notes.extend(notes);
        self
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The message, shared (cheap to clone).
    pub fn shared_envelope(&self) -> Arc<Envelope> {
        Arc::clone(&self.envelope)
    }

    /// The work queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// When an earlier attempt of this message first failed.
    pub fn first_failed_at(&self) -> Option<SystemTime> {
        self.first_failed_at
    }

    /// Whether the attempt number was counted by the broker itself (so a
    /// message delivered more often than its policy allows is one that
    /// crashed its consumer, C13), rather than carried in the message.
    pub fn attempt_counted(&self) -> bool {
        self.attempt_counted
    }

    /// What was odd about the message when it was read (values set aside or
    /// bounded); empty for a well-formed message.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether it has been settled.
    pub fn is_settled(&self) -> bool {
        self.settle.is_none()
    }

    fn take(&mut self) -> Result<Box<dyn Settle>> {
        self.settle.take().ok_or_else(|| {
            Error::new(
                ErrorKind::AlreadySettled,
                format!(
                    "message {} from `{}` was already settled",
                    self.envelope.id, self.queue
                ),
            )
        })
    }

    /// Acknowledges: the message is done (C3).
    pub async fn ack(&mut self) -> Result<()> {
        let mut settle = self.take()?;
        match settle.try_ack() {
            Some(acked) => acked,
            None => settle.ack().await,
        }
    }

    /// Releases the message for immediate redelivery, same attempt.
    pub async fn nack(&mut self) -> Result<()> {
        self.take()?.nack().await
    }

    /// Redelivers the message after `after` with attempt + 1; the wait lives
    /// in the broker (C7, C12). `error` is why this attempt failed.
    pub async fn retry(&mut self, after: Duration, error: &str) -> Result<()> {
        let settle = self.take()?;
        let request = RetryRequest {
            after,
            next_attempt: self.envelope.attempt.saturating_add(1),
            first_failed_at: self.first_failed_at.unwrap_or_else(SystemTime::now),
            last_error: truncate_error_text(error),
        };
        settle.retry(&self.envelope, request).await
    }

    /// The record this delivery would go to the DLQ with (C10).
    pub fn record(&self, reason: DeadLetterReason, error: &str) -> DeadLetter {
        let now = SystemTime::now();
        DeadLetter {
            envelope: Envelope::clone(&self.envelope),
            queue: self.queue.to_string(),
            reason,
            last_error: truncate_error_text(error),
            attempts: self.envelope.attempt,
            first_failed_at: self.first_failed_at.unwrap_or(now).min(now),
            last_failed_at: now,
            notes: self.notes.clone(),
        }
    }

    /// Moves the message to the DLQ with `reason` and the last `error` (C10).
    pub async fn dead_letter(&mut self, reason: DeadLetterReason, error: &str) -> Result<()> {
        let record = self.record(reason, error);
        self.take()?.dead_letter(record).await
    }
}
