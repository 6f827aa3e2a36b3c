//! Walking a queue's DLQ (C10, C11) through the raw client, which reads
//! every message RabbitMQ accepted, also one lapin cannot parse: that one is
//! returned as a record with reason `unreadable`, saying why.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ticketrail_core::wire::{self, RecordFallback};
use ticketrail_core::{
    DeadLetter, DeadLetterCursor, DeadLetterEntry, DeadLetterHandle, DeadLetterReason, Envelope,
    Error, ErrorKind, Result,
};
use tokio::sync::Mutex;

use crate::connection::{open_raw, Link};
use crate::headers::{self, Source, DELIVERY_LIMIT, EXPIRED, MAXLEN, REJECTED};
use crate::publish;
use crate::raw::{RawConnection, RawDelivery};
use crate::topology::dlq_name;

/// A cursor over one DLQ: each record is taken unacknowledged and stays in
/// the DLQ (handed back when the cursor's connection closes) unless it is
/// replayed or removed.
pub(crate) struct RabbitCursor {
    link: Arc<Link>,
    queue: Arc<str>,
    dlq: String,
    raw: Arc<Mutex<RawConnection>>,
    /// Records in the DLQ when the cursor was opened, not yet met.
    left: u32,
    /// Records and consumers in the DLQ when the cursor was opened, and
    /// how many records were settled since: what [`close`] waits to see.
    ///
    /// [`close`]: DeadLetterCursor::close
    opened_with: (u32, u32),
    settled: Arc<AtomicU32>,
    /// The channel the DLQ is being delivered on (0 before the first
    /// record), and how many records it has delivered.
    channel: u16,
    taken_on_channel: u16,
}

/// Records delivered unsettled on one channel: the cursor then consumes on
/// a new channel, as it holds every record it has met until it is closed.
/// Set explicitly, as quorum queues cap an unlimited prefetch at 2,000.
const PER_CHANNEL: u16 = 5_000;

/// How long a cursor waits for the next of the records the DLQ held when it
/// was opened before it asks whether any are left: the broker pushes them
/// without pause, so a silence means someone else took them meanwhile, or a
/// busy broker.
const SILENCE: Duration = Duration::from_secs(5);

/// How long closing a cursor waits for RabbitMQ to hold the records it
/// handed back again: quorum queues take them back asynchronously, once the
/// channels they were delivered on are gone.
const HAND_BACK: Duration = Duration::from_secs(10);

impl RabbitCursor {
    pub(crate) async fn open(link: Arc<Link>, queue: &str) -> Result<Self> {
        let dlq = dlq_name(queue);
        let mut raw = open_raw(&link.config).await?;
        // Fails with NotFound at once if the queue was never declared.
        let (left, consumers) = raw.queue_counts(&dlq).await.map_err(|e| {
            Error::new(e.kind(), format!("opening the DLQ of `{queue}`")).with_source(e)
        })?;
        Ok(RabbitCursor {
            link,
            queue: Arc::from(queue),
            dlq,
            raw: Arc::new(Mutex::new(raw)),
            left,
            opened_with: (left, consumers),
            settled: Arc::new(AtomicU32::new(0)),
            channel: 0,
            taken_on_channel: 0,
        })
    }
}

#[async_trait]
impl DeadLetterCursor for RabbitCursor {
    async fn next(&mut self) -> Option<Result<DeadLetterEntry>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let taken = {
            let mut raw = self.raw.lock().await;
            if self.channel == 0 || self.taken_on_channel == PER_CHANNEL {
                if self.channel == raw.channel_max() {
                    return Some(Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "the DLQ `{}` holds more records than one pass can read \
                             ({} channels of {PER_CHANNEL}); replay or purge some first",
                            self.dlq,
                            raw.channel_max()
                        ),
                    )));
                }
                self.channel += 1;
                self.taken_on_channel = 0;
                if let Err(e) = raw.consume(self.channel, &self.dlq, PER_CHANNEL).await {
                    return Some(Err(Error::new(
                        e.kind(),
                        format!("reading the DLQ `{}`", self.dlq),
                    )
                    .with_source(e)));
                }
            }
            self.taken_on_channel += 1;
            let mut silences = 0;
            loop {
                match raw.next_delivery_within(SILENCE).await {
                    Ok(Some(delivery)) => break Ok(delivery),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                // Nothing for a while: are records left to deliver, or did
                // someone else take them meanwhile?
                let ready = match raw.queue_counts(&self.dlq).await {
                    Ok((ready, _)) => ready,
                    Err(e) => break Err(e),
                };
                if raw.has_pending() {
                    continue;
                }
                if ready == 0 {
                    self.left = 0;
                    return None;
                }
                silences += 1;
                if silences == 3 {
                    break Err(Error::new(
                        ErrorKind::Broker,
                        format!("RabbitMQ stopped delivering records ({ready} ready)"),
                    ));
                }
            }
        };
        let delivery = match taken {
            Ok(delivery) => delivery,
            Err(e) => {
                return Some(Err(Error::new(
                    e.kind(),
                    format!("reading the DLQ `{}`", self.dlq),
                )
                .with_source(e)))
            }
        };
        let (channel, tag) = (delivery.channel, delivery.delivery_tag);
        let record = record(delivery, &self.queue);
        let handle = RabbitDeadLetter {
            link: Arc::clone(&self.link),
            queue: Arc::clone(&self.queue),
            raw: Arc::clone(&self.raw),
            settled: Arc::clone(&self.settled),
            channel,
            tag,
        };
        Some(Ok(DeadLetterEntry::new(
            crate::BACKEND,
            record,
            Box::new(handle),
        )))
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let mut raw = self.raw.lock().await;
        if self.channel > 0 {
            for channel in 1..=self.channel {
                raw.close_channel(channel).await.map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("handing records back to the DLQ `{}`", self.dlq),
                    )
                    .with_source(e)
                })?;
            }
            // The channels are gone; the DLQ has the records back once its
            // consumers are gone too and it holds what it held, less what
            // was settled.
            let (records, consumers) = self.opened_with;
            let expected = records.saturating_sub(self.settled.load(Ordering::Relaxed));
            let deadline = tokio::time::Instant::now() + HAND_BACK;
            loop {
                let (ready, now_consuming) = raw.queue_counts(&self.dlq).await?;
                if ready >= expected && now_consuming <= consumers {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        dlq = %self.dlq,
                        ready,
                        expected,
                        "RabbitMQ has not yet taken back every record this cursor held; \
                         they return to the DLQ when it does"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        raw.shutdown().await;
        Ok(())
    }
}

