//! Subscriptions on queues (pull consumers) and how deliveries are settled.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use ticketrail_core::{
    DeadLetter, DeadLetterReason, Delivery, Envelope, Error, ErrorKind, Result, RetryRequest,
    Settle, Subscription,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::broker::{Inner, QueueInfo};
use crate::headers;
use crate::topology;

/// The delay of a nak meant as "deliver again now". nats-server 2.9 does not
/// count a redelivery after a plain `-NAK` (the next delivery says
/// `delivered: 1` again), which would let a crash loop go on for ever (C13);
/// a nak with a delay is counted.
const IMMEDIATE: Duration = Duration::from_millis(1);

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// A subscription: pulls at most as many messages as it has free prefetch
/// slots (C5); competing subscriptions share the queue's durable consumer (C6).
pub(crate) struct NatsSubscription {
    inner: Arc<Inner>,
    info: QueueInfo,
    consumer: PullConsumer,
    slots: Arc<Semaphore>,
    batch: Option<jetstream::consumer::pull::Batch>,
    /// Whether the consumer's filter is exactly the queue's one binding; if
    /// not, the subscription checks each routing key against the bindings.
    exact_filter: bool,
}

impl NatsSubscription {
    pub(crate) fn new(
        inner: Arc<Inner>,
        info: QueueInfo,
        consumer: PullConsumer,
        slots: Arc<Semaphore>,
    ) -> Self {
        let exact_filter = matches!(info.bindings.as_slice(), [only] if !only.contains('#'));
        NatsSubscription {
            inner,
            info,
            consumer,
            slots,
            batch: None,
            exact_filter,
        }
    }

