//! Messages published for later (C24): held by the broker, in a heap by
//! due time, and routed to the queues bound when they come due. One timer
//! task serves the whole broker while anything is held.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use ticketrail_core::{Envelope, ScheduledMessage};

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
    held: Mutex<Held>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Held {
    due: BinaryHeap<Reverse<Due>>,
    /// Keeps messages due at the same instant in the order they came.
    next_seq: u64,
    timer_running: bool,
}

#[derive(Debug)]
struct Due {
    at: Instant,
    /// `at` on the wall clock, for listing.
    due: SystemTime,
    seq: u64,
    topic_space: String,
    envelope: Arc<Envelope>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Schedule {
    fn held(&self) -> MutexGuard<'_, Held> {
        // Every change is one push or pop: a poisoned lock is still sound.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `limit` messages held for `topic_space`, soonest first.
    pub(crate) fn list(&self, topic_space: &str, limit: usize) -> Vec<ScheduledMessage> {
        let held = self.held();
        let mut due: Vec<&Due> = held
            .due
            .iter()
            .map(|Reverse(due)| due)
            .filter(|due| due.topic_space == topic_space)
            .collect();
        due.sort();
        due.into_iter()
            .take(limit)
            .map(|d| ScheduledMessage::new(&d.envelope.id, &d.envelope.routing_key, d.due))
            .collect()
    }

    /// Drops the held message of `topic_space` with this id; whether there
    /// was one.
    pub(crate) fn cancel(&self, topic_space: &str, id: &str) -> bool {
        let mut held = self.held();
        let before = held.due.len();
        held.due
            .retain(|Reverse(due)| !(due.topic_space == topic_space && due.envelope.id == id));
        held.due.len() < before
    }

    /// How many messages for `topic_space` are held.
    pub(crate) fn count_for(&self, topic_space: &str) -> usize {
        self.held()
            .due
            .iter()
            .filter(|Reverse(due)| due.topic_space == topic_space)
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
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let schedule = server.schedule();
    let mut held = schedule.held();
    let at = Instant::now() + wait;
    let earliest = held.due.peek().map(|Reverse(due)| due.at);
    let seq = held.next_seq;
    held.next_seq += 1;
    held.due.push(Reverse(Due {
        at,
        due: SystemTime::now() + wait,
        seq,
        topic_space: topic_space.to_owned(),
        envelope: Arc::new(envelope),
    }));
    if !held.timer_running {
        held.timer_running = true;
        drop(held);
        tokio::spawn(run_timer(Arc::clone(server)));
    } else if earliest.is_none_or(|earliest| at < earliest) {
        drop(held);
        schedule.changed.notify_one();
    }
}

/// Routes what comes due until nothing is held: the broker lives on while
/// it holds a message, as a broker process would.
async fn run_timer<R: Router>(strong: Arc<R>) {
    loop {
        let (ready, next) = take_due(strong.schedule());
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
        let schedule_changed = async {
            // `notify_one` keeps a permit when nobody waits, so a message
            // held between `take_due` and this wait is not missed.
            strong.schedule().changed.notified().await;
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = schedule_changed => {}
        }
    }
}

/// The messages due now, and when the next one is due; with none left, the
/// timer stops.
fn take_due(schedule: &Schedule) -> (Vec<Due>, Option<Instant>) {
    let mut held = schedule.held();
    let now = Instant::now();
    let mut ready = Vec::new();
    while held.due.peek().is_some_and(|Reverse(due)| due.at <= now) {
        let Reverse(due) = held.due.pop().expect("peeked");
        ready.push(due);
    }
    let next = held.due.peek().map(|Reverse(due)| due.at);
    if next.is_none() {
        held.timer_running = false;
    }
    (ready, next)
}
