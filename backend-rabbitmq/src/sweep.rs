//! Retries RabbitMQ did not bring back, brought back by ticketrail.
//!
//! A retry waits in a wait queue until its TTL ends and RabbitMQ
//! dead-letters it back to its work queue. On RabbitMQ 3.10 clusters that
//! can stop for good: a wait queue with a healthy leader keeps every
//! message past its TTL, ready, and expires none, not even when new ones
//! arrive (rabbitmq-server #10718, #16652; seen in the cluster drill in
//! about one run of three). So the wait queues of every work queue a
//! process subscribes to are swept, by one task and one connection per
//! broker handle: a message still there [`GRACE`] after it was due
//! ([`wire::RETRY_DUE`]) is taken, published to the work queue with the
//! `x-death` entry RabbitMQ would have written (so it counts as the retry
//! it is), confirmed, and only then acked. Copies sit in FIFO order of due
//! time per wait queue, so the sweep stops at the first one not overdue,
//! which it hands back untouched.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use ticketrail_core::{to_unix_millis, wire, Result};

use crate::connection::{open_raw, Link};
use crate::raw::{RawConnection, RawDelivery, RawText, RawValue};
use crate::topology;

/// How often a subscription sweeps.
pub(crate) const EVERY: Duration = Duration::from_secs(5);
/// How long past due a retry must be before the sweep moves it: RabbitMQ
/// has this long to do it first.
pub(crate) const GRACE: Duration = Duration::from_secs(10);
/// How often the sweep asks the broker which of the queue's wait queues
/// exist: on its first round in every tier, later in the tiers in use
/// (see `topology::tiers_in_use`, shared by a process's sweeps); in
/// between it adds those its own process declares.
const DISCOVER_EVERY: Duration = Duration::from_secs(600);

/// A subscription's place in its link's sweep; it leaves when dropped.
pub(crate) struct Sweeper {
    link: Arc<Link>,
    queue: Arc<str>,
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.link.sweeps.leave(&self.queue);
    }
}

/// Sweeps the wait queues of `queue` while the returned sweeper lives.
pub(crate) fn start(link: Arc<Link>, queue: Arc<str>) -> Sweeper {
    if link.sweeps.join(&queue) {
        tokio::spawn(run(Arc::downgrade(&link)));
    }
    Sweeper { link, queue }
}

/// The task: a round every [`EVERY`] over every covered queue, until none
/// is left or the link is gone.
async fn run(link: Weak<Link>) {
    let mut sweep = Sweep {
        raw: None,
        queues: HashMap::new(),
    };
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(link) = link.upgrade() else {
            return;
        };
        let queues = link.sweeps.queues();
        if queues.is_empty() {
            return;
        }
        sweep.queues.retain(|q, _| queues.contains(q));
        let mut failed = None;
        for queue in &queues {
            if let Err(e) = sweep.round(&link, queue).await {
                failed = Some((queue, e));
                break;
            }
        }
        if failed.is_none() {
            // One queue a round, so a process that starts with many queues
            // does not flood the broker with lookups.
            if let Some(queue) = queues.iter().find(|q| !sweep.queues[*q].checked_every_tier) {
                if let Err(e) = sweep.check_every_tier(&link, queue).await {
                    failed = Some((queue, e));
                }
            }
        }
        if let Some((queue, e)) = failed {
            tracing::debug!(queue = %queue, error = %e, "sweeping wait queues failed; next round on a new connection");
            sweep.raw = None;
        }
        if sweep.queues.values().all(|q| q.known.is_empty()) {
            // Nothing to sweep: hold no connection until there is.
            sweep.raw = None;
        }
    }
}

struct Sweep {
    raw: Option<RawConnection>,
    queues: HashMap<Arc<str>, Queue>,
}

/// What the sweep knows of one queue.
#[derive(Default)]
struct Queue {
    /// Its wait queues that exist.
    known: Vec<String>,
    discovered: Option<Instant>,
    /// Whether it was looked for in every tier (see
    /// [`Sweep::check_every_tier`]).
    checked_every_tier: bool,
}

