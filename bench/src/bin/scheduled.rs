//! Publishing for later at scale: N messages (default 100,000) due evenly
//! over the next S seconds (default 600), against N plain publishes in the
//! same run. Prints both publish rates, what the broker holds once they
//! are published (its count, and the broker process's memory where it runs
//! on this machine, which holds the plain ones too), and how they fire:
//! lost, early, and the lateness distribution.
//!
//! `cargo run --release -p ticketrail-bench --bin scheduled -- [memory|rabbitmq|nats] [N] [SECONDS]`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{FuturesUnordered, StreamExt};
use ticketrail::{handler_fn, Consumer, Context, Message, Publisher, QueueSpec, Topology};

#[path = "shared/args.rs"]
mod args;
#[path = "shared/process.rs"]
mod process;

use args::{Args, BenchResult};
use process::usage;

/// Confirmations awaited at once, as in the main bench.
const WINDOW: usize = 256;

#[tokio::main]
async fn main() -> BenchResult<()> {
    let mut args = Args::new();
    let (name, url) = args.broker()?;
    let n: usize = args.number(100_000)?;
    let seconds: u64 = args.number(600)?;
    let broker = ticketrail::connect(&url).await?;
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("bench-later-{unique}.events");
    let topology = Topology::new(&space)
        .queue(QueueSpec::new(format!("bench-later-{unique}.now")).bind("now"))
        .queue(QueueSpec::new(format!("bench-later-{unique}.later")).bind("later"));
    broker.declare(&topology).await?;
    let publisher = Publisher::new(Arc::clone(&broker), &space);
    let rss_before = usage(&url).map(|(rss, _)| rss);

    // Plain publishes first, to a queue of their own.
    let started = Instant::now();
    publish_all(&publisher, n, |_| None, "now").await?;
    let plain_rate = n as f64 / started.elapsed().as_secs_f64();

    let arrived: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let seen = Arc::clone(&arrived);
    let consumer = Consumer::new(
        Arc::clone(&broker),
        format!("bench-later-{unique}.later"),
        handler_fn(move |_i: usize, ctx: Context| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock()
                    .expect("not poisoned")
                    .entry(ctx.id().to_owned())
                    .or_insert_with(SystemTime::now);
                Ok(())
            }
        }),
    )
    .prefetch(100)
    .spawn();
    // Running while they are published: the first are due before the last
    // is published.
    let base = SystemTime::now() + Duration::from_secs(5);
    let spread = Duration::from_secs(seconds);
    let due_at = move |i: usize| base + spread.mul_f64(i as f64 / n as f64);
    let started = Instant::now();
    let due = publish_all(&publisher, n, |i| Some(due_at(i)), "later").await?;
    let later_rate = n as f64 / started.elapsed().as_secs_f64();
    let held = broker.scheduled(&space).await?.map(|s| s.held);
    let rss_after = usage(&url).map(|(rss, _)| rss);
    println!(
        "scheduled {name}: published {n} now at {plain_rate:.0}/s, {n} for later at \
         {later_rate:.0}/s ({:.2} of plain); held {held:?}; broker RSS {} -> {} MiB",
        later_rate / plain_rate,
        rss_before.map_or("?".to_owned(), |m| m.to_string()),
        rss_after.map_or("?".to_owned(), |m| m.to_string()),
    );

    let deadline = due_at(n) + Duration::from_secs(120);
    while arrived.lock().expect("not poisoned").len() < n && SystemTime::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    consumer.shutdown().await?;
    let arrived = arrived.lock().expect("not poisoned").clone();
    let (mut late, mut early) = (Vec::new(), 0);
    for (id, at) in &due {
        match arrived.get(id).map(|got| got.duration_since(*at)) {
            Some(Ok(by)) => late.push(by),
            Some(Err(_)) => early += 1,
            None => {}
        }
    }
    late.sort();
    let pick = |q: f64| late.get(((late.len() as f64 - 1.0) * q) as usize).copied();
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| d.as_millis().to_string());
    println!(
        "scheduled {name}: {n} due over {seconds} s: lost {}, early {early}, late p50 {} ms, \
         p99 {} ms, p99.9 {} ms, max {} ms",
        n - arrived.len().min(n),
        ms(pick(0.5)),
        ms(pick(0.99)),
        ms(pick(0.999)),
        ms(late.last().copied()),
    );
    broker.delete(&topology).await?;
    broker.close().await?;
    Ok(())
}

/// Publishes `n` messages to `key`, each for later when `at` says so,
/// with [`WINDOW`] confirmations in flight; the due time of each by id.
async fn publish_all(
    publisher: &Publisher,
    n: usize,
    at: impl Fn(usize) -> Option<SystemTime>,
    key: &str,
) -> BenchResult<HashMap<String, SystemTime>> {
    let mut due = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..n {
        let message = Message::new(key, i.to_string()).content_type("application/json");
        let confirmation = match at(i) {
            Some(time) => {
                due.insert(message.id.clone(), time);
                publisher.send_message_at(message, time).await?
            }
            None => publisher.send_message(message).await?,
        };
        in_flight.push(confirmation);
        if in_flight.len() >= WINDOW {
            in_flight.next().await.transpose()?;
        }
    }
    while in_flight.next().await.transpose()?.is_some() {}
    Ok(due)
}
