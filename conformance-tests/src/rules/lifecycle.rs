//! C14, C15: shutting down without losing work, and surviving broker restarts.

use std::time::{Duration, Instant};

use ticketrail_core::{Consumer, Fixed, QueueSpec, SharedBroker, SubscribeOptions, Topology};

use super::{checked, Skip};
use crate::harness::{Harness, Restartable};
use crate::support::{
    ensure, expect_nothing, job_message, receive, wait_until, Act, Check, Doing, Scenario, Scripted,
};

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
                ensure!(
                    handler.finished(&format!("slow-{i}")),
                    "shutdown returned before `slow-{i}` finished"
                );
            }
            let mut sub = conn
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            expect_nothing(
                &mut sub,
                Duration::from_millis(500),
                "handled messages were acked before shutdown returned",
            )
            .await?;
            drop(sub);

            // A handler past the deadline is abandoned, and its message released.
            let consumer = Consumer::new(conn.clone(), sc.queue("q"), handler.clone())
                // A retry would wait a minute: what comes back sooner was released.
                .retry_policy(Fixed::new(Duration::from_secs(60), 3).expect("valid"))
                .shutdown_timeout(Duration::from_millis(300))
                .spawn();
            let stuck = sc.publish_job("jobs.a", "stuck").await?;
            wait_until(
                WAIT,
                || !handler.calls("stuck").is_empty(),
                || handler.describe(),
            )
            .await?;
            let begun = Instant::now();
            consumer
                .shutdown()
                .await
                .doing("shutting down with a stuck handler")?;
            let took = begun.elapsed();
            ensure!(
                took < Duration::from_secs(3),
                "shutdown with a 300ms deadline took {took:?}"
            );

            let mut sub = conn
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            let mut d = receive(&mut sub, h.redelivery_timeout())
                .await
                .map_err(|e| format!("the unfinished message was not released: {e}"))?;
            let id = d.envelope().id.clone();
            d.ack().await.doing("acking")?;
            drop(sub);
            ensure!(id == stuck, "got {id}, expected the unfinished {stuck}");

            replaced_at_once(&sc, &conn).await?;
            let _ = conn.close().await;
            Ok(())
        })
        .await,
    )
}

/// A consumer shut down while busy and another started at once, over and
/// over, with messages published right after each shutdown: the next
/// consumer handles them all at once. Nothing sent towards the consumer
/// that went away (a NATS pull request still open on the server, a message
/// received and not handed out) waits for the redelivery timeout.
async fn replaced_at_once(sc: &Scenario, conn: &SharedBroker) -> Check {
    const ROUNDS: usize = 30;
    const MESSAGES: usize = 300;
    // A round takes well under a second; a message left to the redelivery
    // timeout (3 s on the NATS test servers) makes it take longer.
    const BOUND: Duration = Duration::from_secs(2);
    for round in 0..ROUNDS {
        let mut confirmations = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let message = job_message("jobs.a", &format!("r{round}-{i}"));
            confirmations.push(
                conn.send(sc.space(), message)
                    .await
                    .doing("publishing a round")?,
            );
        }
        futures::future::try_join_all(confirmations)
            .await
            .doing("confirming a round")?;
        let handler = Scripted::new(|_, _, _| Act::Succeed);
        let begun = Instant::now();
        let consumer = Consumer::new(conn.clone(), sc.queue("q"), handler.clone())
            .prefetch(50)
            .spawn();
        let all_in = wait_until(
            WAIT,
            || handler.count() >= MESSAGES,
            || format!("{} of {MESSAGES} handled", handler.count()),
        )
        .await;
        let took = begun.elapsed();
        consumer.shutdown().await.doing("shutting down")?;
        all_in.map_err(|e| format!("round {round}: {e}"))?;
        ensure!(
            took < BOUND,
            "round {round}: {MESSAGES} messages published right after the last consumer shut \
             down took {took:?} to handle (more than {BOUND:?}): some went to the consumer that \
             shut down and waited for the redelivery timeout"
        );
    }
    Ok(())
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
    let server = h
        .restartable()
        .await
        .map_err(|e| Skip::Failed(format!("starting a throwaway broker: {e}")))?
        .ok_or_else(|| {
            Skip::Failed(
                "the backend claims reconnect but its harness has no restartable broker".into(),
            )
        })?;
    let result = reconnect_scenario(&*server).await;
    let removed = server.remove().await;
    checked(result)?;
    removed.map_err(|e| Skip::Failed(format!("removing the throwaway broker: {e}")))
}

async fn reconnect_scenario(server: &dyn Restartable) -> Result<(), String> {
    let broker = server
        .connect()
        .await
        .doing("connecting to the throwaway broker")?;
    let topology = Topology::new("tr-c15.events").queue(QueueSpec::new("tr-c15.q").bind("jobs.#"));
    broker.declare(&topology).await.doing("declaring")?;
    let handler = Scripted::new(|_, _, _| Act::Succeed);
    let consumer = Consumer::new(broker.clone(), "tr-c15.q", handler.clone()).spawn();
    let publish = |key: String| {
        let broker = broker.clone();
        async move {
            broker
                .publish("tr-c15.events", job_message("jobs.a", &key))
                .await
        }
    };
    publish("before".into())
        .await
        .doing("publishing before the restart")?;
    wait_until(WAIT, || handler.finished("before"), || handler.describe()).await?;

    server
        .halt("tr-c15.q")
        .await
        .doing("stopping the broker (on a cluster, the queue's leader)")?;
    // While the broker is down, a publish fails; if one were reported Ok,
    // it would have to be delivered after all.
    let mut reported_ok = Vec::new();
    for i in 0..3 {
        let key = format!("outage-{i}");
        if publish(key.clone()).await.is_ok() {
            reported_ok.push(key);
        }
    }
    server.resume().await.doing("starting the broker again")?;

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match publish("after".into()).await {
            Ok(()) => break,
            Err(e) => {
                ensure!(
                    Instant::now() < deadline,
                    "publishing still fails 60s after the restart ({attempt} tries): {e}"
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
    for key in &reported_ok {
        wait_until(
            WAIT,
            || handler.finished(key),
            || format!("`{key}` was reported published during the outage, then lost"),
        )
        .await?;
    }
    ensure!(
        !consumer.is_finished(),
        "the consumer ended during the outage"
    );
    consumer.shutdown().await.doing("shutting down")?;
    broker.delete(&topology).await.doing("cleaning up")?;
    let _ = broker.close().await;
    Ok(())
}
