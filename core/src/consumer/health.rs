//! What a running consumer reports about itself, for a platform's liveness
//! and readiness probes.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::SharedBroker;
use crate::error::Error;

use super::flow::Pause;

/// Where a consumer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumerState {
    /// Opening its subscription.
    Starting,
    /// Subscribed and taking deliveries (or waiting for some).
    Consuming,
    /// Its subscription was interrupted; it is trying again with backoff.
    Reconnecting,
    /// Shutting down: taking no new deliveries, finishing the ones in hand.
    Stopping,
    /// Ended.
    Stopped,
}

impl ConsumerState {
    /// A lower-case name: `starting`, `consuming`, `reconnecting`,
    /// `stopping`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Starting => "starting",
            ConsumerState::Consuming => "consuming",
            ConsumerState::Reconnecting => "reconnecting",
            ConsumerState::Stopping => "stopping",
            ConsumerState::Stopped => "stopped",
        }
    }

    fn from_u8(n: u8) -> Self {
        match n {
            0 => ConsumerState::Starting,
            1 => ConsumerState::Consuming,
            2 => ConsumerState::Reconnecting,
            3 => ConsumerState::Stopping,
            _ => ConsumerState::Stopped,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            ConsumerState::Starting => 0,
            ConsumerState::Consuming => 1,
            ConsumerState::Reconnecting => 2,
            ConsumerState::Stopping => 3,
            ConsumerState::Stopped => 4,
        }
    }
}

/// A consumer's health at one moment (see
/// [`RunningConsumer::health`](crate::RunningConsumer::health)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The queue it consumes.
    pub queue: String,
    /// Where it is in its life.
    pub state: ConsumerState,
    /// Handlers running now.
    pub in_flight: usize,
    /// How long ago the last delivery arrived; `None` before the first.
    pub since_last_delivery: Option<Duration>,
    /// Subscription failures in a row (0 while deliveries arrive).
    pub consecutive_failures: u32,
    /// The last subscription error, if the consumer has met one.
    pub last_error: Option<String>,
    /// Deliveries acked after their handler succeeded.
    pub handled: u64,
    /// Deliveries scheduled for a retry.
    pub retried: u64,
    /// Deliveries moved to the DLQ.
    pub dead_lettered: u64,
    /// Why and since when the consumer's circuit breaker holds
    /// consumption, and when it probes next; `None` while it consumes.
    pub paused: Option<Pause>,
    /// Why the broker refuses publishes now (RabbitMQ's memory or disk
    /// alarm), if it does: the consumer still takes and acks deliveries,
    /// and its retries and dead letters wait for the block to clear.
    pub publishing_blocked: Option<String>,
}

impl Health {
    /// For a liveness probe: the consumer has not ended (it may be
    /// reconnecting; restarting the process would not help that).
    pub fn is_live(&self) -> bool {
        self.state != ConsumerState::Stopped
    }

    /// For a readiness probe: subscribed and consuming.
    pub fn is_ready(&self) -> bool {
        self.state == ConsumerState::Consuming
    }
}

/// A cheap, cloneable handle on a running consumer's [`Health`], for a
/// platform's probe endpoint or a metrics task; see
/// [`RunningConsumer::probe`](crate::RunningConsumer::probe).
#[derive(Debug, Clone)]
pub struct HealthProbe(pub(crate) Arc<HealthState>);

impl HealthProbe {
    /// The consumer's health now.
    pub fn health(&self) -> Health {
        self.0.snapshot()
    }
}

/// The counters behind [`Health`], shared by the consumer's loop and its
/// handle.
#[derive(Debug)]
pub(crate) struct HealthState {
    queue: Arc<str>,
    broker: SharedBroker,
    started: Instant,
    state: AtomicU8,
    in_flight: AtomicUsize,
    /// Nanoseconds after `started` of the last delivery, plus one (0: none yet).
    last_delivery: AtomicU64,
    failures: AtomicU32,
    last_error: Mutex<Option<String>>,
    pub(crate) handled: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    /// The breaker's pause as of `at`, when it holds consumption.
    pause: Mutex<Option<(Pause, Instant)>>,
}

impl HealthState {
    pub(crate) fn new(queue: Arc<str>, broker: SharedBroker) -> Arc<Self> {
        Arc::new(HealthState {
            queue,
            broker,
            started: Instant::now(),
            state: AtomicU8::new(ConsumerState::Starting.to_u8()),
            in_flight: AtomicUsize::new(0),
            last_delivery: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
            handled: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            pause: Mutex::new(None),
        })
    }

    /// The breaker's pause changed (`None`: consuming again).
    pub(crate) fn set_pause(&self, pause: Option<Pause>) {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner()) = pause.map(|p| (p, Instant::now()));
    }

    pub(crate) fn set_state(&self, state: ConsumerState) {
        self.state.store(state.to_u8(), Ordering::Release);
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Release);
    }

    /// A delivery arrived: the subscription works.
    pub(crate) fn delivered(&self) {
        let nanos = self.started.elapsed().as_nanos() as u64;
        self.last_delivery.store(nanos + 1, Ordering::Release);
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        self.set_state(ConsumerState::Consuming);
    }

    pub(crate) fn record_error(&self, error: &Error) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// The subscription failed with `error`; returns the failures in a row.
    pub(crate) fn failed(&self, error: &Error) -> u32 {
        self.record_error(error);
        self.set_state(ConsumerState::Reconnecting);
        self.failures.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The subscription is open again.
    pub(crate) fn resumed(&self) {
        self.set_state(ConsumerState::Consuming);
    }

    pub(crate) fn snapshot(&self) -> Health {
        let last = self.last_delivery.load(Ordering::Acquire);
        Health {
            queue: self.queue.to_string(),
            state: ConsumerState::from_u8(self.state.load(Ordering::Acquire)),
            in_flight: self.in_flight.load(Ordering::Acquire),
            since_last_delivery: (last != 0).then(|| {
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(last - 1))
            }),
            consecutive_failures: self.failures.load(Ordering::Acquire),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            handled: self.handled.load(Ordering::Acquire),
            retried: self.retried.load(Ordering::Acquire),
            dead_lettered: self.dead_lettered.load(Ordering::Acquire),
            paused: self
                .pause
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(pause, at)| {
                    let ago = at.elapsed();
                    Pause {
                        reason: pause.reason.clone(),
                        since: pause.since + ago,
                        next_probe: pause.next_probe.map(|d| d.saturating_sub(ago)),
                    }
                }),
            publishing_blocked: self.broker.publishing_blocked(),
        }
    }
}

/// Waits between attempts to resume a subscription: 100 ms, doubling up to
/// a cap.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn new(cap: Duration) -> Self {
        Backoff {
            next: Self::FIRST,
            cap,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.cap);
        wait
    }
}
