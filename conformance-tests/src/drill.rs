//! The failure drill: many messages with unique ids, while consumers are
//! killed and restarted at random, the broker restarts, and the handler
//! fails some messages for a while and some for good. At the end every id
//! must be handled or dead-lettered: nothing lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Harness, Restartable};
use crate::support::{job_message, Job};
use crate::testing::{proxied, FaultProxy};
use ticketrail_core::{
    Consumer, Context, DeadLetterReason, Error, ErrorKind, Fixed, Handler, HandlerError, QueueSpec,
    Result, SharedBroker, Topology,
};

/// What the drill saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrillReport {
    /// Messages published (each reported Ok by the broker).
    pub published: usize,
    /// Distinct ids handled successfully.
    pub handled: usize,
    /// Distinct ids in the DLQ.
    pub dead_lettered: usize,
    /// Ids neither handled nor dead-lettered.
    pub lost: usize,
    /// Extra successful handlings of ids handled before (at-least-once).
    pub duplicates: usize,
    /// Broken expectations other than loss, e.g. a permanent failure not in
    /// the DLQ with reason permanent.
    pub problems: Vec<String>,
}

/// How a message is meant to fare.
fn fate(i: usize) -> Fate {
    if i.is_multiple_of(100) {
        Fate::Permanent
    } else if i % 10 == 1 {
        Fate::Transient
    } else {
        Fate::Fine
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Fine,
    Transient,
    Permanent,
}

fn index(key: &str) -> usize {
    key.trim_start_matches('m').parse().unwrap_or(usize::MAX)
}

/// Counts successful handlings per id.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<HashMap<String, usize>>>);

impl Handler for Tally {
    type Message = Job;

    async fn handle(&self, job: Job, ctx: &Context) -> std::result::Result<(), HandlerError> {
        match fate(index(&job.key)) {
            Fate::Permanent => return Err(HandlerError::permanent("drill: this one never works")),
            Fate::Transient if ctx.attempt() == 1 => {
                return Err(HandlerError::retryable("drill: works on a later attempt"))
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(ctx.id().to_owned())
            .or_default() += 1;
        Ok(())
    }
}

const CONSUMERS: usize = 3;

/// How the drill reaches its broker: the throwaway server it restarts, or
/// (in memory) the harness itself.
struct Target {
    harness: Arc<dyn Harness>,
    server: Option<Box<dyn Restartable>>,
    /// With silent drops: every connection goes through this proxy, by
    /// this URL.
    proxy: Option<(FaultProxy, String)>,
}

impl Target {
    async fn connect(&self) -> Result<SharedBroker> {
        match (&self.proxy, &self.server) {
            (Some((_, url)), _) => self.harness.connect_to(url).await,
            (None, Some(server)) => server.connect().await,
            (None, None) => self.harness.connect().await,
        }
    }

    /// The drill's own setup and teardown (a connect, a declare, a delete)
    /// as a careful user runs it: tried again while it fails with a
    /// transient error, for up to a minute. With silent drops one attempt
    /// can land on a flow the proxy just dropped and time out, which is the
    /// bounded failure C21 asks for, not a lost message.
    async fn persist<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match op().await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                done => return done,
            }
        }
    }
}

/// Runs the drill with `messages` messages on the backend of `harness`: on
/// a throwaway server of the harness, which it restarts twice, where there
/// is one.
pub async fn run_drill(harness: Arc<dyn Harness>, messages: usize) -> Result<DrillReport> {
    run_drill_with(harness, messages, false).await
}

/// [`run_drill`], and with `silent_drops` every connection goes through a
/// fault proxy that, every 2 to 5 s, silently drops every flow it holds
/// (no FIN, no RST): only heartbeats notice. Publishes run with a 3 s
/// publish timeout, and are tried again until the broker confirms them.
pub async fn run_drill_with(
    harness: Arc<dyn Harness>,
    messages: usize,
    silent_drops: bool,
) -> Result<DrillReport> {
    let server = harness.restartable().await?;
    let proxy = match (silent_drops, server.as_ref().and_then(|s| s.url())) {
        (false, _) => None,
        (true, Some(url)) => {
            let (target, _) = proxied(&url, 0, "");
            let proxy = FaultProxy::start(&target).await?;
            let (_, via) = proxied(&url, proxy.port(), "publish_timeout=3");
            Some((proxy, via))
        }
        (true, None) => {
            return Err(Error::config(
                "silent drops need a throwaway server of one node (rabbitmq, nats)",
            ))
        }
    };
    let target = Arc::new(Target {
        harness,
        server,
        proxy,
    });
    let dropping = target.proxy.is_some().then(|| {
        let target = Arc::clone(&target);
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(11);
            loop {
                tokio::time::sleep(Duration::from_millis(rng.u64(2000..5000))).await;
                if let Some((proxy, _)) = &target.proxy {
                    proxy.blackhole_existing();
                }
            }
        })
    });
    let report = drill(&target, messages).await;
    if let Some(dropping) = dropping {
        dropping.abort();
    }
    if let Some(server) = &target.server {
        server.remove().await?;
    }
    report
}

