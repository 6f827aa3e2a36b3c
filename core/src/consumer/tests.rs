//! The consumer driven through scripted doubles of a broker, its
//! subscriptions and their settlements, on tokio's paused clock: no broker,
//! no real sleeping.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::*;
use crate::broker::{Broker, SubscribeOptions, Subscription};
use crate::capabilities::Capabilities;
use crate::confirmation::Confirmation;
use crate::dead_letter::{DeadLetter, DeadLetterCursor, DeadLetterReason};
use crate::delivery::{Delivery, RetryRequest, Settle};
use crate::envelope::{Envelope, Headers, Message};
use crate::handler::{handler_fn, Context, HandlerError};
use crate::retry::Fixed;
use crate::topology::Topology;

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Ack(String),
    Nack(String),
    Retry {
        id: String,
        after: Duration,
        next_attempt: u32,
    },
    DeadLetter {
        id: String,
        reason: DeadLetterReason,
        error: String,
        notes: Vec<String>,
    },
    /// Dropped unsettled: released for redelivery.
    Released(String),
}

type Log = Arc<Mutex<Vec<Settled>>>;

struct ScriptedSettle {
    id: String,
    log: Log,
    settled: bool,
}

impl ScriptedSettle {
    fn record(&mut self, what: Settled) -> crate::Result<()> {
        self.settled = true;
        self.log.lock().unwrap().push(what);
        Ok(())
    }
}

impl Drop for ScriptedSettle {
    fn drop(&mut self) {
        if !self.settled {
            self.log
                .lock()
                .unwrap()
                .push(Settled::Released(self.id.clone()));
        }
    }
}

#[async_trait]
impl Settle for ScriptedSettle {
    async fn ack(mut self: Box<Self>) -> crate::Result<()> {
        let id = self.id.clone();
        self.record(Settled::Ack(id))
    }

    async fn nack(mut self: Box<Self>) -> crate::Result<()> {
        let id = self.id.clone();
        self.record(Settled::Nack(id))
    }

    async fn retry(mut self: Box<Self>, _: &Envelope, request: RetryRequest) -> crate::Result<()> {
        let id = self.id.clone();
        self.record(Settled::Retry {
            id,
            after: request.after,
            next_attempt: request.next_attempt,
        })
    }

    async fn dead_letter(mut self: Box<Self>, record: DeadLetter) -> crate::Result<()> {
        let id = self.id.clone();
        self.record(Settled::DeadLetter {
            id,
            reason: record.reason,
            error: record.last_error,
            notes: record.notes,
        })
    }
}

/// One step of a scripted subscription.
enum Step {
    /// A delivery of this payload and attempt; `counted`: the broker
    /// counted the attempt.
    Deliver {
        id: &'static str,
        payload: &'static str,
        attempt: u32,
        counted: bool,
    },
    Fail(Error),
    End,
}

fn deliver(id: &'static str, payload: &'static str) -> Step {
    Step::Deliver {
        id,
        payload,
        attempt: 1,
        counted: false,
    }
}

struct ScriptedSubscription {
    steps: VecDeque<Step>,
    log: Log,
    /// How many deliveries were asked for (`next` and `try_next` calls).
    polls: Arc<Mutex<usize>>,
    /// Whether deliveries scripted next are at hand for `try_next`, as a
    /// broker's buffered deliveries are.
    at_hand: bool,
    /// How many subscriptions were closed (`close` calls).
    closes: Arc<Mutex<usize>>,
    /// Whether `close` never returns, as on an unreachable broker.
    close_hangs: bool,
    /// For each `flush` call, how many settlements were logged by then.
    flushes: Arc<Mutex<Vec<usize>>>,
}

impl ScriptedSubscription {
    fn delivery(&self, id: &str, payload: &str, attempt: u32, counted: bool) -> Delivery {
        let envelope = Envelope {
            id: id.to_owned(),
            routing_key: "jobs.a".into(),
            payload: payload.as_bytes().to_vec().into(),
            content_type: Some("application/json".into()),
            headers: Headers::new(),
            published_at: SystemTime::now(),
            attempt,
        };
        let settle = Box::new(ScriptedSettle {
            id: id.to_owned(),
            log: Arc::clone(&self.log),
            settled: false,
        });
        let mut decoded = crate::wire::Incoming::new("jobs.a", envelope.payload.clone()).decode();
        decoded.envelope = envelope;
        decoded.attempt_counted = counted;
        decoded.notes = vec!["a note".into()];
        Delivery::decoded(Arc::from("q"), decoded, settle)
    }
}

