//! ticketrail's side: its publisher and its consumer loop with a typed JSON
//! handler, the same code on every broker.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ticketrail::{
    handler_fn, Confirmation, Consumer, Context, Fixed, Handler, HandlerError, Publisher,
    QueueSpec, SharedBroker, Topology,
};
use tokio::sync::Notify;

use crate::side::{at_rate, BenchResult, Side};
use crate::workload::{email, now_ns, EmailMessage, ROUTING_KEY};

pub(crate) struct Framework {
    broker: SharedBroker,
    topology: Topology,
    queue: String,
    publisher: Publisher,
}

impl Framework {
    pub(crate) async fn new(broker: SharedBroker, name: &str) -> BenchResult<Self> {
        let queue = format!("{name}.q");
        let topology =
            Topology::new(format!("{name}.events")).queue(QueueSpec::new(&queue).bind("user.#"));
        broker.declare(&topology).await?;
        let publisher = Publisher::new(broker.clone(), topology.topic_space.clone());
        Ok(Framework {
            broker,
            topology,
            queue,
            publisher,
        })
    }

    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// Handles `count` messages with `consumers` consumers of `prefetch`
    /// each; a message whose user number is a multiple of `fail_every` fails
    /// its first attempt and is retried after 1 s. Returns how long the
    /// healthy ones took.
    pub(crate) async fn consume_healthy(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
        fail_every: Option<usize>,
    ) -> BenchResult<Duration> {
        self.consume_counting(count, prefetch, consumers, fail_every, None)
            .await
    }

    /// Handles `count` messages with one consumer of `prefetch`, those of
    /// every `fail_every`-th user failing their first attempt and retried
    /// after `retry_after`. Returns how long until every message was
    /// handled, the retried ones too: what retries cost while they keep
    /// coming back, where [`Framework::consume_healthy`] stops before they
    /// do.
    pub(crate) async fn consume_all_retrying(
        &self,
        count: usize,
        prefetch: u16,
        fail_every: usize,
        retry_after: Duration,
    ) -> BenchResult<Duration> {
        self.consume_counting(count, prefetch, 1, Some(fail_every), Some(retry_after))
            .await
    }

    /// With `retry_after`, retried messages count once handled and the
    /// retry waits that long; without, only the healthy ones count and a
    /// retry waits 1 s.
    async fn consume_counting(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
        fail_every: Option<usize>,
        retry_after: Option<Duration>,
    ) -> BenchResult<Duration> {
        let healthy_total = match (fail_every, retry_after) {
            (Some(every), None) => count - count.div_ceil(every),
            _ => count,
        };
        let handler = Arc::new(Counting {
            fail_every,
            count_retried: retry_after.is_some(),
            healthy_total,
            healthy: AtomicUsize::new(0),
            done: Notify::new(),
        });
        let started = Instant::now();
        let mut running = Vec::with_capacity(consumers);
        for _ in 0..consumers.max(1) {
            running.push(
                Consumer::new(self.broker.clone(), self.queue.clone(), handler.clone())
                    .retry_policy(Fixed::new(
                        retry_after.unwrap_or(Duration::from_secs(1)),
                        3,
                    )?)
                    .prefetch(prefetch)
                    .spawn(),
            );
        }
        handler.done.notified().await;
        let handled = started.elapsed();
        if fail_every.is_some() && retry_after.is_none() {
            // Let the flaky ones come back and finish, so the queue is empty.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let stopping = Instant::now();
        for consumer in running {
            consumer.shutdown().await?;
        }
        // On memory the clock counts the consumers' shutdown too, as
        // RustStream's does there (`peers::ruststream::ClockStops`); the
        // wait for the flaky ones above is not counted.
        if self.broker.backend() == "memory" {
            return Ok(handled + stopping.elapsed());
        }
        Ok(handled)
    }
}

/// The benchmark's handler, written as an application would write a handler
/// with state: it counts the healthy messages and says when all are in. With
/// `fail_every`, the messages of every `fail_every`-th user fail their first
/// attempt; with `count_retried`, they count once their retry succeeds.
struct Counting {
    fail_every: Option<usize>,
    count_retried: bool,
    healthy_total: usize,
    healthy: AtomicUsize,
    done: Notify,
}

impl Handler for Counting {
    type Message = EmailMessage;

    async fn handle(&self, email: EmailMessage, ctx: &Context) -> Result<(), HandlerError> {
        if let Some(every) = self.fail_every {
            let number: usize = email
                .user_id
                .trim_start_matches("user-")
                .parse()
                .unwrap_or(1);
            if number.is_multiple_of(every) {
                if ctx.attempt() == 1 {
                    return Err(HandlerError::retryable("flaky on its first attempt"));
                }
                if !self.count_retried {
                    return Ok(());
                }
            }
        }
        if self.healthy.fetch_add(1, Ordering::Relaxed) + 1 == self.healthy_total {
            self.done.notify_one();
        }
        Ok(())
    }
}

#[async_trait]
impl Side for Framework {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        let started = Instant::now();
        if window <= 1 {
            for i in 0..count {
                self.publisher.publish(ROUTING_KEY, &email(i)).await?;
            }
            return Ok(started.elapsed());
        }
        // A queue of confirmations is the window; the oldest is awaited
        // first, as on the raw side.
        let mut in_flight = VecDeque::with_capacity(window);
        for i in 0..count {
            if in_flight.len() >= window {
                let oldest: Confirmation = in_flight.pop_front().expect("not empty");
                oldest.await?;
            }
            in_flight.push_back(self.publisher.send(ROUTING_KEY, &email(i)).await?);
        }
        for confirmation in in_flight {
            confirmation.await?;
        }
        Ok(started.elapsed())
    }

    async fn consume(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        self.consume_healthy(count, prefetch, consumers, None).await
    }

    async fn latency(&self, count: usize, per_second: u32, prefetch: u16) -> BenchResult<Vec<f64>> {
        let samples = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let done = Arc::new(Notify::new());
        let handler = {
            let (samples, done) = (samples.clone(), done.clone());
            handler_fn(move |email: EmailMessage, _ctx: Context| {
                let (samples, done) = (samples.clone(), done.clone());
                async move {
                    let micros = (now_ns().saturating_sub(email.sent_at_ns)) as f64 / 1000.0;
                    let mut samples = samples.lock().expect("not poisoned");
                    samples.push(micros);
                    if samples.len() == count {
                        done.notify_one();
                    }
                    Ok(())
                }
            })
        };
        let consumer = Consumer::new(self.broker.clone(), self.queue.clone(), handler)
            .prefetch(prefetch)
            .spawn();
        let publisher = self.publisher.clone();
        at_rate(count, per_second, move |i| {
            let publisher = publisher.clone();
            async move {
                let _ = publisher.publish(ROUTING_KEY, &email(i)).await;
            }
        })
        .await;
        done.notified().await;
        consumer.shutdown().await?;
        let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
        Ok(samples)
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.broker.delete(&self.topology).await?;
        self.broker.close().await?;
        Ok(())
    }
}
