//! Topology operations at scale, and what an idle queue costs: declares
//! one topic space with N work queues (default 1,000), then times `stats`
//! of every queue, `check` (inspect), deleting one queue and deleting the
//! rest, and reports the broker process's memory before, after declaring
//! and after deleting (where the broker runs on this machine). With
//! RETRIES above 0 (default 3), every queue first gets one message, which
//! its consumer, one per queue in this process, fails RETRIES times with
//! delays of 1 s, 2 s, 4 s, ... before it succeeds: the queues then have
//! those wait tiers too, and the program reports this process's
//! connections to the broker while the consumers run. With MESSAGES above
//! 0 (default 0), it first measures one queue's throughput among its
//! neighbours: MESSAGES for the first queue and as many spread over the
//! others, then the first queue drained by one consumer.
//!
//! `cargo run --release -p ticketrail-bench --bin queues -- [memory|rabbitmq|nats] [N] [RETRIES] [MESSAGES]`

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail::{
    handler_fn, Consumer, Context, Exponential, HandlerError, Message, Publisher, QueueSpec,
    SharedBroker, Topology,
};

#[path = "shared/args.rs"]
mod args;
#[path = "shared/process.rs"]
mod process;

use args::{Args, BenchResult};
use process::usage;

#[tokio::main]
async fn main() -> BenchResult<()> {
    let mut args = Args::new();
    let (name, url) = args.broker()?;
    let n: usize = args.number(1_000)?;
    let retries: u32 = args.number(3)?;
    let messages: usize = args.number(0)?;
    let broker = ticketrail::connect(&url).await?;
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("bench-queues-{unique}.events");
    let mut topology = Topology::new(&space);
    for i in 0..n {
        let queue = QueueSpec::new(format!("bench-queues-{unique}.q{i:04}"));
        topology = topology.queue(queue.bind(format!("q{i}.#")));
    }
    let before = usage(&url);

    let measured = measure(&broker, &topology, &url, messages, retries).await;
    if measured.is_err() {
        // Leave nothing behind on a shared broker.
        let _ = broker.delete(&topology).await;
    }
    let m = measured?;
    broker.close().await?;

    println!("{name}: {n} work queues in one topic space, {retries} wait tiers each");
    if let Some((publish, consume)) = m.alone {
        let neighbours = match n - 1 {
            0 => "no neighbours".to_owned(),
            k => format!("{k} neighbours holding {messages} messages between them"),
        };
        println!(
            "  one queue, {neighbours}: published at {publish:.0}/s (all), \
             its {messages} consumed at {consume:.0}/s"
        );
    }
    if let Some((took, connections, duplicates)) = m.retried {
        println!(
            "  {n} consumers retried a message {retries} times each in {:.1} s \
             ({duplicates} duplicates); this process had {} connections to the broker",
            took.as_secs_f64(),
            connections.map_or("?".to_owned(), |c| c.to_string())
        );
    }
    println!("  declare        {:>8.2} s", m.declare.as_secs_f64());
    println!(
        "  stats (each)   {:>8.2} s   ({} ready in all)",
        m.stats.as_secs_f64(),
        m.ready
    );
    println!(
        "  check          {:>8.2} s   ({} findings)",
        m.check.as_secs_f64(),
        m.findings
    );
    println!("  delete one     {:>8.3} s", m.delete_one.as_secs_f64());
    println!("  delete the rest{:>8.2} s", m.delete_all.as_secs_f64());
    for (when, u) in [
        ("before", before),
        ("declared", m.declared),
        ("deleted", m.deleted),
    ] {
        match u {
            Some((rss, fds)) => {
                println!("  broker {when:<9} RSS {rss:>6} MiB, open files {fds:>6}")
            }
            None => println!("  broker {when:<9} (not a process on this machine)"),
        }
    }
    if let (Some((a, _)), Some((b, _))) = (before, m.declared) {
        let per = (b as f64 - a as f64) * 1024.0 / n as f64;
        println!("  per work queue: {per:.0} KiB of broker RSS");
    }
    Ok(())
}

/// What [`measure`] took and saw.
struct Measured {
    declare: Duration,
    alone: Option<(f64, f64)>,
    retried: Option<(Duration, Option<usize>, usize)>,
    declared: Option<(u64, usize)>,
    stats: Duration,
    ready: u64,
    check: Duration,
    findings: usize,
    delete_one: Duration,
    delete_all: Duration,
    deleted: Option<(u64, usize)>,
}

