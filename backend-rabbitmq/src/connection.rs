//! Connections to RabbitMQ: opened on the first node of the list that
//! answers, and the publishing link, re-established after it breaks (C15).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use ticketrail_core::{Error, ErrorKind, Result, Topology};
use tokio::sync::{watch, Mutex};

use crate::config::RabbitConfig;
use crate::error::{is_untrusted_certificate, kind_of, map};
use crate::raw::{RawConnection, RawTls};
use crate::topology;

/// Which node a new client tries first: a random one, so the connections
/// of many processes (and their quorum queue leaders, placed on the node
/// that declares them) spread over a cluster instead of all landing on the
/// first node of the list.
pub(crate) fn first_node(config: &RabbitConfig) -> usize {
    fastrand::usize(..config.nodes.len())
}

/// A connection that is closed when dropped. lapin keeps a connection (and
/// its consumers, with the deliveries they hold) open until told, so one
/// dropped half-way, e.g. by a subscription cancelled while it opens, would
/// otherwise keep its prefetch window of messages from every other consumer
/// for as long as the process lives.
pub(crate) struct Owned(Option<Connection>);

impl std::ops::Deref for Owned {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let Some(connection) = self.0.take() else {
            return;
        };
        if !connection.status().connected() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = connection.close(200, "ticketrail: done".into()).await;
                });
            }
            // No runtime to close it on: the socket goes when the process does.
            Err(_) => tracing::debug!("a RabbitMQ connection dropped outside a runtime"),
        }
    }
}

/// Opens a connection to the first node of `config` that answers, starting
/// after the one `next` points at, so successive connections spread over a
/// cluster and a node that went away is skipped. A refusal of the
/// credentials is not tried on other nodes.
pub(crate) async fn open(
    config: &RabbitConfig,
    next: &AtomicUsize,
    purpose: &str,
) -> Result<(Owned, String)> {
    let start = next.fetch_add(1, Ordering::Relaxed);
    let mut last = None;
    for i in 0..config.nodes.len() {
        let node = &config.nodes[(start + i) % config.nodes.len()];
        match open_node(config, &node.url, &node.address, purpose).await {
            Ok(connection) => return Ok((Owned(Some(connection)), node.address.clone())),
            Err(e) if e.kind() == ErrorKind::Auth => return Err(e),
            Err(e) => {
                tracing::debug!(node = %node.address, error = %e, "node did not answer; trying the next");
                last = Some(e);
            }
        }
    }
    Err(last.expect("a config has at least one node"))
}

async fn open_node(
    config: &RabbitConfig,
    url: &str,
    address: &str,
    purpose: &str,
) -> Result<Connection> {
    let name = format!("{} ({purpose})", config.connection_name);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: config.tls_ca_pem.clone(),
    };
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| map("starting lapin's runtime", e))?;
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| Error::config(format!("invalid RabbitMQ URL for {address}: {e}")))?;
    // Heartbeats notice a connection that died without a reset (C15 for
    // the faults that close nothing); the setting wins over the URL's.
    uri.query.heartbeat = Some(config.heartbeat);
    let connecting = Connection::connect_uri_with_config(uri, properties, tls, runtime);
    match tokio::time::timeout(config.connect_timeout, connecting).await {
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "connecting to RabbitMQ at {address} took over {:?}",
                config.connect_timeout
            ),
        )),
        Ok(Err(e)) if is_untrusted_certificate(&e) => Err(Error::new(
            ErrorKind::Connection,
            format!(
                "TLS with RabbitMQ at {address} failed: its certificate is not trusted \
                 (trust its CA with RabbitConfig::tls_ca_file)"
            ),
        )
        .with_source(e)),
        Ok(Err(e)) if kind_of(&e) == ErrorKind::Auth => Err(Error::new(
            ErrorKind::Auth,
            format!("RabbitMQ at {address} refused the credentials"),
        )
        .with_source(e)),
        Ok(Err(e)) => Err(map(&format!("connecting to RabbitMQ at {address}"), e)),
        Ok(Ok(connection)) => Ok(connection),
    }
}

/// Awaits one exchange with RabbitMQ that a live broker answers at once
/// (opening a channel, confirm mode, a declare, a close) for at most the
/// connect timeout. A node that goes away mid-exchange, or a reply lapin
/// never gets, would otherwise hold the caller for good, and with it a
/// publisher's session lock and everyone who waits on it.
pub(crate) async fn within<T>(
    config: &RabbitConfig,
    what: &str,
    exchange: impl Future<Output = Result<T>>,
) -> Result<T> {
    let limit = config.connect_timeout;
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("{what}: RabbitMQ did not answer within {limit:?}"),
            ))
        })
}

