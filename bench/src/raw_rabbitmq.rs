//! The raw baseline for RabbitMQ: hand-written lapin with publisher confirms,
//! a window of publishes in flight, and a quorum queue like ticketrail's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::side::{at_rate, publish_windowed, BenchResult, Side};
use crate::workload::{now_ns, payload, EmailMessage, ROUTING_KEY};

pub(crate) struct RawRabbit {
    connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
    /// The queue failed messages wait in for their retry, and how they get
    /// there.
    retry: Option<(String, RetryDesign)>,
}

/// How a raw loop retries a failed message after 1 s without ever losing
/// it, even if the consumer dies while the message waits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryDesign {
    /// What a careful engineer writes (and what ticketrail does): publish a
    /// copy to a quorum wait queue with a 1 s TTL that dead-letters back,
    /// await the broker's confirm, then ack the delivery.
    CopyThenAck,
    /// Cheaper for the client: reject the delivery, and let the broker move
    /// it (at-least-once dead-lettering) into the wait queue. No copy
    /// crosses the network, but a queue has one dead-letter target, so the
    /// work queue can no longer send delivery-limit failures to a DLQ, and
    /// there is one delay per queue.
    RejectToWaitQueue,
}

/// Arguments every quorum queue here shares: dead-lettering at least once
/// to `target` (through the default exchange), which needs reject-publish.
fn quorum_dead_lettering_to(target: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(target.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

/// The header a retried copy carries on the copy-then-ack design; on the
/// reject design the broker's `x-death` says it.
const RETRIED: &str = "x-retried";

impl RawRabbit {
    /// The topic exchange this side publishes to, and its quorum queue: a
    /// peer framework's side reuses them.
    #[cfg(feature = "peers")]
    pub(crate) fn names(&self) -> (&str, &str) {
        (&self.exchange, &self.queue)
    }

    pub(crate) async fn new(url: &str, name: &str) -> BenchResult<Self> {
        Self::declare(url, name, None).await
    }

    /// A raw side whose queue retries failures after 1 s by `design`.
    pub(crate) async fn with_retry(
        url: &str,
        name: &str,
        design: RetryDesign,
    ) -> BenchResult<Self> {
        Self::declare(url, name, Some(design)).await
    }

    async fn declare(url: &str, name: &str, design: Option<RetryDesign>) -> BenchResult<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let exchange = format!("{name}.events");
        let queue = format!("{name}.q");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let wait = format!("{name}.wait.1000ms");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let args = match design {
            Some(RetryDesign::RejectToWaitQueue) => quorum_dead_lettering_to(&wait),
            _ => {
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                args
            }
        };
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await?;
        if design.is_some() {
            let mut args = quorum_dead_lettering_to(&queue);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1000));
            channel
                .queue_declare(wait.as_str().into(), durable, args)
                .await?;
        }
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "user.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(RawRabbit {
            connection,
            channel,
            exchange,
            queue,
            retry: design.map(|design| (wait, design)),
        })
    }

    /// Consumes `count` messages of which those of every `fail_every`-th
    /// user fail their first attempt and are retried after 1 s by the
    /// side's retry design; returns how long the healthy ones took, as
    /// ticketrail's `consume_healthy` does.
    pub(crate) async fn consume_healthy(
        &self,
        count: usize,
        prefetch: u16,
        fail_every: usize,
    ) -> BenchResult<Duration> {
        let (wait, design) = self.retry.clone().ok_or("a side without a retry queue")?;
        let healthy_total = count - count.div_ceil(fail_every);
        let (channel, mut consumer) = self.consumer(prefetch).await?;
        let mut copies = tokio::task::JoinSet::new();
        let started = Instant::now();
        let mut healthy = 0;
        let mut took = None;
        let mut retried_back = 0;
        while healthy < healthy_total || retried_back < count - healthy_total {
            let delivery = consumer.next().await.ok_or("consumer ended")??;
            let email: EmailMessage = serde_json::from_slice(&delivery.data)?;
            let number: usize = email.user_id.trim_start_matches("user-").parse()?;
            let headers = delivery.properties.headers().as_ref();
            let retried = headers.is_some_and(|h| {
                h.inner().contains_key(RETRIED) || h.inner().contains_key("x-death")
            });
            if number.is_multiple_of(fail_every) && !retried {
                match design {
                    RetryDesign::CopyThenAck => {
                        let mut headers = FieldTable::default();
                        headers.insert(RETRIED.into(), AMQPValue::Boolean(true));
                        let properties = delivery.properties.clone().with_headers(headers);
                        let confirm = self
                            .channel
                            .basic_publish(
                                "".into(),
                                wait.as_str().into(),
                                BasicPublishOptions::default(),
                                &delivery.data,
                                properties,
                            )
                            .await?;
                        // The ack waits for the copy's confirm, without
                        // holding up the messages behind it.
                        copies.spawn(async move {
                            if !confirm.await?.is_ack() {
                                return Err("a retry copy was not confirmed".into());
                            }
                            delivery.ack(BasicAckOptions::default()).await?;
                            BenchResult::Ok(())
                        });
                    }
                    RetryDesign::RejectToWaitQueue => {
                        delivery
                            .reject(lapin::options::BasicRejectOptions { requeue: false })
                            .await?;
                    }
                }
                continue;
            }
            if number.is_multiple_of(fail_every) {
                retried_back += 1;
            } else {
                healthy += 1;
                if healthy == healthy_total {
                    took = Some(started.elapsed());
                }
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        while let Some(copy) = copies.join_next().await {
            copy??;
        }
        channel.close(200, "done".into()).await?;
        Ok(took.ok_or("not every healthy message came")?)
    }

    fn properties() -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
    }

    async fn publish_one(
        channel: &Channel,
        exchange: &str,
        i: usize,
    ) -> BenchResult<lapin::PublisherConfirm> {
        Ok(channel
            .basic_publish(
                exchange.into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload(i),
                Self::properties(),
            )
            .await?)
    }

    pub(crate) async fn consumer(&self, prefetch: u16) -> BenchResult<(Channel, lapin::Consumer)> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }
}

