//! How the contract maps onto JetStream: names, subjects, stream and
//! consumer configurations.
//!
//! For a topic space `S` (stream `S` with `.` made `_`) and a queue `Q`:
//! - the stream captures `S.<pattern>` for every binding of every queue,
//!   and `_tr_replay.<stream>.Q` per queue (replays address one queue by
//!   subject, never by a header a stranger could write);
//! - `Q` is a durable pull consumer with explicit acks, filtered to its own
//!   subjects (several filter subjects from nats-server 2.10; on 2.9, which
//!   takes one, to the whole stream, with the subscription skipping what is
//!   not its own);
//! - the DLQ of `Q` is the subject `_tr_dlq.<stream>.Q` of the stream
//!   `TR_DLQ_<stream>`; first failures and retries are kept in the stream
//!   `TR_FAIL_<stream>` (see `failures.rs`).
//!
//! JetStream refuses a stream whose subjects overlap (`S.a.*` and `S.*.b`
//! both match `S.a.b`). Bindings that overlap that way are captured by a
//! broader subject (`S.*.*`), the stream's description says so, and
//! publishers then check the bindings themselves before publishing (C1).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use ticketrail_core::{topic_matches, Error, QueueSpec, Result, Topology};

/// How many deliveries a message may get above its queue's delivery limit
/// before the server stops delivering it: retries count as deliveries on
/// NATS, so the limit must leave room for every attempt a policy allows.
/// A subscription dead-letters a message that reaches it (C13).
pub(crate) const RETRY_HEADROOM: i64 = 1000;

/// Stream names of ticketrail's own streams start with this; topic spaces
/// may not.
const RESERVED_STREAM_PREFIX: &str = "TR_";
/// Subjects of ticketrail's own start with this; topic spaces may not.
const RESERVED_SUBJECT_PREFIX: &str = "_tr";
const DLQ_STREAM_PREFIX: &str = "TR_DLQ_";
const FAILURES_STREAM_PREFIX: &str = "TR_FAIL_";
const DLQ_SUBJECT_PREFIX: &str = "_tr_dlq";
const REPLAY_SUBJECT_PREFIX: &str = "_tr_replay";
const FAILURES_SUBJECT_PREFIX: &str = "_tr_fail";
const SCHEDULE_SUBJECT_PREFIX: &str = "_tr_sched";
const LATER_STREAM_PREFIX: &str = "TR_LATER_";
const LATER_SUBJECT_PREFIX: &str = "_tr_later";
/// The name of the consumer holding messages published for later.
pub(crate) const SCHEDULES_HOLDER: &str = "_tr_schedules";

/// The start of a topic space's stream description.
pub(crate) const SPACE_DESCRIPTION: &str = "ticketrail topic space ";
/// Added to the description of a stream that captures more than its
/// bindings (overlapping bindings): publishers check the bindings.
pub(crate) const OVER_CAPTURES: &str = " (over-captures: publishers check bindings)";
/// The start of a queue's consumer description.
const QUEUE_DESCRIPTION: &str = "ticketrail queue ";
const BINDINGS_WORD: &str = " bindings ";

/// The stream name of a topic space.
pub(crate) fn stream_name(space: &str) -> String {
    space.replace('.', "_")
}

/// The stream holding the dead letters of a topic space's queues.
pub(crate) fn dlq_stream_name(stream: &str) -> String {
    format!("{DLQ_STREAM_PREFIX}{stream}")
}

/// The stream holding first failures and retry counts.
pub(crate) fn failures_stream_name(stream: &str) -> String {
    format!("{FAILURES_STREAM_PREFIX}{stream}")
}

/// The subject of the dead letters of `queue`.
pub(crate) fn dlq_subject(stream: &str, queue: &str) -> String {
    format!("{DLQ_SUBJECT_PREFIX}.{stream}.{queue}")
}

/// The subject replays of `queue` are published to.
pub(crate) fn replay_subject(stream: &str, queue: &str) -> String {
    format!("{REPLAY_SUBJECT_PREFIX}.{stream}.{queue}")
}

/// The queue a replay subject of `stream` addresses.
pub(crate) fn replayed_to<'a>(stream: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(REPLAY_SUBJECT_PREFIX)?
        .strip_prefix('.')?
        .strip_prefix(stream)?
        .strip_prefix('.')
}

/// The subjects of messages of `stream` published for later (C24): each
/// waits on a subject of its own, `name` being unique; in `stream` itself
/// where the server publishes them (`server_schedules`), else in its
/// [`later_stream_name`].
pub(crate) fn schedule_subject(stream: &str, name: &str, server_schedules: bool) -> String {
    let prefix = if server_schedules {
        SCHEDULE_SUBJECT_PREFIX
    } else {
        LATER_SUBJECT_PREFIX
    };
    format!("{prefix}.{stream}.{name}")
}