/// A connection for this round.
async fn connection<'a>(
    raw: &'a mut Option<RawConnection>,
    link: &Link,
) -> Result<&'a mut RawConnection> {
    if raw.is_none() {
        *raw = Some(open_raw(&link.config).await?);
    }
    Ok(raw.as_mut().expect("opened above"))
}

impl Sweep {
    async fn round(&mut self, link: &Link, queue: &Arc<str>) -> Result<()> {
        let state = self.queues.entry(Arc::clone(queue)).or_default();
        let raw = connection(&mut self.raw, link).await?;
        if state
            .discovered
            .is_none_or(|at| at.elapsed() >= DISCOVER_EVERY)
        {
            let tiers = link.tiers_in_use(raw, DISCOVER_EVERY).await?;
            state.known = (existing(raw, queue, &tiers).await?)
                .into_iter()
                .map(|(_, name)| name)
                .collect();
            state.discovered = Some(Instant::now());
        }
        for name in link.wait_queues() {
            if topology::is_wait_queue_of(queue, &name) && !state.known.contains(&name) {
                state.known.push(name);
            }
        }
        for wait in &state.known {
            let moved = sweep_one(raw, queue, wait).await?;
            if moved > 0 {
                tracing::warn!(
                    queue = %queue,
                    wait_queue = %wait,
                    moved,
                    "RabbitMQ kept retries past their time in a wait queue; moved them back"
                );
            }
        }
        Ok(())
    }

    /// Looks for the wait queues of `queue` in every tier, once: those made
    /// before tier markers existed (0.1.0) are found, and their tiers
    /// marked, so `stats` and `delete` see them too.
    async fn check_every_tier(&mut self, link: &Link, queue: &Arc<str>) -> Result<()> {
        let raw = connection(&mut self.raw, link).await?;
        let tiers: Vec<Duration> = topology::tiers().collect();
        let found = existing(raw, queue, &tiers).await?;
        let state = self.queues.entry(Arc::clone(queue)).or_default();
        for (tier, name) in found {
            topology::mark_tier(link.channel().await?, tier).await;
            if !state.known.contains(&name) {
                state.known.push(name);
            }
        }
        state.checked_every_tier = true;
        Ok(())
    }
}

/// The wait queues of `queue` that exist among `tiers`, with their tiers.
async fn existing(
    raw: &mut RawConnection,
    queue: &str,
    tiers: &[Duration],
) -> Result<Vec<(Duration, String)>> {
    let names: Vec<String> = topology::wait_queue_names(queue, tiers).collect();
    let found = raw.queue_counts_many(&names).await?;
    Ok((tiers.iter().copied().zip(names).zip(found))
        .filter_map(|(wait, counts)| counts.map(|_| wait))
        .collect())
}

/// Moves the overdue retries at the head of `wait` back to `queue`;
/// returns how many.
async fn sweep_one(raw: &mut RawConnection, queue: &str, wait: &str) -> Result<usize> {
    let (ready, _) = match raw.queue_counts(wait).await {
        Ok(counts) => counts,
        Err(_) => return Ok(0), // deleted meanwhile
    };
    let mut moved = 0;
    for _ in 0..ready {
        let Some(delivery) = raw.get(wait).await? else {
            break;
        };
        if !overdue(&delivery, SystemTime::now()) {
            raw.reject(delivery.channel, delivery.delivery_tag, true)
                .await?;
            break;
        }
        let properties = returned(&delivery, wait, SystemTime::now());
        if let Err(e) = raw
            .publish("", queue.as_bytes(), &properties, &delivery.body, true)
            .await
        {
            raw.reject(delivery.channel, delivery.delivery_tag, true)
                .await?;
            return Err(e);
        }
        raw.ack(delivery.channel, delivery.delivery_tag).await?;
        moved += 1;
    }
    Ok(moved)
}

