//! Every metric ticketrail records, with its labels, over one scenario on
//! the memory broker: handled, retried, dead-lettered, replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use ticketrail::memory::MemoryBroker;
use ticketrail::metrics::{
    CONSUMED, DEAD_LETTERS, DESTINATION, ERROR_TYPE, HANDLED, IN_FLIGHT, PROCESS_DURATION, REASON,
    RECONNECTS, REPLAYS, RETRIES, SENT, SYSTEM,
};
use ticketrail::{
    handler_fn, Consumer, Context, Fixed, HandlerError, Publisher, QueueSpec, Replay, SharedBroker,
    Topology,
};

/// One metric as recorded: kind, name, labels (sorted).
type Key = (MetricKind, String, BTreeMap<String, String>);

fn key(kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Key {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    (kind, name.to_owned(), labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_with_its_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let broker: SharedBroker = Arc::new(MemoryBroker::new());
    let topology = Topology::new("shop.events").queue(QueueSpec::new("mail").bind("user.#"));
    broker.declare(&topology).await.unwrap();

    // `ok` works; `flaky` fails once; `bad` fails for good until fixed,
    // then is replayed and works.
    let fixed = Arc::new(AtomicBool::new(false));
    let handler = {
        let fixed = Arc::clone(&fixed);
        handler_fn(move |kind: String, ctx: Context| {
            let fixed = Arc::clone(&fixed);
            async move {
                match kind.as_str() {
                    "flaky" if ctx.attempt() == 1 => Err(HandlerError::retryable("relay down")),
                    "bad" if !fixed.load(Ordering::SeqCst) => {
                        Err(HandlerError::permanent("no such user"))
                    }
                    _ => Ok(()),
                }
            }
        })
    };
    let consumer = Consumer::new(broker.clone(), "mail", handler)
        .retry_policy(Fixed::new(Duration::from_millis(50), 3).unwrap())
        .spawn();
    let publisher = Publisher::new(broker.clone(), "shop.events");
    let mut ids = Vec::new();
    for kind in ["ok", "flaky", "bad"] {
        ids.push(publisher.publish("user.signup", kind).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.dead_letters("mail", 10).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "`bad` never reached the DLQ");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fixed.store(true, Ordering::SeqCst);
    assert_eq!(broker.replay("mail", Replay::All).await.unwrap(), 1);
    while consumer.health().handled < 3 {
        assert!(Instant::now() < deadline, "{:?}", consumer.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown().await.unwrap();

    let mut seen: BTreeMap<Key, DebugValue> = BTreeMap::new();
    for (composite, _unit, _description, value) in snapshotter.snapshot().into_vec() {
        let (kind, key) = composite.into_parts();
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        seen.insert((kind, key.name().to_owned(), labels), value);
    }
    let queue = [(SYSTEM, "memory"), (DESTINATION, "mail")];
    let counter = |name: &str, labels: &[(&str, &str)]| match seen.get(&key(
        MetricKind::Counter,
        name,
        labels,
    )) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?}; recorded: {:#?}", seen.keys()),
    };
    assert_eq!(
        counter(SENT, &[(SYSTEM, "memory"), (DESTINATION, "shop.events")]),
        3
    );
    // ok, flaky twice, bad, bad replayed.
    assert_eq!(counter(CONSUMED, &queue), 5);
    assert_eq!(counter(HANDLED, &queue), 3);
    assert_eq!(counter(RETRIES, &queue), 1);
    let permanent = [
        (SYSTEM, "memory"),
        (DESTINATION, "mail"),
        (REASON, "permanent"),
    ];
    assert_eq!(counter(DEAD_LETTERS, &permanent), 1);
    assert_eq!(counter(REPLAYS, &queue), 1);
    assert_eq!(counter(RECONNECTS, &queue), 0);

    let histogram = |labels: &[(&str, &str)]| match seen.get(&key(
        MetricKind::Histogram,
        PROCESS_DURATION,
        labels,
    )) {
        Some(DebugValue::Histogram(values)) => values.len(),
        other => panic!("{PROCESS_DURATION} {labels:?}: {other:?}"),
    };
    assert_eq!(histogram(&queue), 3, "attempts that succeeded");
    let failed = |kind| {
        [
            (SYSTEM, "memory"),
            (DESTINATION, "mail"),
            (ERROR_TYPE, kind),
        ]
    };
    assert_eq!(histogram(&failed("retryable")), 1);
    assert_eq!(histogram(&failed("permanent")), 1);

    match seen.get(&key(MetricKind::Gauge, IN_FLIGHT, &queue)) {
        Some(DebugValue::Gauge(n)) => assert_eq!(n.into_inner(), 0.0, "in flight after shutdown"),
        other => panic!("{IN_FLIGHT}: {other:?}"),
    }

    // Labels are names and small fixed sets, never ids.
    let allowed: BTreeSet<&str> = [SYSTEM, DESTINATION, ERROR_TYPE, REASON].into();
    for (_, name, labels) in seen.keys() {
        for (k, v) in labels {
            assert!(allowed.contains(k.as_str()), "{name} has label {k}");
            assert!(!ids.contains(v), "{name} has a message id as label {k}");
        }
    }
}
