//! The DLQs of a topic space: records written to `_tr_dlq.<stream>.<queue>`
//! of the stream `TR_DLQ_<stream>` (C10), and walked one at a time (C11).
//!
//! A record that does not fit in one message next to its payload (a payload
//! or headers near `max_payload`) keeps the payload, wrapped with the
//! application's headers, in the object store `TR_DLQ_<stream>`, referenced
//! from the record: it is still written, crash-safely, never refused.
//!
//! Records are read through the JetStream API's JSON form, whose headers
//! come base64-encoded, so a header block the client cannot parse (a
//! stranger published it straight into the DLQ) neither hangs nor
//! disconnects the reader: it is returned with reason `unreadable`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_nats::jetstream::stream::RawMessage;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use serde::{Deserialize, Serialize};
use ticketrail_core::wire::{self, Attempt, RecordFallback};
use ticketrail_core::{
    DeadLetter, DeadLetterCursor, DeadLetterEntry, DeadLetterHandle, DeadLetterReason, Envelope,
    Error, ErrorKind, Headers, Result,
};
use tokio::io::AsyncReadExt;

use crate::connection::{Connection, QueueInfo};
use crate::failures::{Deleted, MsgGet, Seq};
use crate::headers::{self, read_block, RawBlock};
use crate::topology;

/// Room kept under `max_payload` for what the size estimate leaves out.
const SIZE_MARGIN: usize = 1024;
/// [`wire::PAYLOAD_REF`] of a payload kept in the object store: followed by
/// `<bucket>/<object>`.
const OBJECT_REF: &str = "object:";

/// The deduplication id of the record of message `sequence` in `queue`'s
/// DLQ: writing it again after a crash stores one record.
fn record_id(info: &QueueInfo, sequence: u64) -> String {
    format!("{}:{}:{}", info.stream, sequence, info.name)
}

async fn object_store(
    conn: &Connection,
    info: &QueueInfo,
) -> Result<async_nats::jetstream::object_store::ObjectStore> {
    let bucket = topology::dlq_stream_name(&info.stream);
    conn.js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: bucket.clone(),
            description: Some(format!(
                "ticketrail dead-letter payloads too large to sit next to their record, of {}",
                info.stream
            )),
            num_replicas: conn.config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("opening the object store `{bucket}`"),
            )
            .with_source(e)
        })
}

/// Writes `record` of message `sequence` to the DLQ of `info`'s queue and
/// waits for the stream's acknowledgement.
pub(crate) async fn write(
    conn: &Connection,
    info: &QueueInfo,
    record: &DeadLetter,
    sequence: u64,
) -> Result<()> {
    let id = record_id(info, sequence);
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let mut bookkeeping = record.wire_headers();
    let headers = headers::copy(
        &record.envelope,
        &record.envelope.headers,
        &bookkeeping,
        &id,
    );
    let limit = conn.server.max_payload;
    let block = headers::block_size(&headers);
    if fits(block, record.envelope.payload.len() + subject.len(), limit) {
        return conn
            .publish(subject, headers, record.envelope.payload.clone())
            .await
            .map(drop);
    }
    // The application's headers do not fit next to the bookkeeping (the
    // server refuses a header block over 64 KiB) or the whole is too
    // large: they travel in the body, wrapped, as RabbitMQ's copies do;
    // the reader unwraps it.
    let body = wire::wrap(&record.envelope);
    let mut inline = bookkeeping.clone();
    inline.push((wire::PAYLOAD_REF, wire::PAYLOAD_IN_BODY.to_owned()));
    let wrapped = headers::copy(&record.envelope, &Headers::new(), &inline, &id);
    if fits(
        headers::block_size(&wrapped),
        body.len() + subject.len(),
        limit,
    ) {
        return conn.publish(subject, wrapped, body).await.map(drop);
    }
    // Too large for one message: the payload and the application's headers
    // go to the object store first, then the record points at them.
    let store = object_store(conn, info).await?;
    store
        .put(id.as_str(), &mut body.as_ref())
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("keeping the payload of `{id}` in the object store"),
            )
            .with_source(e)
        })?;
    let bucket = topology::dlq_stream_name(&info.stream);
    bookkeeping.push((wire::PAYLOAD_REF, format!("{OBJECT_REF}{bucket}/{id}")));
    let headers = headers::copy(&record.envelope, &Headers::new(), &bookkeeping, &id);
    conn.publish(subject, headers, Bytes::new()).await.map(drop)
}

