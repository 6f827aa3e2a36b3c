//! The connection to RabbitMQ, re-established after it breaks (C15).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use ticketrail_core::{Error, ErrorKind, Result, Topology};
use tokio::sync::Mutex;

use crate::config::RabbitConfig;
use crate::error::map;
use crate::topology;

/// One live connection with its confirm-mode publishing channel.
pub(crate) struct Session {
    pub(crate) connection: Arc<Connection>,
    publish: Channel,
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

/// The connection of one [`RabbitBroker`](crate::RabbitBroker), replaced by a
/// new one when it breaks; topologies declared through it are declared again.
pub(crate) struct Link {
    pub(crate) config: RabbitConfig,
    current: Mutex<Option<Arc<Session>>>,
    closed: AtomicBool,
    declared: SyncMutex<Vec<Topology>>,
    wait_queues: SyncMutex<HashMap<String, Instant>>,
}

impl Link {
    /// Connects, failing within the connect timeout with the host and port.
    pub(crate) async fn connect(config: RabbitConfig) -> Result<Arc<Link>> {
        let link = Arc::new(Link {
            config,
            current: Mutex::new(None),
            closed: AtomicBool::new(false),
            declared: SyncMutex::default(),
            wait_queues: SyncMutex::default(),
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
        let session = match current.take() {
            // The connection lives; only the publishing channel broke (e.g.
            // a publish to an exchange that does not exist closes it).
            Some(old) if old.connection.status().connected() => Session {
                publish: confirm_channel(&old.connection, &self.config).await?,
                connection: Arc::clone(&old.connection),
            },
            _ => {
                let session = open(&self.config).await?;
                let topologies = self.declared.lock().expect("not poisoned").clone();
                if !topologies.is_empty() {
                    tracing::info!(broker = %self.config.address(), "reconnected to RabbitMQ; declaring topology again");
                }
                for topology in &topologies {
                    topology::declare(&session.publish, topology).await?;
                }
                self.wait_queues.lock().expect("not poisoned").clear();
                session
            }
        };
        let session = Arc::new(session);
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Declares a topology and remembers it for redeclaring after a reconnect.
    pub(crate) async fn declare(&self, topology: &Topology) -> Result<()> {
        let session = self.session().await?;
        topology::declare(&session.publish, topology).await?;
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

    /// Publishes with `mandatory` and waits for the broker's confirm (C1).
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        self.send(exchange, routing_key, payload, properties)
            .await?
            .await
    }

    /// Publishes with `mandatory`; the future it returns awaits the
    /// broker's confirm (C1).
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
        let session = self.session().await?;
        let where_to = if exchange.is_empty() {
            Target::Queue(routing_key.into())
        } else {
            Target::Exchange(exchange.into(), routing_key.into())
        };
        let confirm = session
            .publish
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(|e| map(&format!("publishing to {where_to}"), e))?;
        Ok(async move {
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
                    format!("RabbitMQ refused the message for {where_to} (nack)"),
                )),
                Confirmation::NotRequested => Err(Error::new(
                    ErrorKind::Broker,
                    "the publishing channel is not in confirm mode",
                )),
            }
        })
    }

    /// Makes sure the wait queue of `queue` for `tier` exists and will not
    /// expire while a message may still enter it.
    pub(crate) async fn ensure_wait_queue(&self, queue: &str, tier: Duration) -> Result<()> {
        let name = topology::wait_queue_name(queue, tier);
        let fresh = self
            .wait_queues
            .lock()
            .expect("not poisoned")
            .get(&name)
            .is_some_and(|at| at.elapsed() < topology::WAIT_QUEUE_REFRESH);
        if fresh {
            return Ok(());
        }
        let session = self.session().await?;
        topology::declare_wait_queue(&session.publish, queue, tier).await?;
        self.wait_queues
            .lock()
            .expect("not poisoned")
            .insert(name, Instant::now());
        Ok(())
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let session = self.session().await?;
        session
            .connection
            .create_channel()
            .await
            .map_err(|e| map("opening a channel", e))
    }

    /// The negotiated frame size: a message's headers must fit in one frame.
    pub(crate) async fn frame_max(&self) -> usize {
        match self.session().await {
            Ok(session) => session.connection.configuration().frame_max() as usize,
            Err(_) => 131_072,
        }
    }

    pub(crate) async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(session) = self.current.lock().await.take() {
            if session.connection.status().connected() {
                session
                    .connection
                    .close(200, "ticketrail closing".into())
                    .await
                    .map_err(|e| map("closing the connection", e))?;
            }
        }
        Ok(())
    }
}

async fn open(config: &RabbitConfig) -> Result<Session> {
    let properties =
        ConnectionProperties::default().with_connection_name(config.connection_name.clone().into());
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: config.tls_ca_pem.clone(),
    };
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| map("starting lapin's runtime", e))?;
    let connecting = Connection::connect_with_config(&config.url, properties, tls, runtime);
    let connection = match tokio::time::timeout(config.connect_timeout, connecting).await {
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "connecting to RabbitMQ at {} took over {:?}",
                    config.address(),
                    config.connect_timeout
                ),
            ))
        }
        Ok(Err(e)) => {
            let mapped = map(
                &format!("connecting to RabbitMQ at {}", config.address()),
                e,
            );
            let auth =
                mapped.kind() == ErrorKind::Auth || mapped.to_string().contains("ACCESS_REFUSED");
            let text = mapped.to_string();
            if text.contains("certificate") || text.contains("UnknownIssuer") {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "TLS with RabbitMQ at {} failed: its certificate is not trusted \
                         (trust its CA with RabbitConfig::tls_ca_file)",
                        config.address()
                    ),
                )
                .with_source(mapped));
            }
            return Err(if auth {
                Error::new(
                    ErrorKind::Auth,
                    format!("RabbitMQ at {} refused the credentials", config.address()),
                )
                .with_source(mapped)
            } else {
                mapped
            });
        }
        Ok(Ok(connection)) => connection,
    };
    let publish = confirm_channel(&connection, config).await?;
    Ok(Session {
        connection: Arc::new(connection),
        publish,
    })
}

async fn confirm_channel(connection: &Connection, config: &RabbitConfig) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| map(&format!("opening a channel to {}", config.address()), e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| map("enabling publisher confirms", e))?;
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
