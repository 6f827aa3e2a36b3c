//! One side of a comparison: the raw client, or ticketrail on the same broker.

use std::time::Duration;

use async_trait::async_trait;

/// A failure of the benchmark itself.
pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The workloads each side runs, against a queue of its own.
#[async_trait]
pub(crate) trait Side: Send + Sync {
    /// Publishes `count` messages, `window` unconfirmed at most, and returns
    /// how long it took until the last confirm.
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration>;

    /// Consumes `count` messages already waiting in the queue (decode,
    /// handle, ack) with `consumers` competing consumers of `prefetch` each,
    /// and returns how long it took.
    async fn consume(&self, count: usize, prefetch: u16, consumers: usize)
        -> BenchResult<Duration>;

    /// Publishes `count` messages at `per_second` while consuming them, and
    /// returns each message's publish-to-handler latency in microseconds.
    async fn latency(&self, count: usize, per_second: u32, prefetch: u16) -> BenchResult<Vec<f64>>;

    /// Deletes the side's queue and topic space.
    async fn teardown(&self) -> BenchResult<()>;
}

/// Spreads `count` sends over time at `per_second`, calling `send(i)` on
/// its own task for each so a slow confirm never lowers the rate.
pub(crate) async fn at_rate<F, Fut>(count: usize, per_second: u32, send: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::with_capacity(count);
    for i in 0..count {
        ticks.tick().await;
        sends.push(tokio::spawn(send(i)));
    }
    for send in sends {
        let _ = send.await;
    }
}

/// Publishes `count` messages with `window` of them in flight at once, each
/// a future of `publish(i)` awaiting its write and its confirmation, and
/// returns how long it took until the last was confirmed.
pub(crate) async fn publish_windowed<F, Fut, E>(
    count: usize,
    window: usize,
    publish: F,
) -> BenchResult<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures::StreamExt;
    let started = std::time::Instant::now();
    let mut sends = futures::stream::iter(0..count)
        .map(publish)
        .buffer_unordered(window.max(1));
    while let Some(sent) = sends.next().await {
        sent.map_err(Into::into)?;
    }
    Ok(started.elapsed())
}