/// The stream subject capturing every [`schedule_subject`] of `stream`
/// that the server publishes itself.
pub(crate) fn schedule_subjects(stream: &str) -> String {
    format!("{SCHEDULE_SUBJECT_PREFIX}.{stream}.>")
}

/// The stream holding the messages of `stream` published for later where
/// the server does not publish them (before nats-server 2.12).
pub(crate) fn later_stream_name(stream: &str) -> String {
    format!("{LATER_STREAM_PREFIX}{stream}")
}

/// The stream subject capturing every message of `stream` published for
/// later that a mover publishes.
pub(crate) fn later_subjects(stream: &str) -> String {
    format!("{LATER_SUBJECT_PREFIX}.{stream}.>")
}

/// Where the messages of `stream` published for later wait, and the
/// subjects they wait on.
pub(crate) fn held_in(stream: &str, server_schedules: bool) -> (String, String) {
    if server_schedules {
        (stream.to_owned(), schedule_subjects(stream))
    } else {
        (later_stream_name(stream), later_subjects(stream))
    }
}

/// The durable consumer that gives the topic space's stream (interest
/// retention) an interest in its messages published for later, so the
/// stream keeps them until the server publishes them. Nothing reads it,
/// so it holds no delivery.
pub(crate) fn schedules_holder(stream: &str, replicas: usize) -> pull::Config {
    pull::Config {
        durable_name: Some(SCHEDULES_HOLDER.to_owned()),
        description: Some(format!(
            "ticketrail: holds the messages of {stream} published for later"
        )),
        filter_subject: schedule_subjects(stream),
        ack_policy: AckPolicy::Explicit,
        num_replicas: replicas,
        ..pull::Config::default()
    }
}

/// The subject of the failure record of message `sequence` in `consumer`.
pub(crate) fn failure_subject(stream: &str, consumer: &str, sequence: u64) -> String {
    format!("{FAILURES_SUBJECT_PREFIX}.{stream}.{consumer}.{sequence}")
}

/// The subjects of the failure records of `consumer`'s messages.
pub(crate) fn failures_of(stream: &str, consumer: &str) -> String {
    format!("{FAILURES_SUBJECT_PREFIX}.{stream}.{consumer}.>")
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
/// is `>` plus the pattern without it (`#` also matches zero words). `#`
/// elsewhere cannot be written in a NATS subject.
pub(crate) fn pattern_subjects(space: &str, pattern: &str) -> Result<Vec<String>> {
    let words: Vec<&str> = pattern.split('.').collect();
    if let Some(pos) = words.iter().position(|w| *w == "#") {
        if pos != words.len() - 1 {
            return Err(Error::invalid_name(format!(
                "pattern `{pattern}`: NATS subjects can express `#` only as the last word \
                 (as `>`); bind the words after it with `*` or use another pattern"
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

fn tokens(subject: &str) -> Vec<&str> {
    subject.split('.').collect()
}

/// Whether NATS subject filter `a` matches every subject `b` matches.
/// (Called for every pair of a stream's subjects: it allocates nothing.)
pub(crate) fn covers(a: &str, b: &str) -> bool {
    let mut b_words = b.split('.');
    for word in a.split('.') {
        let other = b_words.next();
        match word {
            ">" => return other.is_some(),
            "*" => {
                if other.is_none_or(|w| w == ">") {
                    return false;
                }
            }
            literal => {
                if other != Some(literal) {
                    return false;
                }
            }
        }
    }
    b_words.next().is_none()
}

/// Whether some subject matches both filters.
pub(crate) fn overlaps(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), other) | (other, Some(">")) => return other.is_some(),
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => continue,
            _ => return false,
        }
    }
}

/// The narrowest single filter covering two overlapping ones.
fn generalize(a: &str, b: &str) -> String {
    let (a, b) = (tokens(a), tokens(b));
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(&">"), _) | (_, Some(&">")) | (None, _) | (_, None) => {
                out.push(">");
                break;
            }
            (Some(x), Some(y)) if x == y => out.push(x),
            _ => out.push("*"),
        }
    }
    out.join(".")
}

/// The fewest subjects that capture all of `subjects`: no subject is kept
/// that another one covers.
pub(crate) fn minimal_subjects(mut subjects: Vec<String>) -> Vec<String> {
    subjects.sort();
    subjects.dedup();
    let all = subjects.clone();
    subjects.retain(|s| !all.iter().any(|other| other != s && covers(other, s)));
    subjects
}

/// Subjects JetStream accepts for one stream (or one consumer's filters)
/// that capture at least `subjects`: overlapping ones are merged into a
/// broader one. `exact` says whether they capture nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Capture {
    pub(crate) subjects: Vec<String>,
    pub(crate) exact: bool,
}

