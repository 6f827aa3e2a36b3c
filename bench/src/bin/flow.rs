//! What flow control costs when nothing trips it: a consumer with a
//! timeout layer, a shared concurrency limit and a circuit breaker, against
//! the same consumer without them, in alternating rounds on one broker.
//!
//! `cargo run --release -p ticketrail-bench --bin flow -- [memory|rabbitmq|nats] [N] [ROUNDS]`
//! (default memory, 200,000 messages, 5 rounds a side). `FLOW=timeout`,
//! `limit` or `breaker` measures one of them alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ticketrail::layers::{ConcurrencyLimitLayer, TimeoutLayer};
use ticketrail::{
    handler_fn, CircuitBreaker, Confirmation, Consumer, Context, HandlerError, Publisher,
    QueueSpec, SharedBroker, Topology,
};

#[path = "shared/args.rs"]
mod args;

use args::{Args, BenchResult};

#[tokio::main]
async fn main() -> BenchResult<()> {
    let mut args = Args::new();
    let (name, url) = args.broker()?;
    let n: u64 = args.number(200_000)?;
    let rounds: usize = args.number(5)?;
    let broker = ticketrail::connect(&url).await?;
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("bench-flow-{unique}.events");
    let queue = format!("bench-flow-{unique}.q");
    let topology = Topology::new(&space).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await?;
    let outcome = compare(&broker, &space, &queue, n, rounds).await;
    broker.delete(&topology).await?;
    broker.close().await?;
    let (plain, layered) = outcome?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, layered) = (median(plain), median(layered));
    println!("flow {name}: {n} messages a round, medians of {rounds} alternating rounds");
    println!("  plain consumer                          {plain:>10.0}/s");
    println!(
        "  with timeout, shared limit and breaker  {layered:>10.0}/s   {:.3} of plain",
        layered / plain
    );
    Ok(())
}

async fn compare(
    broker: &SharedBroker,
    space: &str,
    queue: &str,
    n: u64,
    rounds: usize,
) -> BenchResult<(Vec<f64>, Vec<f64>)> {
    let (mut plain, mut layered) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for with_layers in [false, true] {
            fill(broker, space, n).await?;
            let rate = drain(broker, queue, n, with_layers).await?;
            if with_layers {
                layered.push(rate);
            } else {
                plain.push(rate);
            }
        }
    }
    Ok((plain, layered))
}

async fn fill(broker: &SharedBroker, space: &str, n: u64) -> BenchResult<()> {
    let publisher = Publisher::new(Arc::clone(broker), space);
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        if window.len() == 256 {
            let oldest: Confirmation = window.pop_front().expect("full");
            oldest.await?;
        }
        window.push_back(publisher.send("job", &i).await?);
    }
    for confirmation in window {
        confirmation.await?;
    }
    Ok(())
}

/// Drains `n` messages; handled per second.
async fn drain(broker: &SharedBroker, queue: &str, n: u64, layers: bool) -> BenchResult<f64> {
    let handler = handler_fn(|_n: u64, _ctx: Context| async { Ok::<(), HandlerError>(()) });
    let consumer = Consumer::new(Arc::clone(broker), queue, handler).prefetch(100);
    let started = Instant::now();
    // FLOW=timeout,limit,breaker (the default: all three) picks which.
    let picked = std::env::var("FLOW").unwrap_or_else(|_| "timeout,limit,breaker".to_owned());
    let has = |what: &str| layers && picked.split(',').any(|p| p == what);
    let running = match (has("timeout"), has("limit"), has("breaker")) {
        (true, true, true) => consumer
            .layer(TimeoutLayer::new(Duration::from_secs(30)))
            .layer(ConcurrencyLimitLayer::new(1000))
            .circuit_breaker(CircuitBreaker::default())
            .spawn(),
        (true, _, _) => consumer
            .layer(TimeoutLayer::new(Duration::from_secs(30)))
            .spawn(),
        (_, true, _) => consumer.layer(ConcurrencyLimitLayer::new(1000)).spawn(),
        (_, _, true) => consumer.circuit_breaker(CircuitBreaker::default()).spawn(),
        _ => consumer.spawn(),
    };
    while running.health().handled < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    running.shutdown().await?;
    Ok(n as f64 / took.as_secs_f64())
}
