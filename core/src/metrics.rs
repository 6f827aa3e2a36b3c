//! The metrics ticketrail records, through the `metrics` facade: install any
//! exporter (Prometheus, OpenTelemetry, StatsD) and they appear. Names and
//! labels follow OpenTelemetry's messaging conventions where they have one;
//! labels are queue and topic-space names, the backend, and small fixed
//! sets (reasons, error kinds), never message ids or other unbounded values.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `messaging.client.sent.messages` | counter | `messaging.system`, `messaging.destination.name` (topic space), `error.type` (on failure) |
//! | `messaging.client.consumed.messages` | counter | `messaging.system`, `messaging.destination.name` (queue) |
//! | `messaging.process.duration` | histogram, seconds | `messaging.system`, `messaging.destination.name`, `error.type` (on failure) |
//! | `ticketrail.handled` | counter | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.retries` | counter | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.dead_letters` | counter | `messaging.system`, `messaging.destination.name`, `ticketrail.reason` |
//! | `ticketrail.replays` | counter | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.reconnects` | counter | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.deliveries.in_flight` | gauge | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.consumer.paused` | gauge (1 paused, 0 consuming) | `messaging.system`, `messaging.destination.name` |
//!
//! Prometheus exporters write the dots as underscores; with the
//! Prometheus exporter's recommended naming on, counters end in `_total`
//! and the duration in `_seconds` (`messaging_client_sent_messages_total`,
//! `messaging_process_duration_seconds`).
//!
//! Each metric is described (help text and unit) to the recorder installed
//! when ticketrail first records one; call [`describe`] after installing a
//! recorder later than that.

use std::sync::Once;

use metrics::{Counter, Gauge, Histogram, Unit};

/// Messages a publisher handed to the broker and the broker confirmed (or,
/// with `error.type`, refused).
pub const SENT: &str = "messaging.client.sent.messages";
/// Deliveries a consumer took from the broker.
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// How long each attempt took, decoding and handling, in seconds.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Deliveries handled and acked.
pub const HANDLED: &str = "ticketrail.handled";
/// Deliveries scheduled for a retry.
pub const RETRIES: &str = "ticketrail.retries";
/// Deliveries moved to the DLQ, by reason.
pub const DEAD_LETTERS: &str = "ticketrail.dead_letters";
/// Dead letters replayed to their queue.
pub const REPLAYS: &str = "ticketrail.replays";
/// Times a consumer's subscription was interrupted and resumed or reopened.
pub const RECONNECTS: &str = "ticketrail.reconnects";
/// Handlers running now.
pub const IN_FLIGHT: &str = "ticketrail.deliveries.in_flight";
/// 1 while a consumer's circuit breaker holds consumption, else 0.
pub const PAUSED: &str = "ticketrail.consumer.paused";

/// The broker (`rabbitmq`, `nats`, `memory`).
pub const SYSTEM: &str = "messaging.system";
/// The queue or topic space.
pub const DESTINATION: &str = "messaging.destination.name";
/// The kind of failure: an [`ErrorKind`](crate::ErrorKind) for publishes;
/// `retryable`, `permanent`, `undecodable`, `panic`, `timeout` or
/// `delivery-limit` for attempts.
pub const ERROR_TYPE: &str = "error.type";
/// Why a message was dead-lettered ([`DeadLetterReason`](crate::DeadLetterReason)).
pub const REASON: &str = "ticketrail.reason";

/// Describes every metric (help text, unit) to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        SENT,
        Unit::Count,
        "Messages published and confirmed by the broker (with error.type: refused)"
    );
    metrics::describe_counter!(CONSUMED, Unit::Count, "Deliveries taken from the queue");
    metrics::describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Duration of each attempt: decoding and the handler (with error.type: failed attempts)"
    );
    metrics::describe_counter!(HANDLED, Unit::Count, "Deliveries handled and acked");
    metrics::describe_counter!(
        RETRIES,
        Unit::Count,
        "Deliveries scheduled for a delayed retry"
    );
    metrics::describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Deliveries moved to the DLQ, by reason"
    );
    metrics::describe_counter!(
        REPLAYS,
        Unit::Count,
        "Dead letters replayed to their work queue"
    );
    metrics::describe_counter!(
        RECONNECTS,
        Unit::Count,
        "Times a consumer's subscription broke and was resumed or reopened"
    );
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Handlers running now");
    metrics::describe_gauge!(
        PAUSED,
        Unit::Count,
        "1 while the consumer's circuit breaker holds consumption (a downstream outage), else 0"
    );
}

