//! Messages published for later (C24): held by the broker, in a heap by
//! due time, and routed to the queues bound when they come due. One timer
//! task serves the whole broker while anything is held.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use ticketrail_core::{Envelope, ScheduledMessage};

use crate::store::{DueHeap, Timer};

/// The broker a schedule belongs to: where its messages are routed when
/// they come due.
pub(crate) trait Router: Send + Sync + 'static {
    /// The broker's schedule.
    fn schedule(&self) -> &Schedule;
    /// Routes `envelope` in `topic_space`: on how many queues, or `None`
    /// if the space is not declared.
    fn route(&self, topic_space: &str, envelope: &Arc<Envelope>) -> Option<usize>;
}

/// The messages held for later.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    held: Mutex<DueHeap<Held>>,
    changed: Notify,
}

/// One message held for later.
#[derive(Debug)]
struct Held {
    /// When it is due, on the wall clock, for listing.
    due: SystemTime,
    topic_space: String,
    envelope: Arc<Envelope>,
}

impl Schedule {
    fn held(&self) -> MutexGuard<'_, DueHeap<Held>> {
        // Every change is one push or pop: a poisoned lock is still sound.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `limit` messages held for `topic_space`, soonest first.
    pub(crate) fn list(&self, topic_space: &str, limit: usize) -> Vec<ScheduledMessage> {
        let held = self.held();
        let mut due: Vec<&Held> = held
            .items()
            .filter(|held| held.topic_space == topic_space)
            .collect();
        due.sort_by_key(|held| held.due);
        due.into_iter()
            .take(limit)
            .map(|h| ScheduledMessage::new(&h.envelope.id, &h.envelope.routing_key, h.due))
            .collect()
    }

    /// Drops the held message of `topic_space` with this id; whether there
    /// was one.
    pub(crate) fn cancel(&self, topic_space: &str, id: &str) -> bool {
        let mut held = self.held();
        let before = held.len();
        held.retain(|h| !(h.topic_space == topic_space && h.envelope.id == id));
        held.len() < before
    }

    /// How many messages for `topic_space` are held.
    pub(crate) fn count_for(&self, topic_space: &str) -> usize {
        self.held()
            .items()
            .filter(|held| held.topic_space == topic_space)
            .count()
    }
}

/// Holds `envelope` until `at` (wall clock, turned into tokio's so tests
/// with paused time see it fire), then routes it in `topic_space`.
pub(crate) fn hold<R: Router>(
    server: &Arc<R>,
    topic_space: &str,
    envelope: Envelope,
    at: SystemTime,
) {
    let now = SystemTime::now();
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    let schedule = server.schedule();
    let held = Held {
        due: at.max(now),
        topic_space: topic_space.to_owned(),
        envelope: Arc::new(envelope),
    };
    let timer = schedule.held().push(Instant::now() + wait, held);
    match timer {
        Timer::Start => drop(tokio::spawn(run_timer(Arc::clone(server)))),
        Timer::Wake => schedule.changed.notify_one(),
        Timer::Leave => {}
    }
}

/// Routes what comes due until nothing is held: the broker lives on while
/// it holds a message, as a broker process would.
async fn run_timer<R: Router>(strong: Arc<R>) {
    loop {
        let (ready, next) = strong.schedule().held().take_due(Instant::now());
        for due in ready {
            let routed = strong.route(&due.topic_space, &due.envelope);
            if routed.unwrap_or(0) == 0 {
                tracing::warn!(
                    topic_space = %due.topic_space,
                    routing_key = %due.envelope.routing_key,
                    id = %due.envelope.id,
                    "a scheduled message came due with no queue bound to its routing key; dropped"
                );
            }
        }
        let Some(next) = next else { return };
        // `notify_one` keeps a permit when nobody waits, so a message held
        // between `take_due` and this wait is not missed.
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = strong.schedule().changed.notified() => {}
        }
    }
}
