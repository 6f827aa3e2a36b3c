//! Helpers shared by the rules: unique scenarios, receiving with deadlines,
//! and a scripted handler that records what it saw.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ticketrail_core::{
    Context, DeadLetter, Delivery, Handler, HandlerError, Message, QueueSpec, SharedBroker,
    Subscription, Topology,
};

use crate::harness::Harness;

/// Subscription options with prefetch `n` (not zero).
pub(crate) fn prefetch(n: u16) -> ticketrail_core::SubscribeOptions {
    ticketrail_core::SubscribeOptions::prefetch(
        std::num::NonZeroU16::new(n).expect("prefetch is not zero"),
    )
}

/// A rule's check: `Err` says what was seen instead of what was expected.
pub(crate) type Check = Result<(), String>;

/// Fails the check with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
pub(crate) use ensure;

/// Turns a ticketrail error into a check failure that says what was being done.
pub(crate) trait Doing<T> {
    fn doing(self, what: &str) -> Result<T, String>;
}

impl<T> Doing<T> for ticketrail_core::Result<T> {
    fn doing(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Fresh names for one rule's run, and the connection it declared them on.
pub(crate) struct Scenario {
    pub(crate) broker: SharedBroker,
    pub(crate) topology: Topology,
    prefix: String,
}

impl Scenario {
    /// Connects and declares `queues` (names are suffixes; bindings are
    /// patterns under the scenario's own first word).
    pub(crate) async fn new(
        harness: &dyn Harness,
        rule: &str,
        queues: Vec<QueueSpec>,
    ) -> Result<Self, String> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("{}-{rule}-{}", harness.prefix(), &unique[..10]);
        let broker = harness.connect().await.doing("connecting")?;
        let mut topology = Topology::new(format!("{prefix}.events"));
        for mut spec in queues {
            spec.name = format!("{prefix}.{}", spec.name);
            topology = topology.queue(spec);
        }
        broker
            .declare(&topology)
            .await
            .doing("declaring the topology")?;
        Ok(Scenario {
            broker,
            topology,
            prefix,
        })
    }

    /// The full name of the queue with this suffix.
    pub(crate) fn queue(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    pub(crate) fn space(&self) -> &str {
        &self.topology.topic_space
    }

    /// Publishes a JSON job with this key.
    pub(crate) async fn publish_job(&self, routing_key: &str, key: &str) -> Result<String, String> {
        let message = job_message(routing_key, key);
        let id = message.id.clone();
        self.broker
            .publish(self.space(), message)
            .await
            .doing(&format!("publishing `{key}` to `{routing_key}`"))?;
        Ok(id)
    }

    /// Runs `body`, then deletes everything the scenario declared.
    pub(crate) async fn run<F, Fut>(self, body: F) -> Check
    where
        F: FnOnce(Arc<Scenario>) -> Fut,
        Fut: Future<Output = Check>,
    {
        let scenario = Arc::new(self);
        let result = body(Arc::clone(&scenario)).await;
        let cleanup = scenario.broker.delete(&scenario.topology).await;
        let _ = scenario.broker.close().await;
        match (result, cleanup) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(format!("cleaning up: {e}")),
            (Ok(()), Ok(())) => Ok(()),
        }
    }
}

/// The payload of test messages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) key: String,
}

pub(crate) fn job_message(routing_key: &str, key: &str) -> Message {
    let payload = serde_json::to_vec(&Job {
        key: key.to_owned(),
    })
    .expect("a Job always encodes");
    Message::new(routing_key, payload).content_type("application/json")
}

/// The next delivery within `within`, or what went wrong.
pub(crate) async fn receive(
    sub: &mut Box<dyn Subscription>,
    within: Duration,
) -> Result<Delivery, String> {
    match tokio::time::timeout(within, sub.next()).await {
        Err(_) => Err(format!("no delivery within {within:?}")),
        Ok(None) => Err("the subscription ended".to_owned()),
        Ok(Some(Err(e))) => Err(format!("receiving: {e}")),
        Ok(Some(Ok(delivery))) => Ok(delivery),
    }
}