#[async_trait]
impl Side for RawRabbit {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        // `window` publishes in flight, each awaiting its write and then its
        // confirm. Awaiting each `basic_publish` in turn instead (it
        // resolves once lapin's I/O loop has written the frames) holds a
        // publisher to one I/O round per message: RustStream, publishing
        // concurrently, was faster than that loop.
        let (channel, exchange) = (&self.channel, self.exchange.as_str());
        publish_windowed(count, window, |i| async move {
            if Self::publish_one(channel, exchange, i)
                .await?
                .await?
                .is_ack()
            {
                BenchResult::Ok(())
            } else {
                Err("a publish was not confirmed".into())
            }
        })
        .await
    }

    async fn consume(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        let mut opened = Vec::with_capacity(consumers);
        for _ in 0..consumers.max(1) {
            opened.push(self.consumer(prefetch).await?);
        }
        // The fastest idiomatic AMQP: one ack with `multiple` for every half
        // prefetch window, not one awaited ack per message. Competing
        // consumers each have a channel and a task; the last message handled
        // stops them all, and each acks what it holds.
        let every = usize::from(prefetch / 2).max(1);
        let handled = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (channel, mut consumer) in opened {
            let (handled, stop, mut stopped) = (handled.clone(), stop.clone(), stopped.clone());
            tasks.spawn(async move {
                let mut unacked = None;
                let mut since_ack = 0;
                loop {
                    let delivery = tokio::select! {
                        delivery = consumer.next() => delivery.ok_or("consumer ended")??,
                        _ = stopped.changed() => break,
                    };
                    let email: EmailMessage = serde_json::from_slice(&delivery.data)?;
                    std::hint::black_box(email);
                    since_ack += 1;
                    let n = handled.fetch_add(1, Ordering::Relaxed) + 1;
                    if since_ack == every || n >= count {
                        delivery.ack(BasicAckOptions { multiple: true }).await?;
                        since_ack = 0;
                        unacked = None;
                    } else {
                        unacked = Some(delivery);
                    }
                    if n >= count {
                        let _ = stop.send(true);
                        break;
                    }
                }
                if let Some(delivery) = unacked {
                    delivery.ack(BasicAckOptions { multiple: true }).await?;
                }
                BenchResult::Ok(channel)
            });
        }
        let mut channels = Vec::new();
        while let Some(done) = tasks.join_next().await {
            channels.push(done??);
        }
        let took = started.elapsed();
        for channel in channels {
            channel.close(200, "done".into()).await?;
        }
        Ok(took)
    }

    async fn latency(&self, count: usize, per_second: u32, prefetch: u16) -> BenchResult<Vec<f64>> {
        let (channel, mut consumer) = self.consumer(prefetch).await?;
        let samples = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let receive = {
            let samples = samples.clone();
            async move {
                for _ in 0..count {
                    let delivery = consumer.next().await.ok_or("consumer ended")??;
                    let email: EmailMessage = serde_json::from_slice(&delivery.data)?;
                    delivery.ack(BasicAckOptions::default()).await?;
                    let micros = (now_ns().saturating_sub(email.sent_at_ns)) as f64 / 1000.0;
                    samples.lock().expect("not poisoned").push(micros);
                }
                BenchResult::Ok(())
            }
        };
        let publisher = self.channel.clone();
        let exchange = self.exchange.clone();
        let send = at_rate(count, per_second, move |i| {
            let (publisher, exchange) = (publisher.clone(), exchange.clone());
            async move {
                if let Ok(confirm) = Self::publish_one(&publisher, &exchange, i).await {
                    let _ = confirm.await;
                }
            }
        });
        let (received, ()) = tokio::join!(receive, send);
        received?;
        channel.close(200, "done".into()).await?;
        let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
        Ok(samples)
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        if let Some((wait, _)) = &self.retry {
            self.channel
                .queue_delete(wait.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}
