//! The generic consumer loop: a subscription, a handler and a retry policy,
//! with a prefetch limit, panic catching, an optional handler timeout,
//! graceful shutdown, and a subscription that is resumed, never given up.

mod decision;
mod flow;
mod health;
mod pace;
mod worker;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::broker::{SharedBroker, SubscribeOptions, Subscription};
use crate::codec::{Codec, Json};
use crate::delivery::Delivery;
use crate::error::{Error, ErrorKind, Result};
use crate::handler::Handler;
use crate::metrics::ConsumerMetrics;
use crate::retry::{Exponential, RetryPolicy};

pub use flow::{CircuitBreaker, Pause};
use flow::{Flow, FlowControl, RateLimit, Ticket};
use health::{Backoff, HealthState};
pub use health::{ConsumerState, Health, HealthProbe};
use pace::Pace;
use worker::Worker;

/// The longest wait between attempts to resume a subscription that the
/// broker interrupted (a reconnect in progress).
const RESUME_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The longest wait between attempts to open a new subscription after one
/// failed for good (the queue deleted, the broker refusing).
const RESUBSCRIBE_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Runs a [`Handler`] over the deliveries of one queue.
///
/// For each delivery: decode (undecodable: DLQ), run the handler with panics
/// caught and an optional timeout, then ack, retry after the policy's delay,
/// or dead-letter. At most `prefetch` handlers run at once. If the
/// subscription is interrupted, the consumer logs it, reports it in its
/// [`Health`], and resumes with backoff; it ends only when shut down or when
/// its broker connection is closed.
///
/// ```no_run
/// # async fn demo(broker: ticketrail_core::SharedBroker) -> ticketrail_core::Result<()> {
/// use std::time::Duration;
/// use ticketrail_core::{handler_fn, Consumer, Context, HandlerError};
///
/// let consumer = Consumer::new(broker, "email.notifications", handler_fn(
///     |to: String, _ctx: Context| async move {
///         println!("sending to {to}");
///         Ok::<(), HandlerError>(())
///     },
/// ))
/// .prefetch(5)
/// .handler_timeout(Duration::from_secs(30));
/// let running = consumer.spawn();
/// // ... later, on SIGTERM:
/// running.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Consumer<H: Handler, C: Codec = Json> {
    broker: SharedBroker,
    queue: Arc<str>,
    handler: Arc<H>,
    codec: C,
    policy: Arc<dyn RetryPolicy>,
    prefetch: u16,
    handler_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    parallel: bool,
    breaker: Option<CircuitBreaker>,
    rate: Option<(u32, Duration)>,
}

impl<H: Handler> Consumer<H, Json> {
    /// A consumer of `queue` with the JSON codec, the seed's retry policy
    /// (1 s, ×2, 4 attempts), prefetch 10, no handler timeout and a 30 s
    /// shutdown deadline.
    pub fn new(broker: SharedBroker, queue: impl Into<String>, handler: H) -> Self {
        Consumer {
            broker,
            queue: Arc::from(queue.into()),
            handler: Arc::new(handler),
            codec: Json,
            policy: Arc::new(Exponential::default()),
            prefetch: 10,
            handler_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
            parallel: false,
            breaker: None,
            rate: None,
        }
    }
}

impl<H: Handler, C: Codec> Consumer<H, C> {
    /// Uses another codec.
    pub fn codec<C2: Codec>(self, codec: C2) -> Consumer<H, C2> {
        let handler = Arc::clone(&self.handler);
        self.rebuilt(handler, codec)
    }

    /// This consumer's settings with another handler and codec.
    fn rebuilt<H2: Handler, C2: Codec>(self, handler: Arc<H2>, codec: C2) -> Consumer<H2, C2> {
        Consumer {
            broker: self.broker,
            queue: self.queue,
            handler,
            codec,
            policy: self.policy,
            prefetch: self.prefetch,
            handler_timeout: self.handler_timeout,
            shutdown_timeout: self.shutdown_timeout,
            parallel: self.parallel,
            breaker: self.breaker,
            rate: self.rate,
        }
    }

    /// Uses this retry policy.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// At most this many deliveries unsettled (and handlers running) at
    /// once (C5). Must be at least 1: running with 0 fails with a
    /// [`ErrorKind::Config`] error.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// A handler still running after `timeout` is cancelled and its message
    /// retried as a retryable failure.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// How long a shutdown waits for running handlers before releasing their
    /// messages for redelivery (C14).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Runs each handler on a task of its own, so CPU-heavy handlers use
    /// every core. By default the handlers of one consumer run concurrently
    /// on the consumer's own task, which spares a task and a cross-thread
    /// wake-up per message: right for handlers that mostly wait on I/O.
    pub fn parallel(mut self, parallel: bool) -> Self {
        self.parallel = parallel;
        self
    }

