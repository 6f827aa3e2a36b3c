//! The in-process broker itself: queues with their messages, dead letters
//! and retry timer, and the bindings that route into them. This is what a
//! RabbitMQ node or a nats-server is to the other backends; the rest of the
//! crate is the client side.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use ticketrail_core::{topic_matches, DeadLetter, DeadLetterReason, Envelope, QueueStats};

/// A message waiting in a queue, with the broker's bookkeeping.
#[derive(Debug)]
pub(crate) struct Stored {
    /// Shared with the deliveries of it, and with the other queues a
    /// publish fanned out to: never copied on the way through.
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) first_failed_at: Option<SystemTime>,
    /// Deliveries since the message last entered the queue (C13).
    pub(crate) deliveries: u32,
    /// What was odd about the message when it was published.
    pub(crate) notes: Vec<String>,
}

impl Stored {
    pub(crate) fn fresh(envelope: impl Into<Arc<Envelope>>) -> Self {
        Stored {
            envelope: envelope.into(),
            first_failed_at: None,
            deliveries: 0,
            notes: Vec::new(),
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
    /// Subscriptions waiting on `changed` (see [`Queue::wait_for_change`]):
    /// a publish into a queue nobody waits on takes no lock of `changed`.
    waiters: AtomicUsize,
    /// Set once, before the state is cleared under its lock: whatever takes
    /// the lock afterwards sees it.
    deleted: AtomicBool,
    /// Messages waiting out a retry delay (C7, C12), earliest first.
    waiting: Mutex<DueHeap<Stored>>,
    /// Woken when a message is due earlier than the timer is waiting for,
    /// or the queue is deleted.
    waiting_changed: Notify,
    /// Deliveries handed out and not settled, over all subscriptions.
    pub(crate) in_flight: AtomicU64,
    /// Open subscriptions.
    pub(crate) consumers: AtomicU64,
}

/// Items waiting for their time, earliest first, served by one timer task
/// started when the first arrives and ending when none is left: an item
/// costs a heap push, not a task. A queue's retries wait in one (C7, C12),
/// the broker's messages published for later in another (C24).
#[derive(Debug)]
pub(crate) struct DueHeap<T> {
    due: BinaryHeap<Reverse<Due<T>>>,
    /// Keeps items due at the same instant in the order they came.
    next_seq: u64,
    timer_running: bool,
}

/// What whoever pushed an item must do about the timer task.
pub(crate) enum Timer {
    /// None runs: spawn it.
    Start,
    /// It sleeps until a later item: wake it.
    Wake,
    /// It will come to this item in time.
    Leave,
}

impl<T> Default for DueHeap<T> {
    fn default() -> Self {
        DueHeap {
            due: BinaryHeap::new(),
            next_seq: 0,
            timer_running: false,
        }
    }
}

impl<T> DueHeap<T> {
    /// Adds `item`, due at `at`.
    pub(crate) fn push(&mut self, at: Instant, item: T) -> Timer {
        let earliest = self.due.peek().map(|Reverse(due)| due.at);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.due.push(Reverse(Due { at, seq, item }));
        if !self.timer_running {
            self.timer_running = true;
            Timer::Start
        } else if earliest.is_none_or(|earliest| at < earliest) {
            Timer::Wake
        } else {
            Timer::Leave
        }
    }

    /// The items due at `now`, and when the next one is due; with none
    /// left, the timer stops.
    pub(crate) fn take_due(&mut self, now: Instant) -> (Vec<T>, Option<Instant>) {
        let mut ready = Vec::new();
        while self.due.peek().is_some_and(|Reverse(due)| due.at <= now) {
            let Reverse(due) = self.due.pop().expect("peeked");
            ready.push(due.item);
        }
        let next = self.due.peek().map(|Reverse(due)| due.at);
        if next.is_none() {
            self.timer_running = false;
        }
        (ready, next)
    }

    pub(crate) fn len(&self) -> usize {
        self.due.len()
    }

    pub(crate) fn clear(&mut self) {
        self.due.clear();
    }

    /// The items, in no particular order.
    pub(crate) fn items(&self) -> impl Iterator<Item = &T> {
        self.due.iter().map(|Reverse(due)| &due.item)
    }

    /// Keeps the items for which `keep` holds.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.due.retain(|Reverse(due)| keep(&due.item));
    }
}

#[derive(Debug)]
struct Due<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<T> Eq for Due<T> {}

impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Due<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug)]
struct QueueState {
    ready: VecDeque<Stored>,
    /// Dead letters by the order they arrived in, so a cursor can walk them
    /// while others are replayed or added.
    dead: BTreeMap<u64, DeadLetter>,
    next_dead: u64,
    delivery_limit: u32,
}

