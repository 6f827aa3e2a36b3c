//! The outbox's and inbox's metrics, through the `metrics` facade as the
//! rest of ticketrail's ([`ticketrail_core::metrics`]). Labels are topic
//! space and queue names and error kinds, never ids.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `ticketrail.outbox.stored` | counter | `messaging.destination.name` (topic space) |
//! | `ticketrail.outbox.relayed` | counter | `messaging.system`, `messaging.destination.name` |
//! | `ticketrail.outbox.failed` | counter | `messaging.system`, `messaging.destination.name`, `error.type` |
//! | `ticketrail.outbox.pending` | gauge | (none): unsent rows a relay saw at its last look |
//! | `ticketrail.outbox.oldest` | gauge, seconds | (none): age of the oldest unsent row |
//! | `ticketrail.inbox.duplicates` | counter | `messaging.destination.name` (queue) |

use ticketrail_core::metrics::{DESTINATION, ERROR_TYPE, SYSTEM};
use ticketrail_core::ErrorKind;

/// Rows written into the outbox.
pub const STORED: &str = "ticketrail.outbox.stored";
/// Rows a relay published and the broker confirmed.
pub const RELAYED: &str = "ticketrail.outbox.relayed";
/// Rows the broker refused (unroutable, too large, ...), kept with their error.
pub const FAILED: &str = "ticketrail.outbox.failed";
/// Unsent rows, as a relay last counted them.
pub const PENDING: &str = "ticketrail.outbox.pending";
/// Age in seconds of the oldest unsent row, as a relay last saw it.
pub const OLDEST: &str = "ticketrail.outbox.oldest";
/// Deliveries the inbox skipped because their effects were already committed.
pub const DUPLICATES: &str = "ticketrail.inbox.duplicates";

/// The counter of rows an outbox of `topic_space` writes.
pub(crate) fn stored(topic_space: &str) -> metrics::Counter {
    metrics::counter!(STORED, DESTINATION => topic_space.to_owned())
}

pub(crate) fn relayed(system: &'static str, topic_space: &str, n: u64) {
    metrics::counter!(RELAYED, SYSTEM => system, DESTINATION => topic_space.to_owned())
        .increment(n);
}

pub(crate) fn failed(system: &'static str, topic_space: &str, kind: ErrorKind) {
    metrics::counter!(
        FAILED,
        SYSTEM => system,
        DESTINATION => topic_space.to_owned(),
        ERROR_TYPE => kind.code()
    )
    .increment(1);
}

pub(crate) fn backlog(pending: u64, oldest_seconds: f64) {
    metrics::gauge!(PENDING).set(pending as f64);
    metrics::gauge!(OLDEST).set(oldest_seconds);
}

pub(crate) fn duplicate(queue: &str) {
    metrics::counter!(DUPLICATES, DESTINATION => queue.to_owned()).increment(1);
}
