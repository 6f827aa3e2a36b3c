//! How the contract maps onto RabbitMQ: names, queue arguments and retry tiers.
//!
//! For a work queue `Q` bound to topic exchange `S`:
//! - `Q`: a quorum queue with `x-delivery-limit` (C13) that dead-letters, at
//!   least once, to `Q.dlq`;
//! - `Q.dlq`: a quorum queue holding dead-letter records (C10);
//! - `Q.wait.<ms>ms`: one quorum wait queue per delay tier, created on
//!   demand, whose `x-message-ttl` dead-letters messages back to `Q` (C7,
//!   C12). Wait queues do not expire: a quorum queue's `x-expires` deletes
//!   it with whatever it holds, also messages RabbitMQ has not yet moved
//!   back (its at-least-once dead-lettering can stall after leader
//!   elections in quick succession). `Broker::delete` removes them.
//!   (Versions before 0.1.0 named them `Q.retry.<ms>ms`, with `x-expires`;
//!   a return from one still counts as a retry.)
//! - `ticketrail.tier.<ms>ms`: a fanout exchange bound to nothing, declared
//!   before the first wait queue of its tier in the virtual host. AMQP
//!   cannot list queues, and a missing one costs a channel to look for, so
//!   `stats`, `delete` and the sweep look for a queue's wait queues only
//!   in the tiers these markers name: a few lookups instead of 177.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use ticketrail_core::{Error, ErrorKind, Finding, FindingStatus, QueueSpec, Result, Topology};

use crate::error::{kind_of, map, reply_text};
use crate::raw::RawConnection;

/// The longest work-queue name: room is left for the `.retry.<ms>ms` suffix.
pub(crate) const MAX_QUEUE_NAME: usize = 220;

/// The suffix of a work queue's DLQ.
const DLQ_SUFFIX: &str = ".dlq";
/// Between a work queue's name and a wait queue's tier.
const WAIT_INFIX: &str = ".wait.";
/// The same, in wait queues of earlier versions (which expire).
const LEGACY_WAIT_INFIX: &str = ".retry.";
/// After a wait queue's tier.
const WAIT_SUFFIX: &str = "ms";

/// The name of the DLQ of `queue`.
pub(crate) fn dlq_name(queue: &str) -> String {
    format!("{queue}{DLQ_SUFFIX}")
}

/// The name of the wait queue of `queue` for a tier.
pub(crate) fn wait_queue_name(queue: &str, tier: Duration) -> String {
    format!("{queue}{WAIT_INFIX}{}{WAIT_SUFFIX}", tier.as_millis())
}

/// The names of the wait queues `queue` has if any, in `tiers`.
pub(crate) fn wait_queue_names<'a>(
    queue: &'a str,
    tiers: &'a [Duration],
) -> impl Iterator<Item = String> + 'a {
    tiers.iter().map(move |tier| wait_queue_name(queue, *tier))
}

/// The marker exchange of a tier: it exists once some work queue of the
/// virtual host has had a wait queue of that tier.
fn tier_marker(tier: Duration) -> String {
    format!("ticketrail.tier.{}{WAIT_SUFFIX}", tier.as_millis())
}

/// The tiers in which some work queue of the virtual host may have a wait
/// queue: those whose marker exists. One batch of lookups.
pub(crate) async fn tiers_in_use(raw: &mut RawConnection) -> Result<Vec<Duration>> {
    let all: Vec<Duration> = tiers().collect();
    let markers: Vec<String> = all.iter().map(|t| tier_marker(*t)).collect();
    let exist = raw.exchanges_exist(&markers).await?;
    Ok(all
        .into_iter()
        .zip(exist)
        .filter_map(|(tier, exists)| exists.then_some(tier))
        .collect())
}