/// Every phase, from declaring the topology to deleting it.
async fn measure(
    broker: &SharedBroker,
    topology: &Topology,
    url: &str,
    messages: usize,
    retries: u32,
) -> BenchResult<Measured> {
    let started = Instant::now();
    broker.declare(topology).await?;
    let declare = started.elapsed();
    let alone = if messages > 0 {
        Some(one_queue(broker, topology, messages).await?)
    } else {
        None
    };
    let retried = if retries > 0 {
        let retried = retry_once_each(broker, topology, retries).await?;
        // The consumers' connections close.
        tokio::time::sleep(Duration::from_secs(3)).await;
        Some(retried)
    } else {
        None
    };
    let declared = usage(url);

    let started = Instant::now();
    let mut ready = 0;
    for spec in &topology.queues {
        ready += broker.queue_stats(&spec.name).await?.ready.unwrap_or(0);
    }
    let stats = started.elapsed();

    let started = Instant::now();
    let findings = broker.inspect(topology).await?;
    let check = started.elapsed();

    let started = Instant::now();
    broker
        .delete(
            &Topology::new(&topology.topic_space).queue(QueueSpec::new(&topology.queues[0].name)),
        )
        .await?;
    let delete_one = started.elapsed();

    let started = Instant::now();
    broker.delete(topology).await?;
    let delete_all = started.elapsed();
    let deleted = usage(url);

    Ok(Measured {
        declare,
        alone,
        retried,
        declared,
        stats,
        ready,
        check,
        findings: findings.len(),
        delete_one,
        delete_all,
        deleted,
    })
}

/// One queue's throughput among neighbours: `m` messages for the first
/// queue, `m` spread over the others (their backlog, which a NATS 2.9
/// consumer reads past), then the first queue drained by one consumer
/// (prefetch 100). The publish rate of all, and the first queue's consume
/// rate.
async fn one_queue(
    broker: &SharedBroker,
    topology: &Topology,
    m: usize,
) -> BenchResult<(f64, f64)> {
    let publisher = Publisher::new(Arc::clone(broker), &topology.topic_space);
    let others = topology.queues.len() - 1;
    let mut publish = Duration::ZERO;
    let mut confirmations = Vec::with_capacity(256);
    for i in 0..m {
        let started = Instant::now();
        let message = Message::new("q0.go", "{}").content_type("application/json");
        confirmations.push(publisher.send_message(message).await?);
        if others > 0 {
            let key = format!("q{}.go", 1 + i % others);
            let message = Message::new(key, "{}").content_type("application/json");
            confirmations.push(publisher.send_message(message).await?);
        }
        if confirmations.len() >= 256 || i + 1 == m {
            for confirmation in confirmations.drain(..) {
                confirmation.await?;
            }
        }
        publish += started.elapsed();
    }
    let done = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&done);
    let handler = handler_fn(move |_: serde_json::Value, _: Context| {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok::<_, HandlerError>(())
        }
    });
    let started = Instant::now();
    let consumer = Consumer::new(Arc::clone(broker), topology.queues[0].name.clone(), handler)
        .prefetch(100)
        .spawn();
    let deadline = started + Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < m && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let consume = started.elapsed();
    consumer.shutdown().await?;
    let handled = done.load(Ordering::Relaxed);
    if handled < m {
        return Err(format!("the first queue handled {handled} of {m} in time").into());
    }
    let published = if others > 0 { 2 * m } else { m };
    Ok((
        published as f64 / publish.as_secs_f64(),
        m as f64 / consume.as_secs_f64(),
    ))
}

/// Publishes a message to every queue and runs a consumer per queue that
/// fails it `retries` times (1 s, 2 s, 4 s, ...) before it succeeds; how
/// long until all succeeded, this process's connections to the broker
/// meanwhile, and how many succeeded again (duplicates).
async fn retry_once_each(
    broker: &SharedBroker,
    topology: &Topology,
    retries: u32,
) -> BenchResult<(Duration, Option<usize>, usize)> {
    let started = Instant::now();
    let publisher = Publisher::new(Arc::clone(broker), &topology.topic_space);
    for i in 0..topology.queues.len() {
        publisher
            .publish_message(
                Message::new(format!("q{i}.go"), "{}").content_type("application/json"),
            )
            .await?;
    }
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let duplicates = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for spec in &topology.queues {
        let (done, duplicates) = (Arc::clone(&done), Arc::clone(&duplicates));
        let policy = Exponential::builder()
            .initial(Duration::from_secs(1))
            .multiplier(2.0)
            .jitter(0.0)
            .max_attempts(retries + 1)
            .build()?;
        let handler = handler_fn(move |_: serde_json::Value, ctx: Context| {
            let (done, duplicates) = (Arc::clone(&done), Arc::clone(&duplicates));
            async move {
                if ctx.attempt() <= retries {
                    return Err(HandlerError::retryable("not yet"));
                }
                if !done
                    .lock()
                    .expect("not poisoned")
                    .insert(ctx.id().to_owned())
                {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        });
        consumers.push(
            Consumer::new(Arc::clone(broker), spec.name.clone(), handler)
                .retry_policy(policy)
                .spawn(),
        );
    }
    let n = topology.queues.len();
    let finished = || done.lock().expect("not poisoned").len();
    let deadline = Instant::now() + Duration::from_secs(600) + Duration::from_secs(1 << retries);
    while finished() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    let connections = own_connections();
    // Late copies (duplicates) still arrive for a while.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for consumer in consumers {
        consumer.shutdown().await?;
    }
    let finished = finished();
    if finished < n {
        return Err(format!("{finished} of {n} messages succeeded in time").into());
    }
    Ok((took, connections, duplicates.load(Ordering::Relaxed)))
}

/// This process's established TCP connections.
fn own_connections() -> Option<usize> {
    let out = std::process::Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .ok()?;
    let me = format!("pid={},", std::process::id());
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&me))
            .count(),
    )
}
