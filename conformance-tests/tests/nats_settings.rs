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

#[tokio::test]
async fn nats_declare_again_updates_max_ack_pending_and_ack_wait() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let name = unique("settings");
    let topology = Topology::new(format!("{name}.events"))
        .queue(QueueSpec::new(format!("{name}.q")).bind("#"));
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