#[async_trait]
impl Subscription for ScriptedSubscription {
    async fn next(&mut self) -> Option<crate::Result<Delivery>> {
        *self.polls.lock().unwrap() += 1;
        match self.steps.pop_front() {
            None => std::future::pending().await,
            Some(Step::End) => None,
            Some(Step::Fail(e)) => Some(Err(e)),
            Some(Step::Deliver {
                id,
                payload,
                attempt,
                counted,
            }) => Some(Ok(self.delivery(id, payload, attempt, counted))),
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        if !self.at_hand || !matches!(self.steps.front(), Some(Step::Deliver { .. })) {
            return None;
        }
        *self.polls.lock().unwrap() += 1;
        let Some(Step::Deliver {
            id,
            payload,
            attempt,
            counted,
        }) = self.steps.pop_front()
        else {
            unreachable!("checked above")
        };
        Some(self.delivery(id, payload, attempt, counted))
    }

    async fn close(&mut self) {
        *self.closes.lock().unwrap() += 1;
        if self.close_hangs {
            std::future::pending::<()>().await;
        }
    }

    async fn flush(&mut self) {
        let logged = self.log.lock().unwrap().len();
        self.flushes.lock().unwrap().push(logged);
    }
}

/// A broker whose `subscribe` hands out scripted subscriptions in turn.
#[derive(Debug)]
struct ScriptedBroker {
    scripts: Mutex<VecDeque<Vec<Step>>>,
    at_hand: bool,
    log: Log,
    subscribes: Mutex<usize>,
    polls: Arc<Mutex<usize>>,
    closes: Arc<Mutex<usize>>,
    close_hangs: bool,
    /// Whether the first subscribe times out, as over a silently dropped
    /// connection.
    first_subscribe_times_out: bool,
    flushes: Arc<Mutex<Vec<usize>>>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Step")
    }
}

impl ScriptedBroker {
    fn new(scripts: Vec<Vec<Step>>) -> Arc<Self> {
        Self::with_deliveries_at_hand(scripts, false)
    }

    /// A broker whose subscriptions have their scripted deliveries at hand
    /// for `try_next` (up to the next failure or end) when `at_hand`.
    fn with_deliveries_at_hand(scripts: Vec<Vec<Step>>, at_hand: bool) -> Arc<Self> {
        Arc::new(ScriptedBroker {
            scripts: Mutex::new(scripts.into()),
            at_hand,
            log: Log::default(),
            subscribes: Mutex::new(0),
            polls: Arc::default(),
            closes: Arc::default(),
            close_hangs: false,
            first_subscribe_times_out: false,
            flushes: Arc::default(),
        })
    }

    /// A broker whose subscriptions never finish closing.
    fn with_close_hanging(scripts: Vec<Vec<Step>>) -> Arc<Self> {
        let mut broker = Arc::into_inner(Self::new(scripts)).expect("not shared yet");
        broker.close_hangs = true;
        Arc::new(broker)
    }

    fn log(&self) -> Vec<Settled> {
        self.log.lock().unwrap().clone()
    }
}

fn unsupported<T>() -> crate::Result<T> {
    Err(Error::new(ErrorKind::Unsupported, "not scripted"))
}

