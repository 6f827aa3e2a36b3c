//! Reading and cancelling messages held for later (C24): each waits on a
//! schedule subject of its own (see `publish.rs`), so listing reads the
//! last message of each such subject and cancelling deletes one by its
//! sequence. Not a purge by subject:
//! before 2.10 a filtered purge moves every consumer of the stream past
//! the purged messages, skipping the ones before them that it had not
//! delivered yet.

use std::time::SystemTime;

use async_nats::jetstream::message::StreamMessage;
use futures::{StreamExt, TryStreamExt};
use ticketrail_core::{wire, ErrorKind, Result, ScheduledMessage};

use crate::connection::Connection;
use crate::dead_letters::stream_state;
use crate::failures::{Deleted, LastBySubject, MsgGet, Seq};
use crate::publish::{SCHEDULE, SCHEDULE_TARGET};
use crate::topology;

/// `STREAM.MSG.GET`s kept in flight while listing.
const GETS_IN_FLIGHT: usize = 32;

/// Every message held for `topic_space`, with its stream sequence,
/// soonest first.
async fn held(conn: &Connection, topic_space: &str) -> Result<Vec<(u64, ScheduledMessage)>> {
    let (stream, subjects) =
        topology::held_in(&topology::stream_name(topic_space), conn.server.schedules);
    let state = stream_state(conn, &stream, &subjects).await?;
    let prefix = format!("{topic_space}.");
    let api = &format!("STREAM.MSG.GET.{stream}");
    let doing = &format!("reading a message held for later in `{topic_space}`");
    // One get per subject, a window of them in flight.
    let got: Vec<(String, Option<MsgGet>)> = futures::stream::iter(state.subjects.into_keys())
        .map(|subject| async move {
            let request = LastBySubject {
                last_by_subj: &subject,
            };
            match conn.api(api, &request, doing).await {
                Ok(got) => Ok((subject, Some(got))),
                // Published by the server meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => Ok((subject, None)),
                Err(e) => Err(e),
            }
        })
        .buffered(GETS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut held = Vec::new();
    for (_, got) in got {
        let Some(Ok(message)) = got.map(|g| StreamMessage::try_from(g.message)) else {
            continue;
        };
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let due = header(SCHEDULE)
            .and_then(|s| s.strip_prefix("@at ").map(str::to_owned))
            .and_then(|at| humantime::parse_rfc3339_weak(&at).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let routing_key = header(SCHEDULE_TARGET)
            .and_then(|t| t.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_default();
        let id = header(wire::ID).unwrap_or_default();
        held.push((
            message.sequence,
            ScheduledMessage::new(id, routing_key, due),
        ));
    }
    held.sort_by(|a, b| (a.1.due, &a.1.id).cmp(&(b.1.due, &b.1.id)));
    Ok(held)
}

/// Up to `limit` messages held for `topic_space`, soonest first.
pub(crate) async fn list(
    conn: &Connection,
    topic_space: &str,
    limit: usize,
) -> Result<Vec<ScheduledMessage>> {
    let mut held = held(conn, topic_space).await?;
    held.truncate(limit);
    Ok(held.into_iter().map(|(_, message)| message).collect())
}

/// Deletes the message with this id held for `topic_space`; whether one
/// was held.
pub(crate) async fn cancel(conn: &Connection, topic_space: &str, id: &str) -> Result<bool> {
    let (stream, _) = topology::held_in(&topology::stream_name(topic_space), conn.server.schedules);
    let mut cancelled = false;
    for (seq, _) in held(conn, topic_space)
        .await?
        .into_iter()
        .filter(|(_, m)| m.id == id)
    {
        let deleted: Result<Deleted> = conn
            .api(
                &format!("STREAM.MSG.DELETE.{stream}"),
                &Seq { seq },
                &format!("cancelling message `{id}` held for later in `{topic_space}`"),
            )
            .await;
        match deleted {
            Ok(_) => cancelled = true,
            // Published meanwhile.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(cancelled)
}