pub(crate) fn capture(subjects: Vec<String>) -> Capture {
    let mut subjects = minimal_subjects(subjects);
    let mut exact = true;
    loop {
        let pair = subjects.iter().enumerate().find_map(|(i, a)| {
            subjects[i + 1..]
                .iter()
                .find(|b| overlaps(a, b))
                .map(|b| (a.clone(), b.clone()))
        });
        let Some((a, b)) = pair else { break };
        exact = false;
        subjects.retain(|s| *s != a && *s != b);
        subjects.push(generalize(&a, &b));
        subjects = minimal_subjects(subjects);
    }
    Capture { subjects, exact }
}

/// The consumer description, which carries the queue's name and bindings
/// for subscribers and publishers that did not declare it.
pub(crate) fn description(queue: &QueueSpec) -> String {
    format!(
        "{QUEUE_DESCRIPTION}{}{BINDINGS_WORD}{}",
        queue.name,
        queue.bindings.join(" ")
    )
}

/// The queue name and bindings read back from a consumer description.
pub(crate) fn parse_description(description: &str) -> Option<(String, Vec<String>)> {
    let rest = description.strip_prefix(QUEUE_DESCRIPTION)?;
    let (name, bindings) = rest.split_once(BINDINGS_WORD)?;
    Some((
        name.to_owned(),
        bindings.split_whitespace().map(str::to_owned).collect(),
    ))
}

/// The topic space a stream description names, and whether the stream
/// over-captures.
pub(crate) fn parse_space_description(description: &str) -> Option<(String, bool)> {
    let rest = description.strip_prefix(SPACE_DESCRIPTION)?;
    Some(match rest.strip_suffix(OVER_CAPTURES) {
        Some(space) => (space.to_owned(), true),
        None => (rest.to_owned(), false),
    })
}

/// Whether a routing key is one a queue with these bindings receives.
pub(crate) fn bound(bindings: &[String], routing_key: &str) -> bool {
    bindings.iter().any(|p| topic_matches(p, routing_key))
}

/// Checks names against NATS's limits on top of the core rules.
pub(crate) fn validate(topology: &Topology) -> Result<()> {
    topology.validate()?;
    let space = &topology.topic_space;
    if space.starts_with('$')
        || space.starts_with(RESERVED_SUBJECT_PREFIX)
        || stream_name(space).starts_with(RESERVED_STREAM_PREFIX)
    {
        return Err(Error::invalid_name(format!(
            "topic space `{space}`: names starting with `$`, `{RESERVED_SUBJECT_PREFIX}` or \
             `{RESERVED_STREAM_PREFIX}` are reserved"
        )));
    }
    for queue in &topology.queues {
        for pattern in &queue.bindings {
            pattern_subjects(space, pattern)?;
        }
    }
    Ok(())
}

/// The configuration of a topic space's stream.
///
/// Where the server holds messages for later (nats-server 2.12+), the
/// stream allows schedules and captures their subjects too; before, they
/// wait in a stream of their own ([`later_stream_config`]).
pub(crate) fn stream_config(
    space: &str,
    mut capture: Capture,
    replicas: usize,
    schedules: bool,
) -> stream::Config {
    let over = if capture.exact { "" } else { OVER_CAPTURES };
    let name = stream_name(space);
    if schedules {
        capture.subjects.push(schedule_subjects(&name));
    }
    stream::Config {
        description: Some(format!("{SPACE_DESCRIPTION}{space}{over}")),
        subjects: capture.subjects,
        retention: RetentionPolicy::Interest,
        storage: StorageType::File,
        num_replicas: replicas,
        allow_message_schedules: schedules,
        name,
        ..stream::Config::default()
    }
}

/// The configuration of the stream holding messages of `stream` published
/// for later, before nats-server 2.12: limits retention, so a message
/// stays until a mover publishes it and deletes it, whatever the queues'
/// consumers do.
pub(crate) fn later_stream_config(stream: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: later_stream_name(stream),
        description: Some(format!(
            "ticketrail messages of {stream} published for later"
        )),
        subjects: vec![later_subjects(stream)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: replicas,
        ..stream::Config::default()
    }
}

/// The configuration of a topic space's DLQ stream.
pub(crate) fn dlq_stream_config(stream: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: dlq_stream_name(stream),
        description: Some(format!("ticketrail dead letters of {stream}")),
        subjects: vec![format!("{DLQ_SUBJECT_PREFIX}.{stream}.>")],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: replicas,
        ..stream::Config::default()
    }
}

