//! The in-process broker.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::Notify;

use ticketrail_core::{
    Broker, Capabilities, DeadLetter, Error, ErrorKind, Message, Replay, Result, SubscribeOptions,
    Subscription, Topology,
};

use crate::config::MemoryConfig;
use crate::delivery::MemorySubscription;
use crate::topology::{Binding, Queue, Registry};

/// An in-process broker. Clones share one connection; [`connect`](MemoryBroker::connect)
/// opens another connection to the same broker, which can be closed on its own.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    connection: Arc<Connection>,
}

struct Shared {
    config: MemoryConfig,
    registry: Mutex<Registry>,
}

/// One connection: closing it ends its subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Connection {
    closed_flag: AtomicBool,
    pub(crate) closed: Notify,
}

impl Connection {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed_flag.load(Ordering::Acquire)
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.shared.config)
            .field("closed", &self.connection.is_closed())
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A new, empty broker with default settings.
    pub fn new() -> Self {
        MemoryBroker::with_config(MemoryConfig::default())
    }

    /// A new, empty broker.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                config,
                registry: Mutex::new(Registry::default()),
            }),
            connection: Arc::new(Connection::default()),
        }
    }

    /// Another connection to the same broker.
    pub fn connect(&self) -> MemoryBroker {
        MemoryBroker {
            shared: Arc::clone(&self.shared),
            connection: Arc::new(Connection::default()),
        }
    }

    /// Publishes as a plain client with no ticketrail metadata would (C17):
    /// no headers, no content type, and the given broker message id, if any.
    pub async fn publish_foreign(
        &self,
        topic_space: &str,
        routing_key: &str,
        payload: Vec<u8>,
        message_id: Option<String>,
    ) -> Result<()> {
        let mut message = Message::new(routing_key, payload);
        if let Some(id) = message_id {
            message.id = id;
        }
        self.publish(topic_space, message).await
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn ensure_open(&self) -> Result<()> {
        if self.connection.is_closed() {
            return Err(Error::closed("the memory broker connection is closed"));
        }
        Ok(())
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>> {
        self.ensure_open()?;
        self.registry().queues.get(name).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("queue `{name}` is not declared"),
            )
        })
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        self.ensure_open()?;
        topology.validate()?;
        let mut registry = self.registry();
        let mut bindings = registry
            .spaces
            .get(&topology.topic_space)
            .cloned()
            .unwrap_or_default();
        for spec in &topology.queues {
            let queue = match registry.queues.get(&spec.name) {
                Some(queue) => {
                    queue.set_delivery_limit(spec.delivery_limit);
                    Arc::clone(queue)
                }
                None => {
                    let queue = Arc::new(Queue::new(&spec.name, spec.delivery_limit));
                    registry
                        .queues
                        .insert(spec.name.clone(), Arc::clone(&queue));
                    queue
                }
            };
            for pattern in &spec.bindings {
                let bound = bindings
                    .iter()
                    .any(|b| &b.pattern == pattern && Arc::ptr_eq(&b.queue, &queue));
                if !bound {
                    bindings.push(Binding {
                        pattern: pattern.clone(),
                        queue: Arc::clone(&queue),
                    });
                }
            }
        }
        registry
            .spaces
            .insert(topology.topic_space.clone(), bindings);
        Ok(())
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        self.ensure_open()?;
        let mut registry = self.registry();
        for spec in &topology.queues {
            if let Some(queue) = registry.queues.remove(&spec.name) {
                queue.delete();
                for bindings in registry.spaces.values_mut() {
                    bindings.retain(|b| !Arc::ptr_eq(&b.queue, &queue));
                }
            }
        }
        if registry
            .spaces
            .get(&topology.topic_space)
            .is_some_and(Vec::is_empty)
        {
            registry.spaces.remove(&topology.topic_space);
        }
        Ok(())
    }

    async fn publish(&self, topic_space: &str, message: Message) -> Result<()> {
        self.ensure_open()?;
        message.check(
            topic_space,
            self.shared.config.max_payload,
            "the memory broker",
        )?;
        let envelope = Arc::new(message.into_envelope(SystemTime::now()));
        match self.registry().route(topic_space, &envelope) {
            Some(0) => Err(Error::new(
                ErrorKind::Unroutable,
                format!(
                    "no queue of `{topic_space}` is bound to a pattern matching `{}`",
                    envelope.routing_key
                ),
            )),
            Some(_) => Ok(()),
            None => Err(Error::new(
                ErrorKind::Unroutable,
                format!("topic space `{topic_space}` is not declared"),
            )),
        }
    }

    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        if options.prefetch == 0 {
            return Err(Error::config(format!(
                "subscription to `{queue}`: prefetch must be at least 1"
            )));
        }
        let queue = self.queue(queue)?;
        Ok(Box::new(MemorySubscription {
            queue,
            connection: Arc::clone(&self.connection),
            prefetch: usize::from(options.prefetch),
            unsettled: Arc::new(AtomicUsize::new(0)),
        }))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        Ok(self.queue(queue)?.dead_letters(limit))
    }

    async fn replay(&self, queue: &str, which: Replay) -> Result<usize> {
        let replayed = self
            .queue(queue)?
            .replay(|record| which.selects(&record.envelope.id));
        if replayed == 0 {
            if let Replay::Id(id) = &which {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no dead letter with id `{id}` in the DLQ of `{queue}`"),
                ));
            }
        }
        Ok(replayed)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        Ok(self.queue(queue)?.purge_dead_letters())
    }

    async fn close(&self) -> Result<()> {
        self.connection.closed_flag.store(true, Ordering::Release);
        self.connection.closed.notify_waiters();
        Ok(())
    }
}
