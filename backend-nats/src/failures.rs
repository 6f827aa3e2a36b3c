//! First failures and retry counts, kept in the broker: one record per
//! message of a queue, in the stream `TR_FAIL_<stream>` under
//! `_tr_fail.<stream>.<consumer>.<sequence>`.
//!
//! NATS redelivers the stored message after a delayed `Nak`, unchanged, so
//! what ticketrail knows about its earlier attempts cannot travel in it.
//! Kept here, a dead-letter record written by another process, or after a
//! restart, still says when the first attempt failed and how many retries
//! there were; and a redelivery that was not a retry (its consumer died)
//! does not use up an attempt.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::SystemTime;

use async_nats::{HeaderMap, StatusCode};
use serde::Deserialize;
use ticketrail_core::wire;
use ticketrail_core::{Error, ErrorKind, Result};

use crate::connection::Connection;
use crate::headers::EXPECTED_LAST_SUBJECT_SEQUENCE;
use crate::{error, topology};

/// The header of a direct get's answer that carries the stored message's
/// sequence.
const NATS_SEQUENCE: &str = "Nats-Sequence";

/// What the broker keeps about one message's failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailureRecord {
    pub(crate) first_failed_at: SystemTime,
    /// Retries scheduled so far.
    pub(crate) retries: u32,
    /// The record's own sequence, so the next update replaces exactly it.
    pub(crate) sequence: u64,
}

fn encode(first_failed_at: SystemTime, retries: u32) -> String {
    format!("{} {retries}", wire::encode_time(first_failed_at))
}

fn decode(text: &str, sequence: u64) -> Option<FailureRecord> {
    let (first, retries) = text.split_once(' ')?;
    Some(FailureRecord {
        first_failed_at: wire::decode_time(first)?,
        retries: retries.trim().parse().ok()?,
        sequence,
    })
}

/// The answer to `STREAM.MSG.GET`.
#[derive(Deserialize)]
pub(crate) struct MsgGet {
    pub(crate) message: async_nats::jetstream::stream::RawMessage,
}

/// A `STREAM.MSG.GET` or `STREAM.MSG.DELETE` of the message at `seq`.
#[derive(serde::Serialize)]
pub(crate) struct Seq {
    pub(crate) seq: u64,
}

/// The answer to `STREAM.MSG.DELETE`.
#[derive(Deserialize)]
pub(crate) struct Deleted {}

/// A `STREAM.MSG.GET` of the last message on a subject.
#[derive(serde::Serialize)]
pub(crate) struct LastBySubject<'a> {
    pub(crate) last_by_subj: &'a str,
}

/// Whether the failure records of `stream` can be read through a direct
/// get: their stream takes direct gets and has one replica (with more,
/// any replica answers a direct get, one that lags too). Asked once per
/// subscription; when in doubt, no.
pub(crate) async fn direct_gets(conn: &Connection, stream: &str) -> bool {
    #[derive(Deserialize)]
    struct Info {
        config: Settings,
    }
    #[derive(Deserialize)]
    struct Settings {
        #[serde(default)]
        allow_direct: bool,
        #[serde(default)]
        num_replicas: usize,
    }
    let api = format!("STREAM.INFO.{}", topology::failures_stream_name(stream));
    match conn
        .api_empty::<Info>(&api, "looking up the stream of failure records")
        .await
    {
        Ok(info) => info.config.allow_direct && info.config.num_replicas <= 1,
        Err(_) => false,
    }
}