/// [`within`] for one of lapin's calls, its error named by `what`.
pub(crate) async fn answered<T>(
    config: &RabbitConfig,
    what: &str,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    within(config, what, async { call.await.map_err(|e| map(what, e)) }).await
}

/// Opens a raw connection (see [`crate::raw`]) to the first node that answers.
pub(crate) async fn open_raw(config: &RabbitConfig) -> Result<RawConnection> {
    let tls = RawTls {
        ca_pem: config.tls_ca_pem.clone(),
    };
    let mut last = None;
    for node in &config.nodes {
        match RawConnection::connect_with(&node.url, &tls, config.connect_timeout).await {
            Ok(raw) => return Ok(raw),
            Err(e) if e.kind() == ErrorKind::Auth => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("a config has at least one node"))
}

/// One live connection with its confirm-mode publishing channel.
pub(crate) struct Session {
    pub(crate) connection: Arc<Owned>,
    publish: Channel,
    /// Follows the connection's `connection.blocked` / `unblocked`
    /// notifications; ends with the session.
    _alarms: AbortOnDrop,
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether RabbitMQ blocks the publishing connection, and why: it sends
/// `connection.blocked` with its reason when a resource alarm (memory or
/// disk) goes off, and stops reading from connections that publish until
/// `connection.unblocked`.
pub(crate) type Blocked = watch::Sender<Option<String>>;

/// Follows the alarms of `connection` into `blocked`; a new connection
/// starts unblocked.
fn follow_alarms(connection: &Connection, blocked: &Arc<Blocked>) -> AbortOnDrop {
    blocked.send_replace(None);
    let events = connection.events_listener();
    let blocked = Arc::clone(blocked);
    AbortOnDrop(tokio::spawn(async move {
        futures::pin_mut!(events);
        while let Some(event) = futures::StreamExt::next(&mut events).await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!(reason = %reason, "RabbitMQ blocks publishing (a resource alarm)");
                    blocked.send_replace(Some(reason));
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!("RabbitMQ unblocked publishing");
                    blocked.send_replace(None);
                }
                _ => {}
            }
        }
    }))
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

/// The connection a [`RabbitBroker`](crate::RabbitBroker) publishes and
/// declares through, replaced by a new one (on another node if its own is
/// gone) when it breaks; topologies declared through it are declared again.
/// Subscriptions have connections of their own.
pub(crate) struct Link {
    pub(crate) config: RabbitConfig,
    /// Which node the next connection tries first.
    pub(crate) next_node: AtomicUsize,
    current: Mutex<Option<Arc<Session>>>,
    closed: AtomicBool,
    declared: SyncMutex<Vec<Topology>>,
    wait_queues: SyncMutex<HashSet<String>>,
    /// The tiers in use (`topology::tiers_in_use`), and when they were
    /// asked for.
    tiers: SyncMutex<Option<(Instant, Vec<Duration>)>>,
    /// The queues whose wait queues are swept.
    pub(crate) sweeps: Sweeps,
    /// Whether the ladder of messages published for later was declared on
    /// the current connection.
    pub(crate) ladder: AtomicBool,
    /// The broker's product and version, read at connect.
    pub(crate) server: String,
    /// Why RabbitMQ blocks this link's publishes, while it does.
    blocked: Arc<Blocked>,
}