impl Queue {
    pub(crate) fn new(name: &str, delivery_limit: u32) -> Self {
        Queue {
            name: Arc::from(name),
            state: Mutex::new(QueueState {
                ready: VecDeque::new(),
                dead: BTreeMap::new(),
                next_dead: 0,
                delivery_limit,
            }),
            changed: Notify::new(),
            waiters: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            waiting: Mutex::new(DueHeap::default()),
            waiting_changed: Notify::new(),
            in_flight: AtomicU64::new(0),
            consumers: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the state half-changed
        // (every change is one push or pop), so a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn delivery_limit(&self) -> u32 {
        self.state().delivery_limit
    }

    pub(crate) fn set_delivery_limit(&self, limit: u32) {
        self.state().delivery_limit = limit;
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(AtomicOrdering::Acquire)
    }

    pub(crate) fn delete(&self) {
        self.deleted.store(true, AtomicOrdering::Release);
        let mut state = self.state();
        state.ready.clear();
        state.dead.clear();
        drop(state);
        self.waiting().clear();
        self.changed.notify_waiters();
        self.waiting_changed.notify_one();
    }

    fn waiting(&self) -> MutexGuard<'_, DueHeap<Stored>> {
        // Every change is one push or pop: a poisoned lock is still sound.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a message once `after` has passed, on tokio's clock. The wait
    /// is the broker's, not the consumer's (C12).
    pub(crate) fn push_after(self: &Arc<Self>, stored: Stored, after: Duration) {
        let timer = self.waiting().push(Instant::now() + after, stored);
        match timer {
            Timer::Start => drop(tokio::spawn(Arc::clone(self).run_timer())),
            Timer::Wake => self.waiting_changed.notify_one(),
            Timer::Leave => {}
        }
    }

    /// Moves due messages to the ready queue until none is waiting.
    async fn run_timer(self: Arc<Self>) {
        loop {
            let (ready, next) = self.waiting().take_due(Instant::now());
            if !ready.is_empty() {
                self.push_all(ready);
            }
            let Some(next) = next else { return };
            // `notify_one` keeps a permit when nobody waits, so a message
            // pushed between `take_due` and this wait is not missed.
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = self.waiting_changed.notified() => {}
            }
        }
    }

