//! `Broker::queues`: the work queues of a topic space, as `ticketrail
//! stats --space` lists them, on the brokers that can list them; RabbitMQ,
//! whose AMQP lists no queues, says so.

use ticketrail_conformance::testing::unique;
use ticketrail_conformance::{Harness, MemoryHarness, NatsHarness, RabbitHarness};
use ticketrail_core::{ErrorKind, QueueSpec, Topology};

async fn lists_the_queues_of_a_space(harness: &dyn Harness) {
    let broker = harness.connect().await.expect("connecting");
    let prefix = unique("listing");
    let space = format!("{prefix}.events");
    let names: Vec<String> = ["c", "a", "b"]
        .iter()
        .map(|q| format!("{prefix}.{q}"))
        .collect();
    let mut topology = Topology::new(&space);
    for name in &names {
        topology = topology.queue(QueueSpec::new(name).bind(format!("{name}.#")));
    }
    broker.declare(&topology).await.expect("declaring");
    // Another space's queue is not listed.
    let other = Topology::new(format!("{prefix}.other"))
        .queue(QueueSpec::new(format!("{prefix}.x")).bind("x"));
    broker.declare(&other).await.expect("declaring");

    let mut sorted = names.clone();
    sorted.sort();
    let listed = broker.queues(&space).await.expect("listing");
    assert_eq!(listed, sorted);

    let one = Topology::new(&space).queue(QueueSpec::new(&names[0]));
    broker.delete(&one).await.expect("deleting one");
    let listed = broker.queues(&space).await.expect("listing");
    assert_eq!(listed, sorted[..2].to_vec(), "after deleting {}", names[0]);

    broker.delete(&topology).await.expect("cleaning up");
    broker.delete(&other).await.expect("cleaning up");
    assert_eq!(
        broker.queues(&space).await.expect("listing"),
        Vec::<String>::new()
    );
    let _ = broker.close().await;
}

#[tokio::test]
async fn memory_lists_the_queues_of_a_space() {
    lists_the_queues_of_a_space(&MemoryHarness::default()).await;
}

#[tokio::test]
async fn nats_lists_the_queues_of_a_space() {
    lists_the_queues_of_a_space(&NatsHarness::from_env()).await;
}

#[tokio::test]
async fn rabbitmq_says_it_cannot_list_queues() {
    let broker = RabbitHarness::from_env()
        .connect()
        .await
        .expect("connecting");
    let e = broker.queues("listing.events").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("name them"), "{e}");
    let _ = broker.close().await;
}
