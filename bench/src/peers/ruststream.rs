//! RustStream 0.7 (`ruststream`, `ruststream-lapin`, `ruststream-nats`):
//! publishing through its publishers with broker confirmation, consuming
//! through its application runtime with a typed JSON handler that acks, as
//! its documentation shows a service doing.
//!
//! Its handlers are functions named by an attribute macro, so the queue a
//! run reads is given at the mount site (`handle.name(queue)`) or, for a
//! JetStream source that needs two names, read from the statics below.

use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ruststream::memory::{MemoryBroker, MemoryPosition, Retaining, Retention};
use ruststream::prelude::*;
use ruststream_lapin::{ConfirmsPublisher, LapinBroker, LapinPublish};
use ruststream_nats::{JetStreamPublish, JetStreamPublisher, JetStreamSubject, NatsBroker};
use tokio::sync::Notify;

use crate::raw_rabbitmq::RawRabbit;
use crate::side::{publish_windowed, BenchResult, Side};
use crate::workload::{email, EmailMessage, ROUTING_KEY};

/// Messages the running handler still waits for, and the wake-up when the
/// last one is in. One RustStream side consumes at a time.
static LEFT: AtomicUsize = AtomicUsize::new(0);
static DONE: Notify = Notify::const_new();

/// The JetStream stream and prefetch the NATS handler's source names.
static NATS_SOURCE: Mutex<(String, String, i64)> = Mutex::new((String::new(), String::new(), 0));

fn counted() {
    if LEFT.fetch_sub(1, Ordering::AcqRel) == 1 {
        DONE.notify_one();
    }
}

/// The handler, as an application writes one: decode, work, ack.
#[subscriber]
async fn handle(email: &EmailMessage) -> HandlerOutcome {
    std::hint::black_box(email);
    counted();
    HandlerOutcome::ack()
}

fn nats_subject() -> String {
    NATS_SOURCE.lock().expect("not poisoned").0.clone()
}
fn nats_stream() -> String {
    NATS_SOURCE.lock().expect("not poisoned").1.clone()
}
fn nats_window() -> i64 {
    NATS_SOURCE.lock().expect("not poisoned").2
}

/// The same on NATS: a durable pull consumer of the stream, holding at most
/// the prefetch unacknowledged.
#[subscriber(JetStreamSubject::new(nats_subject(), nats_stream()).durable("ruststream").max_ack_pending(nats_window()))]
async fn handle_jetstream(email: &EmailMessage) -> HandlerOutcome {
    std::hint::black_box(email);
    counted();
    HandlerOutcome::ack()
}

fn app_info() -> AppInfo {
    AppInfo::new("bench", "0.1.0")
}

/// When a consume's clock stops.
#[derive(Clone, Copy)]
enum ClockStops {
    /// Once the last message is handled.
    Handled,
    /// Once the apps have also shut down: on the memory broker, where
    /// RustStream's retaining log keeps every consumed message until the
    /// broker is dropped at shutdown, while every other side frees each
    /// message as it consumes it.
    ShutDown,
}

/// Runs `apps` until `count` messages are handled; how long that took,
/// from starting them (connecting and subscribing included, as for the
/// other sides) until `stops`.
async fn run_until_handled<A: App>(
    count: usize,
    apps: impl IntoIterator<Item = A>,
    stops: ClockStops,
) -> BenchResult<Duration> {
    LEFT.store(count, Ordering::Release);
    let done = DONE.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    let mut running = Vec::new();
    for app in apps {
        running.push(app.start().await?);
    }
    done.await;
    let handled = started.elapsed();
    for app in running {
        app.shutdown().await?;
    }
    Ok(match stops {
        ClockStops::Handled => handled,
        ClockStops::ShutDown => started.elapsed(),
    })
}

/// RustStream's in-memory broker. It is pub/sub, not a queue: a backlog is
/// kept by a retaining broker (one per round, sized to it) and read from
/// its start. The log frees its messages only when the broker is dropped,
/// at the app's shutdown, so a consume is timed until then
/// ([`ClockStops::ShutDown`]): the other sides free each message as they
/// consume it, inside their clocks.
pub(crate) struct RustStreamMemory {
    broker: Mutex<Option<MemoryBroker<Retaining>>>,
}