impl Link {
    /// Connects, failing within the connect timeout with the host and port.
    pub(crate) async fn connect(config: RabbitConfig) -> Result<Arc<Link>> {
        // The raw handshake tells the broker's version, which lapin keeps
        // to itself; it also proves the credentials before lapin tries them.
        let raw = open_raw(&config).await?;
        let server = raw.server.clone();
        raw.close().await;
        let first = first_node(&config);
        let link = Arc::new(Link {
            config,
            next_node: AtomicUsize::new(first),
            current: Mutex::new(None),
            closed: AtomicBool::new(false),
            declared: SyncMutex::default(),
            wait_queues: SyncMutex::default(),
            tiers: SyncMutex::default(),
            sweeps: Sweeps::default(),
            ladder: AtomicBool::new(false),
            server,
            blocked: Arc::new(watch::channel(None).0),
        });
        link.session().await?;
        Ok(link)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The live session, reconnecting (once) if the last one broke.
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        if self.is_closed() {
            return Err(Error::closed("the RabbitMQ connection was closed"));
        }
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref().filter(|s| s.healthy()) {
            return Ok(Arc::clone(session));
        }
        let config = &self.config;
        let session = match current.take() {
            // The connection lives; only the publishing channel broke (e.g.
            // a publish to an exchange that does not exist closes it).
            Some(old) if old.connection.status().connected() => Session {
                publish: confirm_channel(config, &old.connection).await?,
                connection: Arc::clone(&old.connection),
                _alarms: follow_alarms(&old.connection, &self.blocked),
            },
            _ => {
                let (connection, address) = open(config, &self.next_node, "publishing").await?;
                let session = Session {
                    publish: confirm_channel(config, &connection).await?,
                    _alarms: follow_alarms(&connection, &self.blocked),
                    connection: Arc::new(connection),
                };
                let topologies = self.declared.lock().expect("not poisoned").clone();
                if !topologies.is_empty() {
                    tracing::info!(broker = %address, "reconnected to RabbitMQ; declaring topology again");
                }
                for topology in &topologies {
                    let what = format!("declaring `{}` again", topology.topic_space);
                    within(
                        config,
                        &what,
                        topology::declare(&session.connection, &session.publish, topology),
                    )
                    .await?;
                }
                self.wait_queues.lock().expect("not poisoned").clear();
                self.ladder.store(false, Ordering::Release);
                session
            }
        };
        // Closed while this reconnected: the new connection is not kept
        // (dropped, it is closed), so `close` need not wait for the lock.
        if self.is_closed() {
            return Err(Error::closed("the RabbitMQ connection was closed"));
        }
        let session = Arc::new(session);
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Declares a topology and remembers it for redeclaring after a reconnect.
    pub(crate) async fn declare(&self, topology: &Topology) -> Result<()> {
        let session = self.session().await?;
        topology::declare(&session.connection, &session.publish, topology).await?;
        let mut declared = self.declared.lock().expect("not poisoned");
        if !declared.contains(topology) {
            declared.push(topology.clone());
        }
        Ok(())
    }

    /// Forgets a deleted topology.
    pub(crate) fn forget(&self, topology: &Topology) {
        self.declared
            .lock()
            .expect("not poisoned")
            .retain(|t| t.topic_space != topology.topic_space);
    }

    /// Publishes with `mandatory`; the future it returns awaits the
    /// broker's confirm (C1).
    ///
    /// Returns once the message's frames are queued on the channel, not
    /// written: lapin's `basic_publish` resolves only after its I/O loop has
    /// written them, and awaiting that for each message in turn caps a
    /// publisher at one I/O round per message. Queued in the order of the
    /// calls, messages keep the channel's order, and the write is awaited
    /// with the confirm.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: Bytes,
        properties: BasicProperties,
    ) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
        if let Some(reason) = self.blocked_reason() {
            return Err(blocked(&reason));
        }
        let session = self.session().await?;
        let limit = self.config.publish_timeout;
        let alarm = self.blocked.subscribe();
        let where_to = if exchange.is_empty() {
            Target::Queue(routing_key.into())
        } else {
            Target::Exchange(exchange.into(), routing_key.into())
        };
        let (exchange, routing_key) = (ShortString::from(exchange), ShortString::from(routing_key));
        let mut written = Box::pin(async move {
            session
                .publish
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &payload,
                    properties,
                )
                .await
        });
        // The first poll takes the channel's next delivery tag and queues
        // the frames; a refusal (a closed channel) comes back at once.
        let first = futures::poll!(written.as_mut());
        if let std::task::Poll::Ready(Err(e)) = first {
            return Err(map(&format!("publishing to {where_to}"), e));
        }
        let confirmed = async move {
            let confirm = match first {
                std::task::Poll::Ready(queued) => queued,
                std::task::Poll::Pending => written.await,
            }
            .map_err(|e| map(&format!("publishing to {where_to}"), e))?;
            let confirm = confirm.await.map_err(|e| {
                let mapped = map(&format!("publishing to {where_to}"), e);
                if mapped.kind() == ErrorKind::NotFound {
                    Error::new(
                        ErrorKind::Unroutable,
                        format!("{where_to}: it does not exist"),
                    )
                    .with_source(mapped)
                } else {
                    mapped
                }
            })?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::new(
                    ErrorKind::Unroutable,
                    format!("no queue is bound for {where_to}"),
                )),
                Confirmation::Nack(None) => Err(Error::new(
                    ErrorKind::Broker,
                    format!(
                        "RabbitMQ refused the message for {where_to} (nack: a queue is full, \
                         or a quorum queue could not reach its majority)"
                    ),
                )),
                Confirmation::NotRequested => Err(Error::new(
                    ErrorKind::Broker,
                    "the publishing channel is not in confirm mode",
                )),
            }
        };
        Ok(async move {
            match tokio::time::timeout(limit, confirmed).await {
                Ok(outcome) => outcome,
                // Blocked while in flight: the broker stopped reading with
                // the message perhaps unread; it is published if the
                // connection lives until the alarm clears.
                Err(_) => Err(match alarm.borrow().clone() {
                    Some(reason) => Error::new(
                        ErrorKind::Blocked,
                        format!(
                            "RabbitMQ blocked publishing while this message was in flight: \
                             {reason}; no confirm within {limit:?}, so it may still be \
                             published when the alarm clears"
                        ),
                    )
                    .with_source(unconfirmed(limit)),
                    None => unconfirmed(limit),
                }),
            }
        })
    }

    /// Why RabbitMQ blocks publishing now, if it does.
    pub(crate) fn blocked_reason(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// Waits until RabbitMQ no longer blocks publishing; at once if it
    /// does not. Ends with the link.
    pub(crate) async fn unblocked(&self) -> Result<()> {
        let mut alarm = self.blocked.subscribe();
        loop {
            if self.is_closed() {
                return Err(Error::closed("the RabbitMQ connection was closed"));
            }
            if alarm.borrow_and_update().is_none() {
                return Ok(());
            }
            // Checked again now and then: a connection lost while blocked
            // never says "unblocked"; its successor starts afresh.
            let _ = tokio::time::timeout(Duration::from_secs(1), alarm.changed()).await;
        }
    }

    /// Publishes a copy straight to `queue` (the default exchange) and waits
    /// for the broker's confirm. While RabbitMQ blocks publishing (a
    /// resource alarm) the copy waits for it to clear, however long, rather
    /// than fail: a failed copy would put its message back in the queue,
    /// to be handled again and counted against its delivery limit. A copy
    /// cut off by an alarm is sent again after it (same id: a duplicate at
    /// worst, never a loss).
    pub(crate) async fn publish_to_queue(
        &self,
        queue: &str,
        payload: Bytes,
        properties: BasicProperties,
    ) -> Result<()> {
        let mut said = false;
        loop {
            if self.blocked_reason().is_some() {
                if !said {
                    said = true;
                    tracing::warn!(
                        queue,
                        reason = ?self.blocked_reason(),
                        "a retry or dead-letter copy waits for RabbitMQ to unblock publishing"
                    );
                }
                self.unblocked().await?;
            }
            let sent = async {
                self.send("", queue, payload.clone(), properties.clone())
                    .await?
                    .await
            };
            match sent.await {
                Err(e) if e.kind() == ErrorKind::Blocked => continue,
                outcome => return outcome,
            }
        }
    }

    /// Makes sure the wait queue of `queue` for `tier` exists: declared
    /// once per connection (a reconnect forgets, so it is declared again
    /// after the queue may have been deleted).
    pub(crate) async fn ensure_wait_queue(&self, queue: &str, tier: Duration) -> Result<()> {
        let name = topology::wait_queue_name(queue, tier);
        if self
            .wait_queues
            .lock()
            .expect("not poisoned")
            .contains(&name)
        {
            return Ok(());
        }
        topology::mark_tier(self.channel().await?, tier).await;
        let session = self.session().await?;
        topology::declare_wait_queue(&session.publish, queue, tier).await?;
        self.wait_queues.lock().expect("not poisoned").insert(name);
        Ok(())
    }

    /// The tiers in use in the virtual host, asked for on `raw` unless
    /// this link asked less than `fresh` ago.
    pub(crate) async fn tiers_in_use(
        &self,
        raw: &mut RawConnection,
        fresh: Duration,
    ) -> Result<Vec<Duration>> {
        if let Some((at, tiers)) = &*self.tiers.lock().expect("not poisoned") {
            if at.elapsed() < fresh {
                return Ok(tiers.clone());
            }
        }
        let tiers = topology::tiers_in_use(raw).await?;
        *self.tiers.lock().expect("not poisoned") = Some((Instant::now(), tiers.clone()));
        Ok(tiers)
    }

    /// The wait queues this link declared on its current connection.
    pub(crate) fn wait_queues(&self) -> Vec<String> {
        let declared = self.wait_queues.lock().expect("not poisoned");
        declared.iter().cloned().collect()
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let session = self.session().await?;
        answered(
            &self.config,
            "opening a channel",
            session.connection.create_channel(),
        )
        .await
    }

    /// The negotiated frame size: a message's headers must fit in one frame.
    pub(crate) async fn frame_max(&self) -> usize {
        match self.session().await {
            Ok(session) => session.connection.configuration().frame_max() as usize,
            Err(_) => 131_072,
        }
    }

    /// Closes the publishing connection. Bounded by the connect timeout,
    /// twice over: for a reconnect under way to let go of the session (it
    /// then drops what it opened), and for RabbitMQ to confirm the close
    /// (one not confirmed in time is left to finish in the background).
    pub(crate) async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let limit = self.config.connect_timeout;
        let Ok(mut current) = tokio::time::timeout(limit, self.current.lock()).await else {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "closing the RabbitMQ connection: a reconnect still held it after {limit:?}; \
                     it closes what it opened when it ends"
                ),
            ));
        };
        let Some(session) = current.take() else {
            return Ok(());
        };
        drop(current);
        if !session.connection.status().connected() {
            return Ok(());
        }
        let closing = session.connection.close(200, "ticketrail closing".into());
        answered(&self.config, "closing the connection", closing).await
    }
}

