//! The NATS JetStream broker.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::ErrorCode;
use async_trait::async_trait;
use serde::Deserialize;
use ticketrail_core::{
    validate_name, Broker, Capabilities, Confirmation, DeadLetterCursor, Error, ErrorKind, Finding,
    FindingStatus, Message, QueueSpec, QueueStats, Result, Scheduled, ScheduledMessage,
    SubscribeOptions, Subscription, Topology,
};

use crate::config::NatsConfig;
use crate::connection::{Connection, QueueInfo};
use crate::dead_letters::{self, NatsCursor};
use crate::error;
use crate::subscription::NatsSubscription;
use crate::{mover, publish, scheduled, topology, versions};

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
    conn: Arc<Connection>,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("config", &self.conn.config)
            .field("server", &self.conn.server.version)
            .finish()
    }
}

impl NatsBroker {
    /// Connects. An unreachable server fails within the connect timeout,
    /// naming the host and port; later outages are bridged by reconnecting
    /// with backoff, to another server of the list if need be (C15).
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let conn = Connection::connect(config).await?;
        versions::log_server(
            &conn.server.version,
            conn.config.address(),
            conn.server.several_filters,
            conn.server.progress_acks,
        );
        Ok(NatsBroker {
            conn: Arc::new(conn),
        })
    }

    /// The server's version (`2.9.10`).
    pub fn server_version(&self) -> &str {
        &self.conn.server.version
    }
}

/// Why creating or updating a stream failed, by JetStream's error code.
fn stream_error(doing: &str, e: async_nats::jetstream::context::CreateStreamError) -> Error {
    let kind = match e.kind() {
        CreateStreamErrorKind::JetStream(api) => error::api_kind(api.error_code()),
        CreateStreamErrorKind::TimedOut => ErrorKind::Timeout,
        CreateStreamErrorKind::JetStreamUnavailable => ErrorKind::Connection,
        _ => ErrorKind::Broker,
    };
    let hint = if kind == ErrorKind::InvalidName {
        " (its subjects overlap another topic space's: a space whose name is a prefix of this \
         one, bound to a pattern that reaches into it, e.g. `app` bound to `events.#` and the \
         space `app.events`)"
    } else {
        ""
    };
    Error::new(kind, format!("{doing}{hint}")).with_source(e)
}

#[derive(Deserialize)]
struct ConsumerCounts {
    num_pending: u64,
    num_ack_pending: u64,
}

