//! The NATS JetStream broker.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures::TryStreamExt;
use ticketrail_core::{
    validate_name, Broker, Capabilities, Confirmation, DeadLetter, Error, ErrorKind, Message,
    Replay, Result, SubscribeOptions, Subscription, Topology,
};
use tokio::sync::Semaphore;

use crate::config::NatsConfig;
use crate::dead_letters;
use crate::delivery::NatsSubscription;
use crate::error::{map, map_any};
use crate::headers;
use crate::topology;

/// Where a queue lives: its topic space, stream, consumer and bindings.
#[derive(Debug, Clone)]
pub(crate) struct QueueInfo {
    pub(crate) name: Arc<str>,
    pub(crate) space: String,
    pub(crate) stream: String,
    pub(crate) bindings: Vec<String>,
}

pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    /// The server's `max_payload`, read once: `server_info()` copies the
    /// whole server description, too dear for every publish.
    max_payload: usize,
    /// Whether subscriptions send `+WPI` for deliveries in hand.
    pub(crate) progress_acks: bool,
    queues: Mutex<HashMap<String, QueueInfo>>,
    /// When a message (stream, sequence) first failed: NATS redelivers the
    /// stored message after a delayed nak, so this is kept on the side.
    first_failures: Mutex<HashMap<(String, u64), SystemTime>>,
    closed: AtomicBool,
}