    /// Wraps the handler in `layer` (see [`layers`](crate::layers)): a
    /// timeout, a concurrency limit shared with other consumers, or one of
    /// your own. The last layer added is the outermost.
    pub fn layer<L>(self, layer: L) -> Consumer<L::Service, C>
    where
        L: crate::layers::Layer<Arc<H>>,
        L::Service: Handler<Message = H::Message>,
    {
        let handler = Arc::new(layer.layer(Arc::clone(&self.handler)));
        let codec = self.codec.clone();
        self.rebuilt(handler, codec)
    }

    /// Pauses consumption while the handler fails for most messages (a
    /// downstream outage), probing now and then, instead of spending every
    /// message's attempts; see [`CircuitBreaker`]. The pause shows in
    /// [`Health::paused`], the `ticketrail.consumer.paused` gauge and one
    /// log line per change.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Takes at most `messages` deliveries per `per`, evenly spaced (200
    /// per second: one every 5 ms), for a downstream with a rate limit of
    /// its own. Deliveries over the rate stay in the broker (or, up to the
    /// prefetch limit, unsettled in the subscription); none is taken and
    /// held. Zero messages or a zero interval fails with a
    /// [`ErrorKind::Config`] error when the consumer runs.
    pub fn rate_limit(mut self, messages: u32, per: Duration) -> Self {
        self.rate = Some((messages, per));
        self
    }