impl NatsBroker {
    async fn declare_topology(&self, topology: &Topology) -> Result<()> {
        let conn = &self.conn;
        let space = &topology.topic_space;
        let stream_name = topology::stream_name(space);
        let replicas = conn.config.replicas;
        // The stream captures the bindings of every queue of the space,
        // also those declared by others (read from their consumers).
        let mut specs: Vec<QueueSpec> = conn.queues_of(space).await?;
        for queue in &topology.queues {
            specs.retain(|q| q.name != queue.name);
            specs.push(queue.clone());
        }
        if specs.is_empty() {
            return Ok(());
        }
        let mut subjects = Vec::new();
        for spec in &specs {
            for pattern in &spec.bindings {
                subjects.extend(topology::pattern_subjects(space, pattern)?);
            }
        }
        let mut capture = topology::capture(subjects);
        capture.subjects.extend(
            specs
                .iter()
                .map(|q| topology::replay_subject(&stream_name, &q.name)),
        );
        let wanted = topology::stream_config(space, capture, replicas, conn.server.schedules);
        let stream = match conn.js.get_stream(&stream_name).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Connection,
                            format!("reading stream `{stream_name}`"),
                        )
                        .with_source(e)
                    })?
                    .clone();
                let owner = info
                    .config
                    .description
                    .as_deref()
                    .and_then(topology::parse_space_description);
                match owner {
                    Some((owner, _)) if owner != *space => {
                        return Err(Error::invalid_name(format!(
                            "topic spaces `{space}` and `{owner}` map to the same NATS stream \
                             `{stream_name}` (`.` becomes `_`); rename one of them"
                        )))
                    }
                    None => {
                        return Err(Error::invalid_name(format!(
                            "the stream `{stream_name}` of topic space `{space}` exists and was \
                             not made by ticketrail; choose another topic space"
                        )))
                    }
                    Some(_) => {}
                }
                let mut config = info.config.clone();
                let mut subjects = config.subjects.clone();
                subjects.sort();
                let mut wanted_subjects = wanted.subjects.clone();
                wanted_subjects.sort();
                if subjects != wanted_subjects
                    || config.description != wanted.description
                    || config.allow_message_schedules != wanted.allow_message_schedules
                {
                    config.subjects = wanted.subjects;
                    config.description = wanted.description;
                    // Once allowed, schedules stay: a server that no
                    // longer has them would not be asked to.
                    config.allow_message_schedules |= wanted.allow_message_schedules;
                    conn.js.update_stream(config).await.map_err(|e| {
                        stream_error(&format!("updating stream `{stream_name}`"), e)
                    })?;
                }
                stream
            }
            Err(_) => conn
                .js
                .create_stream(wanted)
                .await
                .map_err(|e| stream_error(&format!("creating stream `{stream_name}`"), e))?,
        };
        for aux in [
            topology::dlq_stream_config(&stream_name, replicas),
            topology::failures_stream_config(&stream_name, replicas),
        ] {
            let name = aux.name.clone();
            conn.js
                .get_or_create_stream(aux)
                .await
                .map_err(|e| stream_error(&format!("creating stream `{name}`"), e))?;
        }
        if conn.server.schedules {
            // The stream keeps a message only while a consumer has an
            // interest in it: this one holds messages published for later
            // until the server publishes them. It is never read.
            stream
                .create_consumer(topology::schedules_holder(&stream_name, replicas))
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Broker,
                        format!(
                            "creating the consumer holding `{stream_name}`'s scheduled messages"
                        ),
                    )
                    .with_source(e)
                })?;
            // Messages held before the server was upgraded to 2.12 are
            // still published by a mover.
            let legacy = topology::later_stream_name(&stream_name);
            if conn.js.get_stream(&legacy).await.is_ok() {
                mover::ensure(conn, &stream_name, true);
            }
        } else {
            let later = topology::later_stream_config(&stream_name, replicas);
            conn.js.get_or_create_stream(later).await.map_err(|e| {
                stream_error(
                    &format!("creating the schedule stream of `{stream_name}`"),
                    e,
                )
            })?;
            mover::ensure(conn, &stream_name, false);
        }
        for queue in &topology.queues {
            let filter = topology::filter(space, &stream_name, queue, conn.server.several_filters)?;
            let config = topology::consumer_config(
                queue,
                &filter,
                conn.config.ack_wait,
                conn.config.max_ack_pending,
                replicas,
            );
            stream.create_consumer(config).await.map_err(|e| {
                if let ConsumerErrorKind::JetStream(api) = e.kind() {
                    if api.error_code() == ErrorCode::MAXIMUM_CONSUMERS_LIMIT {
                        return Error::new(
                            ErrorKind::Config,
                            consumer_limit(&queue.name, &stream_name),
                        )
                        .with_source(e);
                    }
                }
                let kind = match e.kind() {
                    ConsumerErrorKind::JetStream(api) => match error::api_kind(api.error_code()) {
                        ErrorKind::Broker => ErrorKind::Config,
                        other => other,
                    },
                    ConsumerErrorKind::TimedOut => ErrorKind::Timeout,
                    _ => ErrorKind::Config,
                };
                Error::new(
                    kind,
                    format!(
                        "declaring queue `{}` (if it exists with other settings that cannot be \
                         changed, delete it first)",
                        queue.name
                    ),
                )
                .with_source(e)
            })?;
            conn.remember(QueueInfo::new(space, queue, conn.server.several_filters)?);
        }
        Ok(())
    }

    /// What the server has of the streams and consumers `declare` would make.
    async fn inspect_topology(&self, topology: &Topology) -> Result<Vec<Finding>> {
        topology::validate(topology)?;
        let conn = &self.conn;
        let space = &topology.topic_space;
        let stream_name = topology::stream_name(space);
        let mut findings = Vec::new();
        let object = format!("stream {stream_name}");
        let mut consumers = None;
        let stream = match conn.js.get_stream(&stream_name).await {
            Err(_) => {
                findings.push(Finding::new(
                    object,
                    FindingStatus::Missing,
                    format!("not there; `declare` creates the stream of topic space `{space}`"),
                ));
                None
            }
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| {
                    Error::new(ErrorKind::Connection, format!("reading {object}")).with_source(e)
                })?;
                let config = info.config.clone();
                consumers = Some((info.state.consumer_count, config.max_consumers));
                let owner = config
                    .description
                    .as_deref()
                    .and_then(topology::parse_space_description);
                let mut wanted = Vec::new();
                for queue in &topology.queues {
                    for pattern in &queue.bindings {
                        wanted.extend(topology::pattern_subjects(space, pattern)?);
                    }
                }
                let uncovered: Vec<&String> = wanted
                    .iter()
                    .filter(|w| !config.subjects.iter().any(|s| topology::covers(s, w)))
                    .collect();
                let (status, detail) = match owner {
                    None => (
                        FindingStatus::Differs,
                        "not made by ticketrail: `declare` refuses it; choose another topic \
                         space or move the stream's data and delete it"
                            .to_owned(),
                    ),
                    Some((owner, _)) if owner != *space => (
                        FindingStatus::Differs,
                        format!(
                            "it belongs to topic space `{owner}` (`.` becomes `_`): rename one"
                        ),
                    ),
                    _ => match limits(&config) {
                        Some(limits) => (
                            FindingStatus::Differs,
                            format!(
                                "it has limits that drop messages ({limits}); ticketrail \
                                 declares none: remove them (`nats stream edit`)"
                            ),
                        ),
                        None if !uncovered.is_empty() => (
                            FindingStatus::Differs,
                            format!(
                                "it does not capture {uncovered:?}; `declare` adds the \
                                 subjects (nothing stored is lost)"
                            ),
                        ),
                        None => (
                            FindingStatus::Matches,
                            format!("captures {:?}", config.subjects),
                        ),
                    },
                };
                findings.push(Finding::new(object, status, detail));
                Some(stream)
            }
        };
        for (name, what) in [
            (topology::dlq_stream_name(&stream_name), "the dead letters"),
            (
                topology::failures_stream_name(&stream_name),
                "first failures and retry counts",
            ),
        ] {
            let object = format!("stream {name}");
            let finding = match conn.js.get_stream(&name).await {
                Err(_) => Finding::new(
                    object,
                    FindingStatus::Missing,
                    format!("not there; `declare` creates it, for {what}"),
                ),
                Ok(mut aux) => match aux.info().await.map(|i| limits(&i.config)) {
                    Ok(Some(limits)) if what == "the dead letters" => Finding::new(
                        object,
                        FindingStatus::Differs,
                        format!("it has limits that drop dead letters ({limits}): remove them"),
                    ),
                    _ => Finding::new(object, FindingStatus::Matches, format!("holds {what}")),
                },
            };
            findings.push(finding);
        }
        for queue in &topology.queues {
            let name = topology::consumer_name(&queue.name);
            let object = format!("consumer {stream_name}/{name}");
            let info = match &stream {
                Some(stream) => stream.consumer_info(&name).await.ok(),
                None => None,
            };
            let finding = match info {
                None => Finding::new(
                    object,
                    FindingStatus::Missing,
                    format!(
                        "not there; `declare` creates the durable consumer of queue `{}`",
                        queue.name
                    ),
                ),
                Some(info) => {
                    let declared = info
                        .config
                        .description
                        .as_deref()
                        .and_then(topology::parse_description);
                    let limit = i64::from(queue.delivery_limit) + 1 + topology::RETRY_HEADROOM;
                    match declared {
                        None => Finding::new(
                            object,
                            FindingStatus::Differs,
                            "not made by ticketrail; delete it or choose another queue name",
                        ),
                        Some((_, bindings)) if bindings != queue.bindings => Finding::new(
                            object,
                            FindingStatus::Differs,
                            format!(
                                "bound to {bindings:?}, not {:?}; `declare` updates the filter",
                                queue.bindings
                            ),
                        ),
                        Some(_) if info.config.max_deliver != limit => Finding::new(
                            object,
                            FindingStatus::Differs,
                            format!(
                                "max_deliver is {}, ticketrail's is {limit} (delivery limit {}); \
                                 `declare` updates it",
                                info.config.max_deliver, queue.delivery_limit
                            ),
                        ),
                        Some(_) => Finding::new(
                            object,
                            FindingStatus::Matches,
                            format!(
                                "explicit acks, ack_wait {:?}, delivery limit {}",
                                info.config.ack_wait, queue.delivery_limit
                            ),
                        ),
                    }
                }
            };
            findings.push(finding);
        }
        if let Some((count, own_limit)) = consumers {
            let missing = (findings.iter())
                .filter(|f| f.object.starts_with("consumer ") && f.status == FindingStatus::Missing)
                .count();
            let cap = consumer_cap(own_limit, &conn.server.version);
            findings.push(consumer_room(&stream_name, count, missing, cap));
        }
        Ok(findings)
    }

    async fn delete_topology(&self, topology: &Topology) -> Result<()> {
        let conn = &self.conn;
        let space = &topology.topic_space;
        let stream_name = topology::stream_name(space);
        let Ok(stream) = conn.js.get_stream(&stream_name).await else {
            return Ok(());
        };
        for queue in &topology.queues {
            let _ = stream
                .delete_consumer(&topology::consumer_name(&queue.name))
                .await;
            if let Ok(info) = QueueInfo::new(space, queue, conn.server.several_filters) {
                let _ = dead_letters::purge(conn, &info).await;
            }
            conn.forget(&queue.name);
        }
        // What is still bound decides what the stream keeps capturing.
        let remaining = conn.queues_of(space).await?;
        if remaining.is_empty() {
            conn.js
                .delete_stream(&stream_name)
                .await
                .map_err(|e| error::client(&format!("deleting stream `{stream_name}`"), e))?;
            for aux in [
                topology::dlq_stream_name(&stream_name),
                topology::failures_stream_name(&stream_name),
                topology::later_stream_name(&stream_name),
            ] {
                let _ = conn.js.delete_stream(&aux).await;
            }
            let _ = conn
                .js
                .delete_object_store(topology::dlq_stream_name(&stream_name))
                .await;
            return Ok(());
        }
        let mut subjects = Vec::new();
        for spec in &remaining {
            for pattern in &spec.bindings {
                subjects.extend(topology::pattern_subjects(space, pattern)?);
            }
        }
        let mut capture = topology::capture(subjects);
        capture.subjects.extend(
            remaining
                .iter()
                .map(|q| topology::replay_subject(&stream_name, &q.name)),
        );
        let mut info = conn
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| error::client("reading the stream", e))?;
        let mut config = info
            .info()
            .await
            .map_err(|e| error::client("reading the stream", e))?
            .config
            .clone();
        let wanted =
            topology::stream_config(space, capture, conn.config.replicas, conn.server.schedules);
        config.subjects = wanted.subjects;
        config.description = wanted.description;
        conn.js
            .update_stream(config)
            .await
            .map_err(|e| stream_error("updating the stream", e))?;
        Ok(())
    }
}

