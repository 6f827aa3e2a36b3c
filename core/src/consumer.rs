//! The generic consumer loop: a subscription, a handler and a retry policy,
//! with a prefetch limit, panic catching, an optional handler timeout and
//! graceful shutdown.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use metrics::{Counter, Histogram};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{field, Instrument};

use crate::broker::{SharedBroker, SubscribeOptions, Subscription};
use crate::codec::{Codec, Json};
use crate::dead_letter::DeadLetterReason;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::handler::{Context, Handler, HandlerError};
use crate::retry::{Exponential, RetryDecision, RetryPolicy};

/// Runs a [`Handler`] over the deliveries of one queue.
///
/// For each delivery: decode (undecodable: DLQ), run the handler with panics
/// caught and an optional timeout, then ack, retry after the policy's delay,
/// or dead-letter. At most `prefetch` handlers run at once.
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
        }
    }
}

impl<H: Handler, C: Codec> Consumer<H, C> {
    /// Uses another codec.
    pub fn codec<C2: Codec>(self, codec: C2) -> Consumer<H, C2> {
        Consumer {
            broker: self.broker,
            queue: self.queue,
            handler: self.handler,
            codec,
            policy: self.policy,
            prefetch: self.prefetch,
            handler_timeout: self.handler_timeout,
            shutdown_timeout: self.shutdown_timeout,
            parallel: self.parallel,
        }
    }

    /// Uses this retry policy.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// At most this many deliveries unsettled (and handlers running) at once (C5).
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

    /// Runs until `signal` completes, then shuts down gracefully (C14):
    /// takes no new deliveries, lets running handlers finish until the
    /// shutdown deadline, and releases the rest for redelivery.
    ///
    /// Returns an error if the subscription cannot be opened or ends by
    /// itself (the broker was closed).
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<()> {
        if self.prefetch == 0 {
            return Err(Error::config(format!(
                "consumer of `{}`: prefetch must be at least 1",
                self.queue
            )));
        }
        let subscription = self
            .broker
            .subscribe(&self.queue, SubscribeOptions::prefetch(self.prefetch))
            .await?;
        let worker = Arc::new(Worker::new(&self));
        let mut running = Running::new(self.parallel);
        let limit = usize::from(self.prefetch);
        tokio::pin!(signal);
        // The pending `next()` is kept across turns of the loop, never
        // dropped half-way: a subscription need not be cancellation-safe. It
        // owns the subscription while it runs and hands it back.
        let mut idle = Some(subscription);
        let mut next: Option<NextDelivery> = None;
        // After a transient error the next `next()` waits a moment first,
        // inside its own future, so running handlers are never paused.
        let mut pause = Duration::ZERO;
        let ended = loop {
            if next.is_none() && running.len() < limit {
                if let Some(mut subscription) = idle.take() {
                    let wait = std::mem::take(&mut pause);
                    next = Some(Box::pin(async move {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        let got = subscription.next().await;
                        (subscription, got)
                    }));
                }
            }
            tokio::select! {
                biased;
                () = &mut signal => break Ok(()),
                () = running.next(), if !running.is_empty() => {}
                (subscription, got) = async { next.as_mut().expect("checked").await }, if next.is_some() => {
                    next = None;
                    idle = Some(subscription);
                    match got {
                        Some(Ok(delivery)) => {
                            let worker = Arc::clone(&worker);
                            running.push(async move { worker.process(delivery).await });
                        }
                        Some(Err(e)) if e.is_transient() => {
                            tracing::warn!(queue = %self.queue, error = %e, "subscription interrupted; waiting for it to resume");
                            pause = Duration::from_millis(100);
                        }
                        Some(Err(e)) => break Err(e),
                        None => break Err(Error::closed(format!("subscription to `{}` ended", self.queue))),
                    }
                }
            }
        };

        // Take no new deliveries; let running handlers finish until the deadline.
        drop(next);
        drop(idle);
        if tokio::time::timeout(self.shutdown_timeout, running.drain())
            .await
            .is_err()
        {
            tracing::warn!(
                queue = %self.queue,
                unfinished = running.len(),
                "shutdown deadline passed; releasing unfinished deliveries for redelivery"
            );
            running.abandon().await;
        }
        ended
    }

    /// Runs on a tokio task; the handle shuts it down.
    pub fn spawn(self) -> RunningConsumer
    where
        H: Handler,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.run_until(async move {
            let _ = stopped.await;
        }));
        RunningConsumer {
            stop: Some(stop),
            task,
        }
    }
}

/// A consumer running on its own task.
#[derive(Debug)]
pub struct RunningConsumer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
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
    }

    /// Whether the consumer has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// A subscription's pending `next()`, which owns the subscription meanwhile.
type NextDelivery =
    Pin<Box<dyn Future<Output = (Box<dyn Subscription>, Option<Result<Delivery>>)> + Send>>;

/// The deliveries being handled: on the consumer's own task, or each on a
/// task of its own ([`Consumer::parallel`]).
enum Running {
    Inline(FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>),
    Spawned(JoinSet<()>),
}

impl Running {
    fn new(parallel: bool) -> Self {
        if parallel {
            Running::Spawned(JoinSet::new())
        } else {
            Running::Inline(FuturesUnordered::new())
        }
    }

