//! How the contract maps onto JetStream: streams, subjects and consumers.
//!
//! For a topic space `S` and a queue `Q` bound by patterns:
//! - stream `S` with `.` made `_` (interest retention, file storage)
//!   captures the subjects `S.<pattern>` of every binding, so a message no
//!   queue would receive has no stream and is unroutable (C1);
//! - `Q` is a durable pull consumer of that stream with explicit acks;
//! - the DLQ of `Q` is the subject `_tr_dlq.<stream>.Q` of the stream
//!   `<stream>_dlq` (limits retention: kept until replayed or purged).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use ticketrail_core::{topic_matches, Error, QueueSpec, Result, Topology};

/// How many deliveries a message may get above its queue's delivery limit
/// before the server stops delivering it: retries count as deliveries on
/// NATS, so the limit must leave room for every attempt a policy allows.
/// A subscription dead-letters a message that reaches it (C13).
pub(crate) const RETRY_HEADROOM: i64 = 1000;

/// The stream name of a topic space.
pub(crate) fn stream_name(space: &str) -> String {
    space.replace('.', "_")
}

/// The stream holding the dead letters of a topic space's queues.
pub(crate) fn dlq_stream_name(stream: &str) -> String {
    format!("{stream}_dlq")
}

/// The subject of the dead letters of `queue`.
pub(crate) fn dlq_subject(stream: &str, queue: &str) -> String {
    format!("_tr_dlq.{stream}.{queue}")
}

/// The durable consumer name of a queue (no `.` allowed).
pub(crate) fn consumer_name(queue: &str) -> String {
    queue.replace('.', "_")
}

/// The subject a routing key is published to.
pub(crate) fn subject(space: &str, routing_key: &str) -> String {
    format!("{space}.{routing_key}")
}

/// The stream subjects that capture a binding pattern: `#` as the last word
/// is `>` plus the pattern without it (`#` also matches zero words).
pub(crate) fn pattern_subjects(space: &str, pattern: &str) -> Result<Vec<String>> {
    let words: Vec<&str> = pattern.split('.').collect();
    if let Some(pos) = words.iter().position(|w| *w == "#") {
        if pos != words.len() - 1 {
            return Err(Error::invalid_name(format!(
                "pattern `{pattern}`: NATS can only express `#` as the last word"
            )));
        }
        let head = &words[..pos];
        if head.is_empty() {
            return Ok(vec![format!("{space}.>")]);
        }
        let head = head.join(".");
        return Ok(vec![format!("{space}.{head}"), format!("{space}.{head}.>")]);
    }
    Ok(vec![format!("{space}.{pattern}")])
}

