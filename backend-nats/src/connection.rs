//! Connections to NATS: the broker's shared client and JetStream context,
//! what the server supports, where each queue lives, and the clients of
//! subscriptions, each of their own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, response::Response};
use async_nats::HeaderMap;
use futures::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ticketrail_core::{Error, ErrorKind, QueueSpec, Result};
use tokio::sync::Notify;

use crate::config::NatsConfig;
use crate::error;
use crate::topology;

/// What the server supports, read at connect.
#[derive(Debug, Clone)]
pub(crate) struct ServerFacts {
    /// `2.9.10`.
    pub(crate) version: String,
    /// The largest message (headers and payload) it accepts.
    pub(crate) max_payload: usize,
    /// Whether a consumer takes several filter subjects (2.10+).
    pub(crate) several_filters: bool,
    /// Whether subscriptions send work-in-progress acks.
    pub(crate) progress_acks: bool,
    /// Whether the server holds messages for later (message schedules,
    /// 2.12+).
    pub(crate) schedules: bool,
}

/// Logs a warning when the account uses 80 % or more of a JetStream limit
/// that stops it once reached: its streams (three to five per topic space),
/// consumers, memory or storage. Per-stream consumer limits are reported
/// by `inspect` (`ticketrail topology check`).
async fn warn_near_limits(js: jetstream::Context) {
    let Ok(account) = js.query_account().await else {
        return; // JetStream's own errors surface where it is used.
    };
    let limits = &account.limits;
    let near = [
        ("streams", account.streams as i64, limits.max_streams),
        ("consumers", account.consumers as i64, limits.max_consumers),
        ("bytes of memory", account.memory as i64, limits.max_memory),
        (
            "bytes of storage",
            account.storage as i64,
            limits.max_storage,
        ),
    ];
    for (what, used, limit) in near {
        if let Some(limit) = limit.filter(|l| *l > 0 && used.saturating_mul(5) >= l * 4) {
            tracing::warn!(
                used,
                limit,
                "the JetStream account uses {used} of its {limit} {what}: at the limit, \
                 declaring topic spaces and queues (or storing messages) fails"
            );
        }
    }
}

/// Whether a server version (`2.9.10`) is older than `major.minor`.
pub(crate) fn version_before(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found < (major, minor)
}

/// Where a queue lives.
#[derive(Debug, Clone)]
pub(crate) struct QueueInfo {
    pub(crate) name: Arc<str>,
    pub(crate) space: String,
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) bindings: Vec<String>,
    /// Whether the server delivers this queue only its own messages.
    pub(crate) exact_filter: bool,
    /// How often a message may come back unsettled (its consumer died)
    /// before it is dead-lettered (C13).
    pub(crate) delivery_limit: u32,
}

impl QueueInfo {
    pub(crate) fn new(space: &str, spec: &QueueSpec, several_filters: bool) -> Result<Self> {
        let stream = topology::stream_name(space);
        let filter = topology::filter(space, &stream, spec, several_filters)?;
        Ok(QueueInfo {
            name: Arc::from(spec.name.as_str()),
            space: space.to_owned(),
            consumer: topology::consumer_name(&spec.name),
            stream,
            bindings: spec.bindings.clone(),
            exact_filter: filter.exact,
            delivery_limit: spec.delivery_limit,
        })
    }
}

/// How a topic space routes, as far as a publisher must know: only a
/// stream that captures more than its bindings needs publishers to check
/// them (C1).
#[derive(Debug, Clone)]
struct Routing {
    over_captures: bool,
    bindings: Vec<String>,
    fetched: Instant,
}

/// How long a publisher trusts what it read about a topic space's routing.
const ROUTING_TTL: Duration = Duration::from_secs(2);

