//! The raw baseline for RabbitMQ: hand-written lapin with publisher confirms,
//! a window of publishes in flight, and a quorum queue like ticketrail's.

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

use crate::side::{at_rate, BenchResult, Side};
use crate::workload::{now_ns, payload, EmailMessage, ROUTING_KEY};

pub(crate) struct RawRabbit {
    connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
}

impl RawRabbit {
    pub(crate) async fn new(url: &str, name: &str) -> BenchResult<Self> {
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
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
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
        })
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
        let started = Instant::now();
        // Confirms come back in order: a queue of them is the window.
        let mut in_flight = std::collections::VecDeque::with_capacity(window);
        for i in 0..count {
            if in_flight.len() >= window {
                let oldest: lapin::PublisherConfirm = in_flight.pop_front().expect("not empty");
                if !oldest.await?.is_ack() {
                    return Err("a publish was not confirmed".into());
                }
            }
            in_flight.push_back(Self::publish_one(&self.channel, &self.exchange, i).await?);
        }
        for confirm in in_flight {
            if !confirm.await?.is_ack() {
                return Err("a publish was not confirmed".into());
            }
        }
        Ok(started.elapsed())
    }

    async fn consume(&self, count: usize, prefetch: u16) -> BenchResult<Duration> {
        let (channel, mut consumer) = self.consumer(prefetch).await?;
        // The fastest idiomatic AMQP: one ack with `multiple` for every half
        // prefetch window, not one awaited ack per message.
        let every = usize::from(prefetch / 2).max(1);
        let started = Instant::now();
        for i in 1..=count {
            let delivery = consumer.next().await.ok_or("consumer ended")??;
            let email: EmailMessage = serde_json::from_slice(&delivery.data)?;
            std::hint::black_box(email);
            if i % every == 0 || i == count {
                delivery.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        let took = started.elapsed();
        channel.close(200, "done".into()).await?;
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