    fn push_all(&self, stored: Vec<Stored>) {
        let mut state = self.state();
        if self.is_deleted() {
            return;
        }
        state.ready.extend(stored);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Appends a message; false if the queue was deleted meanwhile.
    pub(crate) fn push(&self, stored: Stored) -> bool {
        let mut state = self.state();
        if self.is_deleted() {
            return false;
        }
        state.ready.push_back(stored);
        drop(state);
        // A subscription counts itself a waiter before it looks at the
        // ready messages under the state lock: if it found none, its count
        // is seen here.
        if self.waiters.load(AtomicOrdering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
        true
    }

    /// Counts a subscription as waiting on `changed` until the guard is
    /// dropped. Take it after creating the `Notified` future and before
    /// looking for ready messages, so a publish in between wakes it.
    pub(crate) fn wait_for_change(&self) -> Waiter<'_> {
        self.waiters.fetch_add(1, AtomicOrdering::SeqCst);
        Waiter(&self.waiters)
    }

    /// Takes the next ready message for delivery, counting the delivery.
    pub(crate) fn pop(&self) -> Option<Stored> {
        let mut stored = self.state().ready.pop_front()?;
        stored.deliveries += 1;
        self.in_flight.fetch_add(1, AtomicOrdering::AcqRel);
        Some(stored)
    }

    /// A delivery of this queue was settled or released.
    pub(crate) fn settled(&self) {
        self.in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
    }

    /// Puts a message that came back unsettled at the head of the queue, or
    /// dead-letters it once it has been delivered more than the limit allows.
    pub(crate) fn release(&self, stored: Stored) {
        let mut state = self.state();
        if self.is_deleted() {
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
                notes: stored.notes,
                envelope: Arc::unwrap_or_clone(stored.envelope),
            };
            tracing::warn!(queue = %self.name, id = %record.envelope.id, "delivery limit reached; dead-lettered");
            state.add_dead_letter(record);
        } else {
            state.ready.push_front(stored);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    pub(crate) fn add_dead_letter(&self, record: DeadLetter) {
        let mut state = self.state();
        if !self.is_deleted() {
            state.add_dead_letter(record);
        }
    }

    /// The key the next dead letter will get: a cursor opened now walks the
    /// keys below it.
    pub(crate) fn dead_letter_end(&self) -> u64 {
        self.state().next_dead
    }

    /// The first dead letter with a key in `from..to` (by arrival), and its key.
    pub(crate) fn dead_letter_in(&self, from: u64, to: u64) -> Option<(u64, DeadLetter)> {
        self.state()
            .dead
            .range(from..to)
            .map(|(key, record)| (*key, record.clone()))
            .next()
    }

    /// Takes the dead letter with `key` out; `None` if it is gone already.
    pub(crate) fn take_dead_letter(&self, key: u64) -> Option<DeadLetter> {
        self.state().dead.remove(&key)
    }

    /// Puts a replayed message at the back of the ready queue.
    pub(crate) fn replay(&self, envelope: Envelope) -> bool {
        self.push(Stored::fresh(envelope))
    }

    pub(crate) fn purge_dead_letters(&self) -> usize {
        std::mem::take(&mut self.state().dead).len()
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let state = self.state();
        let mut stats = QueueStats::new(self.name.to_string());
        stats.ready = Some(state.ready.len() as u64);
        stats.dead_letters = Some(state.dead.len() as u64);
        drop(state);
        stats.waiting_retries = Some(self.waiting().len() as u64);
        stats.in_flight = Some(self.in_flight.load(AtomicOrdering::Acquire));
        stats.consumers = Some(self.consumers.load(AtomicOrdering::Acquire));
        stats
    }
}

impl QueueState {
    fn add_dead_letter(&mut self, record: DeadLetter) {
        let key = self.next_dead;
        self.next_dead += 1;
        self.dead.insert(key, record);
    }
}

/// A subscription counted as waiting for a change of its queue.
pub(crate) struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::SeqCst);
    }
}

/// Topic spaces, their bindings, and the queues.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// By name, ordered: a publish finds its space in a few comparisons of
    /// the name, cheaper than hashing it for the few spaces a process has.
    pub(crate) spaces: BTreeMap<String, Vec<Binding>>,
    pub(crate) queues: HashMap<String, Arc<Queue>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Binding {
    pub(crate) pattern: String,
    pub(crate) queue: Arc<Queue>,
}

impl Registry {
    /// Puts a copy of the message on every queue of `space` with a binding
    /// that matches its routing key, once per queue, and says on how many;
    /// `None` if the space is not declared. Nothing is allocated for a
    /// well-formed message.
    pub(crate) fn route(
        &self,
        space: &str,
        envelope: &Arc<Envelope>,
        notes: &[String],
    ) -> Option<usize> {
        let bindings = self.spaces.get(space)?;
        let key = envelope.routing_key.as_str();
        let mut routed = 0;
        for (i, binding) in bindings.iter().enumerate() {
            let copied_already = || {
                bindings[..i].iter().any(|earlier| {
                    Arc::ptr_eq(&earlier.queue, &binding.queue)
                        && topic_matches(&earlier.pattern, key)
                })
            };
            if topic_matches(&binding.pattern, key) && !copied_already() {
                let mut stored = Stored::fresh(Arc::clone(envelope));
                stored.notes = notes.to_vec();
                binding.queue.push(stored);
                routed += 1;
            }
        }
        Some(routed)
    }
}
