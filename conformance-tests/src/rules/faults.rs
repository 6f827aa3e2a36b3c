//! C21: faults that close nothing. A connection that goes silent without a
//! reset is noticed and replaced within seconds, and a publish on it ends
//! within its timeout.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail_core::{handler_fn, Consumer, Context, HandlerError, QueueSpec};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{ensure, job_message, wait_until, Doing, Job, Scenario};
use crate::testing::{proxied, FaultProxy};

/// What the contract allows from a silent drop to handling again.
const RESUMED_WITHIN: Duration = Duration::from_secs(20);
/// The publish timeout the rule's publisher runs with.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) async fn c21_silent_faults(h: &dyn Harness) -> Result<(), Skip> {
    let Some(url) = h.broker_url() else {
        return Err(Skip::NotApplicable(
            "the in-process broker has no network".to_owned(),
        ));
    };
    let sc = Scenario::new(h, "c21", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let (target, _) = proxied(&url, 0, "");
            let proxy = FaultProxy::start(&target).await.doing("starting the proxy")?;
            // The worker runs with the default heartbeat; the publisher
            // with a short publish timeout, to hold it to it.
            let (_, worker_url) = proxied(&url, proxy.port(), "");
            let (_, publisher_url) = proxied(
                &url,
                proxy.port(),
                &format!("publish_timeout={}", PUBLISH_TIMEOUT.as_secs()),
            );
            let worker = h.connect_to(&worker_url).await.doing("connecting the worker through the proxy")?;
            let publisher = h
                .connect_to(&publisher_url)
                .await
                .doing("connecting the publisher through the proxy")?;
            let handled: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
            let seen = Arc::clone(&handled);
            let consumer = Consumer::new(
                worker,
                sc.queue("q"),
                handler_fn(move |_job: Job, ctx: Context| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().expect("not poisoned").push((ctx.id().to_owned(), Instant::now()));
                        Ok::<(), HandlerError>(())
                    }
                }),
            )
            .prefetch(10)
            .spawn();
            let ids = |handled: &Arc<Mutex<Vec<(String, Instant)>>>| -> BTreeSet<String> {
                handled.lock().expect("not poisoned").iter().map(|(id, _)| id.clone()).collect()
            };

            let mut expected = BTreeSet::new();
            for i in 0..10 {
                expected.insert(sc.publish_job("jobs.a", &format!("before-{i}")).await?);
            }
            let through = job_message("jobs.a", "through-the-proxy");
            expected.insert(through.id.clone());
            publisher
                .publish(sc.space(), through)
                .await
                .doing("publishing through the proxy before the fault")?;
            wait_until(
                Duration::from_secs(10),
                || ids(&handled).is_superset(&expected),
                || format!("handled {} of {} before the fault", ids(&handled).len(), expected.len()),
            )
            .await?;

            // Every open flow goes silent: no FIN, no RST.
            proxy.blackhole_existing();
            let dropped = Instant::now();
            let stuck = job_message("jobs.a", "on-a-silent-connection");
            let started = Instant::now();
            let outcome = publisher.publish(sc.space(), stuck.clone()).await;
            let took = started.elapsed();
            ensure!(
                took <= PUBLISH_TIMEOUT + Duration::from_secs(1),
                "a publish on a silent connection took {took:?} ({outcome:?}); the timeout is {PUBLISH_TIMEOUT:?}"
            );
            if outcome.is_ok() {
                expected.insert(stuck.id);
            }
            for i in 0..10 {
                expected.insert(sc.publish_job("jobs.a", &format!("after-{i}")).await?);
            }
            let all = wait_until(
                RESUMED_WITHIN + Duration::from_secs(10),
                || ids(&handled).is_superset(&expected),
                || {
                    format!(
                        "handled {} of {} messages after the flows went silent",
                        ids(&handled).intersection(&expected).count(),
                        expected.len()
                    )
                },
            )
            .await;
            let resumed = handled
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|(_, at)| *at)
                .find(|at| *at > dropped)
                .map(|at| at - dropped);
            consumer.abort();
            let _ = publisher.close().await;
            all?;
            let resumed = resumed.ok_or("nothing was handled after the fault")?;
            ensure!(
                resumed <= RESUMED_WITHIN,
                "the worker handled again {resumed:?} after its connection went silent; at most {RESUMED_WITHIN:?}"
            );
            Ok(())
        })
        .await,
    )
}