impl RustStreamMemory {
    pub(crate) fn new() -> Self {
        RustStreamMemory {
            broker: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Side for RustStreamMemory {
    async fn publish(&self, count: usize, _window: usize) -> BenchResult<Duration> {
        let retention =
            Retention::Messages(std::num::NonZeroUsize::new(count.max(1)).expect("not zero"));
        let broker = MemoryBroker::retaining(retention);
        let publisher = broker.publisher();
        let started = Instant::now();
        for i in 0..count {
            publisher
                .message(&email(i))
                .to(ROUTING_KEY)
                .publish()
                .await?;
        }
        let took = started.elapsed();
        *self.broker.lock().expect("not poisoned") = Some(broker);
        Ok(took)
    }

    async fn consume(
        &self,
        count: usize,
        _prefetch: u16,
        // A pub/sub broker gives every subscription every message: one.
        _consumers: usize,
    ) -> BenchResult<Duration> {
        let broker = self
            .broker
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or("nothing published")?;
        let app = RustStream::new(app_info()).with_broker(broker, |b| {
            b.include(handle.name(ROUTING_KEY).start_at(MemoryPosition::start()));
        });
        run_until_handled(count, [app], ClockStops::ShutDown).await
    }

    async fn latency(&self, _: usize, _: u32, _: u16) -> BenchResult<Vec<f64>> {
        Err("not measured for peers".into())
    }

    async fn teardown(&self) -> BenchResult<()> {
        Ok(())
    }
}

/// RustStream on RabbitMQ (`ruststream-lapin`, lapin 4 as ticketrail), on
/// a quorum queue bound to a topic exchange like the other sides'.
pub(crate) struct RustStreamRabbit {
    url: String,
    topology: RawRabbit,
    publisher: ConfirmsPublisher,
    _connected: ruststream_lapin::ConnectedLapinBroker,
}

impl RustStreamRabbit {
    pub(crate) async fn new(url: &str, name: &str) -> BenchResult<Self> {
        let topology = RawRabbit::new(url, name).await?;
        let connected = LapinBroker::new(url).connect().await?;
        let publisher = connected.publisher(
            LapinPublish::default()
                .exchange(topology.names().0)
                .confirms(),
        );
        Ok(RustStreamRabbit {
            url: url.to_owned(),
            topology,
            publisher,
            _connected: connected,
        })
    }
}

#[async_trait]
impl Side for RustStreamRabbit {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        let publisher = &self.publisher;
        publish_windowed(count, window, |i| async move {
            publisher.message(&email(i)).to(ROUTING_KEY).publish().await
        })
        .await
    }

    async fn consume(
        &self,
        count: usize,
        prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        let queue = self.topology.names().1.to_owned();
        let apps = (0..consumers.max(1)).map(|_| {
            let broker = LapinBroker::new(self.url.as_str())
                .prefetch(NonZeroU16::new(prefetch).unwrap_or(NonZeroU16::MIN));
            let queue = queue.clone();
            RustStream::new(app_info()).with_broker(broker, move |b| {
                b.include(handle.name(queue));
            })
        });
        run_until_handled(count, apps.collect::<Vec<_>>(), ClockStops::Handled).await
    }

    async fn latency(&self, _: usize, _: u32, _: u16) -> BenchResult<Vec<f64>> {
        Err("not measured for peers".into())
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.topology.teardown().await
    }
}

/// RustStream on NATS JetStream (`ruststream-nats`, async-nats 0.50), on a
/// stream like the raw side's, through a durable pull consumer.
pub(crate) struct RustStreamNats {
    url: String,
    js: async_nats::jetstream::Context,
    stream: String,
    subject: String,
    publisher: JetStreamPublisher,
    _connected: ruststream_nats::ConnectedNatsBroker,
}

impl RustStreamNats {
    pub(crate) async fn new(url: &str, name: &str, prefetch: u16) -> BenchResult<Self> {
        use async_nats::jetstream::stream;
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let stream = name.replace('.', "_");
        let subject = format!("{name}.events.{ROUTING_KEY}");
        js.create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        set_nats_source(&subject, &stream, prefetch);
        let connected = NatsBroker::new(url).connect().await?;
        let publisher =
            connected.publisher(JetStreamPublish::default().expect_stream(stream.as_str()));
        Ok(RustStreamNats {
            url: url.to_owned(),
            js,
            stream,
            subject,
            publisher,
            _connected: connected,
        })
    }
}

#[async_trait]
impl Side for RustStreamNats {
    async fn publish(&self, count: usize, window: usize) -> BenchResult<Duration> {
        // An interest stream keeps messages only for a consumer that
        // exists: the durable one the handler reads, as RustStream makes it.
        self.js
            .get_stream(&self.stream)
            .await?
            .get_or_create_consumer(
                "ruststream",
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some("ruststream".to_owned()),
                    filter_subject: self.subject.clone(),
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: nats_window().max(1),
                    ..Default::default()
                },
            )
            .await?;
        let (publisher, subject) = (&self.publisher, self.subject.as_str());
        publish_windowed(count, window, |i| async move {
            publisher.message(&email(i)).to(subject).publish().await
        })
        .await
    }

    async fn consume(
        &self,
        count: usize,
        // The durable consumer's `max_ack_pending`, fixed when the side
        // was made (the run's `--prefetch`).
        _prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        let apps = (0..consumers.max(1)).map(|_| {
            RustStream::new(app_info()).with_broker(NatsBroker::new(self.url.as_str()), |b| {
                b.include(handle_jetstream);
            })
        });
        run_until_handled(count, apps.collect::<Vec<_>>(), ClockStops::Handled).await
    }

    async fn latency(&self, _: usize, _: u32, _: u16) -> BenchResult<Vec<f64>> {
        Err("not measured for peers".into())
    }

    async fn teardown(&self) -> BenchResult<()> {
        self.js.delete_stream(&self.stream).await?;
        Ok(())
    }
}

/// Sets what the NATS handler's source names, before a run.
fn set_nats_source(subject: &str, stream: &str, prefetch: u16) {
    *NATS_SOURCE.lock().expect("not poisoned") =
        (subject.to_owned(), stream.to_owned(), i64::from(prefetch));
}
