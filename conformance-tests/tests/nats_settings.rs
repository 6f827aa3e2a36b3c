//! Settings of a queue's JetStream consumer that `declare` changes in place
//! on a queue that exists, on the server at `NATS_URL`: a deployment that
//! raises `max_ack_pending` or `ack_wait` needs no delete (which would lose
//! the queue's messages).

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use ticketrail_conformance::testing::unique;
use ticketrail_conformance::DEFAULT_NATS_URL;
use ticketrail_core::{Broker, QueueSpec, Topology};
use ticketrail_nats::{NatsBroker, NatsConfig};

/// The server's URL, a fresh name, and a topic space of that name with one
/// queue bound to everything.
fn one_queue(prefix: &str) -> (String, String, Topology) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let name = unique(prefix);
    let topology = Topology::new(format!("{name}.events"))
        .queue(QueueSpec::new(format!("{name}.q")).bind("#"));
    (url, name, topology)
}

#[tokio::test]
async fn nats_declare_again_updates_max_ack_pending_and_ack_wait() {
    let (url, name, topology) = one_queue("settings");
    let config = NatsConfig::from_url(&url).unwrap();
    let before = NatsBroker::connect(
        config
            .clone()
            .max_ack_pending(10_000)
            .ack_wait(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    before.declare(&topology).await.unwrap();
    let after = NatsBroker::connect(
        config
            .max_ack_pending(100_000)
            .ack_wait(Duration::from_secs(45)),
    )
    .await
    .unwrap();
    after
        .declare(&topology)
        .await
        .expect("declaring an existing queue with a larger max_ack_pending");

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream_name = format!("{name}.events").replace('.', "_");
    let stream = js.get_stream(&stream_name).await.unwrap();
    let consumer_name = format!("{name}.q").replace('.', "_");
    let mut consumer: PullConsumer = stream.get_consumer(&consumer_name).await.unwrap();
    let settings = consumer.info().await.unwrap().config.clone();
    assert_eq!(settings.max_ack_pending, 100_000);
    assert_eq!(settings.ack_wait, Duration::from_secs(45));
    after.delete(&topology).await.unwrap();
    before.close().await.unwrap();
    after.close().await.unwrap();
}

/// A failure record is read through the stream's direct get; a stream that
/// takes none (made by another tool, or changed since) is read through the
/// JetStream API instead: the retry still sees its attempt number.
#[tokio::test]
async fn nats_failure_records_are_read_where_the_stream_takes_no_direct_gets() {
    use std::sync::{Arc, Mutex};
    use ticketrail_core::{handler_fn, Consumer, Context, Fixed, HandlerError, Publisher};

    let (url, name, topology) = one_queue("nodirect");
    let broker: ticketrail_core::SharedBroker = Arc::new(
        NatsBroker::connect(NatsConfig::from_url(&url).unwrap())
            .await
            .unwrap(),
    );
    broker.declare(&topology).await.unwrap();

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let records = format!("TR_FAIL_{}", format!("{name}.events").replace('.', "_"));
    let mut config = js
        .get_stream(&records)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert!(
        config.allow_direct,
        "ticketrail makes its record streams with direct gets"
    );
    config.allow_direct = false;
    js.update_stream(config).await.unwrap();

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts);
    let handler = handler_fn(move |_: serde_json::Value, ctx: Context| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push(ctx.attempt());
            match ctx.attempt() {
                1 => Err(HandlerError::retryable("fails once")),
                _ => Ok(()),
            }
        }
    });
    let consumer = Consumer::new(broker.clone(), format!("{name}.q"), handler)
        .retry_policy(Fixed::new(Duration::from_millis(200), 3).unwrap())
        .spawn();
    Publisher::new(broker.clone(), format!("{name}.events"))
        .publish("jobs.a", &serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    let began = tokio::time::Instant::now();
    while attempts.lock().unwrap().len() < 2 && began.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = began.elapsed();
    // Handled at last, the message's record is purged (a request sent
    // without waiting for its answer): the stream of records empties.
    let mut left = u64::MAX;
    let began = tokio::time::Instant::now();
    while began.elapsed() < Duration::from_secs(5) {
        let mut stream = js.get_stream(&records).await.unwrap();
        left = stream.info().await.unwrap().state.messages;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown().await.unwrap();
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1, 2],
        "the retry was read as attempt 2 from its failure record"
    );
    // Retried after 200 ms: a read that waited for a request timeout (10 s)
    // shows here.
    assert!(took < Duration::from_secs(5), "the retry took {took:?}");
    assert_eq!(left, 0, "the handled message's failure record is cleared");
}