/// How many consumers a stream may have: its own `max_consumers`, else
/// the default of nats-server 2.15 and later (1,000, unless the server's
/// `default_max_consumers` says otherwise: a client cannot see that);
/// `None` for no limit.
fn consumer_cap(own: i32, version: &str) -> Option<usize> {
    if own > 0 {
        Some(own as usize)
    } else if crate::connection::version_before(version, (2, 15)) {
        None
    } else {
        Some(1000)
    }
}

/// Whether the queues the topology lacks fit in its stream's consumer
/// limit; a warning at 80 %.
fn consumer_room(stream: &str, count: usize, missing: usize, cap: Option<usize>) -> Finding {
    let object = format!("consumers of stream {stream}");
    let Some(cap) = cap else {
        return Finding::new(
            object,
            FindingStatus::Matches,
            format!("{count}, with no limit"),
        );
    };
    let after = count + missing;
    if after > cap {
        let detail = format!(
            "{count} of at most {cap}: the {missing} queue(s) not declared yet do not fit. {}",
            LIMIT_ADVICE
        );
        Finding::new(object, FindingStatus::Differs, detail)
    } else if after * 5 >= cap * 4 {
        let detail = format!("{count} of at most {cap} (near the limit). {LIMIT_ADVICE}");
        Finding::new(object, FindingStatus::Matches, detail)
    } else {
        Finding::new(
            object,
            FindingStatus::Matches,
            format!("{count} of at most {cap}"),
        )
    }
}

