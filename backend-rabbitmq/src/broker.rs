//! The RabbitMQ broker.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use ticketrail_core::{
    validate_name, Broker, Capabilities, Confirmation, DeadLetter, Error, Message, Replay, Result,
    SubscribeOptions, Subscription, Topology,
};

use crate::config::RabbitConfig;
use crate::dead_letters;
use crate::delivery::RabbitSubscription;
use crate::headers;
use crate::link::Link;
use crate::topology;

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
            .finish()
    }
}

impl RabbitBroker {
    /// Connects. An unreachable broker fails within the connect timeout,
    /// naming the host and port; wrong credentials fail with
    /// [`ErrorKind::Auth`](ticketrail_core::ErrorKind::Auth). Later breaks
    /// of the connection are repaired by reconnecting (C15).
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        Ok(RabbitBroker {
            link: Link::connect(config).await?,
        })
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn backend(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_reconnect(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<()> {
        topology::validate(topology)?;
        self.link.declare(topology).await
    }

    async fn delete(&self, topology: &Topology) -> Result<()> {
        let channel = self.link.channel().await?;
        for queue in &topology.queues {
            topology::delete_queue(&channel, &queue.name).await?;
        }
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

    async fn publish(&self, topic_space: &str, message: Message) -> Result<()> {
        self.send(topic_space, message).await?.await
    }

    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        message.check(topic_space, self.link.config.max_payload, "RabbitMQ")?;
        let properties = headers::properties(&message)?;
        let confirm = self
            .link
            .send(
                topic_space,
                &message.routing_key,
                &message.payload,
                properties,
            )
            .await?;
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
        let mut subscription = RabbitSubscription {
            link: Arc::clone(&self.link),
            queue: Arc::from(queue),
            prefetch: options.prefetch,
            consumer: None,
            acks: None,
        };
        subscription.open().await?;
        Ok(Box::new(subscription))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        dead_letters::list(&self.link, queue, limit).await
    }

    async fn replay(&self, queue: &str, which: Replay) -> Result<usize> {
        dead_letters::replay(&self.link, queue, &which).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        dead_letters::purge(&self.link, queue).await
    }

    async fn close(&self) -> Result<()> {
        self.link.close().await
    }
}