/// The connection of one [`NatsBroker`](crate::NatsBroker): publishing,
/// declaring, dead letters. Subscriptions have clients of their own.
pub(crate) struct Connection {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) server: ServerFacts,
    queues: Mutex<HashMap<String, Arc<QueueInfo>>>,
    /// By topic space, ordered: a publish finds its space in a few
    /// comparisons of the name, cheaper than hashing it.
    routing: Mutex<BTreeMap<String, Routing>>,
    /// The streams whose messages held for later this connection publishes
    /// at their time (servers before 2.12, see `mover.rs`).
    movers: Mutex<HashSet<String>>,
    /// Wakes the movers when the connection is closed or dropped.
    stop: tokio::sync::watch::Sender<()>,
    closed: AtomicBool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("config", &self.config)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Connects a client with `config`'s options; `on_disconnect` is woken and
/// set whenever the client loses its server.
pub(crate) async fn open_client(
    config: &NatsConfig,
    name: &str,
    on_disconnect: Option<Arc<Disconnects>>,
) -> Result<async_nats::Client> {
    let address = config.address().to_owned();
    let mut options = config.connect_options().name(name);
    if config.retry_on_initial_connect {
        options = options.retry_on_initial_connect();
    }
    if let Some(disconnects) = on_disconnect {
        options = options.event_callback(move |event| {
            let disconnects = Arc::clone(&disconnects);
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    disconnects.happened();
                }
            }
        });
    }
    let connecting = options.connect(config.servers.clone());
    let client = match tokio::time::timeout(config.connect_timeout, connecting).await {
        Err(_) => None,
        Ok(Err(e))
            if e.kind() == async_nats::ConnectErrorKind::Tls
                || error::is_untrusted_certificate(&e) =>
        {
            return Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "TLS with NATS at {address} failed: its certificate is not trusted, or TLS \
                     is not set up on one side (trust its CA with NatsConfig::tls_ca_file)"
                ),
            )
            .with_source(e));
        }
        Ok(Err(e)) => {
            return Err(Error::new(
                error::connect_kind(e.kind()),
                format!("connecting to NATS at {address}"),
            )
            .with_source(e))
        }
        Ok(Ok(client)) => Some(client),
    };
    match client {
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
    })
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

/// Disconnects of a client, counted, with a wake-up.
#[derive(Debug, Default)]
pub(crate) struct Disconnects {
    count: std::sync::atomic::AtomicU64,
    pub(crate) notify: Notify,
}