/// The largest header block nats-server stores: it refuses a larger one
/// ("header size exceeds maximum allowed of 64k", JetStream error 10097).
const MAX_HEADER_BLOCK: usize = u16::MAX as usize;

/// Whether a message with a header block of `block` bytes and `rest` bytes
/// of body and subject goes out as one message under a server's
/// `max_payload` of `limit`, with room to spare for what the sizes do not
/// count exactly.
fn fits(block: usize, rest: usize, limit: usize) -> bool {
    block + SIZE_MARGIN <= MAX_HEADER_BLOCK && block + rest + SIZE_MARGIN <= limit
}

#[derive(Serialize)]
struct NextBySubject<'a> {
    seq: u64,
    next_by_subj: &'a str,
}

#[derive(Serialize)]
struct SubjectsFilter<'a> {
    subjects_filter: &'a str,
}

#[derive(Deserialize)]
pub(crate) struct StreamState {
    pub(crate) state: State,
}

#[derive(Deserialize)]
pub(crate) struct State {
    #[serde(default)]
    pub(crate) messages: u64,
    #[serde(default)]
    pub(crate) last_seq: u64,
    #[serde(default)]
    pub(crate) subjects: HashMap<String, u64>,
}

/// The state of `stream`, with per-subject counts of the subjects matching
/// `filter`.
pub(crate) async fn stream_state(conn: &Connection, stream: &str, filter: &str) -> Result<State> {
    let state: StreamState = conn
        .api(
            &format!("STREAM.INFO.{stream}"),
            &SubjectsFilter {
                subjects_filter: filter,
            },
            &format!("reading stream `{stream}`"),
        )
        .await?;
    Ok(state.state)
}

/// How many records the DLQ of `info`'s queue holds.
pub(crate) async fn count(conn: &Connection, info: &QueueInfo) -> Result<u64> {
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let state = stream_state(conn, &topology::dlq_stream_name(&info.stream), &subject).await?;
    Ok(state.subjects.values().sum())
}

/// A cursor over the records in the DLQ of one queue when it was opened.
///
/// Reading one record per round trip (`next_by_subj`) reads a few hundred
/// a second, so the cursor keeps [`WINDOW`] gets of the following sequence
/// numbers in flight, and skips those of other queues (the stream holds the
/// DLQs of a whole topic space) or deleted since. A window with nothing of
/// this queue's means its records are sparse there: the cursor then jumps
/// to the next one with `next_by_subj` and starts a new window from it.
pub(crate) struct NatsCursor {
    conn: Arc<Connection>,
    info: Arc<QueueInfo>,
    stream: String,
    subject: String,
    /// The next sequence number to ask for.
    next: u64,
    last: u64,
    /// Gets in flight, in sequence order.
    window: FuturesOrdered<BoxFuture<'static, Result<Option<RawMessage>>>>,
    /// Gets of the window in flight that found nothing of this queue's yet.
    misses: usize,
}

/// Gets a cursor keeps in flight.
const WINDOW: usize = 64;

impl NatsCursor {
    pub(crate) async fn open(conn: Arc<Connection>, info: Arc<QueueInfo>) -> Result<Self> {
        let stream = topology::dlq_stream_name(&info.stream);
        let subject = topology::dlq_subject(&info.stream, &info.name);
        let state = stream_state(&conn, &stream, &subject).await?;
        Ok(NatsCursor {
            conn,
            info,
            stream,
            subject,
            next: 1,
            last: state.last_seq,
            window: FuturesOrdered::new(),
            misses: 0,
        })
    }

