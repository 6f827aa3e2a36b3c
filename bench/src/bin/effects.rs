//! The outbox and inbox against what they are built on, in one run:
//!
//! - relay: committed outbox rows published by a relay, against the same
//!   messages published directly with confirms and the same window;
//! - inbox: a consumer whose inbox handler inserts one row per message,
//!   against a plain loop of "begin, insert the marker and the effect,
//!   commit" with as many tasks as the consumer's prefetch. The database's
//!   commits per second are the ceiling of both.
//!
//! `cargo run --release -p ticketrail-bench --bin effects -- [memory|rabbitmq|nats] [N]`
//! (default memory, 20,000), against the PostgreSQL of `DATABASE_URL`
//! (default the tests' role on 127.0.0.1) in a database of its own.
//! `RELAYS=n` runs n relays side by side (default 1).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use ticketrail::postgres::{InboxHandler, Store};
use ticketrail::{Consumer, Context, HandlerError, Publisher, QueueSpec, SharedBroker, Topology};

const WINDOW: usize = 100;
const CONCURRENCY: u16 = 10;

#[path = "shared/args.rs"]
mod args;

use args::{Args, BenchResult};

#[tokio::main]
async fn main() -> BenchResult<()> {
    let mut args = Args::new();
    let (broker_name, url) = args.broker()?;
    let n: u64 = args.number(20_000)?;
    let server: PgConnectOptions = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://ticketrail:ticketrail@127.0.0.1:5432/postgres".to_owned())
        .parse()?;
    let name = format!(
        "tr_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = PgConnection::connect_with(&server).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(u32::from(CONCURRENCY) + 5)
        .connect_with(server.clone().database(&name))
        .await?;
    let outcome = run(&url, &broker_name, pool.clone(), n).await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    outcome
}

async fn run(url: &str, broker_name: &str, pool: PgPool, n: u64) -> BenchResult<()> {
    let store = Store::new(pool.clone());
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE effects (message_id text NOT NULL);
         CREATE TABLE bare_markers (queue text, message_id text, PRIMARY KEY (queue, message_id));
         CREATE TABLE bare_effects (message_id text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let broker = ticketrail::connect(url).await?;
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("bench-effects-{unique}.events");
    let queue = format!("bench-effects-{unique}.q");
    let topology = Topology::new(&space).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await?;
    let outcome = measure(&broker, broker_name, &store, &space, &queue, n).await;
    broker.delete(&topology).await?;
    broker.close().await?;
    outcome
}

async fn measure(
    broker: &SharedBroker,
    broker_name: &str,
    store: &Store,
    space: &str,
    queue: &str,
    n: u64,
) -> BenchResult<()> {
    // Direct: confirmed publishes, a window of WINDOW.
    let publisher = Publisher::new(Arc::clone(broker), space);
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    for i in 0..n {
        if in_flight.len() == WINDOW {
            let oldest: ticketrail::Confirmation = in_flight.pop_front().expect("full");
            oldest.await?;
        }
        in_flight.push_back(publisher.send("job", &i).await?);
    }
    for confirmation in in_flight {
        confirmation.await?;
    }
    let direct = rate(n, started.elapsed());

    // Relay: the same messages as committed rows, a batch of WINDOW.
    let outbox = store.outbox(space)?;
    for chunk in 0..n.div_ceil(1000) {
        let mut tx = store.pool().begin().await?;
        for i in chunk * 1000..((chunk + 1) * 1000).min(n) {
            outbox.publish(&mut tx, "job", &i).await?;
        }
        tx.commit().await?;
    }
    // RELAYS relays side by side (as spawned relays of one process or
    // several would run), each locking its own batches.
    let relays: usize = std::env::var("RELAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..relays {
        let relay = store.relay(Arc::clone(broker)).batch(WINDOW as u32);
        let sent = Arc::clone(&sent);
        tasks.push(tokio::spawn(async move {
            while sent.load(Ordering::Relaxed) < n {
                let pass = relay.run_once().await?;
                sent.fetch_add(pass.sent, Ordering::Relaxed);
            }
            Ok::<(), ticketrail::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let relayed = rate(n, started.elapsed());

    // The bare transaction loop, CONCURRENCY tasks.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (pool, next) = (store.pool().clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let id = uuid::Uuid::new_v4().to_string();
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bare_markers (queue, message_id) VALUES ('q', $1) ON CONFLICT DO NOTHING")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO bare_effects (message_id) VALUES ($1)")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let bare = rate(n, started.elapsed());

    // The inbox: a consumer with prefetch CONCURRENCY drains the 2n
    // messages published above (direct and relayed), one effect each.
    let total = 2 * n;
    let started = Instant::now();
    let consumer = Consumer::new(Arc::clone(broker), queue, store.inbox(Effect))
        .prefetch(CONCURRENCY)
        .spawn();
    // Counted once acked, after the commit.
    while consumer.health().handled < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let inbox = rate(total, started.elapsed());
    consumer.shutdown().await?;

    println!("effects {broker_name}: {n} messages, window {WINDOW}, {CONCURRENCY} at a time");
    println!("  direct confirmed publish   {direct:>9.0}/s");
    println!(
        "  relay from the outbox      {relayed:>9.0}/s   {:.2} of direct",
        relayed / direct
    );
    println!(
        "  bare transaction loop      {bare:>9.0}/s   (the database's commits/s: the ceiling)"
    );
    println!(
        "  inbox consumer             {inbox:>9.0}/s   {:.2} of the bare loop",
        inbox / bare
    );
    Ok(())
}

fn rate(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

/// One effect row per message, in the inbox's transaction.
struct Effect;

impl InboxHandler for Effect {
    type Message = u64;

    async fn handle(
        &self,
        _n: u64,
        ctx: &Context,
        db: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(ctx.id())
            .execute(db)
            .await?;
        Ok(())
    }
}