/// The failure record of message `sequence` of `consumer`, if it has one.
///
/// Read for every redelivery, so through the stream's direct get where
/// [`direct_gets`] said it can be (served by the stream itself, without the
/// JetStream API's JSON and base64: about a fifth less server time per
/// retried message on nats-server 2.15), else through the API, which the
/// stream's leader answers.
pub(crate) async fn read(
    conn: &Connection,
    stream: &str,
    consumer: &str,
    sequence: u64,
    direct: bool,
) -> Result<Option<FailureRecord>> {
    let subject = topology::failure_subject(stream, consumer, sequence);
    let records = topology::failures_stream_name(stream);
    if !direct {
        return read_through_api(conn, &records, &subject).await;
    }
    let body = serde_json::to_vec(&LastBySubject {
        last_by_subj: &subject,
    })
    .expect("a request always encodes");
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(conn.config.request_timeout));
    let doing = "reading a failure record";
    let message = conn
        .client
        .send_request(format!("$JS.API.DIRECT.GET.{records}"), request)
        .await
        .map_err(|e| error::request(doing, e))?;
    match message.status {
        None | Some(StatusCode::OK) => {}
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(status) => {
            return Err(Error::new(
                ErrorKind::Broker,
                format!(
                    "{doing}: the server answered {} {}",
                    status.as_u16(),
                    message.description.as_deref().unwrap_or_default()
                ),
            ))
        }
    }
    let record_sequence = message
        .headers
        .as_ref()
        .and_then(|h| h.get(NATS_SEQUENCE))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or_default();
    Ok(decode(
        &String::from_utf8_lossy(&message.payload),
        record_sequence,
    ))
}

