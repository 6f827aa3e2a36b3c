//! C10, C11: the DLQ says why, and can be listed, replayed and purged.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use ticketrail_core::{
    Consumer, DeadLetterReason, ErrorKind, Fixed, Message, QueueSpec, Replay, MAX_ERROR_LEN,
};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{
    ensure, job_message, wait_for_dead_letters, wait_until, Act, Check, Doing, Scenario, Scripted,
};

const WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn c10_dead_letter_record(h: &dyn Harness) -> Result<(), Skip> {
    let queues = vec![
        QueueSpec::new("q").bind("jobs.#"),
        QueueSpec::new("cross").bind("cross.#"),
    ];
    let sc = Scenario::new(h, "c10", queues).await?;
    checked(
        sc.run(|sc| async move {
            let huge = "x".repeat(3 * MAX_ERROR_LEN);
            let handler = {
                let huge = huge.clone();
                Scripted::new(move |key, _, _| match key {
                    "rejected" => Act::Permanent(format!("rejected: {huge}")),
                    _ => Act::Retry("still failing".into()),
                })
            };
            let consumer = Consumer::new(sc.broker.clone(), sc.queue("q"), handler.clone())
                .retry_policy(Fixed::new(Duration::from_millis(300), 2).expect("valid"))
                .spawn();
            let started = SystemTime::now();
            let rejected: Message = job_message("jobs.eu.signup", "rejected")
                .header("tenant", "acme")
                .header("note", "ünïcode ✓");
            let sent = rejected.clone();
            sc.broker
                .publish(sc.space(), rejected)
                .await
                .doing("publishing")?;
            let exhausted = sc.publish_job("jobs.us", "exhausted").await?;
            let records = wait_for_dead_letters(&sc.broker, &sc.queue("q"), 2, WAIT).await?;
            consumer.shutdown().await.doing("shutting down")?;
            let ended = SystemTime::now();

            let permanent = records
                .iter()
                .find(|r| r.envelope.id == sent.id)
                .ok_or("the permanent failure is not in the DLQ")?;
            ensure!(
                permanent.envelope.payload == sent.payload,
                "payload changed in the DLQ"
            );
            ensure!(
                permanent.envelope.headers == sent.headers,
                "headers {:?} became {:?}",
                sent.headers,
                permanent.envelope.headers
            );
            ensure!(
                permanent.envelope.routing_key == sent.routing_key,
                "routing key became {:?}",
                permanent.envelope.routing_key
            );
            ensure!(
                permanent.envelope.content_type == sent.content_type,
                "content type became {:?}",
                permanent.envelope.content_type
            );
            ensure!(
                permanent.queue == sc.queue("q"),
                "source queue {:?}, expected {:?}",
                permanent.queue,
                sc.queue("q")
            );
            ensure!(
                permanent.reason == DeadLetterReason::Permanent,
                "reason {}",
                permanent.reason
            );
            ensure!(permanent.attempts == 1, "attempts {}", permanent.attempts);
            ensure!(
                permanent.last_error.starts_with("rejected: xxx"),
                "last error {:?}",
                &permanent.last_error[..40.min(permanent.last_error.len())]
            );
            ensure!(
                permanent.last_error.len() <= MAX_ERROR_LEN,
                "last error is {} bytes, over the bound {MAX_ERROR_LEN}",
                permanent.last_error.len()
            );
            ensure!(
                permanent.first_failed_at <= permanent.last_failed_at,
                "first failure after the last"
            );

            let retried = records
                .iter()
                .find(|r| r.envelope.id == exhausted)
                .ok_or("the exhausted message is not in the DLQ")?;
            ensure!(
                retried.reason == DeadLetterReason::Exhausted,
                "reason {}",
                retried.reason
            );
            ensure!(retried.attempts == 2, "attempts {}", retried.attempts);
            ensure!(
                retried.last_error == "still failing",
                "last error {:?}",
                retried.last_error
            );
            let span = retried
                .last_failed_at
                .duration_since(retried.first_failed_at)
                .unwrap_or_default();
            ensure!(
                span >= Duration::from_millis(300),
                "first and last failure are {span:?} apart; the retry delay was 300ms"
            );
            let slack = Duration::from_secs(1);
            for r in &records {
                ensure!(
                    r.first_failed_at + slack >= started && r.last_failed_at <= ended + slack,
                    "failure times {:?}..{:?} lie outside the test run",
                    r.first_failed_at,
                    r.last_failed_at
                );
            }
            records_across_processes(h, &sc).await
        })
        .await,
    )
}

