//! RabbitMQ's resource alarms, on a throwaway node whose memory watermark
//! is set below what it uses (what a full disk or memory pressure does in
//! production): publishing is blocked, consuming must go on.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail_conformance::testing::{RabbitNode, ServerProcess};
use ticketrail_core::{
    handler_fn, Consumer, Context, ErrorKind, Fixed, HandlerError, Message, QueueSpec,
    SharedBroker, Topology,
};
use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};

const MESSAGES: usize = 300;
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

async fn connect(url: &str) -> SharedBroker {
    let config = RabbitConfig::from_url(url)
        .unwrap()
        .publish_timeout(PUBLISH_TIMEOUT);
    Arc::new(RabbitBroker::connect(config).await.unwrap())
}

async fn watermark(node: &RabbitNode, fraction: &str) {
    node.ctl(&["set_vm_memory_high_watermark", fraction])
        .await
        .unwrap();
}

/// Waits until `check` holds, polling, or panics with `what`.
async fn wait(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "waited {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// During a memory alarm a publish fails fast naming the alarm, the
/// worker keeps acking what it handles while its retries wait, and after
/// the alarm every message is handled: none lost, no attempt spent on the
/// wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_memory_alarm_blocks_publishing_not_consuming() {
    let mut node = RabbitNode::start().await.unwrap();
    let url = node.url();
    let publisher = connect(&url).await;
    let topology = Topology::new("alarm.events").queue(QueueSpec::new("alarm.q").bind("#"));
    publisher.declare(&topology).await.unwrap();
    let mut ids = BTreeSet::new();
    for i in 0..MESSAGES {
        let message = Message::new("job", format!("{i}"));
        ids.insert(message.id.clone());
        publisher.publish("alarm.events", message).await.unwrap();
    }

    watermark(&node, "0.000001").await;
    let alarm_on = Instant::now();
    // A publish during the alarm fails within the publish timeout and
    // says why; the next one fails at once.
    let started = Instant::now();
    let mut blocked = None;
    while started.elapsed() < Duration::from_secs(15) {
        let attempt = Instant::now();
        match publisher
            .publish("alarm.events", Message::new("job", "1"))
            .await
        {
            Ok(()) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                assert!(
                    attempt.elapsed() <= PUBLISH_TIMEOUT + Duration::from_secs(1),
                    "a publish took {:?}: {e}",
                    attempt.elapsed()
                );
                blocked = Some(e);
                break;
            }
        }
    }
    let blocked = blocked.expect("publishing still worked 15 s into the alarm");
    assert_eq!(blocked.kind(), ErrorKind::Blocked, "{blocked}");
    assert!(blocked.to_string().contains("memory"), "{blocked}");
    assert!(
        blocked.to_string().contains("may still be published"),
        "{blocked}"
    );
    let fast = Instant::now();
    let again = publisher
        .publish("alarm.events", Message::new("job", "1"))
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Blocked);
    assert!(again.to_string().contains("not published"), "{again}");
    assert!(
        fast.elapsed() < Duration::from_millis(500),
        "a publish while blocked took {:?}",
        fast.elapsed()
    );
    assert!(publisher.publishing_blocked().is_some());

    // A worker started during the alarm drains the backlog: its
    // connection only consumes and acks. Every tenth message fails once;
    // its retry waits for the alarm to clear.
    let handled: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let worker = connect(&url).await;
    let consumer = Consumer::new(
        Arc::clone(&worker),
        "alarm.q",
        handler_fn(move |n: u64, ctx: Context| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if n.is_multiple_of(10) && ctx.attempt() == 1 {
                    return Err(HandlerError::retryable("fails once"));
                }
                seen.lock()
                    .unwrap()
                    .push((ctx.id().to_owned(), ctx.attempt()));
                Ok(())
            }
        }),
    )
    .retry_policy(Fixed::new(Duration::from_millis(200), 3).unwrap())
    .prefetch(50)
    .spawn();
    let count = || handled.lock().unwrap().len();
    wait(
        Duration::from_secs(20),
        "the worker handles messages during the alarm",
        || count() >= MESSAGES / 2,
    )
    .await;
    wait(
        Duration::from_secs(20),
        "health says publishing is blocked",
        || consumer.health().publishing_blocked.is_some(),
    )
    .await;
    // The alarm holds for 30 s, as a real one would for a while; the
    // worker keeps handling (its retries wait) until the backlog is done.
    let mut rising = vec![count()];
    while alarm_on.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rising.push(count());
    }
    assert!(
        publisher.publishing_blocked().is_some(),
        "still blocked 30 s in"
    );
    let held = alarm_on.elapsed();

    watermark(&node, "0.4").await;
    let everything = || {
        let handled = handled.lock().unwrap();
        let seen: BTreeSet<&String> = handled.iter().map(|(id, _)| id).collect();
        ids.iter().all(|id| seen.contains(id))
    };
    wait(
        Duration::from_secs(60),
        "every message handled after the alarm",
        everything,
    )
    .await;
    // A retry that waited out the alarm still ran as attempt 2: the wait
    // spent no attempt.
    let attempts: Vec<u32> = handled.lock().unwrap().iter().map(|(_, a)| *a).collect();
    assert!(attempts.iter().all(|a| *a <= 2), "attempts: {attempts:?}");
    assert!(worker.publishing_blocked().is_none());
    consumer.shutdown().await.unwrap();
    println!(
        "alarm held {held:?}; handled during it, every 5 s: {rising:?}; publish refused with: {blocked}"
    );
    let _ = publisher.close().await;
    let _ = worker.close().await;
    node.remove().await.unwrap();
}

/// NATS's equivalent of an alarm: a stream out of room. A publish is
/// refused as `Blocked`; a dead-letter record that has no room waits,
/// holding its message, and is written once there is room: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_full_streams_block_publishing_and_dead_letters_wait_for_room() {
    use ticketrail_conformance::{Harness, NatsHarness};
    let harness = NatsHarness::from_env();
    let broker = harness.connect().await.unwrap();
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let space = format!("full-{unique}.events");
    let queue = format!("full-{unique}.q");
    let topology = Topology::new(&space).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await.unwrap();
    let client = async_nats::connect(harness.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // Limits set as an operator would, on the streams ticketrail made.
    let limit = |name: String, messages: i64, bytes: i64| {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(&name).await.unwrap();
            let mut config = stream.info().await.unwrap().config.clone();
            config.max_messages = messages;
            config.max_bytes = bytes;
            config.discard = async_nats::jetstream::stream::DiscardPolicy::New;
            js.update_stream(config).await.unwrap();
        }
    };
    let stream = space.replace('.', "_");
    limit(stream.clone(), 2, -1).await;
    for _ in 0..2 {
        broker
            .publish(&space, Message::new("job", "x"))
            .await
            .unwrap();
    }
    let refused = broker
        .publish(&space, Message::new("job", "x"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Blocked, "{refused}");

    // The DLQ stream holds nothing more: a permanent failure waits.
    let dlq = format!("TR_DLQ_{stream}");
    limit(dlq.clone(), -1, 1).await;
    let consumer = Consumer::new(
        Arc::clone(&broker),
        queue.clone(),
        handler_fn(|_: serde_json::Value, _ctx: Context| async {
            Err::<(), _>(HandlerError::permanent("no good"))
        }),
    )
    .spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = consumer.health();
    assert_eq!(waiting.dead_lettered, 2, "{waiting:?}");
    assert!(broker.dead_letters(&queue, 10).await.unwrap().is_empty());
    limit(dlq, -1, -1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.dead_letters(&queue, 10).await.unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the dead letters were not written once there was room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown().await.unwrap();
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}
