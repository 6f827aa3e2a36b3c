//! Publishing to a topic space's stream: the stream's acknowledgement is the
//! confirm (C1); a subject no stream captures is unroutable, and for a
//! stream that captures more than its bindings, the bindings are checked
//! here first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ticketrail_core::{Confirmation, Error, ErrorKind, Message, Result};

use crate::connection::Connection;
use crate::{headers, topology};

/// The header asking the server to publish a stored message later, and
/// the subject it publishes it to (message schedules, nats-server 2.12+).
pub(crate) const SCHEDULE: &str = "Nats-Schedule";
pub(crate) const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// Hands a message to JetStream; the confirmation awaits the stream's ack.
///
/// With `at`, to be published then (C24): the message is stored on a
/// schedule subject of its own in the topic space's stream, with the
/// server's `Nats-Schedule: @at …` naming its time and its subject as the
/// target. From nats-server 2.12 the server publishes it then, into the
/// same stream, and drops the schedule: nothing of ours needs to run. No
/// consumer sees it before (their filters leave schedule subjects out).
/// Before 2.12 it waits in a stream of its own, and the movers of the
/// connections using the space publish it (see `mover.rs`).
///
/// One function for both: the future of every publish is boxed, and a
/// wrapper around it would make it larger (see the test in broker.rs).
pub(crate) async fn send(
    conn: &Connection,
    topic_space: &str,
    message: Message,
    at: Option<SystemTime>,
) -> Result<Confirmation> {
    let (subject, headers) = prepared(conn, topic_space, &message, at)?;
    let limit = conn.config.publish_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let Message {
        id,
        routing_key,
        payload,
        ..
    } = message;
    let handed = async {
        conn.check_routable(topic_space, &routing_key).await?;
        conn.send(subject, headers, payload).await
    };
    let stored = tokio::time::timeout_at(deadline, handed)
        .await
        .map_err(|_| unconfirmed(limit))??;
    Ok(Confirmation::new(id, async move {
        tokio::time::timeout_at(deadline, stored)
            .await
            .map_err(|_| unconfirmed(limit))?
            .map(drop)
    }))
}

/// `at` as RFC 3339 in whole milliseconds, rounded up: never early.
fn schedule_time(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let millis = since.as_nanos().div_ceil(1_000_000);
    let rounded = UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX));
    humantime::format_rfc3339_millis(rounded).to_string()
}

/// The checked message's subject and headers; for one published for later,
/// its schedule subject and the server's schedule headers. Not async, so
/// none of it weighs on the publish's future.
fn prepared(
    conn: &Connection,
    topic_space: &str,
    message: &Message,
    at: Option<SystemTime>,
) -> Result<(String, async_nats::HeaderMap)> {
    let limit = match conn.server.max_payload {
        0 => usize::MAX,
        limit => limit,
    };
    message.check(topic_space, limit, "the NATS server (max_payload)")?;
    let mut headers = headers::outgoing(message)?;
    let subject = topology::subject(topic_space, &message.routing_key);
    let Some(at) = at else {
        return Ok((subject, headers));
    };
    let now = SystemTime::now();
    if at <= now && !conn.server.schedules {
        // Due already: published now, with no mover in between.
        return Ok((subject, headers));
    }
    // A time already passed is published at once by the server too.
    let at = at.max(now);
    headers.insert(SCHEDULE, format!("@at {}", schedule_time(at)).as_str());
    headers.insert(SCHEDULE_TARGET, subject.as_str());
    let name = ticketrail_core::new_message_id();
    let stream = topology::stream_name(topic_space);
    Ok((
        topology::schedule_subject(&stream, &name, conn.server.schedules),
        headers,
    ))
}

/// The error of a publish that took longer than the publish timeout.
fn unconfirmed(limit: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "no acknowledgement from JetStream within {limit:?}: the message may or may not \
             have been stored; publishing it again may store it twice, which an idempotent \
             consumer absorbs (the publish timeout is set by NatsConfig::publish_timeout or \
             ?publish_timeout=)"
        ),
    )
}