/// Whether `name` is one of the wait queues of `queue`.
pub(crate) fn is_wait_queue_of(queue: &str, name: &str) -> bool {
    name.strip_prefix(queue)
        .and_then(|rest| {
            rest.strip_prefix(WAIT_INFIX)
                .or_else(|| rest.strip_prefix(LEGACY_WAIT_INFIX))
        })
        .and_then(|rest| rest.strip_suffix(WAIT_SUFFIX))
        .and_then(|ms| ms.parse::<u64>().ok())
        .is_some_and(|ms| tiers().any(|t| t.as_millis() == u128::from(ms)))
}

/// Tiers below one second, in 100 ms steps: late by under 100 ms.
const SUB_SECOND_STEP_MS: u64 = 100;
/// Tiers from one second up, per decade: neighbours differ by at most 15.4 %,
/// so a delay rounded up to its tier is late by less than C7's 20 %.
const DECADE: [u64; 24] = [
    10, 11, 12, 13, 15, 16, 18, 20, 22, 24, 27, 30, 33, 36, 40, 44, 48, 53, 58, 64, 70, 77, 85, 93,
];
/// Decades of seconds covered: 1 s up to about 108 days.
const DECADES: u32 = 7;

/// Every tier, shortest first.
pub(crate) fn tiers() -> impl Iterator<Item = Duration> {
    let sub_second = (1..=9).map(|i| Duration::from_millis(i * SUB_SECOND_STEP_MS));
    let above = (0..DECADES).flat_map(|decade| {
        DECADE
            .iter()
            .map(move |m| Duration::from_millis(m * 100 * 10u64.pow(decade)))
    });
    sub_second.chain(above)
}

/// The shortest tier not below `delay`: the wait queue a retry after `delay`
/// goes to. Never earlier than asked (C7), and late by at most
/// max(100 ms, 15.4 %).
pub(crate) fn tier_for(delay: Duration) -> Result<Duration> {
    tiers().find(|t| *t >= delay).ok_or_else(|| {
        Error::config(format!(
            "retry delay {delay:?} is longer than the longest the RabbitMQ backend supports ({:?})",
            tiers().last().unwrap_or_default()
        ))
    })
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn quorum_args(dead_letter_to: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(dead_letter_to));
    // Without reject-publish, at-least-once dead-lettering silently falls
    // back to at-most-once.
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Checks names against RabbitMQ's own limits on top of the core rules.
pub(crate) fn validate(topology: &Topology) -> Result<()> {
    topology.validate()?;
    if topology.topic_space.starts_with("amq.") {
        return Err(Error::invalid_name(format!(
            "topic space `{}`: names starting with `amq.` are reserved by RabbitMQ",
            topology.topic_space
        )));
    }
    for queue in &topology.queues {
        if queue.name.len() > MAX_QUEUE_NAME {
            return Err(Error::invalid_name(format!(
                "queue `{}` is {} bytes long; the RabbitMQ backend allows {MAX_QUEUE_NAME} \
                 (room is kept for its retry and dead-letter queues)",
                queue.name,
                queue.name.len()
            )));
        }
        if queue.name.starts_with("amq.") {
            return Err(Error::invalid_name(format!(
                "queue `{}`: names starting with `amq.` are reserved by RabbitMQ",
                queue.name
            )));
        }
    }
    Ok(())
}

/// How many channels declare or inspect queues at once: RabbitMQ carries
/// out a channel's commands one after another, and declaring a quorum
/// queue waits for its Raft member to start.
const AT_ONCE: usize = 8;

/// Declares the exchange, the work queues, their DLQs and bindings; the
/// queues on up to [`AT_ONCE`] channels of their own at once (a refused
/// declaration closes only its channel).
pub(crate) async fn declare(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
) -> Result<()> {
    let space = topology.topic_space.as_str();
    channel
        .exchange_declare(
            space.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| map(&format!("declaring topic exchange `{space}`"), e))?;
    let per_channel = topology.queues.len().div_ceil(AT_ONCE).max(1);
    let declaring = topology
        .queues
        .chunks(per_channel)
        .map(|queues| async move {
            let channel = open_channel(connection).await?;
            for queue in queues {
                declare_queue(&channel, space, queue).await?;
            }
            let _ = channel.close(200, "declared".into()).await;
            Ok::<_, Error>(())
        });
    futures::future::try_join_all(declaring).await?;
    // Messages published for later reach the topic exchange through this
    // binding (C24).
    crate::ladder::bind_space(channel, space).await
}

async fn declare_queue(channel: &Channel, space: &str, spec: &QueueSpec) -> Result<()> {
    let dlq = dlq_name(&spec.name);
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), long("quorum"));
    channel
        .queue_declare(dlq.as_str().into(), durable(), dlq_args)
        .await
        .map_err(|e| map(&format!("declaring dead-letter queue `{dlq}`"), e))?;

    let mut args = quorum_args(&dlq);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(spec.delivery_limit)),
    );
    channel
        .queue_declare(spec.name.as_str().into(), durable(), args)
        .await
        .map_err(|e| {
            map(
                &format!(
                    "declaring queue `{}` (if it exists with other arguments, e.g. as a classic \
                     queue or with another delivery limit, delete it or choose another name)",
                    spec.name
                ),
                e,
            )
        })?;
    for pattern in &spec.bindings {
        channel
            .queue_bind(
                spec.name.as_str().into(),
                space.into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                map(
                    &format!("binding `{}` to `{space}` with `{pattern}`", spec.name),
                    e,
                )
            })?;
    }
    Ok(())
}

