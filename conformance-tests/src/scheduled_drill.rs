//! The scheduled drill: messages published for 1 to 60 s ahead while the
//! broker (a throwaway server) restarts twice. Every one must arrive, none
//! before its time (C24 across restarts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ticketrail_core::{
    Consumer, Context, Error, Handler, HandlerError, Message, Publisher, QueueSpec, Result,
    Topology,
};

use crate::harness::Harness;

/// What the scheduled drill saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScheduledReport {
    /// Messages the broker confirmed as held for later.
    pub scheduled: usize,
    /// Distinct ids delivered.
    pub delivered: usize,
    /// Ids never delivered.
    pub lost: usize,
    /// Deliveries before their time.
    pub early: usize,
    /// Extra deliveries of ids delivered before.
    pub duplicates: usize,
    /// The median and the largest lateness of first deliveries; those due
    /// while the broker was down are late by the outage.
    pub median_late: Duration,
    /// See [`median_late`](ScheduledReport::median_late).
    pub max_late: Duration,
    /// The same for the messages due neither while the broker was down
    /// nor in the 5 s after it answered again: lateness under normal load.
    pub median_late_steady: Duration,
    /// See [`median_late_steady`](ScheduledReport::median_late_steady).
    pub max_late_steady: Duration,
    /// How long each restart kept the broker away (halt to answering).
    pub outages: Vec<Duration>,
}

/// First arrival time of each id, and how many times each came.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, (SystemTime, usize)>>>);

impl Handler for Arrivals {
    type Message = serde_json::Value;

    async fn handle(
        &self,
        _message: serde_json::Value,
        ctx: &Context,
    ) -> std::result::Result<(), HandlerError> {
        let now = SystemTime::now();
        let mut seen = self.0.lock().expect("not poisoned");
        seen.entry(ctx.id().to_owned()).or_insert((now, 0)).1 += 1;
        Ok(())
    }
}

/// Schedules `messages` messages spread over 1 to 60 s ahead on a
/// throwaway server of `harness`, restarts it at 15 s and 35 s, and
/// accounts for every one.
pub async fn run_scheduled_drill(
    harness: Arc<dyn Harness>,
    messages: usize,
) -> Result<ScheduledReport> {
    let server = harness.restartable().await?.ok_or_else(|| {
        Error::config("the scheduled drill needs a throwaway server (rabbitmq, nats)")
    })?;
    let outcome = drill(&*server, messages).await;
    server.remove().await?;
    outcome
}

async fn drill(
    server: &dyn crate::harness::Restartable,
    messages: usize,
) -> Result<ScheduledReport> {
    let topology = Topology::new("drill.later").queue(QueueSpec::new("drill.sq").bind("jobs.#"));
    let broker = server.connect().await?;
    broker.declare(&topology).await?;
    let publisher = Publisher::new(broker.clone(), "drill.later");
    let started = Instant::now();
    let base = SystemTime::now() + Duration::from_secs(1);
    let spread = Duration::from_secs(59);
    let mut due: HashMap<String, SystemTime> = HashMap::new();
    for i in 0..messages {
        let at = base + spread.mul_f64(i as f64 / messages.max(1) as f64);
        let message =
            Message::new("jobs.later", format!("{{\"n\":{i}}}")).content_type("application/json");
        due.insert(message.id.clone(), at);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Sent again (same id) until the broker says it holds it.
        loop {
            let sent = async { publisher.send_message_at(message.clone(), at).await?.await };
            match sent.await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let arrivals = Arrivals::default();
    let consumer = Consumer::new(broker.clone(), "drill.sq", arrivals.clone())
        .prefetch(50)
        .spawn();
    // When the broker was away, and 5 s more for its queues and the
    // consumer to catch up.
    let mut outages: Vec<(SystemTime, SystemTime)> = Vec::new();
    for restart_at in [Duration::from_secs(15), Duration::from_secs(35)] {
        if let Some(wait) = restart_at.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let down = SystemTime::now();
        server.halt("drill.sq").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.resume().await?;
        outages.push((down, SystemTime::now()));
    }
    let steady = |at: &SystemTime| {
        !outages
            .iter()
            .any(|(down, up)| *at >= *down && *at <= *up + Duration::from_secs(5))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = arrivals.0.lock().expect("not poisoned").len();
        let last_due = base + spread;
        if (got >= due.len() && SystemTime::now() > last_due) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates have a moment to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    consumer.shutdown().await?;
    let seen = arrivals.0.lock().expect("not poisoned").clone();
    let mut lateness = Vec::new();
    let mut steady_lateness = Vec::new();
    let mut report = ScheduledReport {
        scheduled: due.len(),
        ..ScheduledReport::default()
    };
    for (id, at) in &due {
        match seen.get(id) {
            None => report.lost += 1,
            Some((arrived, count)) => {
                report.delivered += 1;
                report.duplicates += count - 1;
                match arrived.duration_since(*at) {
                    Ok(late) => {
                        lateness.push(late);
                        if steady(at) {
                            steady_lateness.push(late);
                        }
                    }
                    Err(_) => report.early += 1,
                }
            }
        }
    }
    let median_max = |mut late: Vec<Duration>| {
        late.sort();
        (
            late.get(late.len() / 2).copied().unwrap_or_default(),
            late.last().copied().unwrap_or_default(),
        )
    };
    (report.median_late, report.max_late) = median_max(lateness);
    (report.median_late_steady, report.max_late_steady) = median_max(steady_lateness);
    report.outages = outages
        .iter()
        .map(|(down, up)| up.duration_since(*down).unwrap_or_default())
        .collect();
    broker.delete(&topology).await?;
    let _ = broker.close().await;
    Ok(report)
}