    /// One get of the stream: at `seq` exactly, or with `by_subject` the
    /// first of this queue's records from `seq` on; `None` if there is none.
    fn get(&self, seq: u64, by_subject: bool) -> BoxFuture<'static, Result<Option<RawMessage>>> {
        let conn = Arc::clone(&self.conn);
        let api = format!("STREAM.MSG.GET.{}", self.stream);
        let subject = by_subject.then(|| self.subject.clone());
        let doing = format!("reading the DLQ of `{}`", self.info.name);
        Box::pin(async move {
            let got: Result<MsgGet> = match &subject {
                Some(subject) => {
                    let request = NextBySubject {
                        seq,
                        next_by_subj: subject,
                    };
                    conn.api(&api, &request, &doing).await
                }
                None => conn.api(&api, &Seq { seq }, &doing).await,
            };
            match got {
                Ok(got) => Ok(Some(got.message)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// The next stored message of this queue's DLQ, up to `last`.
    async fn next_message(&mut self) -> Result<Option<RawMessage>> {
        loop {
            // After a window's worth of misses in a row, stop speculating.
            while self.misses < WINDOW && self.window.len() < WINDOW && self.next <= self.last {
                let get = self.get(self.next, false);
                self.window.push_back(get);
                self.next += 1;
            }
            if let Some(got) = self.window.next().await {
                match got? {
                    Some(message) if message.subject == self.subject => {
                        self.misses = 0;
                        return Ok(Some(message));
                    }
                    _ => self.misses += 1,
                }
                continue;
            }
            if self.next > self.last {
                return Ok(None);
            }
            // A whole window of other queues' records: jump.
            self.misses = 0;
            match self.get(self.next, true).await? {
                Some(message) if message.sequence <= self.last => {
                    self.next = message.sequence + 1;
                    return Ok(Some(message));
                }
                _ => {
                    self.next = self.last + 1;
                    return Ok(None);
                }
            }
        }
    }

    async fn read(&mut self) -> Result<Option<DeadLetterEntry>> {
        let Some(message) = self.next_message().await? else {
            return Ok(None);
        };
        let decode = |text: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .unwrap_or_default()
        };
        let block = read_block(&message.headers.as_deref().map(decode).unwrap_or_default());
        let payload = Bytes::from(decode(&message.payload));
        let stored_at = SystemTime::from(message.time);
        let (record, object) = record(&self.conn, &self.info, block, payload, stored_at).await?;
        let handle = NatsDeadLetter {
            conn: Arc::clone(&self.conn),
            info: Arc::clone(&self.info),
            stream: self.stream.clone(),
            sequence: message.sequence,
            object,
        };
        Ok(Some(DeadLetterEntry::new(
            crate::BACKEND,
            record,
            Box::new(handle),
        )))
    }
}

#[async_trait]
impl DeadLetterCursor for NatsCursor {
    async fn next(&mut self) -> Option<Result<DeadLetterEntry>> {
        self.read().await.transpose()
    }
}

/// Reads a DLQ message as its record, fetching a payload kept in the object
/// store; returns the object's name too, to delete it with the record.
async fn record(
    conn: &Connection,
    info: &QueueInfo,
    mut block: RawBlock,
    mut payload: Bytes,
    stored_at: SystemTime,
) -> Result<(DeadLetter, Option<String>)> {
    let mut object = None;
    if let Some(reference) = block.headers.get(wire::PAYLOAD_REF).cloned() {
        if let Some((_bucket, name)) = reference
            .strip_prefix(OBJECT_REF)
            .and_then(|r| r.split_once('/'))
        {
            let store = object_store(conn, info).await?;
            let mut data = Vec::new();
            let mut reader = store.get(name).await.map_err(|e| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("the payload `{name}` of a dead letter"),
                )
                .with_source(e)
            })?;
            reader.read_to_end(&mut data).await.map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("reading the payload `{name}`"),
                )
                .with_source(e)
            })?;
            payload = data.into();
            // Now the payload is a wrapped body, like RabbitMQ's.
            block.headers.insert(
                wire::PAYLOAD_REF.to_owned(),
                wire::PAYLOAD_IN_BODY.to_owned(),
            );
            object = Some(name.to_owned());
        }
    }
    let problems = std::mem::take(&mut block.problems);
    let has_record = block.headers.contains_key(wire::REASON);
    let routing_key = block
        .headers
        .get(wire::ROUTING_KEY)
        .cloned()
        .unwrap_or_default();
    let decoded = block
        .into_incoming(&routing_key, payload, stored_at, Attempt::Recorded)
        .decode();
    let fallback = RecordFallback {
        queue: info.name.to_string(),
        reason: DeadLetterReason::Permanent,
        last_error: "this message carries no dead-letter record: another client published it \
                     straight to the DLQ"
            .to_owned(),
        failed_at: Some(stored_at),
    };
    let mut record = DeadLetter::from_wire(decoded, fallback);
    if !has_record {
        record
            .notes
            .push("published straight to the DLQ, not by ticketrail".to_owned());
    }
    if !problems.is_empty() {
        record.notes.push(format!(
            "before it was found unreadable: reason {}, last error: {}",
            record.reason,
            wire::quote(&record.last_error)
        ));
        record.reason = DeadLetterReason::Unreadable;
        record.last_error = format!(
            "the NATS client cannot read this message: {}",
            problems.join("; ")
        );
    }
    Ok((record, object))
}