/// What RabbitMQ has of each object `declare` would make. An object is
/// looked for with a passive declare; one that exists is declared again
/// with ticketrail's arguments, which changes nothing when they are equal
/// and is refused (PRECONDITION_FAILED, naming the first argument that
/// differs) when they are not. Bindings cannot be listed over AMQP.
pub(crate) async fn inspect(connection: &Connection, topology: &Topology) -> Result<Vec<Finding>> {
    validate(topology)?;
    let space = topology.topic_space.as_str();
    let mut findings = Vec::new();
    let exchange = format!("exchange {space}");
    let topic = |channel: Channel, passive: bool| async move {
        let options = ExchangeDeclareOptions {
            passive,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let declared = channel
            .exchange_declare(
                space.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "inspected".into()).await;
        declared
    };
    findings.push(
        probe(
            connection,
            exchange,
            |c| topic(c, true),
            |c| topic(c, false),
            "a durable topic exchange".to_owned(),
            "RabbitMQ cannot change an exchange's type or durability: delete it \
             (`rabbitmqctl delete_exchange`) once nothing publishes to it, or use another \
             topic space name, then declare"
                .to_owned(),
        )
        .await?,
    );
    let probes: Vec<_> = (topology.queues.iter())
        .map(|spec| inspect_queue(connection, space, spec))
        .collect();
    let queues = futures::stream::iter(probes).buffered(AT_ONCE);
    for queue in queues.collect::<Vec<_>>().await {
        findings.extend(queue?);
    }
    Ok(findings)
}

/// What RabbitMQ has of one work queue, its DLQ and its bindings.
async fn inspect_queue(
    connection: &Connection,
    space: &str,
    spec: &QueueSpec,
) -> Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let dlq = dlq_name(&spec.name);
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), long("quorum"));
    findings.push(
        probe_queue(
            connection,
            &dlq,
            dlq_args,
            format!(
                "the quorum queue holding the dead letters of `{}`, with no length limit or TTL",
                spec.name
            ),
            format!(
                "RabbitMQ cannot change a queue's type or arguments in place. A TTL or length \
                 limit on a DLQ drops dead letters. Move its records elsewhere (e.g. a shovel), \
                 delete `{dlq}` and declare, or give the work queue another name"
            ),
        )
        .await?,
    );
    let mut args = quorum_args(&dlq);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(spec.delivery_limit)),
    );
    findings.push(
        probe_queue(
            connection,
            &spec.name,
            args,
            format!(
                "a quorum queue with delivery limit {}, dead-lettering at least once to `{dlq}`",
                spec.delivery_limit
            ),
            format!(
                "RabbitMQ cannot change a queue's type or arguments in place. To migrate: \
                 declare ticketrail's topology with another queue name (e.g. `{0}.v2`) bound \
                 to the same patterns and start its workers; unbind `{0}`, let its old \
                 consumers drain it (or move its messages with a shovel); then delete it",
                spec.name
            ),
        )
        .await?,
    );
    for pattern in &spec.bindings {
        findings.push(Finding::new(
            format!("binding {space} -> {} ({pattern})", spec.name),
            FindingStatus::Unknown,
            "AMQP cannot list bindings; `declare` adds it if it is missing (idempotent)",
        ));
    }
    Ok(findings)
}