    /// Runs until `signal` completes, then shuts down gracefully (C14):
    /// takes no new deliveries, lets running handlers finish until the
    /// shutdown deadline, and releases the rest for redelivery.
    ///
    /// Returns an error if the first subscription cannot be opened for a
    /// reason that waiting does not mend (no such queue, a bad setting), or
    /// if the broker connection is closed under it. A transient failure
    /// (the broker away or silent), then or later, is logged, reported in
    /// [`Health`] and tried again with backoff.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<()> {
        let health = HealthState::new(Arc::clone(&self.queue), Arc::clone(&self.broker));
        self.run_reporting(signal, health).await
    }

    async fn run_reporting(
        self,
        signal: impl Future<Output = ()>,
        health: Arc<HealthState>,
    ) -> Result<()> {
        let result = self.run_loop(signal, &health).await;
        if let Err(e) = &result {
            health.record_error(e);
        }
        health.set_state(ConsumerState::Stopped);
        result
    }

    async fn run_loop(
        self,
        signal: impl Future<Output = ()>,
        health: &Arc<HealthState>,
    ) -> Result<()> {
        let prefetch = NonZeroU16::new(self.prefetch).ok_or_else(|| {
            Error::config(format!(
                "consumer of `{}`: prefetch must be at least 1",
                self.queue
            ))
        })?;
        let options = SubscribeOptions::prefetch(prefetch);
        let rate = self
            .rate
            .map(|(messages, per)| RateLimit::new(messages, per))
            .transpose()?;
        let first = match self.broker.subscribe(&self.queue, options).await {
            Ok(subscription) => {
                health.resumed();
                Some(subscription)
            }
            Err(e) if e.is_transient() && e.kind() != ErrorKind::Closed => {
                health.failed(&e);
                tracing::warn!(queue = %self.queue, error = %e, "first subscription failed; opening a new one");
                None
            }
            Err(e) => return Err(e),
        };
        let metrics = Arc::new(ConsumerMetrics::new(self.broker.backend(), &self.queue));
        let in_flight = |n: usize| {
            health.set_in_flight(n);
            metrics.in_flight.set(n as f64);
        };
        // A handling is polled once as it is pushed, and that poll may run
        // the handler to its end and count the outcome (a retry) before
        // the push returns: counted in flight first, health never shows a
        // retry counted with nothing in flight while its settlement is
        // still under way.
        let starting = |running: usize| health.set_in_flight(running + 1);
        let flow = Flow::new(self.breaker.clone(), rate, tokio::time::Instant::now());
        let flow = flow.is_active().then(|| {
            Arc::new(FlowControl::new(
                flow,
                Arc::clone(&self.queue),
                Arc::clone(health),
                Arc::clone(&metrics),
            ))
        });
        let worker = Arc::new(Worker {
            flow: flow.clone(),
            queue: Arc::clone(&self.queue),
            handler: Arc::clone(&self.handler),
            codec: self.codec.clone(),
            policy: Arc::clone(&self.policy),
            handler_timeout: self.handler_timeout,
            health: Arc::clone(health),
            metrics: Arc::clone(&metrics),
        });
        let handle = |delivery: Delivery, ticket: Ticket| {
            let worker = Arc::clone(&worker);
            async move { worker.process(delivery, ticket).await }
        };
        // Whether a delivery may be taken now: always, without flow
        // control; else as the breaker and rate limit say, with when to
        // look again.
        let ready = || match &flow {
            None => Ok(Ticket::Normal),
            Some(flow) => flow.ready(),
        };
        let took = |ticket: Ticket| {
            if let Some(flow) = &flow {
                flow.took(ticket);
            }
        };
        // Deliveries received while flow control holds consumption, taken
        // first, in order, once it allows. They count against the prefetch
        // limit as running handlers do; received rather than left in the
        // client, they are the subscription's to keep alive (NATS's
        // progress acks) for as long as the pause lasts.
        let mut held: std::collections::VecDeque<Delivery> = std::collections::VecDeque::new();
        let mut running = Running::new(self.parallel);
        let limit = usize::from(prefetch.get());
        tokio::pin!(signal);
        // The pending `next()` is kept across turns of the loop, never
        // dropped half-way: a subscription need not be cancellation-safe. It
        // owns the subscription while it runs and hands it back (`None`:
        // a new one is to be opened).
        let mut idle: Option<Option<Box<dyn Subscription>>> = Some(first);
        // Where a `next()` dropped at shutdown leaves its subscription.
        let dropped_with_next = Slot::default();
        let mut next: Option<NextDelivery> = None;
        // After an interruption the next `next()` waits first, inside its
        // own future, so running handlers are never paused.
        let mut pause = Duration::ZERO;
        let mut resume = Backoff::new(RESUME_BACKOFF_CAP);
        let mut resubscribe = Backoff::new(RESUBSCRIBE_BACKOFF_CAP);
        if idle.as_ref().is_some_and(Option::is_none) {
            pause = resubscribe.next_wait();
        }
        let ended = loop {
            // Deliveries at hand are taken without a future each; the
            // subscription is awaited only when it has none.
            // When flow control allows the next delivery, if it holds.
            let mut wake: Option<tokio::time::Instant> = None;
            while !held.is_empty() && running.len() < limit {
                match ready() {
                    Ok(ticket) => {
                        took(ticket);
                        let delivery = held.pop_front().expect("checked");
                        starting(running.len());
                        running.push(|| handle(delivery, ticket)).await;
                        in_flight(running.len());
                    }
                    Err(until) => {
                        wake = until;
                        break;
                    }
                }
            }
            if let (Some(Some(subscription)), true) = (idle.as_mut(), pause.is_zero()) {
                // At most `limit` a turn, also when each finishes at once,
                // so a stop signal is seen while a backlog drains.
                let mut taken: usize = 0;
                while running.len() + held.len() < limit && taken < limit {
                    let ticket = if held.is_empty() { ready() } else { Err(wake) };
                    let Some(delivery) = subscription.try_next() else {
                        break;
                    };
                    match ticket {
                        Ok(ticket) => {
                            took(ticket);
                            starting(running.len());
                            running.push(|| handle(delivery, ticket)).await;
                        }
                        Err(until) => {
                            wake = wake.or(until);
                            held.push_back(delivery);
                        }
                    }
                    taken += 1;
                }
                if taken > 0 {
                    resume.reset();
                    resubscribe.reset();
                    health.delivered();
                    metrics.consumed.increment(taken as u64);
                    in_flight(running.len());
                }
            }
            if let Err(until) = ready() {
                // Held until then (or until a running probe ends, which
                // `running.next()` sees).
                wake = wake.or(until);
            }
            // Receiving goes on while flow control holds, into `held`,
            // within the prefetch limit.
            if next.is_none() && running.len() + held.len() < limit {
                if let Some(subscription) = idle.take() {
                    next = Some(Box::pin(next_delivery(
                        self.broker.clone(),
                        Arc::clone(&self.queue),
                        options,
                        Lease {
                            subscription,
                            home: Arc::clone(&dropped_with_next),
                        },
                        std::mem::take(&mut pause),
                    )));
                }
            }
            tokio::select! {
                biased;
                () = &mut signal => break Ok(()),
                () = running.next(), if !running.is_empty() => in_flight(running.len()),
                () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {}
                (subscription, got) = async { next.as_mut().expect("checked").await }, if next.is_some() => {
                    next = None;
                    idle = Some(subscription);
                    match got {
                        Got::Delivery(delivery) => {
                            resume.reset();
                            resubscribe.reset();
                            health.delivered();
                            metrics.consumed.increment(1);
                            match ready() {
                                Ok(ticket) if held.is_empty() => {
                                    took(ticket);
                                    starting(running.len());
                                    running.push(|| handle(delivery, ticket)).await;
                                    in_flight(running.len());
                                }
                                // Held, behind any held before it.
                                _ => held.push_back(delivery),
                            }
                        }
                        Got::Interrupted(e) => {
                            metrics.reconnects.increment(1);
                            let failures = health.failed(&e);
                            pause = resume.next_wait();
                            tracing::warn!(queue = %self.queue, error = %e, failures, retry_in = ?pause, "subscription interrupted; resuming");
                        }
                        Got::Broken(e) => {
                            metrics.reconnects.increment(1);
                            let failures = health.failed(&e);
                            pause = resubscribe.next_wait();
                            tracing::error!(queue = %self.queue, error = %e, failures, retry_in = ?pause, "subscription failed; opening a new one");
                        }
                        Got::Ended => {
                            break Err(Error::closed(format!(
                                "the broker connection of the consumer of `{}` was closed",
                                self.queue
                            )))
                        }
                    }
                }
            }
        };

        // Take no new deliveries; let running handlers finish until the deadline.
        health.set_state(ConsumerState::Stopping);
        drop(next);
        // Unsettled: the broker delivers them again.
        drop(held);
        let subscription = idle.flatten().or_else(|| {
            dropped_with_next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
        // The subscription closes while the handlers run on, both within
        // the deadline: a close that waits on an unreachable broker holds
        // up neither the handlers nor the shutdown.
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let closing = async {
            let mut subscription = subscription?;
            subscription.close().await;
            Some(subscription)
        };
        let (closed, drained) = tokio::join!(
            tokio::time::timeout_at(deadline, closing),
            tokio::time::timeout_at(deadline, running.drain()),
        );
        if drained.is_err() {
            tracing::warn!(
                queue = %self.queue,
                unfinished = running.len(),
                "shutdown deadline passed; releasing unfinished deliveries for redelivery"
            );
            running.abandon().await;
        }
        // The handlers' acks, some only queued, go out before the
        // subscription is dropped (and with it, maybe, its connection).
        if let Ok(Some(mut subscription)) = closed {
            let flushed = tokio::time::timeout_at(deadline, subscription.flush()).await;
            if flushed.is_err() {
                tracing::warn!(queue = %self.queue, "shutdown deadline passed before every ack was sent; their messages will be delivered again");
            }
        }
        in_flight(0);
        ended
    }

    /// Runs on a tokio task; the handle reports its [`Health`] and shuts it
    /// down.
    pub fn spawn(self) -> RunningConsumer {
        let (stop, stopped) = oneshot::channel::<()>();
        let health = HealthState::new(Arc::clone(&self.queue), Arc::clone(&self.broker));
        let task = tokio::spawn(self.run_reporting(
            async move {
                let _ = stopped.await;
            },
            Arc::clone(&health),
        ));
        RunningConsumer {
            stop: Some(stop),
            task,
            health,
        }
    }
}

/// What the pending `next()` came to.
enum Got {
    Delivery(Delivery),
    /// The subscription was interrupted and resumes by itself.
    Interrupted(Error),
    /// The subscription (or opening a new one) failed; a new one is to be
    /// opened.
    Broken(Error),
    /// The broker connection was closed.
    Ended,
}

/// A subscription's pending `next()`, which owns the subscription meanwhile.
type NextDelivery = Pin<Box<dyn Future<Output = (Option<Box<dyn Subscription>>, Got)> + Send>>;

/// Where a subscription goes when the `next()` that owns it is dropped.
type Slot = Arc<std::sync::Mutex<Option<Box<dyn Subscription>>>>;

/// The subscription a pending `next()` owns. Dropped with that future (at
/// shutdown), it leaves the subscription in `home`, so the subscription
/// can still be closed.
struct Lease {
    subscription: Option<Box<dyn Subscription>>,
    home: Slot,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(subscription) = self.subscription.take() {
            *self
                .home
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(subscription);
        }
    }
}

