//! Hostile and careless publishers: every message a broker accepts, from
//! any client, ends handled or in the DLQ with a record saying why; one bad
//! message costs the good ones nothing (no attempt, no stall); the consumer
//! stays alive; the DLQ tools read every record without hanging.
//!
//! Each backend gets messages from plain clients (forged bookkeeping
//! headers, odd ids, times and payloads) and, where a broker stores what its
//! client library cannot read, raw protocol frames (NATS header blocks that
//! are not UTF-8, have no colon, a status line, another version; AMQP short
//! strings that are not UTF-8). Good messages go between them; at the end
//! every key is accounted for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail_conformance::testing::{raw_amqp, raw_nats_publish, unique};
use ticketrail_conformance::{Harness, MemoryHarness, NatsHarness, RabbitHarness};
use ticketrail_core::wire;
use ticketrail_core::{
    handler_fn, Consumer, Context, DeadLetter, DeadLetterReason, Fixed, HandlerError, Message,
    QueueSpec, RunningConsumer, SharedBroker, Topology,
};
use ticketrail_memory::RawMessage;
use ticketrail_rabbitmq::raw::{RawProperties, RawText, RawValue};

#[derive(serde::Deserialize)]
struct Job {
    key: String,
}

/// What a handled message looked like.
#[derive(Debug, Clone)]
struct Seen {
    attempt: u32,
    id: String,
    routing_key: String,
}

/// What must become of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Handled, every time at attempt 1.
    Handled,
    /// In the DLQ with this reason.
    DeadLettered(DeadLetterReason),
    /// Handled, or in the DLQ with this reason (it depends on the server
    /// version).
    Either(DeadLetterReason),
}

/// What became of every message.
struct Report {
    handled: BTreeMap<String, Vec<Seen>>,
    records: BTreeMap<String, DeadLetter>,
}

impl Report {
    fn seen(&self, key: &str) -> &[Seen] {
        self.handled.get(key).map_or(&[], Vec::as_slice)
    }

    fn record(&self, key: &str) -> &DeadLetter {
        self.records
            .get(key)
            .unwrap_or_else(|| panic!("`{key}` is not in the DLQ"))
    }
}

/// A queue with a consumer that records every key it handles.
struct Battery {
    broker: SharedBroker,
    topology: Topology,
    queue: String,
    handled: Arc<Mutex<BTreeMap<String, Vec<Seen>>>>,
    consumer: RunningConsumer,
    expected: Vec<(String, Expect)>,
    goods: usize,
}

impl Battery {
    async fn start(harness: &dyn Harness, delivery_limit: u32) -> Battery {
        // What the backends log (warnings on unreadable messages), with RUST_LOG.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let prefix = unique("tr-hostile");
        let queue = format!("{prefix}.q");
        let topology = Topology::new(format!("{prefix}.events")).queue(
            QueueSpec::new(&queue)
                .bind("jobs.#")
                .delivery_limit(delivery_limit),
        );
        let broker = harness.connect().await.expect("connecting");
        broker.declare(&topology).await.expect("declaring");
        let handled: Arc<Mutex<BTreeMap<String, Vec<Seen>>>> = Arc::default();
        let record = Arc::clone(&handled);
        let handler = handler_fn(move |job: Job, ctx: Context| {
            let record = Arc::clone(&record);
            async move {
                record
                    .lock()
                    .unwrap()
                    .entry(job.key)
                    .or_default()
                    .push(Seen {
                        attempt: ctx.attempt(),
                        id: ctx.id().to_owned(),
                        routing_key: ctx.envelope().routing_key.clone(),
                    });
                Ok::<(), HandlerError>(())
            }
        });
        let consumer = Consumer::new(broker.clone(), queue.clone(), handler)
            .retry_policy(Fixed::new(Duration::from_millis(200), 3).unwrap())
            .prefetch(20)
            .spawn();
        Battery {
            broker,
            topology,
            queue,
            handled,
            consumer,
            expected: Vec::new(),
            goods: 0,
        }
    }

    fn space(&self) -> String {
        self.topology.topic_space.clone()
    }

    fn expect(&mut self, key: &str, expect: Expect) {
        self.expected.push((key.to_owned(), expect));
    }

    /// A good message between two bad ones.
    async fn good(&mut self) {
        self.goods += 1;
        let key = format!("good-{}", self.goods);
        let message = Message::new("jobs.good", json(&key)).content_type("application/json");
        self.broker
            .publish(&self.topology.topic_space, message)
            .await
            .expect("a good publish");
        self.expect(&key, Expect::Handled);
    }