/// The error of a publish refused because RabbitMQ blocks publishing.
fn blocked(reason: &str) -> Error {
    Error::new(
        ErrorKind::Blocked,
        format!(
            "RabbitMQ blocks publishing: {reason} (a memory or disk alarm; it clears when \
             consumers drain the queues or the disk has room); not published"
        ),
    )
}

/// The error of a publish whose confirm did not come in time.
fn unconfirmed(limit: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "no confirm from RabbitMQ within {limit:?}: the message may or may not have \
             been published; publishing it again with the same id is safe for an idempotent \
             consumer (the publish timeout is set by RabbitConfig::publish_timeout or \
             ?publish_timeout=)"
        ),
    )
}

async fn confirm_channel(config: &RabbitConfig, connection: &Connection) -> Result<Channel> {
    let channel = answered(config, "opening a channel", connection.create_channel()).await?;
    let confirms = channel.confirm_select(ConfirmSelectOptions::default());
    answered(config, "enabling publisher confirms", confirms).await?;
    Ok(channel)
}

/// Where a publish went, for error messages; owned, as the confirm future
/// that may report it outlives the call.
enum Target {
    Queue(ShortString),
    Exchange(ShortString, ShortString),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Queue(queue) => write!(f, "queue `{queue}`"),
            Target::Exchange(exchange, key) => {
                write!(f, "`{exchange}` with routing key `{key}`")
            }
        }
    }
}

