//! Publishing messages held for later where the server cannot: before
//! nats-server 2.12 (C24).
//!
//! A message published for later is stored with the same headers on every
//! server version, `Nats-Schedule: @at …` and `Nats-Schedule-Target` (see
//! `publish.rs`), on a subject of its own. From 2.12 it waits in its topic
//! space's stream, and the server publishes it at its time. Before, it
//! waits in a stream of its own, `TR_LATER_<stream>`, with limits
//! retention: kept until a mover deletes it. (Held in the topic space's
//! stream instead, where the queues' consumers read every subject before
//! 2.10 and pass over these, 423 and then 762 of the drill's 1,000 never
//! reached the worker once nats-server 2.9.10 had restarted, though a
//! mover had published them; the cause is not known. In a stream of their
//! own, none were lost.) Every connection that declared the
//! space or subscribes to one of its queues runs a mover for it:
//!
//! - it learns what is held from an ordered consumer that reads only the
//!   headers, from the first message on, and keeps a set of (due time,
//!   sequence) in memory: it holds no acknowledgement and no slot of any
//!   queue's consumer, and a message's wait costs the server nothing but
//!   its storage;
//! - at a message's time it reads it (`STREAM.MSG.GET`), publishes it to
//!   its target subject with the same headers, minus the schedule's, and
//!   waits for the stream's ack, then deletes the held copy;
//! - the copy is published under `Nats-Msg-Id = _tr_sched:<stream>:<seq>`:
//!   where two movers (two workers) publish the same message, or one dies
//!   between publishing and deleting and another does it again, the
//!   stream's duplicate window (two minutes) keeps one.
//!
//! What is held survives any process: messages wait in the stream, and a
//! mover that starts reads them all. But something of ours must run for
//! them to be published: with no worker or declaring process connected,
//! a message due meanwhile is published when the next one starts.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::ErrorCode;
use async_nats::HeaderMap;
use futures::StreamExt;
use ticketrail_core::{ErrorKind, Result};

use crate::connection::Connection;
use crate::failures::{Deleted, MsgGet, Seq};
use crate::publish::{SCHEDULE, SCHEDULE_TARGET};
use crate::{headers, topology};

/// Messages moved at once when several are due.
const MOVES_IN_FLIGHT: usize = 32;
/// How long a move that failed (the server away) waits to be tried again.
const MOVE_AGAIN: Duration = Duration::from_secs(1);
/// How long a mover waits before reading the schedules again after its
/// reader ended (the stream gone, the server away).
const READ_AGAIN: Duration = Duration::from_secs(1);

/// Starts the mover of `stream` on this connection, unless one runs
/// already. Not where the server publishes scheduled messages itself,
/// unless `legacy`: messages held before the server was upgraded.
pub(crate) fn ensure(conn: &Arc<Connection>, stream: &str, legacy: bool) {
    if conn.server.schedules && !legacy {
        return;
    }
    let Some(mut stop) = conn.start_mover(stream) else {
        return;
    };
    let weak = Arc::downgrade(conn);
    let stream = stream.to_owned();
    tokio::spawn(async move {
        tokio::select! {
            () = run(&weak, &stream) => {
                if let Some(conn) = weak.upgrade() {
                    conn.mover_ended(&stream);
                }
            }
            // Closed, or dropped: its sender is gone.
            _ = stop.changed() => {}
        }
    });
}

/// The due time of a held message, from its headers; `None` if they are
/// not ours.
fn due_of(headers: Option<&HeaderMap>) -> Option<SystemTime> {
    let at = headers?.get(SCHEDULE)?.as_str().strip_prefix("@at ")?;
    humantime::parse_rfc3339_weak(at).ok()
}

