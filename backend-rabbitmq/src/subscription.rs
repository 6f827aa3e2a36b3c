//! Subscriptions on work queues, and how their deliveries are settled.
//!
//! Each subscription has a connection of its own. When lapin cannot parse
//! a delivery (RabbitMQ accepts properties that are not UTF-8 from any
//! client), it closes that connection, and every delivery of it in flight
//! goes back to the queue. To keep that from costing the other messages
//! anything, the subscription then takes deliveries one at a time: only
//! the unreadable message is delivered (and counted) when the connection
//! breaks again, until the queue's delivery limit moves it to the DLQ,
//! where the DLQ tools read it (see [`crate::raw`]). After a window's worth
//! of readable deliveries the subscription goes back to its prefetch.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use ticketrail_core::wire;
use ticketrail_core::{
    DeadLetter, Delivery, Envelope, Error, ErrorKind, Result, RetryRequest, Settle, Subscription,
};

use crate::acks::Acks;
use crate::connection::{self, Link};
use crate::error::{is_unparsable, map};
use crate::headers::{self, Source};
use crate::publish;
use crate::sweep;
use crate::topology;

/// A consumer on one work queue, on a connection of its own, opened again
/// (on another node of a cluster if its own is gone) after it breaks.
pub(crate) struct RabbitSubscription {
    link: Arc<Link>,
    queue: Arc<str>,
    prefetch: u16,
    /// Which node the next connection tries first.
    next_node: AtomicUsize,
    open: Option<Open>,
    /// Readable deliveries since a delivery lapin could not parse, while
    /// the subscription takes them one at a time.
    isolating: Option<u16>,
    /// Brings back retries RabbitMQ keeps past their time.
    _sweeper: sweep::Sweeper,
}

/// The live consumer and its channel's acks.
struct Open {
    consumer: lapin::Consumer,
    acks: Arc<Acks>,
    /// What `try_next` found the consumer ended with, left to `next`.
    held: Option<Option<lapin::Result<lapin::message::Delivery>>>,
}

impl RabbitSubscription {
    pub(crate) async fn open(link: Arc<Link>, queue: &str, prefetch: u16) -> Result<Self> {
        let first = connection::first_node(&link.config);
        let sweeper = sweep::start(Arc::clone(&link), Arc::from(queue));
        let mut subscription = RabbitSubscription {
            link,
            queue: Arc::from(queue),
            prefetch,
            next_node: AtomicUsize::new(first),
            open: None,
            isolating: None,
            _sweeper: sweeper,
        };
        subscription.consume().await?;
        Ok(subscription)
    }

