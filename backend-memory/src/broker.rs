//! The in-process broker, as a [`Broker`].

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use ticketrail_core::{
    Broker, Capabilities, Confirmation, DeadLetterCursor, Finding, Message, QueueStats, Result,
    Scheduled, ScheduledMessage, SubscribeOptions, Subscription, Topology, TrySend,
};

use crate::config::MemoryConfig;
use crate::connection::{Connection, Server};
use crate::dead_letters::MemoryCursor;
use crate::headers::RawMessage;
use crate::subscription::MemorySubscription;
use crate::{publish, topology};

/// An in-process broker. Clones share one connection; [`connect`](MemoryBroker::connect)
/// opens another connection to the same broker, which can be closed on its own.
#[derive(Clone)]
pub struct MemoryBroker {
    connection: Arc<Connection>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.connection.server.config)
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
            connection: Connection::open(Server::new(config)),
        }
    }

    /// Another connection to the same broker.
    pub fn connect(&self) -> MemoryBroker {
        MemoryBroker {
            connection: Connection::open(Arc::clone(&self.connection.server)),
        }
    }

    /// How many messages published for later to `topic_space` (C24) the
    /// broker still holds.
    pub fn scheduled(&self, topic_space: &str) -> usize {
        self.connection.server.schedule.count_for(topic_space)
    }

    /// Publishes as a plain client with no ticketrail metadata would (C17),
    /// or a careless or hostile one writing any headers: the message is
    /// read as every backend reads a delivery, bookkeeping it claims
    /// bounded. Unroutable messages are refused as by [`Broker::publish`].
    pub async fn publish_raw(&self, topic_space: &str, message: RawMessage) -> Result<()> {
        publish::send_raw(&self.connection, topic_space, message)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn backend(&self) -> &'static str {
        crate::BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_scheduling(true)
    }

    fn describe(&self) -> String {
        "the in-process memory broker".to_owned()
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        topology::declare(&self.connection, topology)
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        topology::delete(&self.connection, topology)
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        topology::inspect(&self.connection, topology)
    }

    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        publish::send(&self.connection, topic_space, message)
    }

    async fn send_at(
        &self,
        topic_space: &str,
        message: Message,
        at: SystemTime,
    ) -> Result<Confirmation> {
        publish::send_at(&self.connection, topic_space, message, at)
    }

    fn try_send(&self, topic_space: &str, message: Message) -> TrySend {
        TrySend::Done(publish::send(&self.connection, topic_space, message))
    }

    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let queue = self.connection.queue(queue)?;
        Ok(Box::new(MemorySubscription::new(
            queue,
            Arc::clone(&self.connection),
            usize::from(options.prefetch.get()),
        )))
    }

    async fn dead_letter_cursor(&self, queue: &str) -> Result<Box<dyn DeadLetterCursor>> {
        Ok(Box::new(MemoryCursor::new(
            self.connection.queue(queue)?,
            Arc::clone(&self.connection),
        )))
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        Ok(self.connection.queue(queue)?.purge_dead_letters())
    }

    async fn scheduled(&self, topic_space: &str) -> Result<Option<Scheduled>> {
        self.connection.ensure_open()?;
        Ok(Some(Scheduled::new(
            self.connection.server.schedule.count_for(topic_space) as u64,
            false,
        )))
    }

    async fn list_scheduled(
        &self,
        topic_space: &str,
        limit: usize,
    ) -> Result<Vec<ScheduledMessage>> {
        self.connection.ensure_open()?;
        Ok(self.connection.server.schedule.list(topic_space, limit))
    }

    async fn cancel_scheduled(&self, topic_space: &str, id: &str) -> Result<bool> {
        self.connection.ensure_open()?;
        Ok(self.connection.server.schedule.cancel(topic_space, id))
    }

    async fn queues(&self, topic_space: &str) -> Result<Vec<String>> {
        self.connection.ensure_open()?;
        let registry = self.connection.registry();
        let mut names: Vec<String> = (registry.spaces.get(topic_space))
            .into_iter()
            .flatten()
            .map(|binding| binding.queue.name.to_string())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        Ok(self.connection.queue(queue)?.stats())
    }

    async fn close(&self) -> Result<()> {
        self.connection.close();
        Ok(())
    }
}