/// Reads what is held and moves it at its time, until the connection is
/// closed or dropped or the stream is deleted; it outlives a server's
/// absence, reading again once it is back.
async fn run(weak: &Weak<Connection>, stream: &str) {
    let held_in = topology::later_stream_name(stream);
    let mut held: BTreeSet<(SystemTime, u64)> = BTreeSet::new();
    loop {
        let Some(conn) = weak.upgrade().filter(|c| !c.is_closed()) else {
            return;
        };
        let stream_handle = match conn.js.get_stream(&held_in).await {
            Ok(handle) => handle,
            Err(e) if not_found(&e) => return,
            Err(e) => {
                tracing::debug!(stream, error = %e, "cannot read the messages held for later yet");
                drop(conn);
                tokio::time::sleep(READ_AGAIN).await;
                continue;
            }
        };
        let config = OrderedConfig {
            filter_subject: topology::later_subjects(stream),
            headers_only: true,
            deliver_policy: DeliverPolicy::All,
            ..OrderedConfig::default()
        };
        let reader = async {
            stream_handle
                .create_consumer(config)
                .await?
                .messages()
                .await
                .map_err(async_nats::Error::from)
        };
        let mut reader = match reader.await {
            Ok(reader) => reader,
            Err(e) => {
                tracing::debug!(stream, error = %e, "cannot read the messages held for later yet");
                drop(conn);
                tokio::time::sleep(READ_AGAIN).await;
                continue;
            }
        };
        drop(conn);
        loop {
            let wait = held.first().map(|(due, _)| {
                due.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            tokio::select! {
                next = reader.next() => match next {
                    Some(Ok(message)) => {
                        let (Some(due), Ok(info)) = (due_of(message.headers.as_ref()), message.info()) else {
                            tracing::warn!(stream, subject = %message.subject, "a message on a schedule subject without a schedule; left alone");
                            continue;
                        };
                        held.insert((due, info.stream_sequence));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(stream, error = %e, "reading the messages held for later");
                        let Some(conn) = weak.upgrade() else { return };
                        if gone(&conn, &held_in).await {
                            return;
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => {
                    let Some(conn) = weak.upgrade().filter(|c| !c.is_closed()) else {
                        return;
                    };
                    move_due(&conn, stream, &held_in, &mut held).await;
                }
            }
        }
        tokio::time::sleep(READ_AGAIN).await;
    }
}

/// Whether the stream is gone (deleted with its topic space: the next
/// declare starts another mover).
fn not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(api)
        if api.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Whether `held_in` was deleted.
async fn gone(conn: &Connection, held_in: &str) -> bool {
    matches!(conn.js.get_stream(held_in).await, Err(e) if not_found(&e))
}

/// Moves every message of `held` that is due; one that could not be moved
/// is kept and tried again a little later.
async fn move_due(
    conn: &Connection,
    stream: &str,
    held_in: &str,
    held: &mut BTreeSet<(SystemTime, u64)>,
) {
    let now = SystemTime::now();
    let mut due = Vec::new();
    while let Some(&(at, seq)) = held.first() {
        if at > now {
            break;
        }
        held.pop_first();
        due.push(seq);
    }
    let failed: Vec<u64> = futures::stream::iter(due)
        .map(|seq| async move {
            move_one(conn, stream, held_in, seq)
                .await
                .err()
                .map(|e| (seq, e))
        })
        .buffer_unordered(MOVES_IN_FLIGHT)
        .filter_map(|failed| async move {
            let (seq, e) = failed?;
            tracing::warn!(stream, seq, error = %e, "publishing a message held for later; trying again");
            Some(seq)
        })
        .collect()
        .await;
    let again = SystemTime::now() + MOVE_AGAIN;
    held.extend(failed.into_iter().map(|seq| (again, seq)));
}

/// Publishes the message `seq` held in `held_in` to its target and deletes
/// it. A message already gone (moved by another, cancelled) is done.
async fn move_one(conn: &Connection, stream: &str, held_in: &str, seq: u64) -> Result<()> {
    let got: MsgGet = match conn
        .api(
            &format!("STREAM.MSG.GET.{held_in}"),
            &Seq { seq },
            "reading a message held for later",
        )
        .await
    {
        Ok(got) => got,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let Ok(message) = StreamMessage::try_from(got.message) else {
        tracing::warn!(
            stream,
            seq,
            "a message held for later that cannot be read; left alone"
        );
        return Ok(());
    };
    let target = message
        .headers
        .get(SCHEDULE_TARGET)
        .map(|t| t.as_str().to_owned());
    if let Some(target) = target {
        let mut copy = HeaderMap::new();
        for (name, values) in message.headers.iter() {
            if [SCHEDULE, SCHEDULE_TARGET].contains(&name.as_ref()) {
                continue;
            }
            for value in values {
                copy.append(name.clone(), value.clone());
            }
        }
        copy.insert(
            headers::MSG_ID,
            format!("_tr_sched:{stream}:{seq}").as_str(),
        );
        match conn.publish(target.clone(), copy, message.payload).await {
            Ok(_) => {}
            // No queue is bound for it any longer: like a message
            // published now, it reaches none.
            Err(e) if e.kind() == ErrorKind::Unroutable => {
                tracing::warn!(stream, seq, subject = %target, "a message held for later came due with no queue bound for it");
            }
            Err(e) => return Err(e),
        }
    } else {
        tracing::warn!(
            stream,
            seq,
            "a message held for later without a target subject; left alone"
        );
        return Ok(());
    }
    let deleted: Result<Deleted> = conn
        .api(
            &format!("STREAM.MSG.DELETE.{held_in}"),
            &Seq { seq },
            "removing a message held for later once published",
        )
        .await;
    match deleted {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