    fn len(&self) -> usize {
        match self {
            Running::Inline(set) => set.len(),
            Running::Spawned(set) => set.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, handling: impl Future<Output = ()> + Send + 'static) {
        match self {
            Running::Inline(set) => set.push(Box::pin(handling)),
            Running::Spawned(set) => drop(set.spawn(handling)),
        }
    }

    /// Waits for one handling to finish.
    async fn next(&mut self) {
        match self {
            Running::Inline(set) => drop(set.next().await),
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
            Running::Inline(set) => set.clear(),
            Running::Spawned(set) => set.shutdown().await,
        }
    }
}

/// What one attempt came to.
enum Outcome {
    Handled,
    Failed(HandlerError),
    Undecodable(String),
    OverLimit,
}

/// The per-queue state shared by the tasks that process deliveries.
struct Worker<H: Handler, C: Codec> {
    queue: Arc<str>,
    handler: Arc<H>,
    codec: C,
    policy: Arc<dyn RetryPolicy>,
    handler_timeout: Option<Duration>,
    acked: Counter,
    retried: Counter,
    dead_lettered: Counter,
    handler_seconds: Histogram,
}

impl<H: Handler, C: Codec> Worker<H, C> {
    fn new(consumer: &Consumer<H, C>) -> Self {
        let queue = consumer.queue.to_string();
        Worker {
            queue: Arc::clone(&consumer.queue),
            handler: Arc::clone(&consumer.handler),
            codec: consumer.codec.clone(),
            policy: Arc::clone(&consumer.policy),
            handler_timeout: consumer.handler_timeout,
            acked: metrics::counter!("ticketrail_acked_total", "queue" => queue.clone()),
            retried: metrics::counter!("ticketrail_retried_total", "queue" => queue.clone()),
            dead_lettered: metrics::counter!("ticketrail_dead_lettered_total", "queue" => queue.clone()),
            handler_seconds: metrics::histogram!("ticketrail_handler_seconds", "queue" => queue),
        }
    }
}

impl<H: Handler, C: Codec> Worker<H, C> {
    async fn process(&self, mut delivery: Delivery) {
        let envelope = delivery.shared_envelope();
        let span = tracing::info_span!(
            "ticketrail.delivery",
            queue = %self.queue,
            id = %envelope.id,
            attempt = envelope.attempt,
            outcome = field::Empty,
        );
        async {
            let started = std::time::Instant::now();
            let outcome = self.attempt(&delivery).await;
            self.handler_seconds.record(started.elapsed().as_secs_f64());
            let attempt = envelope.attempt;
            let settled = match outcome {
                Outcome::Handled => {
                    tracing::Span::current().record("outcome", "acked");
                    self.acked.increment(1);
                    delivery.ack().await
                }
                Outcome::Undecodable(why) => {
                    self.dead_letter(&mut delivery, DeadLetterReason::Undecodable, &why)
                        .await
                }
                Outcome::OverLimit => {
                    let why = format!(
                        "delivered {attempt} times, more than the {} attempts allowed; \
                         its consumer likely crashed while handling it",
                        self.policy.max_attempts()
                    );
                    self.dead_letter(&mut delivery, DeadLetterReason::DeliveryLimit, &why)
                        .await
                }
                Outcome::Failed(error) if !error.is_retryable() => {
                    self.dead_letter(
                        &mut delivery,
                        DeadLetterReason::Permanent,
                        &error.to_string(),
                    )
                    .await
                }
                Outcome::Failed(error) => match self.policy.decide(attempt, &error) {
                    RetryDecision::Retry(after) => {
                        tracing::Span::current().record("outcome", "retried");
                        tracing::warn!(
                            queue = %self.queue,
                            id = %envelope.id,
                            attempt,
                            error = %error,
                            retry_in = ?after,
                            "handler failed; retrying"
                        );
                        self.retried.increment(1);
                        delivery.retry(after, &error.to_string()).await
                    }
                    RetryDecision::DeadLetter => {
                        self.dead_letter(
                            &mut delivery,
                            DeadLetterReason::Exhausted,
                            &error.to_string(),
                        )
                        .await
                    }
                },
            };
            if let Err(e) = settled {
                // The delivery is dropped unsettled below, so the broker
                // delivers it again: nothing is lost.
                tracing::error!(
                    queue = %self.queue,
                    id = %envelope.id,
                    error = %e,
                    "settling failed; the message will be redelivered"
                );
            }
        }
        .instrument(span)
        .await
    }

    async fn dead_letter(
        &self,
        delivery: &mut Delivery,
        reason: DeadLetterReason,
        why: &str,
    ) -> Result<()> {
        tracing::Span::current().record("outcome", "dead-lettered");
        let envelope = delivery.envelope();
        tracing::error!(
            queue = %self.queue,
            id = %envelope.id,
            attempt = envelope.attempt,
            reason = %reason,
            error = %why,
            "message dead-lettered"
        );
        self.dead_lettered.increment(1);
        delivery.dead_letter(reason, why).await
    }

    async fn attempt(&self, delivery: &Delivery) -> Outcome {
        let envelope = delivery.shared_envelope();
        if envelope.attempt > self.policy.max_attempts() {
            return Outcome::OverLimit;
        }
        let message = match self.codec.decode::<H::Message>(&envelope.payload) {
            Ok(message) => message,
            Err(why) => return Outcome::Undecodable(why),
        };
        let ctx = Context::new(envelope, Arc::clone(&self.queue));
        let run = AssertUnwindSafe(self.handler.handle(message, &ctx)).catch_unwind();
        let result = match self.handler_timeout {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(result) => result,
                Err(_) => {
                    return Outcome::Failed(HandlerError::retryable(format!(
                        "handler timed out after {limit:?}"
                    )))
                }
            },
        };
        match result {
            Ok(Ok(())) => Outcome::Handled,
            Ok(Err(error)) => Outcome::Failed(error),
            Err(panic) => Outcome::Failed(HandlerError::retryable(format!(
                "handler panicked: {}",
                panic_message(&*panic)
            ))),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}