/// How long a failure record outlives its message's last retry at most:
/// longer than any retry delay a policy would use.
const FAILURE_RECORD_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The configuration of the stream of first failures and retry counts: one
/// record per message (the newest kept), expiring long after any retry.
pub(crate) fn failures_stream_config(stream: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: failures_stream_name(stream),
        description: Some(format!(
            "ticketrail first failures and retries of messages of {stream}"
        )),
        subjects: vec![format!("{FAILURES_SUBJECT_PREFIX}.{stream}.>")],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_messages_per_subject: 1,
        max_age: FAILURE_RECORD_AGE,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        num_replicas: replicas,
        ..stream::Config::default()
    }
}

/// The filter of a queue's consumer: its bindings' subjects and its replay
/// subject, or the whole stream on servers that take one filter subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Several filter subjects (nats-server 2.10+); empty: the whole stream.
    pub(crate) subjects: Vec<String>,
    /// Whether the server delivers this queue nothing but its own messages;
    /// if not, the subscription skips the others.
    pub(crate) exact: bool,
}

pub(crate) fn filter(
    space: &str,
    stream: &str,
    queue: &QueueSpec,
    several_filters: bool,
) -> Result<Filter> {
    if !several_filters {
        return Ok(Filter {
            subjects: Vec::new(),
            exact: false,
        });
    }
    let mut subjects = Vec::new();
    for pattern in &queue.bindings {
        subjects.extend(pattern_subjects(space, pattern)?);
    }
    let mut captured = capture(subjects);
    captured.subjects.push(replay_subject(stream, &queue.name));
    Ok(Filter {
        subjects: captured.subjects,
        exact: captured.exact,
    })
}

/// The configuration of a queue's durable pull consumer.
pub(crate) fn consumer_config(
    queue: &QueueSpec,
    filter: &Filter,
    ack_wait: Duration,
    max_ack_pending: i64,
    replicas: usize,
) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(&queue.name)),
        description: Some(description(queue)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: i64::from(queue.delivery_limit) + 1 + RETRY_HEADROOM,
        filter_subjects: filter.subjects.clone(),
        max_ack_pending,
        num_replicas: replicas,
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
    fn covering_subjects_are_folded() {
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
    fn overlap_is_decided_token_by_token() {
        assert!(overlaps("s.a.*", "s.*.b"));
        assert!(overlaps("s.*.*", "s.a.>"));
        assert!(overlaps("s.b.*.>", "s.*.a.>"));
        assert!(!overlaps("s.a", "s.a.>"));
        assert!(!overlaps("s.a.*", "s.b.*"));
        assert!(!overlaps("s.a.*", "s.a"));
        assert!(overlaps("s.>", "s.x"));
    }

    #[test]
    fn overlapping_bindings_are_captured_broader_and_said_so() {
        let cases: [(&[&str], &[&str]); 4] = [
            (&["s.a.*", "s.*.b"], &["s.*.*"]),
            (&["s.*.*", "s.a", "s.a.>"], &["s.*.>", "s.a"]),
            (
                &["s.b.*.>", "s.*.a.>", "s.b.*", "s.*.a"],
                &["s.*.*", "s.*.*.>"],
            ),
            (&["s.a", "s.b.*"], &["s.a", "s.b.*"]),
        ];
        for (given, expected) in cases {
            let got = capture(given.iter().map(|s| s.to_string()).collect());
            let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            want.sort();
            let mut have = got.subjects.clone();
            have.sort();
            assert_eq!(have, want, "{given:?}");
            assert_eq!(
                got.exact,
                given.len() == 2 && given[0] == "s.a",
                "{given:?}"
            );
            // Whatever was given is still captured, and nothing overlaps.
            for s in given {
                assert!(
                    got.subjects.iter().any(|c| covers(c, s) || c == s),
                    "{s} lost"
                );
            }
            for (i, a) in got.subjects.iter().enumerate() {
                for b in &got.subjects[i + 1..] {
                    assert!(!overlaps(a, b), "{a} overlaps {b}");
                }
            }
        }
    }

    #[test]
    fn descriptions_round_trip() {
        let q = QueueSpec::new("email.notifications")
            .bind("user.#")
            .bind("admin.*");
        let (name, bindings) = parse_description(&description(&q)).unwrap();
        assert_eq!(name, "email.notifications");
        assert_eq!(bindings, vec!["user.#", "admin.*"]);
        let config = stream_config(
            "app.events",
            Capture {
                subjects: vec![],
                exact: false,
            },
            1,
            false,
        );
        assert_eq!(
            parse_space_description(config.description.as_deref().unwrap()),
            Some(("app.events".to_owned(), true))
        );
    }

    #[test]
    fn replay_subjects_name_their_queue() {
        let subject = replay_subject("app_events", "email.notifications");
        assert_eq!(
            replayed_to("app_events", &subject),
            Some("email.notifications")
        );
        assert_eq!(replayed_to("app", &subject), None);
        assert_eq!(replayed_to("app_events", "app.events.x"), None);
    }
}