/// Checks that nothing is delivered for `quiet`.
pub(crate) async fn expect_nothing(
    sub: &mut Box<dyn Subscription>,
    quiet: Duration,
    why: &str,
) -> Check {
    match tokio::time::timeout(quiet, sub.next()).await {
        Err(_) => Ok(()),
        Ok(Some(Ok(d))) => Err(format!(
            "{why}, but message {} (attempt {}) was delivered",
            d.envelope().id,
            d.envelope().attempt
        )),
        Ok(Some(Err(e))) => Err(format!("{why}, but receiving failed: {e}")),
        Ok(None) => Err(format!("{why}, but the subscription ended")),
    }
}

/// Waits until `condition` holds, polling, or fails after `within` with
/// what `describe` says was seen.
pub(crate) async fn wait_until<C, D>(within: Duration, mut condition: C, describe: D) -> Check
where
    C: FnMut() -> bool,
    D: FnOnce() -> String,
{
    let deadline = Instant::now() + within;
    while !condition() {
        if Instant::now() >= deadline {
            return Err(format!("waited {within:?}: {}", describe()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits until the DLQ of `queue` holds `count` records, and returns them.
pub(crate) async fn wait_for_dead_letters(
    broker: &SharedBroker,
    queue: &str,
    count: usize,
    within: Duration,
) -> Result<Vec<DeadLetter>, String> {
    let deadline = Instant::now() + within;
    loop {
        let records = broker
            .dead_letters(queue, 1000)
            .await
            .doing("listing dead letters")?;
        if records.len() >= count {
            return Ok(records);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "expected {count} dead letters in `{queue}` within {within:?}, found {}",
                records.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What a scripted handler does with one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Act {
    Succeed,
    Retry(String),
    Permanent(String),
    Panic,
    /// Sleeps this long, then succeeds.
    Work(Duration),
    /// Never returns (stands in for a consumer that dies mid-message).
    Hang,
}

/// One call of a scripted handler.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) key: String,
    pub(crate) id: String,
    pub(crate) attempt: u32,
    pub(crate) started: Instant,
    pub(crate) finished: Option<Instant>,
}

type Script = dyn Fn(&str, u32, usize) -> Act + Send + Sync;

/// A handler that records every call and acts as its script says, given the
/// job key, the attempt and how many times this key was seen before.
#[derive(Clone)]
pub(crate) struct Scripted {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Script>,
}

impl Scripted {
    pub(crate) fn new(script: impl Fn(&str, u32, usize) -> Act + Send + Sync + 'static) -> Self {
        Scripted {
            seen: Arc::default(),
            script: Arc::new(script),
        }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    pub(crate) fn calls(&self, key: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.key == key).collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().expect("not poisoned").len()
    }

    pub(crate) fn finished(&self, key: &str) -> bool {
        self.calls(key).iter().any(|s| s.finished.is_some())
    }

    /// Whether a second call for `key` has finished.
    pub(crate) fn finished_twice(&self, key: &str) -> bool {
        self.calls(key)
            .iter()
            .filter(|s| s.finished.is_some())
            .count()
            >= 2
    }

    /// A one-line summary of the calls, for failure messages.
    pub(crate) fn describe(&self) -> String {
        let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
        for s in self.seen() {
            by_key.entry(s.key).or_default().push(s.attempt);
        }
        format!("handler calls (key: attempts): {by_key:?}")
    }
}

impl Handler for Scripted {
    type Message = Job;

    async fn handle(&self, job: Job, ctx: &Context) -> Result<(), HandlerError> {
        let index = {
            let mut seen = self.seen.lock().expect("not poisoned");
            let before = seen.iter().filter(|s| s.key == job.key).count();
            seen.push(Seen {
                key: job.key.clone(),
                id: ctx.id().to_owned(),
                attempt: ctx.attempt(),
                started: Instant::now(),
                finished: None,
            });
            (seen.len() - 1, before)
        };
        let act = (self.script)(&job.key, ctx.attempt(), index.1);
        let result = match act {
            Act::Succeed => Ok(()),
            Act::Retry(e) => Err(HandlerError::retryable(e)),
            Act::Permanent(e) => Err(HandlerError::permanent(e)),
            Act::Panic => panic!("scripted panic for `{}`", job.key),
            Act::Work(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Act::Hang => std::future::pending().await,
        };
        self.seen.lock().expect("not poisoned")[index.0].finished = Some(Instant::now());
        result
    }
}