/// What to do about a stream's consumer limit.
const LIMIT_ADVICE: &str = "ticketrail makes one consumer per queue of the topic space, and \
    readers for a while. nats-server 2.15 allows 1,000 per stream unless its configuration says \
    otherwise (`jetstream { limits { default_max_consumers: N } }`), and an account can set a \
    lower limit: raise it, or spread the queues over more topic spaces";

/// Why a queue could not be declared: its stream holds as many consumers
/// as it may.
fn consumer_limit(queue: &str, stream: &str) -> String {
    format!("declaring queue `{queue}`: stream `{stream}` has as many consumers as it may. {LIMIT_ADVICE}")
}

#[async_trait]
impl Broker for NatsBroker {
    fn backend(&self) -> &'static str {
        crate::BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_reconnect(true)
            .with_scheduling(true)
    }

    fn describe(&self) -> String {
        format!(
            "nats-server {} at {}",
            self.conn.server.version,
            self.conn.config.address()
        )
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        topology::validate(topology)?;
        self.declare_topology(topology).await
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        self.inspect_topology(topology).await
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        self.delete_topology(topology).await
    }

    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        publish::send(&self.conn, topic_space, message, None).await
    }

    async fn send_at(
        &self,
        topic_space: &str,
        message: Message,
        at: SystemTime,
    ) -> Result<Confirmation> {
        publish::send(&self.conn, topic_space, message, Some(at)).await
    }

    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        validate_name("queue", queue)?;
        let info = self.conn.locate(queue).await?;
        mover::ensure(&self.conn, &info.stream, false);
        let subscription = NatsSubscription::open(
            Arc::clone(&self.conn),
            info,
            usize::from(options.prefetch.get()),
        )
        .await?;
        Ok(Box::new(subscription))
    }

    async fn dead_letter_cursor(&self, queue: &str) -> Result<Box<dyn DeadLetterCursor>> {
        let info = self.conn.locate(queue).await?;
        Ok(Box::new(
            NatsCursor::open(Arc::clone(&self.conn), info).await?,
        ))
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        let info = self.conn.locate(queue).await?;
        dead_letters::purge(&self.conn, &info).await
    }

    /// Ready messages, deliveries in flight and messages waiting out a retry
    /// (together they are the consumer's pending acks; the waiting ones are
    /// those with a failure on record), and DLQ records. A pull consumer
    /// does not know how many subscriptions pull from it.
    async fn scheduled(&self, topic_space: &str) -> Result<Option<Scheduled>> {
        validate_name("topic space", topic_space)?;
        let stream = topology::stream_name(topic_space);
        let doing = format!("reading the messages held for later in `{topic_space}`");
        if !self.conn.server.schedules {
            // Their stream holds nothing else.
            let later = topology::later_stream_name(&stream);
            let state: dead_letters::StreamState = self
                .conn
                .api_empty(&format!("STREAM.INFO.{later}"), &doing)
                .await?;
            return Ok(Some(Scheduled::new(state.state.messages, false)));
        }
        // The holder consumer is never read: its pending messages are
        // exactly those waiting for their time.
        let counts: ConsumerCounts = self
            .conn
            .api_empty(
                &format!("CONSUMER.INFO.{stream}.{}", topology::SCHEDULES_HOLDER),
                &doing,
            )
            .await?;
        Ok(Some(Scheduled::new(counts.num_pending, false)))
    }

    async fn list_scheduled(
        &self,
        topic_space: &str,
        limit: usize,
    ) -> Result<Vec<ScheduledMessage>> {
        validate_name("topic space", topic_space)?;
        scheduled::list(&self.conn, topic_space, limit).await
    }

    async fn cancel_scheduled(&self, topic_space: &str, id: &str) -> Result<bool> {
        validate_name("topic space", topic_space)?;
        scheduled::cancel(&self.conn, topic_space, id).await
    }

    async fn queues(&self, topic_space: &str) -> Result<Vec<String>> {
        validate_name("topic space", topic_space)?;
        let mut names: Vec<String> = (self.conn.queues_of(topic_space).await?)
            .into_iter()
            .map(|spec| spec.name)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        let info = self.conn.locate(queue).await?;
        let counts: ConsumerCounts = self
            .conn
            .api_empty(
                &format!("CONSUMER.INFO.{}.{}", info.stream, info.consumer),
                &format!("reading the state of `{queue}`"),
            )
            .await?;
        let failures = dead_letters::stream_state(
            &self.conn,
            &topology::failures_stream_name(&info.stream),
            &topology::failures_of(&info.stream, &info.consumer),
        )
        .await
        .map(|s| s.subjects.len() as u64)
        .unwrap_or(0);
        let waiting = failures.min(counts.num_ack_pending);
        let mut stats = QueueStats::new(queue);
        stats.ready = Some(counts.num_pending);
        stats.in_flight = Some(counts.num_ack_pending - waiting);
        stats.waiting_retries = Some(waiting);
        stats.dead_letters = Some(dead_letters::count(&self.conn, &info).await?);
        Ok(stats)
    }

    async fn close(&self) -> Result<()> {
        self.conn.mark_closed();
        // Acks and naks already sent are flushed before the connection
        // goes. Both wait for a server that is away: close gives up after
        // the request timeout, and the server delivers again, after
        // `ack_wait`, whatever was not acked.
        let limit = self.conn.config.request_timeout;
        let closing = async {
            let _ = self.conn.client.flush().await;
            self.conn.client.drain().await
        };
        match tokio::time::timeout(limit, closing).await {
            Ok(drained) => drained.map_err(|e| error::client("closing the NATS connection", e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("closing the NATS connection: the server did not answer within {limit:?}"),
            )),
        }
    }
}

