//! C3..C6: acks, redelivery, prefetch and competing consumers.

use std::collections::BTreeSet;
use std::time::Duration;

use ticketrail_core::{QueueSpec, SubscribeOptions};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{ensure, expect_nothing, prefetch, receive, Doing, Scenario};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);

pub(crate) async fn c03_ack_is_final(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c03", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let acked = sc.publish_job("jobs.a", "acked").await?;
            let first = h.connect().await.doing("connecting the first consumer")?;
            let mut sub = first
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            let mut d = receive(&mut sub, WAIT).await?;
            ensure!(
                d.envelope().id == acked,
                "received {} instead of {acked}",
                d.envelope().id
            );
            d.ack().await.doing("acking")?;
            drop(sub);
            first
                .close()
                .await
                .doing("closing the first consumer's connection")?;

            // A restarted consumer gets only what came after the ack.
            let later = sc.publish_job("jobs.b", "later").await?;
            let second = h.connect().await.doing("connecting the second consumer")?;
            let mut sub = second
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing again")?;
            let mut d = receive(&mut sub, WAIT).await?;
            let got = d.envelope().id.clone();
            d.ack().await.doing("acking")?;
            ensure!(
                got == later,
                "after a restart, received {got} (the acked message is {acked}), expected {later}"
            );
            let quiet =
                expect_nothing(&mut sub, QUIET, "the acked message must not come back").await;
            let _ = second.close().await;
            quiet
        })
        .await,
    )
}

pub(crate) async fn c04_at_least_once(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c04", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let id = sc.publish_job("jobs.a", "dies-with-consumer").await?;
            let doomed = h.connect().await.doing("connecting the doomed consumer")?;
            let queue = sc.queue("q");
            let (got, received) = tokio::sync::oneshot::channel();
            let task = {
                let doomed = doomed.clone();
                tokio::spawn(async move {
                    let mut sub = doomed
                        .subscribe(&queue, SubscribeOptions::default())
                        .await?;
                    let delivery = sub.next().await;
                    let _ = got.send(
                        delivery
                            .as_ref()
                            .map(|d| d.as_ref().map(|d| d.envelope().id.clone()).ok()),
                    );
                    // Holds the delivery unsettled until it is killed.
                    std::future::pending::<()>().await;
                    drop((sub, delivery));
                    Ok::<(), ticketrail_core::Error>(())
                })
            };
            let first = tokio::time::timeout(WAIT, received)
                .await
                .map_err(|_| format!("no first delivery within {WAIT:?}"))?
                .map_err(|_| "the doomed consumer ended early".to_owned())?;
            ensure!(
                first.clone().flatten().as_deref() == Some(id.as_str()),
                "first delivery was {first:?}, expected {id}"
            );
            task.abort();
            let _ = task.await;
            doomed
                .close()
                .await
                .doing("dropping the doomed consumer's connection")?;

            let survivor = h
                .connect()
                .await
                .doing("connecting the surviving consumer")?;
            let mut sub = survivor
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            let mut d = receive(&mut sub, h.redelivery_timeout())
                .await
                .map_err(|e| format!("the unsettled message was not delivered again: {e}"))?;
            let again = d.envelope().id.clone();
            d.ack().await.doing("acking")?;
            let _ = survivor.close().await;
            ensure!(again == id, "redelivered {again}, expected {id}");
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c05_prefetch(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c05", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            for i in 0..6 {
                sc.publish_job("jobs.a", &format!("m{i}")).await?;
            }
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), prefetch(3))
                .await
                .doing("subscribing")?;
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(receive(&mut sub, WAIT).await?);
            }
            expect_nothing(
                &mut sub,
                QUIET,
                "with prefetch 3 and 3 unsettled, no 4th delivery may come",
            )
            .await?;
            let mut first = held.remove(0);
            first.ack().await.doing("acking")?;
            held.push(
                receive(&mut sub, WAIT)
                    .await
                    .map_err(|e| format!("after one ack, a slot should open: {e}"))?,
            );
            expect_nothing(
                &mut sub,
                QUIET,
                "3 unsettled again, so no delivery may come",
            )
            .await?;
            for mut d in held {
                d.ack().await.doing("acking")?;
            }
            for _ in 0..2 {
                receive(&mut sub, WAIT)
                    .await?
                    .ack()
                    .await
                    .doing("acking the rest")?;
            }
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c06_competing_consumers(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c06", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let a = h.connect().await.doing("connecting consumer A")?;
            let b = h.connect().await.doing("connecting consumer B")?;
            let mut sub_a = a
                .subscribe(&sc.queue("q"), prefetch(5))
                .await
                .doing("subscribing A")?;
            let mut sub_b = b
                .subscribe(&sc.queue("q"), prefetch(5))
                .await
                .doing("subscribing B")?;
            let mut published = BTreeSet::new();
            for i in 0..10 {
                published.insert(sc.publish_job("jobs.a", &format!("m{i}")).await?);
            }
            // Each holds its five unsettled, so each must get a share.
            let mut held = Vec::new();
            let mut ids_a = BTreeSet::new();
            let mut ids_b = BTreeSet::new();
            for _ in 0..5 {
                let d = receive(&mut sub_a, WAIT)
                    .await
                    .map_err(|e| format!("consumer A: {e}"))?;
                ids_a.insert(d.envelope().id.clone());
                held.push(d);
            }
            for _ in 0..5 {
                let d = receive(&mut sub_b, WAIT)
                    .await
                    .map_err(|e| format!("consumer B: {e}"))?;
                ids_b.insert(d.envelope().id.clone());
                held.push(d);
            }
            for mut d in held {
                d.ack().await.doing("acking")?;
            }
            let _ = a.close().await;
            let _ = b.close().await;
            ensure!(
                ids_a.is_disjoint(&ids_b),
                "both consumers got {:?}",
                ids_a.intersection(&ids_b).collect::<Vec<_>>()
            );
            let all: BTreeSet<String> = ids_a.union(&ids_b).cloned().collect();
            ensure!(
                all == published,
                "consumers got {all:?}, published {published:?}"
            );
            Ok(())
        })
        .await,
    )
}