/// The record is right when the failures happened in different processes:
/// the first attempt fails in consumer A, which is killed while the retry
/// waits; consumer B, on a connection of its own, fails the rest.
async fn records_across_processes(h: &dyn Harness, sc: &Scenario) -> Check {
    let queue = sc.queue("cross");
    let handler = Scripted::new(|_, attempt, _| Act::Retry(format!("attempt {attempt} failed")));
    let policy = || Fixed::new(Duration::from_millis(700), 3).expect("valid");
    let a = h.connect().await.doing("connecting consumer A")?;
    let consumer_a = Consumer::new(a.clone(), queue.clone(), handler.clone())
        .retry_policy(policy())
        .spawn();
    let before_first = SystemTime::now();
    let id = sc.publish_job("cross.a", "across").await?;
    wait_until(
        WAIT,
        || {
            let health = consumer_a.health();
            health.retried >= 1 && health.in_flight == 0
        },
        || format!("consumer A never retried; {}", handler.describe()),
    )
    .await?;
    let first_failed = handler.calls("across")[0]
        .finished
        .ok_or("the first attempt never finished")?;
    consumer_a.abort();
    a.close().await.doing("dropping consumer A's connection")?;

    let b = h.connect().await.doing("connecting consumer B")?;
    let consumer_b = Consumer::new(b.clone(), queue.clone(), handler.clone())
        .retry_policy(policy())
        .spawn();
    let records = wait_for_dead_letters(&sc.broker, &queue, 1, WAIT).await?;
    consumer_b
        .shutdown()
        .await
        .doing("shutting down consumer B")?;
    let _ = b.close().await;
    let after_last = SystemTime::now();
    let record = &records[0];
    let attempts: Vec<u32> = handler.calls("across").iter().map(|c| c.attempt).collect();
    ensure!(
        record.envelope.id == id,
        "the DLQ holds {}, expected {id}",
        record.envelope.id
    );
    ensure!(
        attempts == [1, 2, 3],
        "across two consumers the handler saw attempts {attempts:?}, expected [1, 2, 3]"
    );
    ensure!(
        record.reason == DeadLetterReason::Exhausted && record.attempts == 3,
        "the record says {} after {} attempts, expected exhausted after 3",
        record.reason,
        record.attempts
    );
    ensure!(
        record.last_error.contains("attempt 3 failed"),
        "last error {:?}",
        record.last_error
    );
    // The first failure happened in consumer A: the record must say when,
    // not when consumer B first saw the message.
    let slack = Duration::from_millis(500);
    let first = record.first_failed_at;
    let a_failed = SystemTime::now() - first_failed.elapsed();
    ensure!(
        first + slack >= before_first && first <= a_failed + slack,
        "the record's first failure is {:?} after the first attempt failed in consumer A \
         (a record made in another process lost it)",
        first.duration_since(a_failed).unwrap_or_default()
    );
    ensure!(
        record.last_failed_at >= first && record.last_failed_at <= after_last + slack,
        "the last failure {:?} is not between the first {first:?} and the end of the run",
        record.last_failed_at
    );
    Ok(())
}

pub(crate) async fn c11_dlq_operations(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c11", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            // The first call of each key fails for good; after a replay it works.
            let handler = Scripted::new(|_, _, before| {
                if before == 0 {
                    Act::Permanent("bad day".into())
                } else {
                    Act::Succeed
                }
            });
            let consumer = Consumer::new(sc.broker.clone(), sc.queue("q"), handler.clone()).spawn();
            let q = sc.queue("q");
            let mut ids = Vec::new();
            for key in ["one", "two", "three"] {
                ids.push(sc.publish_job("jobs.a", key).await?);
            }
            wait_for_dead_letters(&sc.broker, &q, 3, WAIT).await?;
            let listed = sc.broker.dead_letters(&q, 100).await.doing("listing")?;
            let again = sc
                .broker
                .dead_letters(&q, 100)
                .await
                .doing("listing again")?;
            ensure!(
                listed.len() == 3 && again.len() == 3,
                "listing removed messages: {} then {}",
                listed.len(),
                again.len()
            );
            let limited = sc
                .broker
                .dead_letters(&q, 2)
                .await
                .doing("listing with a limit")?;
            ensure!(limited.len() == 2, "a limit of 2 listed {}", limited.len());
            let after_limit = sc
                .broker
                .dead_letters(&q, 100)
                .await
                .doing("listing after a limited listing")?;
            ensure!(
                after_limit.len() == 3,
                "a listing right after one stopped at 2 met {}",
                after_limit.len()
            );

            let replayed = sc
                .broker
                .replay(&q, Replay::Id(ids[0].clone()))
                .await
                .doing("replaying one")?;
            ensure!(replayed == 1, "replaying one id replayed {replayed}");
            wait_until(
                WAIT,
                || handler.finished_twice("one"),
                || handler.describe(),
            )
            .await?;
            let one = handler.calls("one");
            ensure!(
                one[1].id == ids[0] && one[1].attempt == 1,
                "replayed as id {} attempt {}, expected {} attempt 1",
                one[1].id,
                one[1].attempt,
                ids[0]
            );
            let left: BTreeSet<String> = sc
                .broker
                .dead_letters(&q, 100)
                .await
                .doing("listing")?
                .into_iter()
                .map(|r| r.envelope.id)
                .collect();
            let expected: BTreeSet<String> = ids[1..].iter().cloned().collect();
            ensure!(
                left == expected,
                "after replaying one, the DLQ holds {left:?}, expected {expected:?}"
            );

            let missing = sc.broker.replay(&q, Replay::Id("no-such-id".into())).await;
            ensure!(
                matches!(&missing, Err(e) if e.kind() == ErrorKind::NotFound),
                "replaying an unknown id gave {missing:?}, expected a not-found error"
            );

            let replayed = sc
                .broker
                .replay(&q, Replay::All)
                .await
                .doing("replaying all")?;
            ensure!(
                replayed == 2,
                "replaying all replayed {replayed}, expected 2"
            );
            wait_until(
                WAIT,
                || handler.finished_twice("two") && handler.finished_twice("three"),
                || handler.describe(),
            )
            .await?;
            let left = sc.broker.dead_letters(&q, 100).await.doing("listing")?;
            ensure!(
                left.is_empty(),
                "after replaying all, {} remain",
                left.len()
            );

            for key in ["four", "five"] {
                sc.publish_job("jobs.a", key).await?;
            }
            wait_for_dead_letters(&sc.broker, &q, 2, WAIT).await?;
            let purged = sc.broker.purge_dead_letters(&q).await.doing("purging")?;
            ensure!(purged == 2, "purge removed {purged}, expected 2");
            let left = sc.broker.dead_letters(&q, 100).await.doing("listing")?;
            ensure!(left.is_empty(), "after a purge, {} remain", left.len());
            consumer.shutdown().await.doing("shutting down")?;
            Ok(())
        })
        .await,
    )
}