    /// Turns a pulled message into a delivery, or settles it here when it is
    /// not this queue's to handle (another queue's replay, a subject outside
    /// the bindings) or has reached the server's delivery limit.
    async fn accept(
        &self,
        message: jetstream::Message,
        slot: OwnedSemaphorePermit,
    ) -> Option<Delivery> {
        let (stream_sequence, delivered, stored_at) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.delivered,
                SystemTime::from(info.published),
            ),
            Err(e) => {
                tracing::warn!(queue = %self.info.name, error = %e, "message without JetStream metadata; skipped");
                return None;
            }
        };
        let routing_key = message
            .subject
            .as_str()
            .strip_prefix(self.info.space.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(message.subject.as_str())
            .to_owned();
        let headers = message.headers.as_ref();
        let addressed_elsewhere = headers
            .and_then(|h| h.get_last(headers::QUEUE))
            .is_some_and(|q| q.as_str() != &*self.info.name);
        let unbound = !self.exact_filter && !topology::bound(&self.info.bindings, &routing_key);
        if addressed_elsewhere || unbound {
            if let Err(e) = message.ack().await {
                tracing::warn!(queue = %self.info.name, error = %e, "could not pass over a message for another queue");
            }
            return None;
        }
        let attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
        let envelope = headers::incoming(
            headers,
            &routing_key,
            message.payload.clone(),
            stored_at,
            attempt,
        );
        let first_failed_at = self.inner.first_failure(&self.info.stream, stream_sequence);
        let settle = NatsSettle {
            inner: Arc::clone(&self.inner),
            info: self.info.clone(),
            sequence: stream_sequence,
            message: Some(message),
            _slot: slot,
        };
        let max_deliver = self.consumer.cached_info().config.max_deliver;
        if max_deliver > 0 && delivered >= max_deliver {
            // The server delivers this message no more after this: dead-letter
            // it here rather than let it sit unseen (C13).
            let mut delivery = Delivery::new(
                Arc::clone(&self.info.name),
                envelope,
                first_failed_at,
                Box::new(settle),
            );
            let why =
                format!("delivered {delivered} times, the most the server allows for this queue");
            if let Err(e) = delivery
                .dead_letter(DeadLetterReason::DeliveryLimit, &why)
                .await
            {
                tracing::error!(queue = %self.info.name, error = %e, "dead-lettering at the delivery limit failed");
            }
            return None;
        }
        Some(Delivery::new(
            Arc::clone(&self.info.name),
            envelope,
            first_failed_at,
            Box::new(settle),
        ))
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.inner.is_closed() {
                return None;
            }
            if let Some(batch) = self.batch.as_mut() {
                match batch.next().await {
                    Some(Ok(message)) => {
                        let slot = match Arc::clone(&self.slots).try_acquire_owned() {
                            Ok(slot) => slot,
                            Err(_) => Arc::clone(&self.slots).acquire_owned().await.ok()?,
                        };
                        if let Some(delivery) = self.accept(message, slot).await {
                            return Some(Ok(delivery));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(queue = %self.info.name, error = %e, "pull interrupted; pulling again");
                        self.batch = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    None => self.batch = None,
                }
                continue;
            }
            // Pull only as many as there are free slots.
            let free = match self.slots.available_permits() {
                0 => {
                    drop(self.slots.acquire().await.ok()?);
                    continue;
                }
                n => n,
            };
            match self
                .consumer
                .batch()
                .max_messages(free)
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(batch) => {
                    self.batch = Some(batch);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(queue = %self.info.name, error = %e, retry_in = ?backoff, "cannot pull; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Settles one JetStream message. Dropped unsettled, it naks it for
/// immediate redelivery; its prefetch slot is freed either way.
struct NatsSettle {
    inner: Arc<Inner>,
    info: QueueInfo,
    sequence: u64,
    message: Option<jetstream::Message>,
    _slot: OwnedSemaphorePermit,
}

impl NatsSettle {
    fn take(&mut self) -> jetstream::Message {
        self.message
            .take()
            .expect("settled once: Delivery guarantees it")
    }

    /// Sends an ack of `kind` and waits for the server to confirm it.
    async fn confirmed(
        &self,
        message: &jetstream::Message,
        kind: AckKind,
        doing: &str,
    ) -> Result<()> {
        let reply = message.reply.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Broker,
                "the message has no reply subject to settle it",
            )
        })?;
        self.inner
            .client
            .request(reply, kind.into())
            .await
            .map(drop)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("{doing} message {}", self.sequence),
                )
                .with_source(e)
            })
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        if let (Some(message), Ok(runtime)) =
            (self.message.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = message.ack_with(AckKind::Nak(Some(IMMEDIATE))).await;
            });
        }
    }
}

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let message = self.take();
        self.confirmed(&message, AckKind::Ack, "acking").await?;
        self.inner.forget_failure(&self.info.stream, self.sequence);
        Ok(())
    }

    async fn nack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let message = self.take();
        message
            .ack_with(AckKind::Nak(Some(IMMEDIATE)))
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "nacking").with_source(e))
    }

    async fn retry(mut self: Box<Self>, _envelope: &Envelope, request: RetryRequest) -> Result<()> {
        // The server keeps the message and delivers it again after the delay:
        // the wait lives in the stream (C12).
        let message = self.take();
        self.inner.remember_first_failure(
            &self.info.stream,
            self.sequence,
            request.first_failed_at,
        );
        message
            .ack_with(AckKind::Nak(Some(request.after)))
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "scheduling the retry").with_source(e))
    }

    async fn dead_letter(mut self: Box<Self>, record: DeadLetter) -> Result<()> {
        let message = self.take();
        // Published under `stream:sequence`, so doing it again after a crash
        // stores one record; only then is the original terminated.
        let mut headers = headers::copy(
            &record.envelope,
            &format!("{}:{}", self.info.stream, self.sequence),
        );
        headers::add_record(&mut headers, &record);
        let subject = topology::dlq_subject(&self.info.stream, &self.info.name);
        if let Err(e) = self
            .inner
            .publish(subject, headers, record.envelope.payload.clone())
            .await
        {
            self.message = Some(message); // released on drop: nothing lost
            return Err(e);
        }
        self.confirmed(&message, AckKind::Term, "terminating")
            .await?;
        self.inner.forget_failure(&self.info.stream, self.sequence);
        Ok(())
    }
}
