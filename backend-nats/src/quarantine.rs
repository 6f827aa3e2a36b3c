//! Messages the NATS client cannot parse, moved to the DLQ.
//!
//! nats-server stores any header block a client sends; async-nats drops its
//! whole connection when it meets one it cannot parse (bytes that are not
//! UTF-8, a line without a colon, a name with a space, another version
//! word), at every delivery of the message, for ever. A subscription whose
//! connection broke therefore reads the messages just delivered to its
//! queue through the JetStream API, whose JSON answer carries headers
//! base64-encoded, past the client's parser; one it could not have read is
//! recorded in the DLQ of every queue it was for (reason `unreadable`, with
//! why) and only then deleted from the stream.
//!
//! An upstream fix would let async-nats hand such a message to the
//! subscription as an error (with its reply subject) instead of closing the
//! connection; then it could be dead-lettered and terminated like any other.

use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use ticketrail_core::wire::Attempt;
use ticketrail_core::{DeadLetter, DeadLetterReason, ErrorKind, Result};

use crate::connection::{Connection, QueueInfo};
use crate::dead_letters;
use crate::failures::{Deleted, MsgGet, Seq};
use crate::headers::read_block;
use crate::topology;

/// How many of the stream sequences delivered last are looked at: the
/// message that broke the connection was delivered moments before.
const WINDOW: u64 = 1024;

#[derive(Deserialize)]
struct ConsumerState {
    delivered: Sequences,
    ack_floor: Sequences,
}

#[derive(Deserialize)]
struct Sequences {
    stream_seq: u64,
}

/// Looks at the messages delivered last to `info`'s queue and moves those
/// the client cannot parse to the DLQ. Returns how many it moved.
pub(crate) async fn scan(conn: &Connection, info: &QueueInfo) -> Result<usize> {
    let state: ConsumerState = conn
        .api_empty(
            &format!("CONSUMER.INFO.{}.{}", info.stream, info.consumer),
            &format!("reading the state of `{}`", info.name),
        )
        .await?;
    let high = state.delivered.stream_seq;
    let low = (state.ack_floor.stream_seq + 1).max(high.saturating_sub(WINDOW) + 1);
    let mut moved = 0;
    for sequence in low..=high {
        let got: Result<MsgGet> = conn
            .api(
                &format!("STREAM.MSG.GET.{}", info.stream),
                &Seq { seq: sequence },
                "reading a delivered message",
            )
            .await;
        let message = match got {
            Ok(got) => got.message,
            // Acked and gone, or deleted.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let decode = |text: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .unwrap_or_default()
        };
        let block = read_block(&message.headers.as_deref().map(decode).unwrap_or_default());
        if block.problems.is_empty() {
            continue;
        }
        quarantine(
            conn,
            info,
            sequence,
            &message.subject,
            block,
            Bytes::from(decode(&message.payload)),
            SystemTime::from(message.time),
        )
        .await?;
        moved += 1;
    }
    Ok(moved)
}

async fn quarantine(
    conn: &Connection,
    info: &QueueInfo,
    sequence: u64,
    subject: &str,
    block: crate::headers::RawBlock,
    payload: Bytes,
    stored_at: SystemTime,
) -> Result<()> {
    let why = block.problems.join("; ");
    let replayed_to = topology::replayed_to(&info.stream, subject).map(str::to_owned);
    let routing_key = subject
        .strip_prefix(info.space.as_str())
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(subject)
        .to_owned();
    let decoded = block
        .into_incoming(&routing_key, payload, stored_at, Attempt::Fresh)
        .decode();
    // Every queue it was for: the one a replay names, or every queue whose
    // bindings match; each would meet the same wall.
    let queues = conn.queues_of(&info.space).await?;
    let targets = queues.iter().filter(|q| match &replayed_to {
        Some(name) => *name == q.name,
        None => topology::bound(&q.bindings, &routing_key),
    });
    for spec in targets {
        let target = QueueInfo::new(&info.space, spec, conn.server.several_filters)?;
        let mut notes = decoded.notes.clone();
        notes.push(format!("stream sequence {sequence} of {}", info.stream));
        let now = SystemTime::now();
        let record = DeadLetter {
            envelope: decoded.envelope.clone(),
            queue: spec.name.clone(),
            reason: DeadLetterReason::Unreadable,
            last_error: format!(
                "the NATS client cannot read this message ({why}); every delivery of it broke \
                 the consumer's connection, so it was taken out of the stream"
            ),
            attempts: 1,
            first_failed_at: now,
            last_failed_at: now,
            notes,
        };
        dead_letters::write(conn, &target, &record, sequence).await?;
    }
    let _: Deleted = conn
        .api(
            &format!("STREAM.MSG.DELETE.{}", info.stream),
            &Seq { seq: sequence },
            "removing an unreadable message from its stream",
        )
        .await?;
    tracing::warn!(queue = %info.name, sequence, why = %why, "an unreadable message was moved to the DLQ");
    Ok(())
}