impl Disconnects {
    fn happened(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// How many disconnects so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

impl Connection {
    /// Connects. An unreachable server fails within the connect timeout,
    /// naming the host and port; later outages are bridged by reconnecting
    /// with backoff (C15).
    pub(crate) async fn connect(config: NatsConfig) -> Result<Self> {
        let client = open_client(&config, "ticketrail", None).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let info = client.server_info();
        let progress_acks = config.progress_acks.unwrap_or(true);
        let server = ServerFacts {
            several_filters: !version_before(&info.version, (2, 10)),
            schedules: !version_before(&info.version, (2, 12)),
            version: info.version,
            max_payload: info.max_payload,
            progress_acks,
        };
        tokio::spawn(warn_near_limits(js.clone()));
        Ok(Connection {
            config,
            client,
            js,
            server,
            queues: Mutex::default(),
            routing: Mutex::default(),
            movers: Mutex::default(),
            stop: tokio::sync::watch::Sender::new(()),
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop.send_replace(());
    }

    /// A JetStream API request (`STREAM.INFO.<name>`, ...) with a JSON body,
    /// and its typed answer.
    pub(crate) async fn api<T, V>(&self, subject: &str, payload: &T, doing: &str) -> Result<V>
    where
        T: ?Sized + Serialize,
        V: DeserializeOwned,
    {
        let body = serde_json::to_vec(payload).expect("API requests always encode");
        self.api_raw(subject, body.into(), doing).await
    }

    /// A JetStream API request with no body (`CONSUMER.INFO.<s>.<c>`).
    pub(crate) async fn api_empty<V: DeserializeOwned>(
        &self,
        subject: &str,
        doing: &str,
    ) -> Result<V> {
        self.api_raw(subject, bytes::Bytes::new(), doing).await
    }

    async fn api_raw<V: DeserializeOwned>(
        &self,
        subject: &str,
        body: bytes::Bytes,
        doing: &str,
    ) -> Result<V> {
        let request = async_nats::Request::new()
            .payload(body)
            .timeout(Some(self.config.request_timeout));
        let message = self
            .client
            .send_request(format!("$JS.API.{subject}"), request)
            .await
            .map_err(|e| error::request(doing, e))?;
        let response: Response<V> = serde_json::from_slice(&message.payload).map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("{doing}: an answer that is not JSON"),
            )
            .with_source(e)
        })?;
        match response {
            Response::Ok(value) => Ok(value),
            Response::Err { error } => Err(error::api(doing, error)),
        }
    }

    /// Whether a mover for `stream` should start here (none runs yet), and
    /// what tells it to stop.
    pub(crate) fn start_mover(&self, stream: &str) -> Option<tokio::sync::watch::Receiver<()>> {
        let new = self
            .movers
            .lock()
            .expect("not poisoned")
            .insert(stream.to_owned());
        new.then(|| self.stop.subscribe())
    }

    /// The mover of `stream` has stopped (its stream is gone); the next
    /// declare starts another.
    pub(crate) fn mover_ended(&self, stream: &str) {
        self.movers.lock().expect("not poisoned").remove(stream);
    }

    /// Remembers a queue declared through this connection.
    pub(crate) fn remember(&self, info: QueueInfo) {
        self.queues
            .lock()
            .expect("not poisoned")
            .insert(info.name.to_string(), Arc::new(info));
    }

    pub(crate) fn forget(&self, queue: &str) {
        self.queues.lock().expect("not poisoned").remove(queue);
        self.routing.lock().expect("not poisoned").clear();
    }

    /// Finds a queue: declared here, or by its consumer on the server.
    pub(crate) async fn locate(&self, queue: &str) -> Result<Arc<QueueInfo>> {
        if let Some(info) = self.queues.lock().expect("not poisoned").get(queue) {
            return Ok(Arc::clone(info));
        }
        let consumer = topology::consumer_name(queue);
        let names: Vec<String> = self
            .js
            .stream_names()
            .try_collect()
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "listing streams").with_source(e))?;
        for stream_name in &names {
            let Ok(mut stream) = self.js.get_stream(stream_name).await else {
                continue;
            };
            let Ok(stream_info) = stream.info().await.cloned() else {
                continue;
            };
            let Some((space, _)) = stream_info
                .config
                .description
                .as_deref()
                .and_then(topology::parse_space_description)
            else {
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
            let limit = info.config.max_deliver - 1 - topology::RETRY_HEADROOM;
            let spec = QueueSpec {
                name,
                bindings,
                delivery_limit: u32::try_from(limit.max(1)).unwrap_or(u32::MAX),
            };
            let info = QueueInfo::new(&space, &spec, self.server.several_filters)?;
            self.remember(info);
            return Ok(Arc::clone(
                self.queues
                    .lock()
                    .expect("not poisoned")
                    .get(queue)
                    .expect("just remembered"),
            ));
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("queue `{queue}` is not declared on this NATS server"),
        ))
    }

    /// Every queue of a topic space's stream, by its consumer's description.
    pub(crate) async fn queues_of(&self, space: &str) -> Result<Vec<QueueSpec>> {
        let stream_name = topology::stream_name(space);
        let mut stream = match self.js.get_stream(&stream_name).await {
            Ok(stream) => stream,
            Err(_) => return Ok(Vec::new()),
        };
        let descriptions: Vec<(Option<String>, i64)> = stream
            .consumers()
            .map_ok(|info| (info.config.description, info.config.max_deliver))
            .try_collect()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("listing the queues of `{space}`"),
                )
                .with_source(e)
            })?;
        let _ = &mut stream;
        Ok(descriptions
            .into_iter()
            .filter_map(|(description, max_deliver)| {
                let (name, bindings) = topology::parse_description(description.as_deref()?)?;
                let limit = max_deliver - 1 - topology::RETRY_HEADROOM;
                Some(QueueSpec {
                    name,
                    bindings,
                    delivery_limit: u32::try_from(limit.max(1)).unwrap_or(u32::MAX),
                })
            })
            .collect())
    }

    /// Refuses a routing key no binding of the space matches, for a stream
    /// that captures more than its bindings; other streams refuse it
    /// themselves (no stream captures the subject).
    pub(crate) async fn check_routable(&self, space: &str, routing_key: &str) -> Result<()> {
        let cached = self
            .routing
            .lock()
            .expect("not poisoned")
            .get(space)
            .filter(|r| r.fetched.elapsed() < ROUTING_TTL)
            .map(|r| !r.over_captures || topology::bound(&r.bindings, routing_key));
        match cached {
            Some(true) => Ok(()),
            // Rare, and its future large: boxed, it keeps every publish's
            // future small.
            _ => Box::pin(self.check_routable_fresh(space, routing_key)).await,
        }
    }

    async fn check_routable_fresh(&self, space: &str, routing_key: &str) -> Result<()> {
        let routing = self.fetch_routing(space).await?;
        if !routing.over_captures || topology::bound(&routing.bindings, routing_key) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unroutable,
            format!("no queue of `{space}` is bound to a pattern matching `{routing_key}`"),
        ))
    }

    async fn fetch_routing(&self, space: &str) -> Result<Routing> {
        let stream_name = topology::stream_name(space);
        let over_captures = match self.js.get_stream(&stream_name).await {
            Ok(mut stream) => stream
                .info()
                .await
                .ok()
                .and_then(|i| i.config.description.clone())
                .and_then(|d| topology::parse_space_description(&d))
                .is_some_and(|(_, over)| over),
            Err(_) => false,
        };
        let bindings = if over_captures {
            self.queues_of(space)
                .await?
                .into_iter()
                .flat_map(|q| q.bindings)
                .collect()
        } else {
            Vec::new()
        };
        let routing = Routing {
            over_captures,
            bindings,
            fetched: Instant::now(),
        };
        self.routing
            .lock()
            .expect("not poisoned")
            .insert(space.to_owned(), routing.clone());
        Ok(routing)
    }

    /// Sends a message to JetStream; the future it returns awaits the
    /// stream's acknowledgement (C1) and yields the stored message's
    /// sequence.
    pub(crate) async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<impl Future<Output = Result<u64>> + Send + 'static> {
        // A `Subject` is shared bytes: keeping it for error messages is free.
        let subject = async_nats::Subject::from(subject);
        // async-nats' publish future is over 900 bytes: boxed on its own it
        // keeps `Broker::send`'s boxed future small (see the test in broker.rs).
        let ack = Box::pin(
            self.js
                .publish_with_headers(subject.clone(), headers, payload),
        )
        .await
        .map_err(|e| {
            Error::new(
                error::publish_kind(&e),
                format!("publishing to `{subject}`"),
            )
            .with_source(e)
        })?;
        Ok(async move {
            let stored = ack.await.map_err(|e| {
                let kind = error::publish_kind(&e);
                let doing = if kind == ErrorKind::Unroutable {
                    format!("no queue is bound for `{subject}`")
                } else {
                    format!("publishing to `{subject}`")
                };
                Error::new(kind, doing).with_source(e)
            })?;
            Ok(stored.sequence)
        })
    }

    /// Publishes and waits for the stream's acknowledgement; returns the
    /// stored message's sequence.
    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<u64> {
        self.send(subject, headers, payload).await?.await
    }
}