/// The queues a link's sweep covers: those of its live subscriptions.
/// One task per link sweeps them all over one connection, so a process
/// with a thousand consumers holds one sweeping connection, not a
/// thousand (see `sweep.rs`).
#[derive(Default)]
pub(crate) struct Sweeps(SyncMutex<Covered>);

#[derive(Default)]
struct Covered {
    /// Each queue, with how many subscriptions of this link it has.
    queues: HashMap<Arc<str>, usize>,
    /// Whether the task runs.
    running: bool,
}

impl Sweeps {
    /// Adds a subscription of `queue`; whether the task must be started.
    pub(crate) fn join(&self, queue: &Arc<str>) -> bool {
        let mut covered = self.0.lock().expect("not poisoned");
        *covered.queues.entry(Arc::clone(queue)).or_default() += 1;
        !std::mem::replace(&mut covered.running, true)
    }

    pub(crate) fn leave(&self, queue: &str) {
        let mut covered = self.0.lock().expect("not poisoned");
        if let Some(n) = covered.queues.get_mut(queue) {
            *n -= 1;
            if *n == 0 {
                covered.queues.remove(queue);
            }
        }
    }

    /// The queues to sweep; none, once the task is to end (it is marked
    /// stopped under the same lock, so a later `join` starts another).
    pub(crate) fn queues(&self) -> Vec<Arc<str>> {
        let mut covered = self.0.lock().expect("not poisoned");
        if covered.queues.is_empty() {
            covered.running = false;
        }
        covered.queues.keys().cloned().collect()
    }
}