async fn drill(target: &Arc<Target>, messages: usize) -> Result<DrillReport> {
    let topology = Topology::new("drill.events")
        .queue(QueueSpec::new("drill.q").bind("jobs.#").delivery_limit(10));
    let admin = target.persist(|| target.connect()).await?;
    target.persist(|| admin.declare(&topology)).await?;
    let tally = Tally::default();
    let stop = Arc::new(AtomicBool::new(false));
    let policy = || Fixed::new(Duration::from_millis(200), 6).expect("valid");

    // Consumers killed and restarted at random moments.
    let mut chaos = Vec::new();
    for slot in 0..CONSUMERS {
        let (target, tally, stop) = (Arc::clone(target), tally.clone(), Arc::clone(&stop));
        chaos.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(slot as u64 + 7);
            while !stop.load(Ordering::Acquire) {
                let Ok(broker) = target.connect().await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                let consumer = Consumer::new(broker.clone(), "drill.q", tally.clone())
                    .retry_policy(policy())
                    .prefetch(10)
                    .spawn();
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                // Killed: the task aborted, the connection dropped, nothing acked on the way out.
                consumer.abort();
                let _ = broker.close().await;
            }
        }));
    }

    // The publisher; the broker restarts twice while it publishes.
    let publisher = target.persist(|| target.connect()).await?;
    // Every id published, with its message's index (which says its fate).
    let mut published: HashMap<String, usize> = HashMap::new();
    let restarts = [messages / 3, 2 * messages / 3];
    for i in 0..messages {
        if restarts.contains(&i) {
            if let Some(server) = &target.server {
                server.halt("drill.q").await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                server.resume().await?;
            }
        }
        let message = job_message("jobs.drill", &format!("m{i}"));
        let id = message.id.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        // Published again (same id) until the broker says it has it.
        while let Err(e) = publisher.publish("drill.events", message.clone()).await {
            if Instant::now() > deadline {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        published.insert(id, i);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    // Each chaos consumer stops after its current round (a connect and a
    // close, both bounded by the backend's timeouts): one that does not is
    // a hang to name, not to wait out.
    for (slot, task) in chaos.into_iter().enumerate() {
        if tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .is_err()
        {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "chaos consumer {slot} did not stop within 120 s of the publishing's end \
                     (stuck connecting, or closing its broker)"
                ),
            ));
        }
    }

    // One consumer that stays, until everything is accounted for.
    let steady = target.persist(|| target.connect()).await?;
    let consumer = Consumer::new(steady.clone(), "drill.q", tally.clone())
        .retry_policy(policy())
        .prefetch(20)
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut dead = Vec::new();
    loop {
        dead = steady
            .dead_letters("drill.q", usize::MAX)
            .await
            .unwrap_or(dead);
        let handled: HashSet<String> = tally
            .0
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect();
        let dead_ids: HashSet<&String> = dead.iter().map(|r| &r.envelope.id).collect();
        let missing = published
            .keys()
            .filter(|id| !handled.contains(*id) && !dead_ids.contains(id))
            .count();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    consumer.shutdown().await?;

    let counts = tally.0.lock().expect("not poisoned").clone();
    let dead_ids: HashSet<&String> = dead.iter().map(|r| &r.envelope.id).collect();
    let mut lost: Vec<usize> = published
        .iter()
        .filter(|(id, _)| !counts.contains_key(*id) && !dead_ids.contains(id))
        .map(|(_, i)| *i)
        .collect();
    lost.sort_unstable();
    let mut report = DrillReport {
        published: published.len(),
        handled: counts.len(),
        dead_lettered: dead_ids.len(),
        lost: lost.len(),
        duplicates: counts.values().map(|n| n - 1).sum::<usize>() + dead.len() - dead_ids.len(),
        problems: Vec::new(),
    };
    if !lost.is_empty() {
        // Where they might be, for whoever reads the report.
        let stats = steady.queue_stats("drill.q").await;
        report.problems.push(format!(
            "unaccounted for: {:?}; the queue at the end: {stats:?}",
            lost.iter()
                .take(20)
                .map(|i| format!("m{i} ({:?})", fate(*i)))
                .collect::<Vec<_>>()
        ));
    }
    for record in &dead {
        let key = serde_json::from_slice::<Job>(&record.envelope.payload)
            .map(|j| j.key)
            .unwrap_or_default();
        match (fate(index(&key)), record.reason) {
            (Fate::Permanent, DeadLetterReason::Permanent) => {}
            (Fate::Permanent, other) => report
                .problems
                .push(format!("{key}: permanent failure dead-lettered as {other}")),
            (_, DeadLetterReason::Permanent) => report
                .problems
                .push(format!("{key}: dead-lettered as permanent, but it is not")),
            (_, DeadLetterReason::Exhausted | DeadLetterReason::DeliveryLimit) => {} // crashes used up its attempts
            (_, other) => report
                .problems
                .push(format!("{key}: dead-lettered as {other}")),
        }
    }
    target.persist(|| steady.delete(&topology)).await?;
    let _ = steady.close().await;
    let _ = admin.close().await;
    let _ = publisher.close().await;
    Ok(report)
}
