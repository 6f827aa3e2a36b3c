//! Queues and bindings of the in-process broker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::Notify;

use ticketrail_core::{topic_matches, DeadLetter, DeadLetterReason, Envelope};

/// A message waiting in a queue, with the broker's bookkeeping.
#[derive(Debug)]
pub(crate) struct Stored {
    /// Shared with the deliveries of it, and with the other queues a
    /// publish fanned out to: never copied on the way through.
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) first_failed_at: Option<SystemTime>,
    /// Deliveries since the message last entered the queue (C13).
    pub(crate) deliveries: u32,
}

impl Stored {
    pub(crate) fn fresh(envelope: impl Into<Arc<Envelope>>) -> Self {
        Stored {
            envelope: envelope.into(),
            first_failed_at: None,
            deliveries: 0,
        }
    }
}

/// One work queue with its dead letters.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) name: Arc<str>,
    state: Mutex<QueueState>,
    /// Woken when a message becomes ready, a delivery is settled, or the
    /// queue is deleted.
    pub(crate) changed: Notify,
}

#[derive(Debug)]
struct QueueState {
    ready: VecDeque<Stored>,
    dead: Vec<DeadLetter>,
    delivery_limit: u32,
    deleted: bool,
}

impl Queue {
    pub(crate) fn new(name: &str, delivery_limit: u32) -> Self {
        Queue {
            name: Arc::from(name),
            state: Mutex::new(QueueState {
                ready: VecDeque::new(),
                dead: Vec::new(),
                delivery_limit,
                deleted: false,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the state half-changed
        // (every change is one push or pop), so a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_delivery_limit(&self, limit: u32) {
        self.state().delivery_limit = limit;
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.state().deleted
    }

    pub(crate) fn delete(&self) {
        let mut state = self.state();
        state.deleted = true;
        state.ready.clear();
        state.dead.clear();
        drop(state);
        self.changed.notify_waiters();
    }

    /// Appends a message; false if the queue was deleted meanwhile.
    pub(crate) fn push(&self, stored: Stored) -> bool {
        let mut state = self.state();
        if state.deleted {
            return false;
        }
        state.ready.push_back(stored);
        drop(state);
        self.changed.notify_waiters();
        true
    }

    /// Takes the next ready message for delivery, counting the delivery.
    pub(crate) fn pop(&self) -> Option<Stored> {
        let mut stored = self.state().ready.pop_front()?;
        stored.deliveries += 1;
        Some(stored)
    }

    /// Puts a message that came back unsettled at the head of the queue, or
    /// dead-letters it once it has been delivered more than the limit allows.
    pub(crate) fn release(&self, stored: Stored) {
        let mut state = self.state();
        if state.deleted {
            return;
        }
        if stored.deliveries > state.delivery_limit {
            let now = SystemTime::now();
            let record = DeadLetter {
                last_error: format!(
                    "delivered {} times without being settled (delivery limit {}); \
                     its consumer died or released it each time",
                    stored.deliveries, state.delivery_limit
                ),
                attempts: stored.envelope.attempt,
                first_failed_at: stored.first_failed_at.unwrap_or(now),
                last_failed_at: now,
                queue: self.name.to_string(),
                reason: DeadLetterReason::DeliveryLimit,
                envelope: Arc::unwrap_or_clone(stored.envelope),
            };
            tracing::warn!(queue = %self.name, id = %record.envelope.id, "delivery limit reached; dead-lettered");
            state.dead.push(record);
        } else {
            state.ready.push_front(stored);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    pub(crate) fn add_dead_letter(&self, record: DeadLetter) {
        let mut state = self.state();
        if !state.deleted {
            state.dead.push(record);
        }
    }

    pub(crate) fn dead_letters(&self, limit: usize) -> Vec<DeadLetter> {
        self.state().dead.iter().take(limit).cloned().collect()
    }

    /// Moves the selected dead letters back to the ready queue, attempt 1.
    pub(crate) fn replay(&self, selects: impl Fn(&DeadLetter) -> bool) -> usize {
        let mut state = self.state();
        let dead = std::mem::take(&mut state.dead);
        let mut replayed = 0;
        for record in dead {
            if selects(&record) {
                let mut envelope = record.envelope;
                envelope.attempt = 1;
                state.ready.push_back(Stored::fresh(envelope));
                replayed += 1;
            } else {
                state.dead.push(record);
            }
        }
        drop(state);
        if replayed > 0 {
            self.changed.notify_waiters();
        }
        replayed
    }

    pub(crate) fn purge_dead_letters(&self) -> usize {
        std::mem::take(&mut self.state().dead).len()
    }
}

/// Topic spaces, their bindings, and the queues.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) spaces: HashMap<String, Vec<Binding>>,
    pub(crate) queues: HashMap<String, Arc<Queue>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Binding {
    pub(crate) pattern: String,
    pub(crate) queue: Arc<Queue>,
}

impl Registry {
    /// The queues of `space` whose bindings match `routing_key`, each once.
    pub(crate) fn route(&self, space: &str, routing_key: &str) -> Option<Vec<Arc<Queue>>> {
        let bindings = self.spaces.get(space)?;
        let mut targets: Vec<Arc<Queue>> = Vec::new();
        for binding in bindings {
            if topic_matches(&binding.pattern, routing_key)
                && !targets.iter().any(|q| Arc::ptr_eq(q, &binding.queue))
            {
                targets.push(Arc::clone(&binding.queue));
            }
        }
        Some(targets)
    }
}