async fn probe_queue(
    connection: &Connection,
    name: &str,
    args: FieldTable,
    expected: String,
    migrate: String,
) -> Result<Finding> {
    let queue = |channel: Channel, passive: bool, args: FieldTable| async move {
        let options = QueueDeclareOptions {
            passive,
            ..durable()
        };
        let declared = channel
            .queue_declare(name.into(), options, args)
            .await
            .map(|_| ());
        let _ = channel.close(200, "inspected".into()).await;
        declared
    };
    probe(
        connection,
        format!("queue {name}"),
        |c| queue(c, true, FieldTable::default()),
        |c| queue(c, false, args.clone()),
        expected,
        migrate,
    )
    .await
}

/// Looks for an object with `passive`; if it is there, declares it again
/// with `same`, which RabbitMQ refuses if it differs.
async fn probe<P, PF, S, SF>(
    connection: &Connection,
    object: String,
    passive: P,
    same: S,
    expected: String,
    migrate: String,
) -> Result<Finding>
where
    P: FnOnce(Channel) -> PF,
    PF: std::future::Future<Output = lapin::Result<()>>,
    S: FnOnce(Channel) -> SF,
    SF: std::future::Future<Output = lapin::Result<()>>,
{
    match passive(open_channel(connection).await?).await {
        Ok(()) => {}
        Err(e) if kind_of(&e) == ErrorKind::NotFound => {
            let detail = format!("not there; `declare` creates {expected}");
            return Ok(Finding::new(object, FindingStatus::Missing, detail));
        }
        Err(e) => return Err(map(&format!("looking for {object}"), e)),
    }
    match same(open_channel(connection).await?).await {
        Ok(()) => Ok(Finding::new(object, FindingStatus::Matches, expected)),
        Err(e) if kind_of(&e) == ErrorKind::Config => {
            let said = reply_text(&e).unwrap_or_else(|| e.to_string());
            let detail = format!(
                "RabbitMQ has it otherwise: {said}. ticketrail needs {expected}. {migrate}"
            );
            Ok(Finding::new(object, FindingStatus::Differs, detail))
        }
        Err(e) => Err(map(&format!("comparing {object}"), e)),
    }
}

/// Declares the wait queue of `queue` for `tier` (after its tier's
/// marker: see [`mark_tier`]).
pub(crate) async fn declare_wait_queue(
    channel: &Channel,
    queue: &str,
    tier: Duration,
) -> Result<()> {
    let name = wait_queue_name(queue, tier);
    let mut args = quorum_args(queue);
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(tier.as_millis() as i64),
    );
    channel
        .queue_declare(name.as_str().into(), durable(), args)
        .await
        .map_err(|e| map(&format!("declaring wait queue `{name}`"), e))?;
    Ok(())
}