/// Waits `pause`, opens a subscription if there is none, and takes its next
/// delivery.
async fn next_delivery(
    broker: SharedBroker,
    queue: Arc<str>,
    options: SubscribeOptions,
    mut lease: Lease,
    pause: Duration,
) -> (Option<Box<dyn Subscription>>, Got) {
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    let subscription = match &mut lease.subscription {
        Some(subscription) => subscription,
        empty => match broker.subscribe(&queue, options).await {
            Ok(subscription) => empty.insert(subscription),
            Err(e) if e.kind() == ErrorKind::Closed => return (None, Got::Ended),
            Err(e) => return (None, Got::Broken(e)),
        },
    };
    let (keep, got) = match subscription.next().await {
        Some(Ok(delivery)) => (true, Got::Delivery(delivery)),
        Some(Err(e)) if e.is_transient() => (true, Got::Interrupted(e)),
        Some(Err(e)) => (false, Got::Broken(e)),
        None => (false, Got::Ended),
    };
    // A broken or ended subscription is dropped here, not kept for closing.
    (lease.subscription.take().filter(|_| keep), got)
}

/// A consumer running on its own task.
#[derive(Debug)]
pub struct RunningConsumer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
    health: Arc<HealthState>,
}

impl RunningConsumer {
    /// Graceful shutdown (C14); returns when it is complete.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Waits for the consumer to end by itself.
    pub async fn join(&mut self) -> Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(Error::closed("consumer task was cancelled or panicked").with_source(e)),
        }
    }

    /// Stops at once, like a crash: running handlers are dropped mid-way and
    /// their deliveries released unsettled.
    pub fn abort(&self) {
        self.task.abort();
        self.health.set_state(ConsumerState::Stopped);
    }

    /// Whether the consumer has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The consumer's health now: state, handlers in flight, time since the
    /// last delivery, failures in a row and the last error, and how many
    /// deliveries it handled, retried and dead-lettered.
    pub fn health(&self) -> Health {
        let mut health = self.health.snapshot();
        if self.task.is_finished() {
            health.state = ConsumerState::Stopped;
        }
        health
    }

    /// A handle that reports the same health and can be cloned and moved
    /// into a probe endpoint while this handle keeps the consumer.
    pub fn probe(&self) -> HealthProbe {
        HealthProbe(Arc::clone(&self.health))
    }
}