#[async_trait]
impl Broker for ScriptedBroker {
    fn backend(&self) -> &'static str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    async fn declare(&self, _: &Topology) -> crate::Result<()> {
        unsupported()
    }

    async fn delete(&self, _: &Topology) -> crate::Result<()> {
        unsupported()
    }

    async fn send(&self, _: &str, _: Message) -> crate::Result<Confirmation> {
        unsupported()
    }

    async fn subscribe(
        &self,
        _queue: &str,
        _options: SubscribeOptions,
    ) -> crate::Result<Box<dyn Subscription>> {
        let subscribes = {
            let mut count = self.subscribes.lock().unwrap();
            *count += 1;
            *count
        };
        if self.first_subscribe_times_out && subscribes == 1 {
            return Err(Error::new(
                ErrorKind::Timeout,
                "opening a channel: the broker did not answer within 5s",
            ));
        }
        match self.scripts.lock().unwrap().pop_front() {
            Some(steps) => Ok(Box::new(ScriptedSubscription {
                steps: steps.into(),
                log: Arc::clone(&self.log),
                polls: Arc::clone(&self.polls),
                at_hand: self.at_hand,
                closes: Arc::clone(&self.closes),
                close_hangs: self.close_hangs,
                flushes: Arc::clone(&self.flushes),
            })),
            None => Err(Error::new(ErrorKind::NotFound, "queue `q` is gone")),
        }
    }

    async fn dead_letter_cursor(&self, _: &str) -> crate::Result<Box<dyn DeadLetterCursor>> {
        unsupported()
    }

    async fn close(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// What the scripted handler does, by payload: `"ok"`, `"retry"`,
/// `"permanent"`, `"panic"`, `"slow"` (1 s), `"hang"`.
fn handler() -> impl Handler<Message = String> {
    handler_fn(|payload: String, _ctx: Context| async move {
        match payload.as_str() {
            "retry" => Err(HandlerError::retryable("try later")),
            "permanent" => Err(HandlerError::permanent("no such mailbox")),
            "panic" => panic!("scripted panic"),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            "hang" => std::future::pending().await,
            _ => Ok(()),
        }
    })
}

fn consumer(broker: &Arc<ScriptedBroker>) -> Consumer<impl Handler<Message = String>> {
    let shared: SharedBroker = broker.clone();
    Consumer::new(shared, "q", handler())
        .retry_policy(Fixed::new(Duration::from_secs(2), 3).unwrap())
        .shutdown_timeout(Duration::from_secs(5))
}

/// Waits, in paused time, until the broker's log has `n` entries.
async fn settled(broker: &ScriptedBroker, n: usize) -> Vec<Settled> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let log = broker.log();
        if log.len() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "only {log:?} settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits, in paused time, until `n` handlers are running.
async fn handling(running: &RunningConsumer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while running.health().in_flight < n {
        assert!(Instant::now() < deadline, "{:?}", running.health());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn json(s: &'static str) -> &'static str {
    // Payloads are JSON strings for the `String` message type.
    match s {
        "ok" => "\"ok\"",
        "retry" => "\"retry\"",
        "permanent" => "\"permanent\"",
        "panic" => "\"panic\"",
        "slow" => "\"slow\"",
        "hang" => "\"hang\"",
        other => other,
    }
}

#[tokio::test(start_paused = true)]
async fn a_handled_message_is_acked() {
    let broker = ScriptedBroker::new(vec![vec![deliver("a", json("ok"))]]);
    let running = consumer(&broker).spawn();
    assert_eq!(settled(&broker, 1).await, vec![Settled::Ack("a".into())]);
    let health = running.health();
    assert_eq!(health.handled, 1);
    assert!(health.is_ready(), "{health:?}");
    running.shutdown().await.unwrap();
}

/// The first subscribe failing for a reason that passes (a dropped
/// connection noticed late) is tried again, as later ones are; one that
/// does not pass (no such queue) still ends the consumer at once.
#[tokio::test(start_paused = true)]
async fn a_first_subscribe_that_times_out_is_tried_again() {
    let mut broker = Arc::into_inner(ScriptedBroker::new(vec![vec![deliver("a", json("ok"))]]))
        .expect("not shared yet");
    broker.first_subscribe_times_out = true;
    let broker = Arc::new(broker);
    let running = consumer(&broker).spawn();
    assert_eq!(settled(&broker, 1).await, vec![Settled::Ack("a".into())]);
    assert_eq!(*broker.subscribes.lock().unwrap(), 2);
    running.shutdown().await.unwrap();

    let gone = ScriptedBroker::new(Vec::new());
    let err = consumer(&gone).spawn().shutdown().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_is_retried_after_the_policy_delay() {
    let broker = ScriptedBroker::new(vec![vec![deliver("a", json("retry"))]]);
    let running = consumer(&broker).spawn();
    assert_eq!(
        settled(&broker, 1).await,
        vec![Settled::Retry {
            id: "a".into(),
            after: Duration::from_secs(2),
            next_attempt: 2
        }]
    );
    assert_eq!(running.health().retried, 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_last_attempt_is_dead_lettered_as_exhausted() {
    let broker = ScriptedBroker::new(vec![vec![Step::Deliver {
        id: "a",
        payload: json("retry"),
        attempt: 3,
        counted: false,
    }]]);
    let running = consumer(&broker).spawn();
    match &settled(&broker, 1).await[0] {
        Settled::DeadLetter {
            reason,
            error,
            notes,
            ..
        } => {
            assert_eq!(*reason, DeadLetterReason::Exhausted);
            assert_eq!(error, "try later");
            assert_eq!(
                notes,
                &["a note".to_owned()],
                "the delivery's notes are kept"
            );
        }
        other => panic!("{other:?}"),
    }
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_goes_to_the_dlq_at_once() {
    let broker = ScriptedBroker::new(vec![vec![deliver("a", json("permanent"))]]);
    let running = consumer(&broker).spawn();
    assert!(matches!(
        &settled(&broker, 1).await[0],
        Settled::DeadLetter { reason: DeadLetterReason::Permanent, error, .. } if error == "no such mailbox"
    ));
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_payload_goes_to_the_dlq_without_running_the_handler() {
    let broker = ScriptedBroker::new(vec![vec![deliver("a", "{not json")]]);
    let running = consumer(&broker).spawn();
    assert!(matches!(
        &settled(&broker, 1).await[0],
        Settled::DeadLetter { reason: DeadLetterReason::Undecodable, error, .. } if error.contains("JSON")
    ));
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_a_retryable_failure_and_the_consumer_goes_on() {
    let broker = ScriptedBroker::new(vec![vec![
        deliver("a", json("panic")),
        deliver("b", json("ok")),
    ]]);
    let running = consumer(&broker).spawn();
    let log = settled(&broker, 2).await;
    assert!(log.contains(&Settled::Ack("b".into())), "{log:?}");
    assert!(
        log.iter()
            .any(|s| matches!(s, Settled::Retry { id, .. } if id == "a")),
        "{log:?}"
    );
    assert!(!running.is_finished());
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_handler_over_its_timeout_is_cancelled_and_retried() {
    let broker = ScriptedBroker::new(vec![vec![deliver("a", json("hang"))]]);
    let shared: SharedBroker = broker.clone();
    let running = Consumer::new(shared, "q", handler())
        .retry_policy(Fixed::new(Duration::from_secs(2), 3).unwrap())
        .handler_timeout(Duration::from_secs(30))
        .spawn();
    let started = Instant::now();
    assert!(matches!(
        &settled(&broker, 1).await[0],
        Settled::Retry { id, next_attempt: 2, .. } if id == "a"
    ));
    assert!(started.elapsed() >= Duration::from_secs(30));
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_broker_count_over_the_limit_dead_letters_before_the_handler_runs() {
    let broker = ScriptedBroker::new(vec![vec![
        // Counted by the broker: crashed its consumer 3 times before.
        Step::Deliver {
            id: "crashes",
            payload: json("ok"),
            attempt: 4,
            counted: true,
        },
        // Carried in the message: a publisher may have written it.
        Step::Deliver {
            id: "claims",
            payload: json("ok"),
            attempt: 99_999,
            counted: false,
        },
    ]]);
    let running = consumer(&broker).spawn();
    let log = settled(&broker, 2).await;
    assert!(
        log.iter().any(|s| matches!(s, Settled::DeadLetter { id, reason: DeadLetterReason::DeliveryLimit, .. } if id == "crashes")),
        "{log:?}"
    );
    assert!(log.contains(&Settled::Ack("claims".into())), "{log:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_handlers_finish_and_releases_those_past_the_deadline() {
    let broker = ScriptedBroker::new(vec![vec![
        deliver("slow", json("slow")),
        deliver("stuck", json("hang")),
    ]]);
    let running = consumer(&broker).spawn();
    // Both in hand.
    handling(&running, 2).await;
    let begun = Instant::now();
    running.shutdown().await.unwrap();
    assert_eq!(
        begun.elapsed(),
        Duration::from_secs(5),
        "the shutdown deadline"
    );
    let log = broker.log();
    assert!(log.contains(&Settled::Ack("slow".into())), "{log:?}");
    assert!(log.contains(&Settled::Released("stuck".into())), "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_subscription_resumes_and_health_says_so() {
    let broker = ScriptedBroker::new(vec![vec![
        Step::Fail(Error::new(ErrorKind::Connection, "connection reset")),
        Step::Fail(Error::new(ErrorKind::Connection, "connection refused")),
        deliver("a", json("ok")),
    ]]);
    let running = consumer(&broker).spawn();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let health = running.health();
        if health.consecutive_failures == 2 {
            assert_eq!(health.state, ConsumerState::Reconnecting);
            assert!(health.last_error.unwrap().contains("refused"));
            break;
        }
        assert!(Instant::now() < deadline, "{health:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(settled(&broker, 1).await, vec![Settled::Ack("a".into())]);
    let health = running.health();
    assert_eq!(health.consecutive_failures, 0);
    assert_eq!(health.state, ConsumerState::Consuming);
    assert_eq!(
        *broker.subscribes.lock().unwrap(),
        1,
        "resumed, not reopened"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_broken_subscription_is_replaced_with_backoff_never_given_up() {
    let broker = ScriptedBroker::new(vec![
        vec![Step::Fail(Error::new(
            ErrorKind::Broker,
            "consumer deleted",
        ))],
        vec![deliver("a", json("ok"))],
    ]);
    let running = consumer(&broker).spawn();
    assert_eq!(settled(&broker, 1).await, vec![Settled::Ack("a".into())]);
    assert_eq!(*broker.subscribes.lock().unwrap(), 2);
    assert!(!running.is_finished());
    // The broken subscription was dropped, not closed; the one that
    // replaced it is closed at shutdown, although its `next()` is pending.
    assert_eq!(*broker.closes.lock().unwrap(), 0, "closed before shutdown");
    running.shutdown().await.unwrap();
    assert_eq!(*broker.closes.lock().unwrap(), 1, "closes at shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_close_that_hangs_holds_up_neither_handlers_nor_the_shutdown() {
    let broker = ScriptedBroker::with_close_hanging(vec![vec![deliver("slow", json("slow"))]]);
    let running = consumer(&broker).spawn();
    handling(&running, 1).await;
    let begun = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        broker.log(),
        vec![Settled::Ack("slow".into())],
        "the 1 s handler ran on while the close hung"
    );
    tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("shutdown returned although the subscription's close hangs")
        .unwrap()
        .unwrap();
    assert_eq!(
        begun.elapsed(),
        Duration::from_secs(5),
        "the shutdown deadline"
    );
    assert_eq!(*broker.closes.lock().unwrap(), 1);
    // Never closed, so never flushed: dropped at the deadline.
    assert!(broker.flushes.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_flushes_the_subscription_once_its_handlers_have_settled() {
    // Acks that a backend only queued (`try_ack`) must be sent before the
    // subscription, and maybe its connection, is dropped.
    let broker = ScriptedBroker::new(vec![vec![deliver("slow", json("slow"))]]);
    let running = consumer(&broker).spawn();
    handling(&running, 1).await;
    running.shutdown().await.unwrap();
    assert_eq!(broker.log(), vec![Settled::Ack("slow".into())]);
    assert_eq!(
        *broker.flushes.lock().unwrap(),
        vec![1],
        "flushed once, after the running handler's ack"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handling_counts_in_flight_while_its_handler_runs() {
    // A handling is polled once as it is pushed: what its handler sees of
    // the consumer's health (what a probe reports meanwhile) must count
    // it. Seen from outside, a retry counted with nothing in flight would
    // say its settlement was done while the copy was still being written.
    let probe: Arc<Mutex<Option<HealthProbe>>> = Arc::default();
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let handler = {
        let (probe, seen) = (Arc::clone(&probe), Arc::clone(&seen));
        handler_fn(move |_: String, _ctx: Context| {
            let in_flight = probe.lock().unwrap().as_ref().map(|p| p.health().in_flight);
            seen.lock().unwrap().extend(in_flight);
            async { Err(HandlerError::retryable("try later")) }
        })
    };
    for at_hand in [false, true] {
        seen.lock().unwrap().clear();
        let broker = ScriptedBroker::with_deliveries_at_hand(
            vec![vec![
                deliver("a", json("retry")),
                deliver("b", json("retry")),
            ]],
            at_hand,
        );
        let shared: SharedBroker = broker.clone();
        let running = Consumer::new(shared, "q", handler.clone()).spawn();
        // Set before the consumer's task first runs (one thread here).
        *probe.lock().unwrap() = Some(running.probe());
        settled(&broker, 2).await;
        running.shutdown().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![1, 1],
            "in flight as each handler ran (deliveries at hand: {at_hand})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn when_reopening_fails_too_the_consumer_keeps_trying() {
    // One subscription that breaks; every later subscribe fails.
    let broker = ScriptedBroker::new(vec![vec![Step::Fail(Error::new(
        ErrorKind::Broker,
        "consumer deleted",
    ))]]);
    let running = consumer(&broker).spawn();
    tokio::time::sleep(Duration::from_secs(300)).await;
    let health = running.health();
    assert!(health.is_live(), "{health:?}");
    assert!(!health.is_ready());
    assert!(health.consecutive_failures >= 5, "{health:?}");
    assert!(health.last_error.unwrap().contains("gone"));
    let tries = *broker.subscribes.lock().unwrap();
    // Backoff up to 30 s between tries: about 14 in 300 s, not thousands.
    assert!((5..=30).contains(&tries), "{tries} subscribes");
    running.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_closed_connection_ends_the_consumer_with_an_error() {
    let broker = ScriptedBroker::new(vec![vec![Step::End]]);
    let mut running = consumer(&broker).spawn();
    let err = running.join().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(running.health().state, ConsumerState::Stopped);
}

/// Three deliveries that never finish, prefetch 2: two are taken, and a
/// third is never asked for, whether they are awaited or at hand.
async fn takes_no_more_than_prefetch(at_hand: bool) {
    let broker = ScriptedBroker::with_deliveries_at_hand(
        vec![vec![
            deliver("a", json("hang")),
            deliver("b", json("hang")),
            deliver("c", json("hang")),
        ]],
        at_hand,
    );
    let running = consumer(&broker).prefetch(2).spawn();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(running.health().in_flight, 2);
    assert_eq!(
        *broker.polls.lock().unwrap(),
        2,
        "a third delivery was asked for"
    );
    running.abort();
}

#[tokio::test(start_paused = true)]
async fn no_more_deliveries_are_taken_than_prefetch_allows() {
    takes_no_more_than_prefetch(false).await;
}

#[tokio::test(start_paused = true)]
async fn prefetch_zero_is_a_configuration_error() {
    let broker = ScriptedBroker::new(vec![vec![]]);
    let err = consumer(&broker)
        .prefetch(0)
        .run_until(std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("prefetch"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn deliveries_at_hand_are_taken_within_prefetch() {
    takes_no_more_than_prefetch(true).await;
}

#[tokio::test(start_paused = true)]
async fn deliveries_at_hand_and_awaited_ones_are_handled_alike() {
    // At hand: a, b, c; then an interruption only `next` reports, a pause,
    // and d and e (at hand again once the subscription resumed).
    let broker = ScriptedBroker::with_deliveries_at_hand(
        vec![vec![
            deliver("a", json("ok")),
            deliver("b", json("retry")),
            deliver("c", json("permanent")),
            Step::Fail(Error::new(ErrorKind::Connection, "connection reset")),
            deliver("d", json("ok")),
            deliver("e", json("ok")),
        ]],
        true,
    );
    let running = consumer(&broker).spawn();
    let log = settled(&broker, 5).await;
    assert_eq!(log[0], Settled::Ack("a".into()));
    assert_eq!(
        log[1],
        Settled::Retry {
            id: "b".into(),
            after: Duration::from_secs(2),
            next_attempt: 2
        }
    );
    assert!(
        matches!(&log[2], Settled::DeadLetter { id, reason: DeadLetterReason::Permanent, .. } if id == "c"),
        "{log:?}"
    );
    assert_eq!(
        log[3..],
        [Settled::Ack("d".into()), Settled::Ack("e".into())]
    );
    let health = running.health();
    assert_eq!(
        (health.handled, health.retried, health.dead_lettered),
        (3, 1, 1)
    );
    assert_eq!(health.consecutive_failures, 0);
    assert_eq!(
        *broker.subscribes.lock().unwrap(),
        1,
        "resumed, not reopened"
    );
    running.shutdown().await.unwrap();
}

/// Keeps what each `ticketrail.delivery` span had recorded as its outcome.
#[derive(Default)]
struct Outcomes {
    recorded: Mutex<Vec<String>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl tracing::Subscriber for Outcomes {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::span::Id::from_u64(id + 1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        struct Outcome<'a>(&'a Mutex<Vec<String>>);
        impl tracing::field::Visit for Outcome<'_> {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "outcome" {
                    self.0.lock().unwrap().push(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        values.record(&mut Outcome(&self.recorded));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn the_delivery_span_records_how_each_delivery_was_settled() {
    let outcomes = Arc::new(Outcomes::default());
    let _default =
        tracing::dispatcher::set_default(&tracing::Dispatch::from(Arc::clone(&outcomes)));
    let broker = ScriptedBroker::new(vec![vec![
        deliver("a", json("ok")),
        deliver("b", json("retry")),
        deliver("c", json("permanent")),
    ]]);
    let running = consumer(&broker).spawn();
    settled(&broker, 3).await;
    running.shutdown().await.unwrap();
    let mut recorded = outcomes.recorded.lock().unwrap().clone();
    recorded.sort();
    assert_eq!(recorded, ["acked", "dead-lettered", "retried"]);
}