/// Declares the marker of `tier` on `channel`, a channel of its own, and
/// closes it. A refusal (a user without configure permission on
/// `ticketrail.tier.*`) is logged, not returned: retries work without the
/// marker, only `stats`, `delete` and the sweep's later rounds do not see
/// the tier's wait queues.
pub(crate) async fn mark_tier(channel: Channel, tier: Duration) {
    if let Err(e) = declare_tier_marker(&channel, tier).await {
        tracing::warn!(
            marker = %tier_marker(tier),
            error = %e,
            "could not declare a tier marker: `stats` and `delete` will not see this tier's \
             wait queues (the user needs configure permission on `ticketrail.tier.*`)"
        );
    }
    let _ = channel.close(200, "marked".into()).await;
}

/// Declares the marker of `tier` (idempotent).
async fn declare_tier_marker(channel: &Channel, tier: Duration) -> Result<()> {
    let marker = tier_marker(tier);
    channel
        .exchange_declare(
            marker.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| map(&format!("declaring tier marker `{marker}`"), e))
}

/// How many deletions a channel has sent and not yet seen answered.
const DELETES_IN_FLIGHT: usize = 256;

/// Deletes work queues with their DLQs and their wait queues in `tiers`
/// (see [`tiers_in_use`]), pipelined on [`AT_ONCE`] channels: RabbitMQ
/// deletes a channel's quorum queues one after another.
pub(crate) async fn delete_queues(
    connection: &Connection,
    queues: &[&str],
    tiers: &[Duration],
) -> Result<()> {
    let names: Vec<String> = queues
        .iter()
        .flat_map(|queue| {
            [queue.to_string(), dlq_name(queue)]
                .into_iter()
                .chain(wait_queue_names(queue, tiers))
        })
        .collect();
    let per_channel = names.len().div_ceil(AT_ONCE).max(1);
    let deleting = names.chunks(per_channel).map(|names| async move {
        let channel = open_channel(connection).await?;
        for chunk in names.chunks(DELETES_IN_FLIGHT) {
            let deletes = chunk.iter().map(|name| {
                let deleted =
                    channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default());
                async move {
                    deleted
                        .await
                        .map_err(|e| map(&format!("deleting queue `{name}`"), e))
                }
            });
            for result in futures::future::join_all(deletes).await {
                result?;
            }
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok::<_, Error>(())
    });
    futures::future::try_join_all(deleting).await?;
    Ok(())
}

/// A new channel, for one probe: a refused declare closes its channel.
async fn open_channel(connection: &Connection) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| map("opening a channel", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_keep_the_c7_bound_and_are_never_early() {
        let mut ms = 0u64;
        while ms <= 3_600_000 {
            let delay = Duration::from_millis(ms);
            let tier = tier_for(delay).unwrap();
            assert!(tier >= delay, "{delay:?} -> {tier:?} is early");
            let allowed = Duration::from_millis(100).max(delay.mul_f64(0.155));
            assert!(
                tier - delay <= allowed,
                "{delay:?} -> {tier:?} is late by more than {allowed:?}"
            );
            ms += if ms < 10_000 { 7 } else { 997 };
        }
    }

    #[test]
    fn wait_queues_are_recognised_by_name() {
        let name = wait_queue_name("email.q", Duration::from_secs(2));
        assert_eq!(name, "email.q.wait.2000ms");
        assert!(is_wait_queue_of("email.q", &name));
        assert!(
            is_wait_queue_of("email.q", "email.q.retry.2000ms"),
            "an earlier version's"
        );
        assert!(!is_wait_queue_of("email", &name));
        assert!(!is_wait_queue_of("email.q", "email.q.retry.1234ms"));
        assert!(!is_wait_queue_of("email.q", "email.q.dlq"));
    }

    #[test]
    fn seed_delays_are_tiers_of_their_own() {
        for s in [1, 2, 4] {
            assert_eq!(
                tier_for(Duration::from_secs(s)).unwrap(),
                Duration::from_secs(s)
            );
        }
        assert!(tier_for(Duration::from_secs(200 * 24 * 3600)).is_err());
        assert_eq!(tiers().count(), 9 + 24 * 7);
    }
}
