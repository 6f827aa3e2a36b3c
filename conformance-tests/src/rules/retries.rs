//! C7, C8, C9, C12, C13: retries wait in the broker, end, and skip the futile.

use std::time::{Duration, Instant};

use ticketrail_core::{
    Consumer, DeadLetterReason, Fixed, Message, QueueSpec, RetryPolicy, SharedBroker,
    SubscribeOptions,
};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{
    ensure, expect_nothing, wait_for_dead_letters, wait_until, Act, Doing, Scenario, Scripted,
};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

fn fixed(delay: Duration, attempts: u32) -> Fixed {
    Fixed::new(delay, attempts).expect("valid test policy")
}

fn start(
    broker: SharedBroker,
    queue: String,
    handler: &Scripted,
    policy: impl RetryPolicy,
    prefetch: u16,
) -> ticketrail_core::RunningConsumer {
    Consumer::new(broker, queue, handler.clone())
        .retry_policy(policy)
        .prefetch(prefetch)
        .shutdown_timeout(Duration::from_secs(5))
        .spawn()
}

/// The latest a retry may arrive under C7: late by at most max(250 ms, 20 %).
fn latest(delay: Duration) -> Duration {
    delay + Duration::from_millis(250).max(delay.mul_f64(0.2))
}

pub(crate) async fn c07_delayed_retry(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c07", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            // Two delays: a round one, and an odd one such as jitter produces.
            for delay in [Duration::from_millis(1000), Duration::from_millis(1370)] {
                let handler = Scripted::new(|key, attempt, _| {
                    if key == "flaky" && attempt == 1 {
                        Act::Retry("first try fails".into())
                    } else {
                        Act::Succeed
                    }
                });
                // Prefetch 1: the waiting retry must not hold the only slot.
                let consumer = start(
                    sc.broker.clone(),
                    sc.queue("q"),
                    &handler,
                    fixed(delay, 3),
                    1,
                );
                sc.publish_job("jobs.a", "flaky").await?;
                wait_until(
                    WAIT,
                    || !handler.calls("flaky").is_empty(),
                    || handler.describe(),
                )
                .await?;
                for i in 0..3 {
                    sc.publish_job("jobs.a", &format!("meanwhile-{i}")).await?;
                }
                wait_until(
                    WAIT,
                    || handler.calls("flaky").len() >= 2,
                    || handler.describe(),
                )
                .await?;
                consumer.shutdown().await.doing("shutting down")?;

                let calls = handler.calls("flaky");
                let failed_at = calls[0]
                    .finished
                    .ok_or("the first attempt never finished")?;
                let waited = calls[1].started.duration_since(failed_at);
                ensure!(
                    calls[1].attempt == 2,
                    "the retry came with attempt {}, expected 2",
                    calls[1].attempt
                );
                ensure!(
                    calls[1].id == calls[0].id,
                    "the retry has id {}, the original {}",
                    calls[1].id,
                    calls[0].id
                );
                ensure!(
                    waited >= delay,
                    "retry with delay {delay:?} came after {waited:?}: too early"
                );
                ensure!(
                    waited <= latest(delay),
                    "retry with delay {delay:?} came after {waited:?}: later than {:?}",
                    latest(delay)
                );
                for i in 0..3 {
                    let other = handler.calls(&format!("meanwhile-{i}"));
                    ensure!(
                        other.first().is_some_and(|c| c.started < calls[1].started),
                        "`meanwhile-{i}` was not handled while `flaky` waited: {}",
                        handler.describe()
                    );
                }
            }
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c08_exhaustion(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c08", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let handler =
                Scripted::new(|_, attempt, _| Act::Retry(format!("attempt {attempt} failed")));
            let consumer = start(
                sc.broker.clone(),
                sc.queue("q"),
                &handler,
                fixed(Duration::from_millis(200), 3),
                5,
            );
            let id = sc.publish_job("jobs.a", "doomed").await?;
            let records = wait_for_dead_letters(&sc.broker, &sc.queue("q"), 1, WAIT).await?;
            consumer.shutdown().await.doing("shutting down")?;

            let attempts: Vec<u32> = handler.calls("doomed").iter().map(|c| c.attempt).collect();
            ensure!(
                attempts == [1, 2, 3],
                "the handler saw attempts {attempts:?}, expected [1, 2, 3]"
            );
            let record = &records[0];
            ensure!(
                record.envelope.id == id,
                "the DLQ holds {}, expected {id}",
                record.envelope.id
            );
            ensure!(
                record.reason == DeadLetterReason::Exhausted,
                "reason {}, expected exhausted",
                record.reason
            );
            ensure!(
                record.attempts == 3,
                "the record says {} attempts, expected 3",
                record.attempts
            );
            ensure!(
                record.last_error.contains("attempt 3 failed"),
                "last error is {:?}",
                record.last_error
            );

            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            expect_nothing(
                &mut sub,
                QUIET,
                "a dead-lettered message must be gone from the work queue",
            )
            .await
        })
        .await,
    )
}