/// One record of the DLQ stream.
struct NatsDeadLetter {
    conn: Arc<Connection>,
    info: Arc<QueueInfo>,
    stream: String,
    sequence: u64,
    object: Option<String>,
}

impl NatsDeadLetter {
    async fn delete(&self) -> Result<()> {
        let _: Deleted = self
            .conn
            .api(
                &format!("STREAM.MSG.DELETE.{}", self.stream),
                &Seq { seq: self.sequence },
                &format!("removing a record from the DLQ of `{}`", self.info.name),
            )
            .await?;
        if let Some(name) = &self.object {
            if let Ok(store) = object_store(&self.conn, &self.info).await {
                let _ = store.delete(name).await;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetterHandle for NatsDeadLetter {
    async fn replay(self: Box<Self>, envelope: Envelope) -> Result<()> {
        // To this queue only, by its replay subject; same id, attempt 1;
        // removed from the DLQ once the stream has acknowledged it.
        let id = format!("{}:replay:{}", envelope.id, self.sequence);
        let bookkeeping = wire::copy_headers(&envelope);
        let headers = headers::copy(&envelope, &envelope.headers, &bookkeeping, &id);
        let block = headers::block_size(&headers);
        if block > MAX_HEADER_BLOCK {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "replaying message {} needs a header block of {block} bytes with its \
                     bookkeeping, over the 65,535 bytes nats-server stores; it stays in the DLQ",
                    envelope.id
                ),
            ));
        }
        let size = block + envelope.payload.len();
        if size > self.conn.server.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "replaying message {} takes {size} bytes with its bookkeeping, over the \
                     server's max_payload of {}",
                    envelope.id, self.conn.server.max_payload
                ),
            ));
        }
        let subject = topology::replay_subject(&self.info.stream, &self.info.name);
        self.conn
            .publish(subject, headers, envelope.payload.clone())
            .await?;
        self.delete().await.map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "message {} was replayed, but removing it from the DLQ failed; it may be \
                     replayed twice",
                    envelope.id
                ),
            )
            .with_source(e)
        })
    }

    async fn remove(self: Box<Self>) -> Result<()> {
        self.delete().await
    }
}

/// A `STREAM.PURGE` of one subject's messages.
#[derive(Serialize)]
struct PurgeFilter<'a> {
    filter: &'a str,
}

/// The answer to `STREAM.PURGE`.
#[derive(Deserialize)]
struct Purged {
    purged: u64,
}

/// Removes every record of the DLQ of `info`'s queue, and the payloads it
/// kept in the object store.
pub(crate) async fn purge(conn: &Connection, info: &QueueInfo) -> Result<usize> {
    let stream = topology::dlq_stream_name(&info.stream);
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let purged: Purged = conn
        .api(
            &format!("STREAM.PURGE.{stream}"),
            &PurgeFilter { filter: &subject },
            &format!("purging the DLQ of `{}`", info.name),
        )
        .await?;
    if let Ok(store) = conn.js.get_object_store(&stream).await {
        use futures::TryStreamExt;
        let suffix = format!(":{}", info.name);
        if let Ok(list) = store.list().await {
            let names: Vec<String> = list
                .try_filter_map(|o| {
                    let keep = o.name.ends_with(&suffix).then(|| o.name.clone());
                    async move { Ok(keep) }
                })
                .try_collect()
                .await
                .unwrap_or_default();
            for name in names {
                let _ = store.delete(&name).await;
            }
        }
    }
    Ok(purged.purged as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_fits_only_under_both_the_header_and_the_payload_limit() {
        let mib = 1024 * 1024;
        assert!(fits(1_000, 10_000, mib));
        // The server's 64 KiB header block, whatever max_payload allows.
        assert!(!fits(65_000, 10, mib));
        assert!(fits(MAX_HEADER_BLOCK - SIZE_MARGIN, 10, mib));
        assert!(!fits(MAX_HEADER_BLOCK - SIZE_MARGIN + 1, 10, mib));
        // max_payload counts headers and body together.
        assert!(!fits(1_000, mib - 1_000, mib));
    }
}