    /// Waits until every key is handled or dead-lettered, checks what became
    /// of each and that the consumer is alive, and tears down.
    async fn account(self, within: Duration) -> Report {
        let started = Instant::now();
        let deadline = started + within;
        let records = loop {
            let listing = tokio::time::timeout(
                Duration::from_secs(20),
                self.broker.dead_letters(&self.queue, 10_000),
            )
            .await;
            let records = match listing {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => panic!("the DLQ tools failed: {e}"),
                Err(_) => panic!("listing the DLQ hung for 20 s"),
            };
            let dead: BTreeSet<String> = records.iter().filter_map(key_of).collect();
            let handled = self.handled.lock().unwrap().clone();
            let missing: Vec<&String> = self
                .expected
                .iter()
                .map(|(k, _)| k)
                .filter(|k| !handled.contains_key(*k) && !dead.contains(*k))
                .collect();
            if missing.is_empty() {
                break records;
            }
            assert!(
                Instant::now() < deadline,
                "lost (neither handled nor dead-lettered after {within:?}): {missing:?}; \
                 consumer {:?}; DLQ: {:?}",
                self.consumer.health(),
                records
                    .iter()
                    .map(|r| (key_of(r), r.reason, r.last_error.clone()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let took = started.elapsed();
        let health = self.consumer.health();
        assert!(
            !self.consumer.is_finished() && health.is_live(),
            "the consumer died: {health:?}"
        );
        let report = Report {
            handled: self.handled.lock().unwrap().clone(),
            records: records
                .into_iter()
                .filter_map(|r| key_of(&r).map(|k| (k, r)))
                .collect(),
        };
        for (key, expect) in &self.expected {
            let seen = report.handled.get(key);
            let record = report.records.get(key);
            let dead_as = |reason: DeadLetterReason| match record {
                Some(r) => {
                    assert_eq!(r.reason, reason, "`{key}`: {r:?}");
                    assert!(!r.last_error.is_empty(), "`{key}`: a record without why");
                }
                None => panic!("`{key}` should be in the DLQ as {reason}; handled: {seen:?}"),
            };
            match expect {
                Expect::Handled => {
                    let seen = seen.unwrap_or_else(|| panic!("`{key}` not handled: {record:?}"));
                    assert!(
                        seen.iter().all(|s| s.attempt == 1),
                        "`{key}` was handled at attempts {:?}: something cost it an attempt",
                        seen.iter().map(|s| s.attempt).collect::<Vec<_>>()
                    );
                    assert!(record.is_none(), "`{key}` was handled and dead-lettered");
                }
                Expect::DeadLettered(reason) => dead_as(*reason),
                Expect::Either(reason) => {
                    if seen.is_none() {
                        dead_as(*reason);
                    }
                }
            }
        }
        eprintln!(
            "hostile battery on {}: {} messages accounted for in {took:?}: {} handled, {} dead-lettered",
            self.broker.backend(),
            self.expected.len(),
            report.handled.len(),
            report.records.len()
        );
        self.consumer.shutdown().await.expect("shutting down");
        self.broker
            .delete(&self.topology)
            .await
            .expect("cleaning up");
        let _ = self.broker.close().await;
        report
    }
}

/// The key a record's payload carries: JSON `{"key":..}`, or `key=...`
/// after whatever garbage came first.
fn key_of(record: &DeadLetter) -> Option<String> {
    if let Ok(job) = serde_json::from_slice::<Job>(&record.envelope.payload) {
        return Some(job.key);
    }
    let text = String::from_utf8_lossy(&record.envelope.payload);
    let start = text.find("key=")? + 4;
    let key: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some(key)
}

fn json(key: &str) -> Vec<u8> {
    format!(r#"{{"key":"{key}"}}"#).into_bytes()
}

/// A payload that is not JSON, `len` bytes long, with the key findable in it.
fn garbage(key: &str, len: usize) -> Vec<u8> {
    let mut payload = format!("\u{1}not json key={key} ").into_bytes();
    payload.resize(len.max(payload.len()), b'#');
    payload
}

/// Forged bookkeeping every backend must bound: `(key, headers)`.
fn forgeries() -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    vec![
        (
            "forged-attempt",
            vec![(wire::ATTEMPT, "99999999999".into())],
        ),
        ("forged-attempt-3", vec![(wire::ATTEMPT, "3".into())]),
        (
            "negative-first-failure",
            vec![(wire::FIRST_FAILED_AT, "-5".into())],
        ),
        (
            "huge-first-failure",
            vec![(wire::FIRST_FAILED_AT, i64::MAX.to_string())],
        ),
        (
            "future-publish",
            vec![(wire::PUBLISHED_AT, "99999999999999".into())],
        ),
        (
            "wildcard-routing-key",
            vec![(wire::ROUTING_KEY, "jobs.*.>".into())],
        ),
        ("long-id", vec![(wire::ID, "i".repeat(400))]),
        ("empty-id", vec![(wire::ID, String::new())]),
        (
            "payload-ref",
            vec![(wire::PAYLOAD_REF, wire::PAYLOAD_IN_BODY.into())],
        ),
        (
            "forged-record",
            vec![
                (wire::REASON, "vanished".into()),
                (wire::SOURCE_QUEUE, "elsewhere".into()),
                (wire::ATTEMPTS, "lots".into()),
            ],
        ),
        (
            "other-queue",
            vec![(wire::SOURCE_QUEUE, "some.other.queue".into())],
        ),
        ("empty-queue", vec![(wire::SOURCE_QUEUE, String::new())]),
    ]
}

/// The forged values were set aside: first attempts, sane ids and keys.
fn check_forgeries(report: &Report) {
    for (key, _) in forgeries() {
        assert!(!report.seen(key).is_empty(), "`{key}` was not handled");
    }
    let long = report.seen("long-id");
    assert!(
        long.iter().all(|s| s.id.len() <= wire::MAX_ID_LEN),
        "{long:?}"
    );
    let empty = report.seen("empty-id");
    assert!(empty.iter().all(|s| !s.id.is_empty()), "{empty:?}");
    let wild = report.seen("wildcard-routing-key");
    assert!(
        wild.iter().all(|s| s.routing_key == "jobs.hostile"),
        "{wild:?}"
    );
}

/// Payloads that do not decode: empty, garbage, and garbage just under
/// `limit` bytes (the record must still fit, or be kept elsewhere).
fn undecodable(limit: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("garbage-payload", garbage("garbage-payload", 64)),
        (
            "near-limit-payload",
            garbage("near-limit-payload", limit - 400),
        ),
        ("binary-payload", {
            let mut p = garbage("binary-payload", 32);
            p.extend_from_slice(&[0xff, 0xfe, 0x00, 0xc3]);
            p
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hostile_battery() {
    let harness = MemoryHarness::default();
    let mut battery = Battery::start(&harness, 5).await;
    let space = battery.space();
    let publish = |raw: RawMessage| {
        let (broker, space) = (harness.broker().clone(), space.clone());
        async move {
            broker
                .publish_raw(&space, raw)
                .await
                .expect("a raw publish")
        }
    };
    for (key, headers) in forgeries() {
        battery.good().await;
        let mut raw = RawMessage::new("jobs.hostile", json(key));
        for (name, value) in headers {
            raw = raw.header(name, value);
        }
        publish(raw).await;
        battery.expect(key, Expect::Handled);
    }
    for (key, payload) in undecodable(64 * 1024) {
        battery.good().await;
        publish(RawMessage::new("jobs.hostile", payload)).await;
        battery.expect(key, Expect::DeadLettered(DeadLetterReason::Undecodable));
    }
    battery.good().await;
    let report = battery.account(Duration::from_secs(20)).await;
    check_forgeries(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_hostile_battery() {
    let harness = NatsHarness::from_env();
    let mut battery = Battery::start(&harness, 3).await;
    let space = battery.space();
    let server = battery.broker.describe();
    let address = harness
        .url()
        .trim_start_matches("nats://")
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    let publish = |key: String, block: Option<Vec<u8>>, payload: Vec<u8>| {
        let (address, subject) = (address.clone(), format!("{space}.jobs.hostile"));
        async move {
            raw_nats_publish(&address, &subject, block.as_deref(), &payload)
                .await
                .unwrap_or_else(|e| panic!("`{key}`: {e}"))
        }
    };
    // Plain clients forging bookkeeping.
    for (key, headers) in forgeries() {
        battery.good().await;
        let mut block = b"NATS/1.0\r\n".to_vec();
        for (name, value) in headers {
            block.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        block.extend_from_slice(b"\r\n");
        publish(key.to_owned(), Some(block), json(key)).await;
        battery.expect(key, Expect::Handled);
    }
    // Duplicate headers, a huge Nats-Msg-Id: plain, readable.
    battery.good().await;
    let block = format!(
        "NATS/1.0\r\nTenant: a\r\nTenant: b\r\nNats-Msg-Id: {}\r\n\r\n",
        "m".repeat(2000)
    );
    publish(
        "odd-but-readable".into(),
        Some(block.into_bytes()),
        json("odd-but-readable"),
    )
    .await;
    battery.expect("odd-but-readable", Expect::Handled);
    // Header blocks async-nats cannot parse: it drops its connection at
    // every delivery of them.
    for (key, block) in [
        (
            "non-utf8-header",
            b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n".to_vec(),
        ),
        (
            "no-colon-header",
            b"NATS/1.0\r\nNoColonHere\r\n\r\n".to_vec(),
        ),
        ("space-in-name", b"NATS/1.0\r\nBad Name: v\r\n\r\n".to_vec()),
        ("other-version", b"NATS/2.0\r\nA: b\r\n\r\n".to_vec()),
    ] {
        battery.good().await;
        publish(key.to_owned(), Some(block), json(key)).await;
        battery.expect(key, Expect::DeadLettered(DeadLetterReason::Unreadable));
    }
    // Status lines: nats-server 2.9 stores them and the client takes the
    // message for a server status; 2.15 strips them at publish.
    for (key, block) in [
        (
            "status-100",
            b"NATS/1.0 100 Idle Heartbeat\r\nA: b\r\n\r\n".to_vec(),
        ),
        (
            "status-408",
            b"NATS/1.0 408 Request Timeout\r\n\r\n".to_vec(),
        ),
        ("status-503", b"NATS/1.0 503\r\n\r\n".to_vec()),
    ] {
        battery.good().await;
        publish(key.to_owned(), Some(block), json(key)).await;
        battery.expect(key, Expect::Either(DeadLetterReason::Unreadable));
    }
    // Undecodable payloads, one a few hundred bytes under max_payload, and
    // one with a header block near 64 KiB: the record does not fit next to
    // them.
    let max_payload = 1024 * 1024;
    for (key, payload) in undecodable(max_payload) {
        battery.good().await;
        publish(key.to_owned(), None, payload).await;
        battery.expect(key, Expect::DeadLettered(DeadLetterReason::Undecodable));
    }
    battery.good().await;
    let block = format!("NATS/1.0\r\nBig: {}\r\n\r\n", "h".repeat(63 * 1024));
    publish(
        "big-headers".into(),
        Some(block.into_bytes()),
        garbage("big-headers", 1000),
    )
    .await;
    battery.expect(
        "big-headers",
        Expect::DeadLettered(DeadLetterReason::Undecodable),
    );
    // A header block the server stores, but with no room left for the
    // record's bookkeeping next to it: the record carries the headers in
    // its body instead.
    battery.good().await;
    let huge = 65_400 - "NATS/1.0\r\nBig: \r\n\r\n".len();
    let block = format!("NATS/1.0\r\nBig: {}\r\n\r\n", "h".repeat(huge));
    assert_eq!(block.len(), 65_400);
    publish(
        "huge-headers".into(),
        Some(block.into_bytes()),
        garbage("huge-headers", 1000),
    )
    .await;
    battery.expect(
        "huge-headers",
        Expect::DeadLettered(DeadLetterReason::Undecodable),
    );
    // A stranger publishing on another queue's replay subject reaches only
    // that queue (none here): unroutable, nothing stored.
    battery.good().await;
    let report = battery.account(Duration::from_secs(90)).await;
    check_forgeries(&report);
    for key in [
        "non-utf8-header",
        "no-colon-header",
        "space-in-name",
        "other-version",
    ] {
        let record = report.record(key);
        assert!(
            record.last_error.contains("cannot read"),
            "`{key}` on {server}: {}",
            record.last_error
        );
    }
    // The wrapped record gives the headers back whole.
    let big = report.record("huge-headers").envelope.headers.get("Big");
    assert_eq!(big.map(String::len), Some(huge), "on {server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_hostile_battery() {
    let harness = RabbitHarness::from_env();
    // A low delivery limit: an unreadable message needs limit + 1 broken
    // connections to reach the DLQ.
    let mut battery = Battery::start(&harness, 2).await;
    let space = battery.space();
    let mut raw = raw_amqp(harness.url())
        .await
        .expect("a raw AMQP connection");
    // Plain clients forging bookkeeping.
    for (key, headers) in forgeries() {
        battery.good().await;
        let table = headers
            .into_iter()
            .map(|(k, v)| (RawText::from(k), RawValue::LongString(v.into_bytes())))
            .collect();
        let props = RawProperties {
            headers: Some(table),
            ..RawProperties::default()
        };
        raw.publish(&space, b"jobs.hostile", &props, &json(key), true)
            .await
            .unwrap_or_else(|e| panic!("`{key}`: {e}"));
        battery.expect(key, Expect::Handled);
    }
    // Odd but readable properties.
    for (key, props) in [
        (
            "huge-timestamp",
            RawProperties {
                timestamp: Some(u64::MAX),
                ..RawProperties::default()
            },
        ),
        (
            "control-char-id",
            RawProperties {
                message_id: Some(RawText(b"id\x07with\x1bescapes".to_vec())),
                ..RawProperties::default()
            },
        ),
        (
            "empty-id-property",
            RawProperties {
                message_id: Some(RawText(Vec::new())),
                content_type: Some(RawText::from("")),
                ..RawProperties::default()
            },
        ),
        (
            "transient",
            RawProperties {
                delivery_mode: Some(1),
                priority: Some(9),
                ..RawProperties::default()
            },
        ),
    ] {
        battery.good().await;
        raw.publish(&space, b"jobs.hostile", &props, &json(key), true)
            .await
            .unwrap_or_else(|e| panic!("`{key}`: {e}"));
        battery.expect(key, Expect::Handled);
    }
    // A message TTL its publisher set: it expires in the work queue and the
    // broker dead-letters it; the record says so.
    battery.good().await;
    let expiring = RawProperties {
        expiration: Some(RawText::from("1")),
        ..RawProperties::default()
    };
    // Published to the DLQ's own queue would be a forgery of the DLQ; a
    // message with a 1 ms TTL may or may not be delivered first.
    raw.publish(&space, b"jobs.hostile", &expiring, &json("expires"), true)
        .await
        .expect("publishing an expiring message");
    battery.expect("expires", Expect::Either(DeadLetterReason::Broker));
    // Short strings lapin cannot parse: its connection breaks at every
    // delivery of them.
    for (key, props) in [
        (
            "non-utf8-message-id",
            RawProperties {
                message_id: Some(RawText(b"id-\xff\xfe".to_vec())),
                ..RawProperties::default()
            },
        ),
        (
            "non-utf8-content-type",
            RawProperties {
                content_type: Some(RawText(b"application/\xc3".to_vec())),
                ..RawProperties::default()
            },
        ),
        (
            "non-utf8-header-name",
            RawProperties {
                headers: Some(vec![(RawText(b"bad\xff".to_vec()), RawValue::I32(1))]),
                ..RawProperties::default()
            },
        ),
    ] {
        battery.good().await;
        raw.publish(&space, b"jobs.hostile", &props, &json(key), true)
            .await
            .unwrap_or_else(|e| panic!("`{key}`: {e}"));
        battery.expect(key, Expect::DeadLettered(DeadLetterReason::Unreadable));
    }
    // Undecodable payloads, and one whose headers nearly fill a frame: the
    // record's bookkeeping does not fit next to them.
    for (key, payload) in undecodable(4 * 1024 * 1024) {
        battery.good().await;
        raw.publish(
            &space,
            b"jobs.hostile",
            &RawProperties::default(),
            &payload,
            true,
        )
        .await
        .unwrap_or_else(|e| panic!("`{key}`: {e}"));
        battery.expect(key, Expect::DeadLettered(DeadLetterReason::Undecodable));
    }
    battery.good().await;
    let big = RawProperties {
        headers: Some(vec![(
            RawText::from("big"),
            RawValue::LongString(vec![b'h'; 120 * 1024]),
        )]),
        ..RawProperties::default()
    };
    raw.publish(
        &space,
        b"jobs.hostile",
        &big,
        &garbage("big-headers", 100),
        true,
    )
    .await
    .expect("publishing big headers");
    battery.expect(
        "big-headers",
        Expect::DeadLettered(DeadLetterReason::Undecodable),
    );
    battery.good().await;
    raw.close().await;
    let report = battery.account(Duration::from_secs(120)).await;
    check_forgeries(&report);
    for key in [
        "non-utf8-message-id",
        "non-utf8-content-type",
        "non-utf8-header-name",
    ] {
        let record = report.record(key);
        assert!(
            record.last_error.contains("not UTF-8"),
            "`{key}`: {}",
            record.last_error
        );
    }
    let big = report.record("big-headers");
    assert_eq!(
        big.envelope.headers.get("big").map(String::len),
        Some(120 * 1024)
    );
}