pub(crate) async fn c09_no_pointless_retries(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c09", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let handler = Scripted::new(|key, attempt, _| match (key, attempt) {
                ("invalid-address", _) => Act::Permanent("mailbox does not exist".into()),
                ("panics", 1) => Act::Panic,
                _ => Act::Succeed,
            });
            let consumer = start(
                sc.broker.clone(),
                sc.queue("q"),
                &handler,
                fixed(Duration::from_millis(200), 5),
                5,
            );
            let permanent = sc.publish_job("jobs.a", "invalid-address").await?;
            let garbage =
                Message::new("jobs.a", &b"{not json"[..]).content_type("application/json");
            let garbage_id = garbage.id.clone();
            sc.broker
                .publish(sc.space(), garbage)
                .await
                .doing("publishing an undecodable payload")?;
            sc.publish_job("jobs.a", "panics").await?;

            let mut records = wait_for_dead_letters(&sc.broker, &sc.queue("q"), 2, WAIT).await?;
            wait_until(WAIT, || handler.finished("panics"), || handler.describe()).await?;
            sc.publish_job("jobs.a", "after-the-panic").await?;
            wait_until(
                WAIT,
                || handler.finished("after-the-panic"),
                || format!("the consumer stopped after a panic; {}", handler.describe()),
            )
            .await?;
            ensure!(
                !consumer.is_finished(),
                "the consumer ended after a handler panic"
            );
            consumer.shutdown().await.doing("shutting down")?;

            records.sort_by_key(|r| r.envelope.id != permanent);
            ensure!(
                records.len() == 2,
                "expected 2 dead letters, found {}",
                records.len()
            );
            ensure!(
                records[0].envelope.id == permanent
                    && records[0].reason == DeadLetterReason::Permanent,
                "expected {permanent} with reason permanent, found {} with {}",
                records[0].envelope.id,
                records[0].reason
            );
            ensure!(
                records[1].envelope.id == garbage_id
                    && records[1].reason == DeadLetterReason::Undecodable,
                "expected {garbage_id} with reason undecodable, found {} with {}",
                records[1].envelope.id,
                records[1].reason
            );
            ensure!(
                records[1].last_error.contains("JSON"),
                "undecodable record says {:?}",
                records[1].last_error
            );
            let permanent_calls = handler.calls("invalid-address").len();
            ensure!(
                permanent_calls == 1,
                "a permanent failure was handled {permanent_calls} times"
            );
            let panics: Vec<u32> = handler.calls("panics").iter().map(|c| c.attempt).collect();
            ensure!(
                panics == [1, 2],
                "after a panic the attempts were {panics:?}, expected a retry: [1, 2]"
            );
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c12_crash_safe_backoff(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c12", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let delay = Duration::from_secs(1);
            let handler = Scripted::new(|_, attempt, _| {
                if attempt == 1 {
                    Act::Retry("first try fails".into())
                } else {
                    Act::Succeed
                }
            });
            let doomed = h.connect().await.doing("connecting the doomed consumer")?;
            let consumer = start(doomed.clone(), sc.queue("q"), &handler, fixed(delay, 3), 5);
            let id = sc.publish_job("jobs.a", "waits").await?;
            // The retry is settled (handed to the broker) once the consumer
            // counts it and has nothing in flight; then it is killed, well
            // inside the retry's delay.
            wait_until(
                WAIT,
                || {
                    let health = consumer.health();
                    health.retried >= 1 && health.in_flight == 0
                },
                || format!("the retry was never settled; {}", handler.describe()),
            )
            .await?;
            let killed_at = Instant::now();
            consumer.abort();
            doomed
                .close()
                .await
                .doing("dropping the consumer's connection")?;

            let survivor = h.connect().await.doing("connecting a new consumer")?;
            let consumer = start(
                survivor.clone(),
                sc.queue("q"),
                &handler,
                fixed(delay, 3),
                5,
            );
            wait_until(
                WAIT,
                || handler.calls("waits").len() >= 2,
                || {
                    format!(
                        "the waiting retry was lost with its consumer; {}",
                        handler.describe()
                    )
                },
            )
            .await?;
            consumer.shutdown().await.doing("shutting down")?;
            let _ = survivor.close().await;
            let calls = handler.calls("waits");
            ensure!(calls[1].id == id, "got {} instead of {id}", calls[1].id);
            ensure!(
                calls[1].attempt == 2,
                "after the crash the message came with attempt {}, expected 2",
                calls[1].attempt
            );
            ensure!(
                calls[1].started > killed_at,
                "the retry arrived before the consumer was killed"
            );
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c13_crash_loops_end(h: &dyn Harness) -> Result<(), Skip> {
    let limit = 2;
    let sc = Scenario::new(
        h,
        "c13",
        vec![QueueSpec::new("q").bind("jobs.#").delivery_limit(limit)],
    )
    .await?;
    checked(
        sc.run(|sc| async move {
            let policy = || fixed(Duration::from_millis(100), 4);
            let handler = Scripted::new(|_, _, _| Act::Hang);
            let id = sc.publish_job("jobs.a", "poison").await?;
            let mut crashes = 0;
            let records = loop {
                let records = sc
                    .broker
                    .dead_letters(&sc.queue("q"), 10)
                    .await
                    .doing("listing dead letters")?;
                if !records.is_empty() {
                    break records;
                }
                ensure!(
                    crashes < 10,
                    "still not dead-lettered after {crashes} crashes; {}",
                    handler.describe()
                );
                // Counted before the consumer starts: it may take the message
                // before this task runs again.
                let before = handler.count();
                let conn = h.connect().await.doing("connecting a consumer")?;
                let consumer = start(conn.clone(), sc.queue("q"), &handler, policy(), 5);
                let broker = sc.broker.clone();
                let queue = sc.queue("q");
                let deadline = Instant::now() + h.redelivery_timeout() + Duration::from_secs(5);
                loop {
                    if handler.count() > before
                        || !broker
                            .dead_letters(&queue, 1)
                            .await
                            .doing("listing")?
                            .is_empty()
                    {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "no redelivery after crash {crashes}; {}",
                        handler.describe()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                consumer.abort();
                let _ = conn.close().await;
                crashes += 1;
            };
            let record = &records[0];
            ensure!(
                record.envelope.id == id,
                "the DLQ holds {}, expected {id}",
                record.envelope.id
            );
            ensure!(
                record.reason == DeadLetterReason::DeliveryLimit,
                "reason {}, expected delivery-limit",
                record.reason
            );
            let deliveries = handler.calls("poison").len();
            let bound = (limit + 1).max(policy().max_attempts()) as usize;
            ensure!(
                deliveries <= bound,
                "the poison message was handled {deliveries} times; the bound is {bound}; {}",
                handler.describe()
            );
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            expect_nothing(
                &mut sub,
                QUIET,
                "the poison message must be gone from the work queue",
            )
            .await
        })
        .await,
    )
}
