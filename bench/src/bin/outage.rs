//! A downstream outage with the circuit breaker on, at issue scale: N
//! messages waiting (default 2,000), the handler failing for every message
//! for D seconds (default 60), then working again. Prints what the outage
//! cost: dead letters, attempts that failed, how long consumption paused,
//! and whether every message was handled.
//!
//! `cargo run -p ticketrail-bench --bin outage -- [memory|rabbitmq|nats] [N] [SECONDS]`

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail::{
    handler_fn, CircuitBreaker, Consumer, Context, Exponential, HandlerError, Publisher, QueueSpec,
    Topology,
};

#[path = "shared/args.rs"]
mod args;

use args::{Args, BenchResult};

#[tokio::main]
async fn main() -> BenchResult<()> {
    let mut args = Args::new();
    let (name, url) = args.broker()?;
    let n: u64 = args.number(2_000)?;
    let seconds: u64 = args.number(60)?;
    let broker = ticketrail::connect(&url).await?;
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("bench-outage-{unique}.events");
    let queue = format!("bench-outage-{unique}.q");
    let topology = Topology::new(&space).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await?;

    let publisher = Publisher::new(Arc::clone(&broker), &space);
    let mut ids = HashSet::new();
    for i in 0..n {
        ids.insert(publisher.publish("job", &i).await?);
    }
    let down = Arc::new(AtomicBool::new(true));
    let failed = Arc::new(AtomicU64::new(0));
    let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (is_down, failures, seen) = (Arc::clone(&down), Arc::clone(&failed), Arc::clone(&handled));
    let consumer = Consumer::new(
        Arc::clone(&broker),
        queue.clone(),
        handler_fn(move |_n: u64, ctx: Context| {
            let (is_down, failures, seen) = (
                Arc::clone(&is_down),
                Arc::clone(&failures),
                Arc::clone(&seen),
            );
            async move {
                if is_down.load(Ordering::SeqCst) {
                    failures.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::retryable("the mail provider is down"));
                }
                seen.lock()
                    .expect("not poisoned")
                    .insert(ctx.id().to_owned());
                Ok(())
            }
        }),
    )
    // The seed's policy: 1 s, 2 s, 4 s, then the DLQ.
    .retry_policy(Exponential::default())
    .circuit_breaker(CircuitBreaker::default())
    .prefetch(10)
    .spawn();

    let started = Instant::now();
    let mut paused = Duration::ZERO;
    let mut last = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if consumer.health().paused.is_some() {
            paused += last.elapsed();
        }
        last = Instant::now();
    }
    down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.lock().expect("not poisoned").len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if consumer.health().paused.is_some() {
            paused += last.elapsed();
        }
        last = Instant::now();
    }
    let health = consumer.health();
    consumer.shutdown().await?;
    let dead = broker.dead_letters(&queue, usize::MAX).await?.len();
    let handled = handled.lock().expect("not poisoned").len();
    broker.delete(&topology).await?;
    broker.close().await?;
    println!(
        "outage {name}: {n} messages, {seconds} s outage, breaker on: dead-lettered {dead}, \
         lost {}, attempts failed {} (consumer counted {} retries), paused {:.1} s, all handled \
         {:.1} s after the outage began",
        ids.len() - handled - dead,
        failed.load(Ordering::SeqCst),
        health.retried,
        paused.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
