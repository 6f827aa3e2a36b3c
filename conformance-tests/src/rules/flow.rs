//! C22: a downstream outage pauses consumption instead of spending every
//! message's attempts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail_core::{
    handler_fn, CircuitBreaker, Consumer, Context, Fixed, HandlerError, QueueSpec,
};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{ensure, wait_until, Doing, Job, Scenario};

const MESSAGES: usize = 60;
const PREFETCH: u16 = 4;
const OUTAGE: Duration = Duration::from_secs(4);

pub(crate) async fn c22_downstream_outage(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c22", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let down = Arc::new(AtomicBool::new(true));
            let failed = Arc::new(AtomicUsize::new(0));
            let handled: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
            let (is_down, failures, seen) =
                (Arc::clone(&down), Arc::clone(&failed), Arc::clone(&handled));
            let consumer = Consumer::new(
                sc.broker.clone(),
                sc.queue("q"),
                handler_fn(move |_job: Job, ctx: Context| {
                    let (is_down, failures, seen) =
                        (Arc::clone(&is_down), Arc::clone(&failures), Arc::clone(&seen));
                    async move {
                        if is_down.load(Ordering::SeqCst) {
                            failures.fetch_add(1, Ordering::SeqCst);
                            return Err(HandlerError::retryable("the mail provider is down"));
                        }
                        seen.lock()
                            .expect("not poisoned")
                            .entry(ctx.id().to_owned())
                            .or_default()
                            .push(ctx.attempt());
                        Ok(())
                    }
                }),
            )
            // Without the breaker these three quick attempts would put most
            // messages in the DLQ during the outage.
            .retry_policy(Fixed::new(Duration::from_millis(200), 3).expect("valid"))
            .circuit_breaker(
                CircuitBreaker::default()
                    .min_attempts(4)
                    .window(Duration::from_secs(10))
                    .cool_down(Duration::from_millis(500), Duration::from_secs(2)),
            )
            .prefetch(PREFETCH)
            .spawn();
            let mut ids = Vec::new();
            for i in 0..MESSAGES {
                ids.push(sc.publish_job("jobs.a", &format!("m{i}")).await?);
            }
            wait_until(
                Duration::from_secs(10),
                || consumer.health().paused.is_some(),
                || format!("the consumer did not pause: {:?}", consumer.health()),
            )
            .await?;
            let paused = consumer.health();
            let started = Instant::now();
            let mut most_in_flight = 0;
            while started.elapsed() < OUTAGE {
                most_in_flight = most_in_flight.max(consumer.health().in_flight);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            down.store(false, Ordering::SeqCst);
            let all = wait_until(
                Duration::from_secs(30),
                || handled.lock().expect("not poisoned").len() == MESSAGES,
                || {
                    format!(
                        "handled {} of {MESSAGES} after the outage: {:?}",
                        handled.lock().expect("not poisoned").len(),
                        consumer.health()
                    )
                },
            )
            .await;
            let after = consumer.health();
            consumer.shutdown().await.doing("stopping the consumer")?;
            all?;
            let dead = sc
                .broker
                .dead_letters(&sc.queue("q"), 100)
                .await
                .doing("listing the DLQ")?;
            ensure!(dead.is_empty(), "{} messages dead-lettered during an outage the breaker covered", dead.len());
            ensure!(after.dead_lettered == 0, "health counted dead letters: {after:?}");
            ensure!(
                most_in_flight <= usize::from(PREFETCH),
                "{most_in_flight} handlers ran at once while paused; the prefetch is {PREFETCH}"
            );
            // What tripped the breaker, what was in hand then, and one probe
            // per pause (0.5 s doubling to 2 s over the outage: at most 5).
            let failures = failed.load(Ordering::SeqCst);
            let budget = 4 + usize::from(PREFETCH) + 5;
            ensure!(
                failures <= budget,
                "{failures} attempts failed during the outage; the breaker should hold it to {budget} \
                 (paused: {:?})",
                paused.paused
            );
            let handled = handled.lock().expect("not poisoned");
            let first_time = handled.values().filter(|attempts| attempts == &&vec![1]).count();
            ensure!(
                first_time + failures >= MESSAGES,
                "only {first_time} of {MESSAGES} messages were handled at their first attempt with \
                 {failures} failures: the pause spent attempts on held messages"
            );
            ensure!(
                ids.iter().all(|id| handled.get(id).is_some_and(|a| a.len() == 1)),
                "a message was handled twice: {handled:?}"
            );
            Ok(())
        })
        .await,
    )
}

/// The rate of C23: a downstream that allows 200 calls a second.
const RATE: u32 = 200;
/// How long C23 measures.
const RATED_SECONDS: usize = 10;

pub(crate) async fn c23_rate_limit(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c23", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let total = RATE as usize * (RATED_SECONDS + 2);
            let mut sent = Vec::with_capacity(total);
            for i in 0..total {
                let message = crate::support::job_message("jobs.a", &format!("r{i}"));
                sent.push(
                    sc.broker
                        .send(sc.space(), message)
                        .await
                        .doing("publishing")?,
                );
            }
            for confirmation in sent {
                confirmation.await.doing("confirming")?;
            }
            let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
            let seen = Arc::clone(&times);
            let consumer = Consumer::new(
                sc.broker.clone(),
                sc.queue("q"),
                handler_fn(move |_job: Job, _ctx: Context| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().expect("not poisoned").push(Instant::now());
                        Ok::<(), HandlerError>(())
                    }
                }),
            )
            .rate_limit(RATE, Duration::from_secs(1))
            .prefetch(50)
            .spawn();
            let measured = Duration::from_secs(RATED_SECONDS as u64 + 1);
            wait_until(
                measured + Duration::from_secs(5),
                || {
                    let times = times.lock().expect("not poisoned");
                    times
                        .first()
                        .is_some_and(|first| first.elapsed() >= measured)
                },
                || "no delivery was handled".to_owned(),
            )
            .await?;
            consumer.shutdown().await.doing("stopping the consumer")?;
            let times = times.lock().expect("not poisoned");
            let first = times[0];
            let mut per_second = vec![0usize; RATED_SECONDS + 1];
            for t in times.iter() {
                let second = t.duration_since(first).as_secs() as usize;
                if let Some(count) = per_second.get_mut(second) {
                    *count += 1;
                }
            }
            // No full second after the first over the rate by more than
            // 5 %, and together they reach it within 5 %. A single second
            // short of it is the machine not keeping up (the suite runs
            // many brokers at once on two cores), not the limiter letting
            // too much through; a limiter that holds back too much shows
            // in the mean.
            let low = (f64::from(RATE) * 0.95) as usize;
            let high = (f64::from(RATE) * 1.05) as usize;
            let full = &per_second[1..RATED_SECONDS];
            let mean = full.iter().sum::<usize>() / full.len();
            ensure!(
                full.iter().all(|n| *n <= high) && (low..=high).contains(&mean),
                "handled per second {per_second:?} with a limit of {RATE}/s; no full second \
                 after the first may pass {high}, and their mean ({mean}) must be within \
                 {low}..={high}"
            );
            Ok(())
        })
        .await,
    )
}