/// [`describe`], once per process.
fn describe_once() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(describe);
}

/// The metrics of one consumer.
pub(crate) struct ConsumerMetrics {
    system: &'static str,
    queue: String,
    pub(crate) consumed: Counter,
    pub(crate) handled: Counter,
    pub(crate) retried: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) in_flight: Gauge,
    duration_ok: Histogram,
}

impl ConsumerMetrics {
    pub(crate) fn new(system: &'static str, queue: &str) -> Self {
        describe_once();
        let labels = [(SYSTEM, system.to_owned()), (DESTINATION, queue.to_owned())];
        ConsumerMetrics {
            system,
            queue: queue.to_owned(),
            consumed: metrics::counter!(CONSUMED, &labels),
            handled: metrics::counter!(HANDLED, &labels),
            retried: metrics::counter!(RETRIES, &labels),
            reconnects: metrics::counter!(RECONNECTS, &labels),
            in_flight: metrics::gauge!(IN_FLIGHT, &labels),
            duration_ok: metrics::histogram!(PROCESS_DURATION, &labels),
        }
    }

    /// Whether the consumer's breaker holds consumption.
    pub(crate) fn paused(&self, paused: bool) {
        metrics::gauge!(PAUSED, SYSTEM => self.system, DESTINATION => self.queue.clone())
            .set(if paused { 1.0 } else { 0.0 });
    }

    /// The broker these metrics are labelled with.
    pub(crate) fn system(&self) -> &'static str {
        self.system
    }

    /// Records an attempt's duration; `error` is the kind of its failure.
    pub(crate) fn duration(&self, seconds: f64, error: Option<&'static str>) {
        match error {
            None => self.duration_ok.record(seconds),
            Some(kind) => metrics::histogram!(
                PROCESS_DURATION,
                SYSTEM => self.system,
                DESTINATION => self.queue.clone(),
                ERROR_TYPE => kind
            )
            .record(seconds),
        }
    }

    /// Counts a dead-lettering with its reason.
    pub(crate) fn dead_lettered(&self, reason: crate::DeadLetterReason) {
        metrics::counter!(
            DEAD_LETTERS,
            SYSTEM => self.system,
            DESTINATION => self.queue.clone(),
            REASON => reason.as_str()
        )
        .increment(1);
    }
}

/// The metrics of one publisher; clones share them.
#[derive(Clone)]
pub(crate) struct PublisherMetrics(std::sync::Arc<PublisherInner>);

struct PublisherInner {
    system: &'static str,
    topic_space: String,
    sent: Counter,
}

impl PublisherMetrics {
    pub(crate) fn new(system: &'static str, topic_space: &str) -> Self {
        describe_once();
        PublisherMetrics(std::sync::Arc::new(PublisherInner {
            system,
            topic_space: topic_space.to_owned(),
            sent: metrics::counter!(SENT, SYSTEM => system, DESTINATION => topic_space.to_owned()),
        }))
    }

    /// Counts a confirmed message, or a refused one with its error kind.
    pub(crate) fn sent(&self, error: Option<crate::ErrorKind>) {
        match error {
            None => self.0.sent.increment(1),
            Some(kind) => metrics::counter!(
                SENT,
                SYSTEM => self.0.system,
                DESTINATION => self.0.topic_space.clone(),
                ERROR_TYPE => kind.code()
            )
            .increment(1),
        }
    }
}

/// Counts a replay of a dead letter of `queue`.
pub(crate) fn replayed(system: &'static str, queue: &str) {
    metrics::counter!(REPLAYS, SYSTEM => system, DESTINATION => queue.to_owned()).increment(1);
}