/// A connection to NATS JetStream implementing the ticketrail contract.
///
/// ```no_run
/// # async fn demo() -> ticketrail_core::Result<()> {
/// use ticketrail_nats::{NatsBroker, NatsConfig};
///
/// let broker = NatsBroker::connect(NatsConfig::from_url("nats://127.0.0.1:4222")?).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl NatsBroker {
    /// Connects. An unreachable server fails within the connect timeout,
    /// naming the host and port; later outages are bridged by reconnecting
    /// with backoff (C15).
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let address = config.address().to_owned();
        let mut options = config.connect_options();
        if config.retry_on_initial_connect {
            options = options.retry_on_initial_connect();
        }
        let connecting = options.connect(config.server.as_str());
        let client = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Err(_) => None,
            Ok(Err(e)) => {
                let tls = e.kind() == async_nats::ConnectErrorKind::Tls
                    || e.to_string().contains("certificate");
                if tls {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "TLS with NATS at {address} failed: its certificate is not trusted, \
                             or TLS is not set up on one side (trust its CA with NatsConfig::tls_ca_file)"
                        ),
                    )
                    .with_source(e));
                }
                let kind = match e.kind() {
                    async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication => ErrorKind::Auth,
                    async_nats::ConnectErrorKind::TimedOut => ErrorKind::Timeout,
                    async_nats::ConnectErrorKind::ServerParse => ErrorKind::Config,
                    _ => ErrorKind::Connection,
                };
                return Err(
                    Error::new(kind, format!("connecting to NATS at {address}")).with_source(e)
                );
            }
            Ok(Ok(client)) => Some(client),
        };
        let client = match client {
            Some(client) => wait_connected(client, config.connect_timeout).await,
            None => None,
        }
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "no NATS server answered at {address} within {:?}",
                    config.connect_timeout
                ),
            )
        })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let server = client.server_info();
        let progress_acks = config
            .progress_acks
            .unwrap_or_else(|| !server_is_before(&server.version, (2, 10)));
        Ok(NatsBroker {
            inner: Arc::new(Inner {
                config,
                client,
                js,
                max_payload: server.max_payload,
                progress_acks,
                queues: Mutex::default(),
                first_failures: Mutex::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }
}

/// Whether a server version (`2.9.10`) is older than `major.minor`.
fn server_is_before(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found < (major, minor)
}

async fn wait_connected(
    client: async_nats::Client,
    within: Duration,
) -> Option<async_nats::Client> {
    let deadline = Instant::now() + within;
    while client.connection_state() != async_nats::connection::State::Connected {
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(client)
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn remember_first_failure(&self, stream: &str, seq: u64, at: SystemTime) {
        let mut failures = self.first_failures.lock().expect("not poisoned");
        if failures.len() > 100_000 {
            failures.clear(); // a bound, not a store: the record falls back to a later time
        }
        failures.entry((stream.to_owned(), seq)).or_insert(at);
    }

    pub(crate) fn first_failure(&self, stream: &str, seq: u64) -> Option<SystemTime> {
        self.first_failures
            .lock()
            .expect("not poisoned")
            .get(&(stream.to_owned(), seq))
            .copied()
    }

    pub(crate) fn forget_failure(&self, stream: &str, seq: u64) {
        self.first_failures
            .lock()
            .expect("not poisoned")
            .remove(&(stream.to_owned(), seq));
    }

    /// Publishes to JetStream and waits for the stream's acknowledgement (C1).
    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<()> {
        self.send(subject, headers, payload).await?.await
    }

    /// Sends a message; the future it returns awaits the stream's ack.
    pub(crate) async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
        // A `Subject` is shared bytes: keeping it for error messages is free.
        let subject = async_nats::Subject::from(subject);
        // async-nats' publish future is over 900 bytes: boxed on its own it
        // keeps `Broker::send`'s boxed future small (see the test below).
        let ack = Box::pin(
            self.js
                .publish_with_headers(subject.clone(), headers, payload),
        )
        .await
        .map_err(|e| {
            Error::new(
                publish_error_kind(&e.kind()),
                format!("publishing to `{subject}`"),
            )
            .with_source(e)
        })?;
        Ok(async move {
            ack.await.map_err(|e| {
                let kind = publish_error_kind(&e.kind());
                let doing = if kind == ErrorKind::Unroutable {
                    format!("no queue is bound for `{subject}`")
                } else {
                    format!("publishing to `{subject}`")
                };
                Error::new(kind, doing).with_source(e)
            })?;
            Ok(())
        })
    }

    /// Finds a queue: declared here, or by its consumer on the server.
    pub(crate) async fn locate(&self, queue: &str) -> Result<QueueInfo> {
        if let Some(info) = self.queues.lock().expect("not poisoned").get(queue) {
            return Ok(info.clone());
        }
        let consumer = topology::consumer_name(queue);
        let names: Vec<String> = self
            .js
            .stream_names()
            .try_collect()
            .await
            .map_err(|e| map("listing streams", e))?;
        for stream_name in names.iter().filter(|n| !n.ends_with("_dlq")) {
            let Ok(mut stream) = self.js.get_stream(stream_name).await else {
                continue;
            };
            let Ok(info) = stream.consumer_info(&consumer).await else {
                continue;
            };
            let described = info
                .config
                .description
                .as_deref()
                .and_then(topology::parse_description);
            let Some((name, bindings)) = described.filter(|(name, _)| name == queue) else {
                continue;
            };
            let space = stream
                .info()
                .await
                .ok()
                .and_then(|i| i.config.description.clone())
                .and_then(|d| d.strip_prefix("ticketrail topic space ").map(str::to_owned))
                .unwrap_or_else(|| stream_name.replace('_', "."));
            let info = QueueInfo {
                name: Arc::from(name),
                space,
                stream: stream_name.clone(),
                bindings,
            };
            self.queues
                .lock()
                .expect("not poisoned")
                .insert(queue.to_owned(), info.clone());
            return Ok(info);
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("queue `{queue}` is not declared on this NATS server"),
        ))
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        let space = &topology.topic_space;
        let stream_name = topology::stream_name(space);
        let mut subjects = Vec::new();
        for queue in &topology.queues {
            for pattern in &queue.bindings {
                subjects.extend(topology::pattern_subjects(space, pattern)?);
            }
        }
        let existing = self.js.get_stream(&stream_name).await.ok();
        let stream = match existing {
            Some(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| map(&format!("reading stream `{stream_name}`"), e))?;
                let mut config = info.config.clone();
                subjects.extend(config.subjects.iter().cloned());
                let wanted = topology::minimal_subjects(subjects);
                if wanted != topology::minimal_subjects(config.subjects.clone()) {
                    config.subjects = wanted;
                    self.js
                        .update_stream(config)
                        .await
                        .map_err(|e| declare_error(&stream_name, e))?;
                }
                stream
            }
            None if subjects.is_empty() => return Ok(()),
            None => self
                .js
                .create_stream(topology::stream_config(
                    space,
                    topology::minimal_subjects(subjects),
                ))
                .await
                .map_err(|e| declare_error(&stream_name, e))?,
        };
        self.js
            .get_or_create_stream(topology::dlq_stream_config(&stream_name))
            .await
            .map_err(|e| declare_error(&topology::dlq_stream_name(&stream_name), e))?;
        for queue in &topology.queues {
            let config = topology::consumer_config(
                space,
                queue,
                self.config.ack_wait,
                self.config.max_ack_pending,
            );
            stream.create_consumer(config).await.map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "declaring queue `{}` (if it exists with other bindings or settings, delete it first)",
                        queue.name
                    ),
                )
                .with_source(e)
            })?;
            self.queues.lock().expect("not poisoned").insert(
                queue.name.clone(),
                QueueInfo {
                    name: Arc::from(queue.name.as_str()),
                    space: space.clone(),
                    stream: stream_name.clone(),
                    bindings: queue.bindings.clone(),
                },
            );
        }
        Ok(())
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        let stream_name = topology::stream_name(&topology.topic_space);
        let Ok(mut stream) = self.js.get_stream(&stream_name).await else {
            return Ok(());
        };
        let dlq = self
            .js
            .get_stream(topology::dlq_stream_name(&stream_name))
            .await
            .ok();
        for queue in &topology.queues {
            let _ = stream
                .delete_consumer(&topology::consumer_name(&queue.name))
                .await;
            if let Some(dlq) = &dlq {
                let _ = dlq
                    .purge()
                    .filter(topology::dlq_subject(&stream_name, &queue.name))
                    .await;
            }
            self.queues
                .lock()
                .expect("not poisoned")
                .remove(&queue.name);
        }
        // What is still bound decides what the stream keeps capturing.
        let remaining: Vec<Option<String>> = stream
            .consumers()
            .map_ok(|info| info.config.description)
            .try_collect()
            .await
            .unwrap_or_default();
        let mut subjects = Vec::new();
        for description in &remaining {
            if let Some((_, bindings)) =
                description.as_deref().and_then(topology::parse_description)
            {
                for pattern in bindings {
                    subjects.extend(topology::pattern_subjects(&topology.topic_space, &pattern)?);
                }
            }
        }
        if remaining.is_empty() {
            self.js
                .delete_stream(&stream_name)
                .await
                .map_err(|e| map(&format!("deleting stream `{stream_name}`"), e))?;
            let _ = self
                .js
                .delete_stream(topology::dlq_stream_name(&stream_name))
                .await;
        } else if !subjects.is_empty() {
            let mut config = stream
                .info()
                .await
                .map_err(|e| map("reading the stream", e))?
                .config
                .clone();
            config.subjects = topology::minimal_subjects(subjects);
            self.js
                .update_stream(config)
                .await
                .map_err(|e| map("updating the stream", e))?;
        }
        Ok(())
    }
}

