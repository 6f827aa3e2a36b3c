//! omniqueue 0.3: its producer and consumer, as its documentation shows
//! them, on its in-memory backend and on RabbitMQ (through lapin 2).
//!
//! Its RabbitMQ producer never selects confirm mode and drops lapin's
//! confirm: a publish is done once written, at most once. Its publish
//! figure is therefore not the confirmed publish the other sides measure,
//! and says so in its baseline's name.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use omniqueue::backends::rabbitmq::{
    BasicConsumeOptions, BasicProperties, BasicPublishOptions, ConnectionProperties, FieldTable,
};
use omniqueue::backends::{
    InMemoryBackend, InMemoryConsumer, InMemoryProducer, RabbitMqBackend, RabbitMqConfig,
    RabbitMqProducer,
};
use tokio::sync::Mutex;

use crate::raw_rabbitmq::RawRabbit;
use crate::side::{publish_windowed, BenchResult, Side};
use crate::workload::{email, EmailMessage, ROUTING_KEY};

/// Receives, decodes and acks `count` messages, one at a time as its
/// consumer hands them out.
macro_rules! drain {
    ($consumer:expr, $count:expr) => {{
        let started = Instant::now();
        for _ in 0..$count {
            let delivery = $consumer.receive().await?;
            let email: EmailMessage = delivery
                .payload_serde_json()?
                .ok_or("a delivery without a payload")?;
            std::hint::black_box(email);
            delivery.ack().await.map_err(|(e, _)| e)?;
        }
        Ok(started.elapsed())
    }};
}

/// omniqueue's in-memory backend (an unbounded tokio channel).
pub(crate) struct OmniqueueMemory {
    producer: InMemoryProducer,
    consumer: Mutex<InMemoryConsumer>,
}

impl OmniqueueMemory {
    pub(crate) async fn new() -> BenchResult<Self> {
        let (producer, consumer) = InMemoryBackend::builder().build_pair().await?;
        Ok(OmniqueueMemory {
            producer,
            consumer: Mutex::new(consumer),
        })
    }
}

#[async_trait]
impl Side for OmniqueueMemory {
    async fn publish(&self, count: usize, _window: usize) -> BenchResult<Duration> {
        let started = Instant::now();
        for i in 0..count {
            self.producer.send_serde_json(&email(i)).await?;
        }
        Ok(started.elapsed())
    }

    async fn consume(
        &self,
        count: usize,
        _prefetch: u16,
        _consumers: usize,
    ) -> BenchResult<Duration> {
        let mut consumer = self.consumer.lock().await;
        drain!(consumer, count)
    }

    async fn latency(&self, _: usize, _: u32, _: u16) -> BenchResult<Vec<f64>> {
        Err("not measured for peers".into())
    }

    async fn teardown(&self) -> BenchResult<()> {
        Ok(())
    }
}

/// omniqueue on RabbitMQ, on a quorum queue bound to a topic exchange like
/// the other sides'.
pub(crate) struct OmniqueueRabbit {
    config: RabbitMqConfig,
    topology: RawRabbit,
    producer: RabbitMqProducer,
}

impl OmniqueueRabbit {
    pub(crate) async fn new(url: &str, name: &str) -> BenchResult<Self> {
        let topology = RawRabbit::new(url, name).await?;
        let (exchange, queue) = topology.names();
        let config = RabbitMqConfig {
            uri: url.to_owned(),
            connection_properties: ConnectionProperties::default(),
            publish_exchange: exchange.to_owned(),
            publish_routing_key: ROUTING_KEY.to_owned(),
            publish_options: BasicPublishOptions::default(),
            publish_properties: BasicProperties::default().with_delivery_mode(2),
            consume_queue: queue.to_owned(),
            consumer_tag: String::new(),
            consume_options: BasicConsumeOptions::default(),
            consume_arguments: FieldTable::default(),
            consume_prefetch_count: None,
            requeue_on_nack: true,
        };
        let producer = RabbitMqBackend::builder(config.clone())
            .build_producer()
            .await?;
        Ok(OmniqueueRabbit {
            config,
            topology,
            producer,
        })
    }
}

#[async_trait]
impl Side for OmniqueueRabbit {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        let producer = &self.producer;
        publish_windowed(count, window, |i| async move {
            producer.send_serde_json(&email(i)).await
        })
        .await
    }

    async fn consume(
        &self,
        count: usize,
        prefetch: u16,
        _consumers: usize,
    ) -> BenchResult<Duration> {
        let mut config = self.config.clone();
        config.consume_prefetch_count = Some(prefetch);
        let started = Instant::now();
        let mut consumer = RabbitMqBackend::builder(config).build_consumer().await?;
        let drained: BenchResult<Duration> = drain!(consumer, count);
        drained?;
        Ok(started.elapsed())
    }

    async fn latency(&self, _: usize, _: u32, _: u16) -> BenchResult<Vec<f64>> {
        Err("not measured for peers".into())
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.topology.teardown().await
    }
}