/// Whether NATS subject filter `a` matches every subject `b` matches.
fn covers(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    for (i, word) in a.iter().enumerate() {
        match *word {
            ">" => return b.len() > i,
            "*" => {
                if b.get(i).is_none_or(|w| *w == ">") {
                    return false;
                }
            }
            literal => {
                if b.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    a.len() == b.len()
}

/// The fewest subjects that capture all of `subjects`: no subject is kept
/// that another one covers (JetStream refuses overlapping subjects).
pub(crate) fn minimal_subjects(mut subjects: Vec<String>) -> Vec<String> {
    subjects.sort();
    subjects.dedup();
    let all = subjects.clone();
    subjects.retain(|s| !all.iter().any(|other| other != s && covers(other, s)));
    subjects
}

/// The one filter subject of a queue's consumer (nats-server 2.9 takes one):
/// exact for a single binding without `#`, else the whole topic space, with
/// the bindings checked by the subscription.
pub(crate) fn filter_subject(space: &str, bindings: &[String]) -> String {
    match bindings {
        [only] if !only.contains('#') => format!("{space}.{only}"),
        _ => format!("{space}.>"),
    }
}

const DESCRIPTION_PREFIX: &str = "ticketrail queue ";

/// The consumer description, which carries the queue's name and bindings
/// for subscribers that did not declare it.
pub(crate) fn description(queue: &QueueSpec) -> String {
    format!(
        "{DESCRIPTION_PREFIX}{} bindings {}",
        queue.name,
        queue.bindings.join(" ")
    )
}

/// The queue name and bindings read back from a consumer description.
pub(crate) fn parse_description(description: &str) -> Option<(String, Vec<String>)> {
    let rest = description.strip_prefix(DESCRIPTION_PREFIX)?;
    let (name, bindings) = rest.split_once(" bindings ")?;
    Some((
        name.to_owned(),
        bindings.split_whitespace().map(str::to_owned).collect(),
    ))
}

/// Whether a routing key is one a queue with these bindings receives.
pub(crate) fn bound(bindings: &[String], routing_key: &str) -> bool {
    bindings.iter().any(|p| topic_matches(p, routing_key))
}

/// Checks names against NATS's limits on top of the core rules.
pub(crate) fn validate(topology: &Topology) -> Result<()> {
    topology.validate()?;
    if topology.topic_space.starts_with('$') || topology.topic_space.starts_with("_tr_dlq") {
        return Err(Error::invalid_name(format!(
            "topic space `{}`: names starting with `$` or `_tr_dlq` are reserved",
            topology.topic_space
        )));
    }
    for queue in &topology.queues {
        for pattern in &queue.bindings {
            pattern_subjects(&topology.topic_space, pattern)?;
        }
    }
    Ok(())
}

/// The configuration of a topic space's stream.
pub(crate) fn stream_config(space: &str, subjects: Vec<String>) -> stream::Config {
    stream::Config {
        name: stream_name(space),
        description: Some(format!("ticketrail topic space {space}")),
        subjects,
        retention: RetentionPolicy::Interest,
        storage: StorageType::File,
        ..stream::Config::default()
    }
}

/// The configuration of a topic space's DLQ stream.
pub(crate) fn dlq_stream_config(stream: &str) -> stream::Config {
    stream::Config {
        name: dlq_stream_name(stream),
        description: Some(format!("ticketrail dead letters of {stream}")),
        subjects: vec![format!("_tr_dlq.{stream}.>")],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        ..stream::Config::default()
    }
}

/// The configuration of a queue's durable pull consumer.
pub(crate) fn consumer_config(
    space: &str,
    queue: &QueueSpec,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(&queue.name)),
        description: Some(description(queue)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: i64::from(queue.delivery_limit) + 1 + RETRY_HEADROOM,
        filter_subject: filter_subject(space, &queue.bindings),
        max_ack_pending,
        ..pull::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_maps_to_zero_or_more_words() {
        assert_eq!(
            pattern_subjects("app", "user.#").unwrap(),
            vec!["app.user", "app.user.>"]
        );
        assert_eq!(pattern_subjects("app", "#").unwrap(), vec!["app.>"]);
        assert_eq!(
            pattern_subjects("app", "*.created").unwrap(),
            vec!["app.*.created"]
        );
        let err = pattern_subjects("app", "a.#.b").unwrap_err();
        assert!(err.message().contains("last word"), "{err}");
    }

    #[test]
    fn overlapping_subjects_are_folded() {
        let subjects = minimal_subjects(vec![
            "s.shop.*.created".into(),
            "s.shop".into(),
            "s.shop.>".into(),
            "s.shop.order".into(),
            "s.shop.order.>".into(),
            "s.audit.*".into(),
        ]);
        assert_eq!(subjects, vec!["s.audit.*", "s.shop", "s.shop.>"]);
        assert!(covers("a.*", "a.b"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("a.b", "a.*"));
    }

    #[test]
    fn descriptions_round_trip() {
        let q = QueueSpec::new("email.notifications")
            .bind("user.#")
            .bind("admin.*");
        let (name, bindings) = parse_description(&description(&q)).unwrap();
        assert_eq!(name, "email.notifications");
        assert_eq!(bindings, vec!["user.#", "admin.*"]);
    }
}
