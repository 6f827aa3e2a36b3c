//! A consumer whose handler never waits runs each handling to its end at
//! once; draining a backlog that way, it still gives the other tasks of its
//! thread their turns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ticketrail_core::{handler_fn, Consumer, Context, Message, QueueSpec, SharedBroker, Topology};
use ticketrail_memory::MemoryBroker;

const BACKLOG: usize = 20_000;

// One thread: a consumer that never yields would hold it until the backlog
// is gone.
#[tokio::test(flavor = "current_thread")]
async fn a_consumer_draining_a_backlog_lets_other_tasks_run() {
    let broker: SharedBroker = Arc::new(MemoryBroker::new());
    broker
        .declare(&Topology::new("app").queue(QueueSpec::new("work").bind("job.#")))
        .await
        .unwrap();
    for i in 0..BACKLOG {
        broker
            .publish("app", Message::new("job.run", format!("{i}")))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = Arc::clone(&handled);
        handler_fn(move |_n: u64, _ctx: Context| {
            handled.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        })
    };
    let consumer = Consumer::new(broker.clone(), "work", handler)
        .prefetch(100)
        .spawn();
    // Spawned after the consumer, so it runs at the consumer's first yield.
    let seen = tokio::spawn({
        let handled = Arc::clone(&handled);
        async move { handled.load(Ordering::Relaxed) }
    })
    .await
    .unwrap();
    assert!(
        seen < BACKLOG,
        "another task of the consumer's thread ran only after all {BACKLOG} messages were handled"
    );

    // And every message is handled, none twice.
    tokio::time::timeout(Duration::from_secs(60), async {
        while handled.load(Ordering::Relaxed) < BACKLOG {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the backlog is drained");
    consumer.shutdown().await.unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), BACKLOG);
    let stats = broker.queue_stats("work").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.dead_letters),
        (Some(0), Some(0), Some(0)),
        "{stats:?}"
    );
}
