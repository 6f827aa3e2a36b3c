//! `ticketrail dlq replay --new-id`: a dead letter goes back as a new
//! message, its old id in the `replayed-from` header.

use std::sync::Arc;
use std::time::Duration;

use assert_cmd::Command;
use ticketrail::{handler_fn, Consumer, Context, HandlerError, Message, QueueSpec, Topology};
use ticketrail_conformance::{Harness, RabbitHarness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_a_new_id_names_the_old_one() {
    let harness = RabbitHarness::from_env();
    let broker = harness.connect().await.expect("connects");
    let name = format!(
        "tr-cli-newid-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let queue = format!("{name}.q");
    let topology = Topology::new(format!("{name}.events")).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await.expect("declares");
    let message = Message::new("job", "1");
    let old = message.id.clone();
    broker
        .publish(&topology.topic_space, message)
        .await
        .expect("publishes");
    let failing = Consumer::new(
        Arc::clone(&broker),
        queue.clone(),
        handler_fn(|_: u32, _: Context| async { Err::<(), _>(HandlerError::permanent("no")) }),
    )
    .spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while broker
        .dead_letters(&queue, 10)
        .await
        .expect("lists")
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    failing.shutdown().await.expect("stops");

    let output = Command::cargo_bin("ticketrail")
        .expect("built")
        .env("TICKETRAIL_BROKER", harness.url())
        .args(["dlq", "replay", &queue, "--all", "--new-id", "--yes"])
        .timeout(Duration::from_secs(60))
        .output()
        .expect("runs");
    assert!(output.status.success(), "{output:?}");

    let mut sub = broker
        .subscribe(&queue, ticketrail::backend::SubscribeOptions::default())
        .await
        .expect("subscribes");
    let mut delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery")
        .expect("open")
        .expect("ok");
    let envelope = delivery.envelope().clone();
    delivery.ack().await.expect("acks");
    drop(sub);
    broker.delete(&topology).await.expect("deletes");
    let _ = broker.close().await;
    assert_ne!(envelope.id, old);
    assert_eq!(
        envelope.headers.get(ticketrail::backend::REPLAYED_FROM),
        Some(&old)
    );
    assert_eq!(envelope.attempt, 1);
}