/// The deliveries being handled: on the consumer's own task, or each on a
/// task of its own ([`Consumer::parallel`]).
enum Running<F> {
    Inline {
        set: FuturesUnordered<Pin<Box<F>>>,
        /// The box of the last handling that finished at once, for the
        /// next one: a delivery handled at once costs no allocation.
        spare: Option<Pin<Box<F>>>,
        /// When the task, its handlings finishing at once, yields.
        pace: Pace,
    },
    Spawned(JoinSet<()>),
}

impl<F: Future<Output = ()> + Send + 'static> Running<F> {
    fn new(parallel: bool) -> Self {
        if parallel {
            Running::Spawned(JoinSet::new())
        } else {
            Running::Inline {
                set: FuturesUnordered::new(),
                spare: None,
                pace: Pace::default(),
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Running::Inline { set, .. } => set.len(),
            Running::Spawned(set) => set.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the handling `start` makes. On the consumer's task it is
    /// polled once at once and kept in the set only if it did not finish:
    /// a handling whose handler and settlement await nothing (the memory
    /// broker's, a NATS ack) costs no task in the set, no waker and no
    /// second poll. It is made here, not by the caller, so the (large)
    /// future is written into its box and not moved on the way.
    async fn push(&mut self, start: impl FnOnce() -> F) {
        match self {
            Running::Inline { set, spare, pace } => {
                pace.starting();
                let mut handling = match spare.take() {
                    Some(mut boxed) => {
                        boxed.set(start());
                        boxed
                    }
                    None => Box::pin(start()),
                };
                let finished = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(handling.as_mut().poll(cx).is_ready())
                })
                .await;
                if finished {
                    *spare = Some(handling);
                    // Handlers that finish at once never make this task
                    // wait: it yields now and then all the same.
                    if pace.finished_at_once() {
                        tokio::task::yield_now().await;
                    }
                } else {
                    set.push(handling);
                }
            }
            Running::Spawned(set) => drop(set.spawn(start())),
        }
    }

    /// Waits for one handling to finish.
    async fn next(&mut self) {
        match self {
            Running::Inline { set, .. } => drop(set.next().await),
            Running::Spawned(set) => drop(set.join_next().await),
        }
    }

    /// Waits for every handling to finish.
    async fn drain(&mut self) {
        while !self.is_empty() {
            self.next().await;
        }
    }

    /// Drops every unfinished handling: its delivery is released unsettled.
    async fn abandon(&mut self) {
        match self {
            Running::Inline { set, .. } => set.clear(),
            Running::Spawned(set) => set.shutdown().await,
        }
    }
}