/// [`read`] through the JetStream API (`STREAM.MSG.GET`).
async fn read_through_api(
    conn: &Connection,
    records: &str,
    subject: &str,
) -> Result<Option<FailureRecord>> {
    let got: Result<MsgGet> = conn
        .api(
            &format!("STREAM.MSG.GET.{records}"),
            &LastBySubject {
                last_by_subj: subject,
            },
            "reading a failure record",
        )
        .await;
    match got {
        Ok(got) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(got.message.payload.as_bytes())
                .unwrap_or_default();
            Ok(decode(
                &String::from_utf8_lossy(&bytes),
                got.message.sequence,
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records one more retry of message `sequence`, keeping the first failure
/// time of `previous` (or `failed_at` for the first retry); returns the
/// record as stored.
pub(crate) async fn record_retry(
    conn: &Connection,
    stream: &str,
    consumer: &str,
    sequence: u64,
    previous: Option<FailureRecord>,
    failed_at: SystemTime,
) -> Result<FailureRecord> {
    let (first, retries, last) = match previous {
        Some(p) => (p.first_failed_at, p.retries + 1, p.sequence),
        None => (failed_at, 1, 0),
    };
    let mut headers = HeaderMap::new();
    headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string().as_str());
    let stored = conn
        .publish(
            topology::failure_subject(stream, consumer, sequence),
            headers,
            encode(first, retries).into(),
        )
        .await?;
    Ok(FailureRecord {
        first_failed_at: first,
        retries,
        sequence: stored,
    })
}

/// A map by stream sequence. Sequences are numbers the server hands out
/// one after another, never chosen by a publisher, so they need no
/// flood-resistant hash: one multiplication spreads them, where SipHash
/// cost a few hundred instructions for each of the two or three lookups a
/// delivery makes.
pub(crate) type BySequence<K, V> = HashMap<K, V, BuildHasherDefault<SequenceHasher>>;

/// Hashes a stream sequence by Fibonacci multiplication.
#[derive(Default)]
pub(crate) struct SequenceHasher(u64);

impl Hasher for SequenceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys come here; any other input still hashes, byte by byte.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The failure records one subscription wrote, by message, each with the
/// delivery count its message had when it was nacked: most retries come
/// back to the subscription that scheduled them, and then the record need
/// not be read from the broker.
#[derive(Default)]
pub(crate) struct Written {
    by_message: BySequence<u64, (u64, FailureRecord, u64)>,
    /// Messages in the order written, with the stamp of that write.
    order: VecDeque<(u64, u64)>,
    stamp: u64,
}

impl Written {
    /// At most this many are kept; the oldest go first (their messages
    /// most likely went to another consumer, which reads the broker's).
    const CAPACITY: usize = 10_000;

    /// Message `message`, delivered `delivered` times, was nacked after
    /// `record` was stored.
    pub(crate) fn insert(&mut self, message: u64, delivered: u64, record: FailureRecord) {
        self.stamp += 1;
        self.by_message
            .insert(message, (delivered, record, self.stamp));
        self.order.push_back((message, self.stamp));
        while self.order.len() > Self::CAPACITY {
            if let Some((old, stamp)) = self.order.pop_front() {
                if self.by_message.get(&old).is_some_and(|e| e.2 == stamp) {
                    self.by_message.remove(&old);
                }
            }
        }
    }

    /// The record of `message`, now delivered `delivered` times, if this
    /// subscription wrote it and nobody handled the message since: its
    /// delivery count went up by exactly this delivery (a delivery in
    /// between, where another consumer may have written a newer record or
    /// died, would have counted too). Forgotten either way.
    pub(crate) fn take(&mut self, message: u64, delivered: u64) -> Option<FailureRecord> {
        let (nacked_at, record, _) = self.by_message.remove(&message)?;
        (delivered == nacked_at + 1).then_some(record)
    }
}

#[derive(serde::Serialize)]
struct PurgeSubject<'a> {
    filter: &'a str,
}

/// Forgets message `sequence`: it was acked or dead-lettered. The purge
/// is sent, not awaited: the server carries out a JetStream API request
/// that has no reply subject (nats-server 2.9 and 2.15 both), and a
/// record that stays behind, because the request was lost or refused,
/// expires on its own ([`topology::failures_stream_config`]'s age), as
/// one whose purge failed always did. So settling a retried message waits
/// for no round trip, and no answer is parsed (a retried message's whole
/// way took 92,839 client instructions with the purge awaited, 70,003
/// without: BENCHMARKS.md).
pub(crate) async fn clear(
    conn: &Connection,
    stream: &str,
    consumer: &str,
    sequence: u64,
) -> Result<()> {
    let subject = topology::failure_subject(stream, consumer, sequence);
    let api = format!(
        "$JS.API.STREAM.PURGE.{}",
        topology::failures_stream_name(stream)
    );
    let body = serde_json::to_vec(&PurgeSubject { filter: &subject })
        .expect("a purge request always encodes");
    conn.client
        .publish(api, body.into())
        .await
        .map_err(|e| error::client("clearing a failure record", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_none() {
        let at = ticketrail_core::from_unix_millis(1_700_000_000_123);
        assert_eq!(
            decode(&encode(at, 3), 9),
            Some(FailureRecord {
                first_failed_at: at,
                retries: 3,
                sequence: 9
            })
        );
        assert_eq!(decode("garbage", 1), None);
        assert_eq!(decode("-5 1", 1), None);
    }

    fn record(retries: u32) -> FailureRecord {
        FailureRecord {
            first_failed_at: ticketrail_core::from_unix_millis(1_700_000_000_000),
            retries,
            sequence: u64::from(retries) + 100,
        }
    }

    #[test]
    fn a_written_record_is_used_only_if_nobody_had_the_message_since() {
        let mut written = Written::default();
        written.insert(7, 1, record(1));
        assert_eq!(written.take(7, 2), Some(record(1)), "the next delivery");
        assert_eq!(written.take(7, 2), None, "taken once");
        written.insert(7, 2, record(2));
        // Delivered twice since: another consumer may have written a newer
        // record, or died; the broker's record is read instead.
        assert_eq!(written.take(7, 4), None);
        assert_eq!(written.take(7, 3), None, "forgotten after a miss");
    }

    #[test]
    fn written_records_are_bounded_and_the_oldest_go_first() {
        let mut written = Written::default();
        for message in 0..Written::CAPACITY as u64 {
            written.insert(message, 1, record(1));
        }
        // Message 0 retried again: its newer entry outlives the old one's
        // eviction.
        assert_eq!(written.take(0, 2), Some(record(1)));
        written.insert(0, 2, record(2));
        written.insert(1_000_000, 1, record(1));
        assert!(written.by_message.len() <= Written::CAPACITY);
        assert_eq!(written.take(1, 2), None, "the oldest was evicted");
        assert_eq!(written.take(0, 3), Some(record(2)));
        assert_eq!(written.take(1_000_000, 2), Some(record(1)));
    }
}