fn header<'a>(delivery: &'a RawDelivery, name: &str) -> Option<&'a RawValue> {
    delivery
        .properties
        .headers
        .as_ref()?
        .iter()
        .find(|(k, _)| k.0 == name.as_bytes())
        .map(|(_, v)| v)
}

/// Whether a copy in a wait queue is [`GRACE`] past due at `now`. A copy
/// without a due time (from an older version) is left to RabbitMQ.
fn overdue(delivery: &RawDelivery, now: SystemTime) -> bool {
    let due = match header(delivery, wire::RETRY_DUE) {
        Some(RawValue::LongString(text)) => std::str::from_utf8(text)
            .ok()
            .and_then(wire::decode_retry_due),
        _ => None,
    };
    due.is_some_and(|due| now >= due + GRACE)
}

/// The properties of `delivery` as RabbitMQ would have dead-lettered it
/// from `wait` when its TTL ended: a new first `x-death` entry (reason
/// `expired`), and no delivery count of the wait queue's.
fn returned(delivery: &RawDelivery, wait: &str, now: SystemTime) -> crate::raw::RawProperties {
    let mut properties = delivery.properties.clone();
    let headers = properties.headers.get_or_insert_with(Vec::new);
    headers.retain(|(k, _)| k.0 != b"x-delivery-count");
    let death = RawValue::Table(vec![
        (RawText::from("count"), RawValue::I64(1)),
        (
            RawText::from("reason"),
            RawValue::LongString(b"expired".to_vec()),
        ),
        (
            RawText::from("queue"),
            RawValue::LongString(wait.as_bytes().to_vec()),
        ),
        (
            RawText::from("time"),
            RawValue::Timestamp(to_unix_millis(now) / 1000),
        ),
        (RawText::from("exchange"), RawValue::LongString(Vec::new())),
        (
            RawText::from("routing-keys"),
            RawValue::Array(vec![RawValue::LongString(wait.as_bytes().to_vec())]),
        ),
    ]);
    match headers.iter_mut().find(|(k, _)| k.0 == b"x-death") {
        Some((_, RawValue::Array(deaths))) => deaths.insert(0, death),
        Some((_, other)) => *other = RawValue::Array(vec![death]),
        None => headers.push((RawText::from("x-death"), RawValue::Array(vec![death]))),
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{self, Source};
    use ticketrail_core::wire::Attempt;

    fn waiting(due: SystemTime) -> RawDelivery {
        let (name, value) = (wire::RETRY_DUE, wire::encode_time(due));
        RawDelivery {
            channel: 1,
            delivery_tag: 1,
            exchange: RawText::default(),
            routing_key: RawText::from("q.wait.200ms"),
            properties: crate::raw::RawProperties {
                headers: Some(vec![
                    (
                        RawText::from(name),
                        RawValue::LongString(value.into_bytes()),
                    ),
                    (RawText::from("x-delivery-count"), RawValue::I64(2)),
                ]),
                ..Default::default()
            },
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn only_copies_well_past_due_are_moved() {
        let now = SystemTime::now();
        assert!(!overdue(&waiting(now), now));
        assert!(!overdue(&waiting(now - GRACE / 2), now));
        assert!(overdue(&waiting(now - GRACE), now));
        let mut legacy = waiting(now);
        legacy.properties.headers = None;
        assert!(!overdue(&legacy, now + Duration::from_secs(3600)));
    }

    #[test]
    fn a_moved_copy_counts_as_the_retry_it_is() {
        let delivery = waiting(SystemTime::now());
        let wait = topology::wait_queue_name("q", Duration::from_millis(200));
        let properties = returned(&delivery, &wait, SystemTime::now()).to_lapin();
        let incoming = headers::incoming(&properties, "q", bytes::Bytes::new(), Source::Work("q"));
        assert!(matches!(incoming.attempt, Attempt::Retried));
        let headers = properties.headers().as_ref().expect("headers");
        assert!(!headers.inner().contains_key("x-delivery-count"));
    }
}