    /// Opens a connection, a channel with the prefetch limit (1 while
    /// isolating an unreadable message) and a consumer.
    async fn consume(&mut self) -> Result<()> {
        let purpose = format!("consuming {}", self.queue);
        let (connection, _node) =
            connection::open(&self.link.config, &self.next_node, &purpose).await?;
        let config = &self.link.config;
        let opening = connection.create_channel();
        let channel = connection::answered(config, "opening a channel", opening).await?;
        let prefetch = if self.isolating.is_some() {
            1
        } else {
            self.prefetch
        };
        let qos = channel.basic_qos(prefetch, BasicQosOptions::default());
        connection::answered(config, "setting the prefetch limit", qos).await?;
        let consuming = channel.basic_consume(
            self.queue.as_ref().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let what = format!("consuming from queue `{}`", self.queue);
        let consumer = connection::answered(config, &what, consuming).await?;
        self.open = Some(Open {
            consumer,
            acks: Acks::new(connection, channel, self.prefetch),
            held: None,
        });
        Ok(())
    }

    fn delivery(&self, delivery: lapin::message::Delivery, acks: Arc<Acks>) -> Delivery {
        let incoming = headers::incoming(
            &delivery.properties,
            delivery.routing_key.as_str(),
            delivery.data.into(),
            Source::Work(&self.queue),
        );
        acks.delivered(delivery.delivery_tag);
        let settle = RabbitSettle {
            link: Arc::clone(&self.link),
            queue: Arc::clone(&self.queue),
            tag: Some(delivery.delivery_tag),
            acks,
        };
        Delivery::decoded(Arc::clone(&self.queue), incoming.decode(), Box::new(settle))
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.link.is_closed() {
                return None;
            }
            let isolated_enough = self.isolating.is_some_and(|clean| clean >= self.prefetch);
            if isolated_enough && self.open.as_ref().is_some_and(|o| o.acks.idle()) {
                // Enough readable deliveries one at a time, and none in
                // hand: back to the whole prefetch window on a new channel.
                tracing::info!(queue = %self.queue, "no unreadable message left in sight; back to prefetch {}", self.prefetch);
                self.isolating = None;
                self.open = None;
            }
            let Some(open) = self.open.as_mut() else {
                // Boxed: opening is rare and its future large, and this
                // future is allocated for every delivery.
                if let Err(e) = Box::pin(self.consume()).await {
                    return Some(Err(e));
                }
                continue;
            };
            let got = match open.held.take() {
                Some(got) => got,
                None => open.consumer.next().await,
            };
            match got {
                Some(Ok(delivery)) => {
                    if let Some(clean) = self.isolating.as_mut() {
                        *clean += 1;
                    }
                    let acks = Arc::clone(&open.acks);
                    return Some(Ok(self.delivery(delivery, acks)));
                }
                Some(Err(e)) if is_unparsable(&e) => {
                    self.open = None;
                    self.isolating = Some(0);
                    tracing::warn!(
                        queue = %self.queue,
                        error = %e,
                        "a message in the queue cannot be parsed by the AMQP client (its properties \
                         are not UTF-8); taking deliveries one at a time until the queue's delivery \
                         limit moves it to the DLQ"
                    );
                    return Some(Err(map(
                        &format!("reading a delivery of `{}`", self.queue),
                        e,
                    )));
                }
                Some(Err(e)) => {
                    self.open = None;
                    return Some(Err(map(&format!("consuming from `{}`", self.queue), e)));
                }
                None => {
                    self.open = None;
                    if self.link.is_closed() {
                        return None;
                    }
                    return Some(Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "RabbitMQ cancelled the consumer of `{}` (the queue moved or was deleted)",
                            self.queue
                        ),
                    )));
                }
            }
        }
    }

    /// Waits until the acks of the deliveries handed out are sent, those
    /// `try_ack` only queued too.
    async fn flush(&mut self) {
        if let Some(open) = &self.open {
            open.acks.settled().await;
        }
    }

    /// A delivery lapin has already received, while the whole prefetch
    /// window is open; anything else is left to `next`.
    fn try_next(&mut self) -> Option<Delivery> {
        if self.isolating.is_some() || self.link.is_closed() {
            return None;
        }
        let open = self.open.as_mut().filter(|open| open.held.is_none())?;
        match open.consumer.next().now_or_never()? {
            Some(Ok(delivery)) => {
                let acks = Arc::clone(&open.acks);
                Some(self.delivery(delivery, acks))
            }
            ended => {
                open.held = Some(ended);
                None
            }
        }
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
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let tag = self.tag();
        self.acks.ack(tag).await
    }

    fn try_ack(&mut self) -> Option<Result<()>> {
        // Queued for the channel's ack pipeline, which keeps the channel
        // open until it is sent.
        let tag = self.tag();
        Some(self.acks.ack_queued(tag))
    }

    async fn nack(mut self: Box<Self>) -> Result<()> {
        let tag = self.tag();
        self.acks.nack(tag).await
    }

    async fn retry(self: Box<Self>, envelope: &Envelope, request: RetryRequest) -> Result<()> {
        // The copy waits in a wait queue of the broker (C12); only once it is
        // confirmed there is the original acked.
        let tier = topology::tier_for(request.after)?;
        self.link.ensure_wait_queue(&self.queue, tier).await?;
        let wait_queue = topology::wait_queue_name(&self.queue, tier);
        let mut bookkeeping = wire::retry_headers(envelope, &request);
        bookkeeping.push(wire::retry_due(tier));
        publish::publish_copy(&self.link, &wait_queue, envelope, bookkeeping).await?;
        self.ack_after_copy("scheduling the retry").await
    }

    async fn dead_letter(self: Box<Self>, record: DeadLetter) -> Result<()> {
        let dlq = topology::dlq_name(&self.queue);
        let bookkeeping = record.wire_headers();
        publish::publish_copy(&self.link, &dlq, &record.envelope, bookkeeping).await?;
        self.ack_after_copy("dead-lettering").await
    }
}
