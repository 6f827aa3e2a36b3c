//! The RabbitMQ broker.

use std::fmt;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ticketrail_core::{
    validate_name, Broker, Capabilities, Confirmation, DeadLetterCursor, ErrorKind, Finding,
    Message, QueueStats, Result, Scheduled, ScheduledMessage, SubscribeOptions, Subscription,
    Topology,
};

use crate::config::RabbitConfig;
use crate::connection::{open_raw, Link};
use crate::dead_letters::RabbitCursor;
use crate::error::map;
use crate::subscription::RabbitSubscription;
use crate::{ladder, publish, schedule, topology};

/// A connection to RabbitMQ implementing the ticketrail contract.
///
/// ```no_run
/// # async fn demo() -> ticketrail_core::Result<()> {
/// use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};
///
/// let broker = RabbitBroker::connect(RabbitConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitBroker {
    link: Arc<Link>,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.link.config)
            .field("server", &self.link.server)
            .finish()
    }
}

impl RabbitBroker {
    /// Connects. An unreachable broker fails within the connect timeout,
    /// naming the host and port; wrong credentials fail with
    /// [`ErrorKind::Auth`]. Later breaks of the connection are repaired by
    /// reconnecting, to another node of the list if need be (C15).
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        let link = Link::connect(config).await?;
        crate::versions::log_server(&link.server, &link.config.address());
        Ok(RabbitBroker { link })
    }

    /// The broker's product and version, as it announced them
    /// (`RabbitMQ 3.10.8`).
    pub fn server(&self) -> &str {
        &self.link.server
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn backend(&self) -> &'static str {
        crate::BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .with_reconnect(true)
            .with_scheduling(true)
    }

    fn describe(&self) -> String {
        format!("{} at {}", self.link.server, self.link.config.address())
    }

    fn publishing_blocked(&self) -> Option<String> {
        self.link.blocked_reason()
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        topology::validate(topology)?;
        self.link.declare(topology).await
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        let tiers = {
            // Asked for afresh: a queue's wait queues must all go.
            let mut raw = open_raw(&self.link.config).await?;
            let tiers = self.link.tiers_in_use(&mut raw, Duration::ZERO).await;
            raw.close().await;
            tiers?
        };
        let queues: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
        let session = self.link.session().await?;
        topology::delete_queues(&session.connection, &queues, &tiers).await?;
        let channel = self.link.channel().await?;
        let deleted = channel
            .exchange_delete(
                topology.topic_space.as_str().into(),
                lapin::options::ExchangeDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            )
            .await;
        if let Err(e) = deleted {
            // Still bound to queues of another topology: keep it.
            tracing::debug!(exchange = %topology.topic_space, error = %e, "exchange kept");
        } else {
            let _ = channel.close(200, "deleted".into()).await;
        }
        self.link.forget(topology);
        Ok(())
    }

    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        let session = self.link.session().await?;
        topology::inspect(&session.connection, topology).await
    }

    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        publish::send(&self.link, topic_space, message).await
    }

    async fn send_at(
        &self,
        topic_space: &str,
        message: Message,
        at: SystemTime,
    ) -> Result<Confirmation> {
        schedule::send_at(&self.link, topic_space, message, at).await
    }

    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        validate_name("queue", queue)?;
        let prefetch: NonZeroU16 = options.prefetch;
        let subscription =
            RabbitSubscription::open(Arc::clone(&self.link), queue, prefetch.get()).await?;
        Ok(Box::new(subscription))
    }

    async fn dead_letter_cursor(&self, queue: &str) -> Result<Box<dyn DeadLetterCursor>> {
        validate_name("queue", queue)?;
        Ok(Box::new(
            RabbitCursor::open(Arc::clone(&self.link), queue).await?,
        ))
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        let dlq = topology::dlq_name(queue);
        let channel = self.link.channel().await?;
        let purged = channel
            .queue_purge(
                dlq.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await
            .map_err(|e| map(&format!("purging `{dlq}`"), e));
        let _ = channel.close(200, "purged".into()).await;
        Ok(purged? as usize)
    }

    /// Ready messages and consumers of the work queue, records of its DLQ,
    /// and messages in its wait queues; RabbitMQ does not tell a client how
    /// many deliveries are unacknowledged (its management plugin does).
    async fn scheduled(&self, topic_space: &str) -> Result<Option<Scheduled>> {
        validate_name("topic space", topic_space)?;
        let mut raw = open_raw(&self.link.config).await?;
        let mut held = 0u64;
        for level in ladder::ladder() {
            match raw.queue_counts(&level).await {
                Ok((n, _)) => held += u64::from(n),
                // Not declared yet: nothing was ever scheduled here.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        raw.close().await;
        Ok(Some(Scheduled::new(held, true)))
    }

    async fn list_scheduled(
        &self,
        topic_space: &str,
        limit: usize,
    ) -> Result<Vec<ScheduledMessage>> {
        let _ = (topic_space, limit);
        Err(schedule::not_readable("list"))
    }

    async fn cancel_scheduled(&self, topic_space: &str, id: &str) -> Result<bool> {
        let _ = (topic_space, id);
        Err(schedule::not_readable("cancel"))
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        validate_name("queue", queue)?;
        let mut raw = open_raw(&self.link.config).await?;
        let (ready, consumers) = raw.queue_counts(queue).await?;
        let (dead, _) = raw.queue_counts(&topology::dlq_name(queue)).await?;
        // Asked for once for many queues' stats in a row.
        let tiers = self
            .link
            .tiers_in_use(&mut raw, Duration::from_secs(5))
            .await?;
        let waits: Vec<String> = topology::wait_queue_names(queue, &tiers).collect();
        let waiting = raw
            .queue_counts_many(&waits)
            .await?
            .into_iter()
            .flatten()
            .map(|(n, _)| u64::from(n))
            .sum();
        raw.close().await;
        let mut stats = QueueStats::new(queue);
        stats.ready = Some(u64::from(ready));
        stats.consumers = Some(u64::from(consumers));
        stats.dead_letters = Some(u64::from(dead));
        stats.waiting_retries = Some(waiting);
        Ok(stats)
    }

    async fn close(&self) -> Result<()> {
        self.link.close().await
    }
}
