//! One delivery's way through the consumer: decode, run the handler with
//! panics caught and an optional timeout, decide, settle.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use metrics::{Counter, Histogram};
use tracing::{field, Instrument};

use super::decision::{decide, over_limit, Outcome, Settlement};
use super::health::HealthState;
use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::handler::{Context, Handler, HandlerError};
use crate::retry::RetryPolicy;

/// The per-queue state shared by the tasks that process deliveries.
pub(crate) struct Worker<H: Handler, C: Codec> {
    pub(crate) queue: Arc<str>,
    pub(crate) handler: Arc<H>,
    pub(crate) codec: C,
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) health: Arc<HealthState>,
    pub(crate) metrics: WorkerMetrics,
}

/// The metrics one consumer records.
pub(crate) struct WorkerMetrics {
    pub(crate) acked: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) handler_seconds: Histogram,
}

impl WorkerMetrics {
    pub(crate) fn new(queue: &str) -> Self {
        let queue = queue.to_owned();
        WorkerMetrics {
            acked: metrics::counter!("ticketrail_acked_total", "queue" => queue.clone()),
            retried: metrics::counter!("ticketrail_retried_total", "queue" => queue.clone()),
            dead_lettered: metrics::counter!("ticketrail_dead_lettered_total", "queue" => queue.clone()),
            handler_seconds: metrics::histogram!("ticketrail_handler_seconds", "queue" => queue),
        }
    }
}

impl<H: Handler, C: Codec> Worker<H, C> {
    pub(crate) async fn process(&self, mut delivery: Delivery) {
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
            self.metrics
                .handler_seconds
                .record(started.elapsed().as_secs_f64());
            let attempt = envelope.attempt;
            let settled = match decide(outcome, attempt, &*self.policy) {
                Settlement::Ack => {
                    tracing::Span::current().record("outcome", "acked");
                    self.metrics.acked.increment(1);
                    self.health.handled.fetch_add(1, Ordering::Relaxed);
                    delivery.ack().await
                }
                Settlement::Retry { after, error } => {
                    tracing::Span::current().record("outcome", "retried");
                    tracing::warn!(
                        queue = %self.queue,
                        id = %envelope.id,
                        attempt,
                        error = %error,
                        retry_in = ?after,
                        "handler failed; retrying"
                    );
                    self.metrics.retried.increment(1);
                    self.health.retried.fetch_add(1, Ordering::Relaxed);
                    delivery.retry(after, &error).await
                }
                Settlement::DeadLetter { reason, error } => {
                    tracing::Span::current().record("outcome", "dead-lettered");
                    tracing::error!(
                        queue = %self.queue,
                        id = %envelope.id,
                        attempt,
                        reason = %reason,
                        error = %error,
                        "message dead-lettered"
                    );
                    self.metrics.dead_lettered.increment(1);
                    self.health.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    delivery.dead_letter(reason, &error).await
                }
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

    async fn attempt(&self, delivery: &Delivery) -> Outcome {
        let envelope = delivery.shared_envelope();
        if over_limit(envelope.attempt, delivery.attempt_counted(), &*self.policy) {
            return Outcome::OverLimit {
                delivered: envelope.attempt,
            };
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
