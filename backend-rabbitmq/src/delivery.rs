//! Subscriptions on work queues, and how their deliveries are settled.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use ticketrail_core::{
    DeadLetter, Delivery, Envelope, Error, ErrorKind, Result, RetryRequest, Settle, Subscription,
};

use crate::acks::Acks;
use crate::error::map;
use crate::headers;
use crate::link::Link;
use crate::topology;

/// A consumer on one work queue, on a channel of its own, resumed on a new
/// channel after the connection breaks.
pub(crate) struct RabbitSubscription {
    pub(crate) link: Arc<Link>,
    pub(crate) queue: Arc<str>,
    pub(crate) prefetch: u16,
    pub(crate) consumer: Option<lapin::Consumer>,
    /// The consumer's channel and its acks. Dropping the consumer cancels
    /// it; the channel stays open until every delivery taken from it is
    /// settled (C14).
    pub(crate) acks: Option<Arc<Acks>>,
}

impl RabbitSubscription {
    pub(crate) async fn open(&mut self) -> Result<()> {
        let channel = self.link.channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| map("setting the prefetch limit", e))?;
        let consumer = channel
            .basic_consume(
                self.queue.as_ref().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(&format!("consuming from queue `{}`", self.queue), e))?;
        self.consumer = Some(consumer);
        self.acks = Some(Acks::new(channel, self.prefetch));
        Ok(())
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let mut backoff = self.link.config.reconnect_initial;
        loop {
            if self.link.is_closed() {
                return None;
            }
            let Some(consumer) = self.consumer.as_mut() else {
                // Boxed: opening is rare and its future large, and this
                // future is allocated for every delivery.
                match Box::pin(self.open()).await {
                    Ok(()) => continue,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(queue = %self.queue, error = %e, retry_in = ?backoff, "cannot consume; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.link.config.reconnect_max);
                        continue;
                    }
                    Err(e) => return Some(Err(e)),
                }
            };
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    let acks = Arc::clone(self.acks.as_ref().expect("open with its consumer"));
                    return Some(Ok(self.delivery(delivery, acks)));
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "consumer interrupted; resuming");
                    self.consumer = None;
                    self.acks = None;
                }
                None => {
                    self.consumer = None;
                    self.acks = None;
                    if !self.link.is_closed() {
                        tracing::warn!(queue = %self.queue, "consumer cancelled by the broker; resuming");
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        }
    }
}

impl RabbitSubscription {
    fn delivery(&self, delivery: lapin::message::Delivery, acks: Arc<Acks>) -> Delivery {
        let incoming = headers::incoming(
            delivery.properties,
            delivery.routing_key.as_str(),
            delivery.data,
        );
        acks.delivered(delivery.delivery_tag);
        let settle = RabbitSettle {
            link: Arc::clone(&self.link),
            queue: Arc::clone(&self.queue),
            tag: Some(delivery.delivery_tag),
            acks,
        };
        Delivery::new(
            Arc::clone(&self.queue),
            incoming.envelope,
            incoming.first_failed_at,
            Box::new(settle),
        )
    }
}

/// Settles one AMQP delivery. Dropped unsettled, it nacks with requeue.
struct RabbitSettle {
    link: Arc<Link>,
    queue: Arc<str>,
    /// The delivery tag, until settled.
    tag: Option<u64>,
    /// The channel's acks; holding them keeps the channel open until this
    /// delivery is settled: closing it would requeue the message and turn a
    /// finished handler's ack into a duplicate delivery.
    acks: Arc<Acks>,
}

impl RabbitSettle {
    fn tag(&mut self) -> u64 {
        self.tag
            .take()
            .expect("settled once: Delivery guarantees it")
    }

    /// Acks after a copy of the message was safely published elsewhere.
    async fn ack_after_copy(mut self: Box<Self>, what: &str) -> Result<()> {
        let tag = self.tag();
        self.acks.ack(tag).await.map_err(|e| {
            Error::new(
                e.kind(),
                format!("acking after {what}; the broker will deliver the message again"),
            )
            .with_source(e)
        })
    }
}

impl Drop for RabbitSettle {
    fn drop(&mut self) {
        if let (Some(tag), Ok(runtime)) = (self.tag.take(), tokio::runtime::Handle::try_current()) {
            let acks = Arc::clone(&self.acks);
            runtime.spawn(async move {
                let _ = acks.nack(tag).await;
            });
        }
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let tag = self.tag();
        self.acks.ack(tag).await
    }

    async fn nack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let tag = self.tag();
        self.acks.nack(tag).await
    }
    async fn retry(self: Box<Self>, envelope: &Envelope, request: RetryRequest) -> Result<()> {
        // The copy waits in a wait queue of the broker (C12); only once it is
        // confirmed there is the original acked.
        let tier = topology::tier_for(request.after)?;
        self.link.ensure_wait_queue(&self.queue, tier).await?;
        let extra = headers::retry_headers(
            request.next_attempt,
            request.first_failed_at,
            &request.last_error,
        );
        let properties = headers::copy_properties(envelope, &extra);
        let wait_queue = topology::wait_queue_name(&self.queue, tier);
        self.link
            .publish("", &wait_queue, &envelope.payload, properties)
            .await?;
        self.ack_after_copy("scheduling the retry").await
    }

    async fn dead_letter(self: Box<Self>, record: DeadLetter) -> Result<()> {
        let dlq = topology::dlq_name(&self.queue);
        let frame_max = self.link.frame_max().await;
        let used: usize = record
            .envelope
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        let budget = frame_max
            .saturating_sub(used + 1024)
            .min(ticketrail_core::MAX_ERROR_LEN);
        if budget == 0 {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the headers of message {} leave no room for a dead-letter record",
                    record.envelope.id
                ),
            ));
        }
        let extra = headers::record_headers(&record, budget);
        let properties = headers::copy_properties(&record.envelope, &extra);
        self.link
            .publish("", &dlq, &record.envelope.payload, properties)
            .await?;
        self.ack_after_copy("dead-lettering").await
    }
}