/// Reads a message of the DLQ of `queue` as its record.
fn record(delivery: RawDelivery, queue: &str) -> DeadLetter {
    let mut problems = delivery.properties.unreadable();
    for (what, text) in [
        ("routing key", &delivery.routing_key),
        ("exchange", &delivery.exchange),
    ] {
        if text.as_str().is_none() {
            problems.push(format!("its {what} is not UTF-8"));
        }
    }
    let props = delivery.properties.to_lapin();
    let death = headers::death(&props);
    let has_record = props
        .headers()
        .as_ref()
        .is_some_and(|t| t.inner().contains_key(wire::REASON));
    // A message RabbitMQ dead-lettered itself went to the DLQ under the
    // DLQ's name; its own routing key is in `x-death`.
    let routing_key = match &death {
        Some(d) if !has_record => d.routing_key.clone(),
        _ => None,
    }
    .unwrap_or_else(|| delivery.routing_key.lossy());
    let decoded = headers::incoming(
        &props,
        &routing_key,
        Bytes::from(delivery.body),
        Source::DeadLetters,
    )
    .decode();
    let mut fallback = fallback(queue, death.as_ref().and_then(|d| d.reason.as_deref()));
    fallback.failed_at = death.as_ref().and_then(|d| d.time);
    let mut record = DeadLetter::from_wire(decoded, fallback);
    if !problems.is_empty() {
        record.notes.push(format!(
            "before it was found unreadable: reason {}, last error: {}",
            record.reason,
            wire::quote(&record.last_error)
        ));
        record.reason = DeadLetterReason::Unreadable;
        record.last_error = format!(
            "the AMQP client cannot read this message: {}; a replay sends it with those \
             bytes replaced by U+FFFD",
            problems.join("; ")
        );
    }
    record
}

/// What a record RabbitMQ dead-lettered itself says, by its `x-death` reason.
fn fallback(queue: &str, reason: Option<&str>) -> RecordFallback {
    match reason {
        Some(DELIVERY_LIMIT) | None => {
            RecordFallback::delivery_limit(queue, reason.unwrap_or("no reason given"))
        }
        Some(EXPIRED) => RecordFallback::broker(
            queue,
            "its message TTL ran out in the work queue (an `expiration` its publisher set, or \
             a `message-ttl` policy on the queue)",
        ),
        Some(MAXLEN) => RecordFallback::broker(
            queue,
            "the work queue was over a length limit (a `max-length` policy on the queue)",
        ),
        Some(REJECTED) => RecordFallback::broker(
            queue,
            "a client other than ticketrail rejected it without requeueing",
        ),
        Some(other) => RecordFallback::broker(queue, &format!("RabbitMQ says `{other}`")),
    }
}

/// One record of the DLQ, taken and not yet acknowledged.
struct RabbitDeadLetter {
    link: Arc<Link>,
    queue: Arc<str>,
    raw: Arc<Mutex<RawConnection>>,
    settled: Arc<AtomicU32>,
    /// Where it was delivered: tags count per channel.
    channel: u16,
    tag: u64,
}

#[async_trait]
impl DeadLetterHandle for RabbitDeadLetter {
    async fn replay(self: Box<Self>, envelope: Envelope) -> Result<()> {
        // Back to the work queue, same id, attempt 1; the record leaves the
        // DLQ only once the republish is confirmed.
        let bookkeeping = wire::copy_headers(&envelope);
        publish::publish_copy(&self.link, &self.queue, &envelope, bookkeeping).await?;
        self.raw
            .lock()
            .await
            .ack(self.channel, self.tag)
            .await
            .map(|()| {
                self.settled.fetch_add(1, Ordering::Relaxed);
            })
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!(
                        "message {} was replayed, but removing it from the DLQ of `{}` failed; it \
                     may be replayed twice",
                        envelope.id, self.queue
                    ),
                )
                .with_source(e)
            })
    }

    async fn remove(self: Box<Self>) -> Result<()> {
        self.raw.lock().await.ack(self.channel, self.tag).await?;
        self.settled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
