//! The broker's retry timer: one task per queue serves every waiting retry,
//! earliest first, on tokio's clock.

use std::num::NonZeroU16;
use std::time::Duration;

use ticketrail_core::{Broker, Message, QueueSpec, SubscribeOptions, Topology};
use ticketrail_memory::MemoryBroker;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn a_short_retry_scheduled_after_a_long_one_comes_back_first() {
    let broker = MemoryBroker::new();
    broker
        .declare(&Topology::new("app").queue(QueueSpec::new("work").bind("job.#")))
        .await
        .unwrap();
    broker
        .publish("app", Message::new("job.slow", "slow"))
        .await
        .unwrap();
    broker
        .publish("app", Message::new("job.fast", "fast"))
        .await
        .unwrap();
    let mut sub = broker
        .subscribe(
            "work",
            SubscribeOptions::prefetch(NonZeroU16::new(2).unwrap()),
        )
        .await
        .unwrap();
    let started = Instant::now();

    let mut slow = sub.next().await.unwrap().unwrap();
    assert_eq!(slow.envelope().payload, "slow");
    slow.retry(Duration::from_secs(10), "try later")
        .await
        .unwrap();
    // Let the timer start waiting for the slow one.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut fast = sub.next().await.unwrap().unwrap();
    assert_eq!(fast.envelope().payload, "fast");
    fast.retry(Duration::from_millis(100), "try soon")
        .await
        .unwrap();

    let mut again = sub.next().await.unwrap().unwrap();
    assert_eq!(again.envelope().payload, "fast");
    assert_eq!(again.envelope().attempt, 2);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    again.ack().await.unwrap();

    let mut last = sub.next().await.unwrap().unwrap();
    assert_eq!(last.envelope().payload, "slow");
    assert!(started.elapsed() >= Duration::from_secs(10));
    last.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retries_due_at_once_come_back_in_the_order_they_were_made() {
    let broker = MemoryBroker::new();
    broker
        .declare(&Topology::new("app").queue(QueueSpec::new("work").bind("job")))
        .await
        .unwrap();
    for n in 0..20 {
        broker
            .publish("app", Message::new("job", n.to_string()))
            .await
            .unwrap();
    }
    let mut sub = broker
        .subscribe(
            "work",
            SubscribeOptions::prefetch(NonZeroU16::new(20).unwrap()),
        )
        .await
        .unwrap();
    for _ in 0..20 {
        let mut delivery = sub.next().await.unwrap().unwrap();
        delivery
            .retry(Duration::from_secs(1), "later")
            .await
            .unwrap();
    }
    for n in 0..20 {
        let mut delivery = sub.next().await.unwrap().unwrap();
        assert_eq!(delivery.envelope().payload, n.to_string());
        delivery.ack().await.unwrap();
    }
}