fn declare_error<K>(stream: &str, e: async_nats::error::Error<K>) -> Error
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    let text = e.to_string();
    let kind = if text.contains("overlap") {
        ErrorKind::InvalidName
    } else {
        ErrorKind::Broker
    };
    let hint = if kind == ErrorKind::InvalidName {
        " (its subjects overlap another stream's: another topic space already captures them)"
    } else {
        ""
    };
    Error::new(kind, format!("declaring stream `{stream}`{hint}")).with_source(e)
}

#[async_trait]
impl Broker for NatsBroker {
    fn backend(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_reconnect(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        topology::validate(topology)?;
        self.inner.declare(topology).await
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        self.inner.delete(topology).await
    }

    async fn publish(&self, topic_space: &str, message: Message) -> Result<()> {
        self.send(topic_space, message).await?.await
    }

    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        let limit = match self.inner.max_payload {
            0 => usize::MAX,
            limit => limit,
        };
        message.check(topic_space, limit, "the NATS server (max_payload)")?;
        let headers = headers::outgoing(&message)?;
        let subject = topology::subject(topic_space, &message.routing_key);
        let confirm = self.inner.send(subject, headers, message.payload).await?;
        Ok(Confirmation::new(message.id, confirm))
    }

    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        validate_name("queue", queue)?;
        if options.prefetch == 0 {
            return Err(Error::config(format!(
                "subscription to `{queue}`: prefetch must be at least 1"
            )));
        }
        let info = self.inner.locate(queue).await?;
        let consumer: jetstream::consumer::PullConsumer = self
            .inner
            .js
            .get_stream(&info.stream)
            .await
            .map_err(|e| map(&format!("finding the stream of `{queue}`"), e))?
            .get_consumer(&topology::consumer_name(queue))
            .await
            .map_err(|e| map_any(&format!("finding the consumer of `{queue}`"), e))?;
        Ok(Box::new(NatsSubscription::new(
            Arc::clone(&self.inner),
            info,
            consumer,
            Arc::new(Semaphore::new(usize::from(options.prefetch))),
        )))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let info = self.inner.locate(queue).await?;
        dead_letters::list(&self.inner, &info, limit).await
    }

    async fn replay(&self, queue: &str, which: Replay) -> Result<usize> {
        let info = self.inner.locate(queue).await?;
        dead_letters::replay(&self.inner, &info, &which).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        let info = self.inner.locate(queue).await?;
        dead_letters::purge(&self.inner, &info).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        // Acks and naks already sent are flushed before the connection goes.
        let _ = self.inner.client.flush().await;
        self.inner
            .client
            .drain()
            .await
            .map_err(|e| map_any("closing the NATS connection", e))
    }
}

fn publish_error_kind(kind: &PublishErrorKind) -> ErrorKind {
    match kind {
        PublishErrorKind::StreamNotFound => ErrorKind::Unroutable,
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::BrokenPipe => ErrorKind::Connection,
        _ => ErrorKind::Broker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future of every publish is boxed (the `Broker` trait is object
    /// safe); glibc serves blocks up to about 1 KB from a per-thread cache
    /// and larger ones under its arena lock, which async-nats' connection
    /// task then contends for while it frees the sent messages.
    #[tokio::test]
    async fn the_boxed_send_future_stays_under_a_kilobyte() {
        let broker = NatsBroker::connect(NatsConfig::from_url("nats://127.0.0.1:4222").unwrap())
            .await
            .expect("NATS on 127.0.0.1:4222 (start it with scripts/brokers nats)");
        let send = Broker::send(&broker, "space", Message::new("a.b", "x"));
        let size = std::mem::size_of_val(&*send);
        assert!(size < 1024, "Broker::send's future is {size} bytes");
    }
}
