//! One delivery's way through the consumer: decode, run the handler with
//! panics caught and an optional timeout, decide, settle.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::{field, Instrument};

use super::decision::{decide, over_limit, Outcome, Settlement};
use super::flow::Ticket;
use super::health::HealthState;
use super::FlowControl;
use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::handler::{Context, FailureKind, Handler, HandlerError};
use crate::metrics::ConsumerMetrics;
use crate::retry::RetryPolicy;
use crate::trace::ProcessSpan;

/// The per-queue state shared by the tasks that process deliveries.
pub(crate) struct Worker<H: Handler, C: Codec> {
    pub(crate) queue: Arc<str>,
    pub(crate) handler: Arc<H>,
    pub(crate) codec: C,
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) health: Arc<HealthState>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    /// The breaker to tell how each attempt ended, if there is one.
    pub(crate) flow: Option<Arc<FlowControl>>,
}

/// The `error.type` of a failed attempt (see [`crate::metrics::ERROR_TYPE`]).
type ErrorType = &'static str;

impl<H: Handler, C: Codec> Worker<H, C> {
    pub(crate) async fn process(&self, mut delivery: Delivery, ticket: Ticket) {
        // The envelope is borrowed from the delivery where it is read, not
        // shared: each `Arc` clone and drop is two atomic operations a
        // message. Only the handler's `Context` takes a share.
        let envelope = delivery.envelope();
        let attempt = envelope.attempt;
        let span = tracing::info_span!(
            "ticketrail.delivery",
            queue = %self.queue,
            id = %envelope.id,
            attempt,
            outcome = field::Empty,
        );
        // The outcome is recorded on this handle: cheaper than looking the
        // span up again as the current one.
        let recorded = span.clone();
        async {
            let otel = ProcessSpan::start(self.metrics.system(), &self.queue, delivery.envelope());
            let started = std::time::Instant::now();
            let (outcome, error_type) = otel.within(self.attempt(&delivery)).await;
            self.metrics
                .duration(started.elapsed().as_secs_f64(), error_type);
            let decided = decide(outcome, attempt, &*self.policy);
            if let Some(flow) = &self.flow {
                flow.ended(ticket, &decided);
            }
            let (settled, settlement, error) = match decided {
                Settlement::Ack => {
                    self.metrics.handled.increment(1);
                    self.health.handled.fetch_add(1, Ordering::Relaxed);
                    (delivery.ack().await, "acked", None)
                }
                Settlement::Retry { after, error } => {
                    tracing::warn!(
                        queue = %self.queue,
                        id = %delivery.envelope().id,
                        attempt,
                        error = %error,
                        retry_in = ?after,
                        "handler failed; retrying"
                    );
                    self.metrics.retried.increment(1);
                    self.health.retried.fetch_add(1, Ordering::Relaxed);
                    (delivery.retry(after, &error).await, "retried", Some(error))
                }
                Settlement::DeadLetter { reason, error } => {
                    tracing::error!(
                        queue = %self.queue,
                        id = %delivery.envelope().id,
                        attempt,
                        reason = %reason,
                        error = %error,
                        "message dead-lettered"
                    );
                    self.metrics.dead_lettered(reason);
                    self.health.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    let settled = delivery.dead_letter(reason, &error).await;
                    (settled, "dead-lettered", Some(error))
                }
            };
            recorded.record("outcome", settlement);
            let failure = error_type.zip(error.as_deref());
            match settled {
                Ok(()) => otel.end(settlement, failure),
                Err(e) => {
                    // The delivery is dropped unsettled below, so the broker
                    // delivers it again: nothing is lost.
                    tracing::error!(
                        queue = %self.queue,
                        id = %delivery.envelope().id,
                        error = %e,
                        "settling failed; the message will be redelivered"
                    );
                    otel.end("redelivered", Some(("settle", &e.to_string())));
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Runs one attempt; a failure comes with its `error.type`.
    async fn attempt(&self, delivery: &Delivery) -> (Outcome, Option<ErrorType>) {
        let envelope = delivery.envelope();
        if over_limit(envelope.attempt, delivery.attempt_counted(), &*self.policy) {
            let outcome = Outcome::OverLimit {
                delivered: envelope.attempt,
            };
            return (outcome, Some("delivery_limit"));
        }
        let message = match self.codec.decode::<H::Message>(&envelope.payload) {
            Ok(message) => message,
            Err(why) => return (Outcome::Undecodable(why), Some("undecodable")),
        };
        let ctx = Context::new(delivery.shared_envelope(), Arc::clone(&self.queue));
        let run = AssertUnwindSafe(self.handler.handle(message, &ctx)).catch_unwind();
        let result = match self.handler_timeout {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(result) => result,
                Err(_) => {
                    let error =
                        HandlerError::retryable(format!("handler timed out after {limit:?}"));
                    return (Outcome::Failed(error), Some("timeout"));
                }
            },
        };
        match result {
            Ok(Ok(())) => (Outcome::Handled, None),
            Ok(Err(error)) => {
                let kind = match error.kind() {
                    FailureKind::Retryable => "retryable",
                    FailureKind::Permanent => "permanent",
                };
                (Outcome::Failed(error), Some(kind))
            }
            Err(panic) => {
                let error = HandlerError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(&*panic)
                ));
                (Outcome::Failed(error), Some("panic"))
            }
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