/// The limits of a stream that make the server drop messages, if any.
fn limits(config: &async_nats::jetstream::stream::Config) -> Option<String> {
    let mut limits = Vec::new();
    if config.max_messages > 0 {
        limits.push(format!("max_msgs {}", config.max_messages));
    }
    if config.max_bytes > 0 {
        limits.push(format!("max_bytes {}", config.max_bytes));
    }
    if !config.max_age.is_zero() && config.max_messages_per_subject != 1 {
        limits.push(format!("max_age {:?}", config.max_age));
    }
    (!limits.is_empty()).then(|| limits.join(", "))
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

    #[test]
    fn a_stream_s_consumer_limit_is_its_own_else_2_15_s_default() {
        assert_eq!(consumer_cap(5000, "2.15.1"), Some(5000));
        assert_eq!(consumer_cap(-1, "2.15.1"), Some(1000));
        assert_eq!(consumer_cap(0, "2.16.0"), Some(1000));
        assert_eq!(consumer_cap(-1, "2.9.10"), None);
        assert_eq!(consumer_cap(20, "2.9.10"), Some(20));
    }

    #[test]
    fn check_says_when_the_missing_queues_do_not_fit() {
        let room = |count, missing, cap| consumer_room("S", count, missing, cap);
        assert_eq!(room(10, 5, None).status, FindingStatus::Matches);
        assert_eq!(room(10, 5, Some(1000)).status, FindingStatus::Matches);
        assert!(!room(10, 5, Some(1000)).detail.contains("near"));
        let near = room(790, 20, Some(1000));
        assert_eq!(near.status, FindingStatus::Matches);
        assert!(near.detail.contains("near the limit"), "{}", near.detail);
        let full = room(999, 2, Some(1000));
        assert_eq!(full.status, FindingStatus::Differs);
        assert!(
            full.detail.contains("default_max_consumers"),
            "{}",
            full.detail
        );
    }
}
