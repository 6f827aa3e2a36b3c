//! The raw baseline for NATS: hand-written async-nats JetStream with
//! pipelined publish acks and a durable pull consumer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt;

use crate::side::{at_rate, BenchResult, Side};
use crate::workload::{now_ns, payload, EmailMessage, ROUTING_KEY};

pub(crate) struct RawNats {
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// Whether each message carries the metadata ticketrail's do (a message
    /// id and a content type, as two headers), for a second baseline that
    /// separates the cost of a header block from the framework's own.
    with_headers: bool,
}

/// The metadata of message `i` as a raw client would add it: the same two
/// headers, of the same size, as ticketrail's.
fn headers(i: usize) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Ticketrail-Id",
        format!("00000000-0000-4000-8000-{i:012}").as_str(),
    );
    headers.insert("Content-Type", "application/json");
    headers
}

impl RawNats {
    /// A raw side of its own stream `name`; with `with_headers`, its
    /// messages carry an id and a content type in two headers.
    pub(crate) async fn new(url: &str, name: &str, with_headers: bool) -> BenchResult<Self> {
        let client = async_nats::connect(url).await?;
        let js = jetstream::new(client);
        let stream = name.replace('.', "_");
        let space = format!("{name}.events");
        js.create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{space}.user"), format!("{space}.user.>")],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        js.get_stream(&stream)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some("raw".to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await?;
        Ok(RawNats {
            js,
            stream,
            subject: format!("{space}.{ROUTING_KEY}"),
            with_headers,
        })
    }

    async fn messages(&self, prefetch: u16) -> BenchResult<pull::Stream> {
        let consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_stream(&self.stream)
            .await?
            .get_consumer("raw")
            .await?;
        Ok(consumer
            .stream()
            .max_messages_per_batch(usize::from(prefetch))
            .messages()
            .await?)
    }
}

#[async_trait]
impl Side for RawNats {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        let started = Instant::now();
        // Acks come back in order: a queue of them is the window.
        let mut in_flight = std::collections::VecDeque::with_capacity(window);
        for i in 0..count {
            if in_flight.len() >= window {
                let ack: jetstream::context::PublishAckFuture =
                    in_flight.pop_front().expect("not empty");
                ack.await?;
            }
            let subject = self.subject.clone();
            let ack = if self.with_headers {
                self.js
                    .publish_with_headers(subject, headers(i), payload(i).into())
                    .await?
            } else {
                self.js.publish(subject, payload(i).into()).await?
            };
            in_flight.push_back(ack);
        }
        while let Some(ack) = in_flight.pop_front() {
            ack.await?;
        }
        Ok(started.elapsed())
    }

    async fn consume(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        let mut streams = Vec::with_capacity(consumers);
        for _ in 0..consumers.max(1) {
            streams.push(self.messages(prefetch).await?);
        }
        // Competing pull loops of the one durable consumer, each a task; the
        // last message handled stops them all.
        let handled = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut messages in streams {
            let (handled, stop, mut stopped) = (handled.clone(), stop.clone(), stopped.clone());
            tasks.spawn(async move {
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message.ok_or("consumer ended")??,
                        _ = stopped.changed() => break,
                    };
                    let email: EmailMessage = serde_json::from_slice(&message.payload)?;
                    std::hint::black_box(email);
                    message.ack().await?;
                    if handled.fetch_add(1, Ordering::Relaxed) + 1 >= count {
                        let _ = stop.send(true);
                        break;
                    }
                }
                BenchResult::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(started.elapsed())
    }

    async fn latency(&self, count: usize, per_second: u32, prefetch: u16) -> BenchResult<Vec<f64>> {
        let mut messages = self.messages(prefetch).await?;
        let samples = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let receive = {
            let samples = samples.clone();
            async move {
                for _ in 0..count {
                    let message = messages.next().await.ok_or("consumer ended")??;
                    let email: EmailMessage = serde_json::from_slice(&message.payload)?;
                    message.ack().await?;
                    let micros = (now_ns().saturating_sub(email.sent_at_ns)) as f64 / 1000.0;
                    samples.lock().expect("not poisoned").push(micros);
                }
                BenchResult::Ok(())
            }
        };
        let js = self.js.clone();
        let subject = self.subject.clone();
        let send = at_rate(count, per_second, move |i| {
            let (js, subject) = (js.clone(), subject.clone());
            async move {
                if let Ok(ack) = js.publish(subject, payload(i).into()).await {
                    let _ = ack.await;
                }
            }
        });
        let (received, ()) = tokio::join!(receive, send);
        received?;
        let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
        Ok(samples)
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.js.delete_stream(&self.stream).await?;
        Ok(())
    }
}
