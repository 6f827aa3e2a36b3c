//! C14, C15: shutting down without losing work, and surviving broker restarts.

use std::time::{Duration, Instant};

use ticketrail_core::{Consumer, Fixed, QueueSpec, SubscribeOptions};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{ensure, expect_nothing, receive, wait_until, Act, Doing, Scenario, Scripted};

const WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn c14_graceful_shutdown(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c14", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            // In-flight handlers finish within the deadline and are acked.
            let handler = Scripted::new(|key, _, _| match key {
                "stuck" => Act::Hang,
                _ => Act::Work(Duration::from_millis(400)),
            });
            let conn = h.connect().await.doing("connecting")?;
            let consumer = Consumer::new(conn.clone(), sc.queue("q"), handler.clone())
                .prefetch(3)
                .shutdown_timeout(Duration::from_secs(5))
                .spawn();
            for i in 0..3 {
                sc.publish_job("jobs.a", &format!("slow-{i}")).await?;
            }
            wait_until(WAIT, || handler.count() == 3, || handler.describe()).await?;
            consumer.shutdown().await.doing("shutting down")?;
            for i in 0..3 {
                ensure!(handler.finished(&format!("slow-{i}")), "shutdown returned before `slow-{i}` finished");
            }
            let mut sub = conn.subscribe(&sc.queue("q"), SubscribeOptions::default()).await.doing("subscribing")?;
            expect_nothing(&mut sub, Duration::from_millis(500), "handled messages were acked before shutdown returned").await?;
            drop(sub);

            // A handler past the deadline is abandoned, and its message released.
            let consumer = Consumer::new(conn.clone(), sc.queue("q"), handler.clone())
                .retry_policy(Fixed::new(Duration::from_secs(1), 3).expect("valid"))
                .shutdown_timeout(Duration::from_millis(300))
                .spawn();
            let stuck = sc.publish_job("jobs.a", "stuck").await?;
            wait_until(WAIT, || !handler.calls("stuck").is_empty(), || handler.describe()).await?;
            let begun = Instant::now();
            consumer.shutdown().await.doing("shutting down with a stuck handler")?;
            let took = begun.elapsed();
            ensure!(took < Duration::from_secs(3), "shutdown with a 300ms deadline took {took:?}");

            let mut sub = conn.subscribe(&sc.queue("q"), SubscribeOptions::default()).await.doing("subscribing")?;
            let mut d = receive(&mut sub, h.redelivery_timeout())
                .await
                .map_err(|e| format!("the unfinished message was not released: {e}"))?;
            let (id, attempt) = (d.envelope().id.clone(), d.envelope().attempt);
            d.ack().await.doing("acking")?;
            let _ = conn.close().await;
            ensure!(id == stuck, "got {id}, expected the unfinished {stuck}");
            ensure!(attempt == 1, "the released message came back with attempt {attempt}: it was retried, not released");
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c15_reconnect(h: &dyn Harness) -> Result<(), Skip> {
    let probe = h
        .connect()
        .await
        .map_err(|e| Skip::Failed(format!("connecting: {e}")))?;
    let capable = probe.capabilities().reconnect;
    let _ = probe.close().await;
    if !capable {
        return Err(Skip::NotApplicable(format!(
            "the {} backend declares no reconnect capability: there is no broker process to restart",
            h.name()
        )));
    }
    let Some(mut server) = h
        .restartable()
        .await
        .map_err(|e| Skip::Failed(format!("starting a throwaway broker: {e}")))?
    else {
        return Err(Skip::Failed(
            "the backend claims reconnect but its harness has no restartable broker".into(),
        ));
    };
    let result = reconnect_scenario(h, &mut *server).await;
    let stopped = server.stop().await;
    checked(result)?;
    stopped.map_err(|e| Skip::Failed(format!("stopping the throwaway broker: {e}")))
}

async fn reconnect_scenario(
    _h: &dyn Harness,
    server: &mut dyn crate::harness::Restartable,
) -> Result<(), String> {
    let broker = server
        .connect()
        .await
        .doing("connecting to the throwaway broker")?;
    let topology = ticketrail_core::Topology::new("tr-c15.events")
        .queue(QueueSpec::new("tr-c15.q").bind("jobs.#"));
    broker.declare(&topology).await.doing("declaring")?;
    let handler = Scripted::new(|_, _, _| Act::Succeed);
    let consumer = Consumer::new(broker.clone(), "tr-c15.q", handler.clone()).spawn();
    let publish = |key: &'static str| {
        let broker = broker.clone();
        async move {
            broker
                .publish("tr-c15.events", crate::support::job_message("jobs.a", key))
                .await
        }
    };
    publish("before")
        .await
        .doing("publishing before the restart")?;
    wait_until(WAIT, || handler.finished("before"), || handler.describe()).await?;

    server
        .restart(Duration::from_secs(1))
        .await
        .doing("restarting the broker")?;

    // A publish right after the restart either fails or is delivered.
    let early = publish("during").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match publish("after").await {
            Ok(()) => break,
            Err(e) => {
                ensure!(
                    Instant::now() < deadline,
                    "publishing still fails 60s after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    wait_until(
        Duration::from_secs(60),
        || handler.finished("after"),
        || {
            format!(
                "the consumer did not resume after the restart; {}",
                handler.describe()
            )
        },
    )
    .await?;
    if early.is_ok() {
        wait_until(
            WAIT,
            || handler.finished("during"),
            || "a publish reported Ok during the restart was lost".to_owned(),
        )
        .await?;
    }
    consumer.shutdown().await.doing("shutting down")?;
    broker.delete(&topology).await.doing("cleaning up")?;
    let _ = broker.close().await;
    Ok(())
}
