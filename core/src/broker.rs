//! The broker contract every backend implements.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::confirmation::Confirmation;
use crate::dead_letter::{DeadLetter, Replay};
use crate::delivery::Delivery;
use crate::envelope::Message;
use crate::error::Result;
use crate::topology::Topology;

/// A shared, dynamically chosen broker: what a program holds when it picks
/// its backend at run time from a URL.
pub type SharedBroker = Arc<dyn Broker>;

/// Options for [`Broker::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// At most this many deliveries are unsettled at once in this
    /// subscription (C5). Default 10.
    pub prefetch: u16,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions { prefetch: 10 }
    }
}

impl SubscribeOptions {
    /// Options with the given prefetch limit.
    pub fn prefetch(prefetch: u16) -> Self {
        SubscribeOptions { prefetch }
    }
}

/// A message broker: declares topology, publishes, subscribes, and gives
/// access to dead letters. Every method documents the rule of DESIGN.md it
/// honours; the conformance suite proves it.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// A short name of the backend (`memory`, `rabbitmq`, `nats`).
    fn backend(&self) -> &'static str;

    /// The optional rules this backend honours.
    fn capabilities(&self) -> Capabilities;

    /// Declares a topic space and its queues, with their retry and
    /// dead-letter plumbing.
    ///
    /// # Behavior
    /// Idempotent. Bindings follow C16. Invalid names fail with
    /// [`ErrorKind::InvalidName`](crate::ErrorKind::InvalidName) naming the culprit.
    async fn declare(&self, topology: &Topology) -> Result<()>;

    /// Deletes the queues of `topology`, their dead letters and, when no
    /// queue is left bound to it, the topic space. For tests and teardown.
    async fn delete(&self, topology: &Topology) -> Result<()>;

    /// Publishes a message to a topic space.
    ///
    /// # Behavior
    /// C1: returns `Ok` only after the broker has durably accepted the
    /// message; a message no queue would receive fails with
    /// [`ErrorKind::Unroutable`](crate::ErrorKind::Unroutable). C2: payload,
    /// content type, headers, id and routing key arrive unchanged.
    async fn publish(&self, topic_space: &str, message: Message) -> Result<()>;

    /// Hands a message to the broker and returns before the broker has
    /// confirmed it; the [`Confirmation`] resolves as
    /// [`publish`](Broker::publish) would have.
    ///
    /// # Behavior
    /// C1 holds for the confirmation: it is `Ok` only once the broker has
    /// durably accepted the message. Errors found before the message leaves
    /// (an invalid routing key, a payload over the limit, a closed
    /// connection) come back from `send` itself. Many sends can be in flight
    /// at once; a backend whose client bounds unconfirmed publishes waits
    /// here for room. By default this publishes and returns a confirmation
    /// that is already resolved.
    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation> {
        let id = message.id.clone();
        self.publish(topic_space, message).await?;
        Ok(Confirmation::confirmed(id))
    }

    /// Opens a subscription on a work queue.
    ///
    /// # Behavior
    /// C4: deliveries left unsettled when the subscription dies are
    /// delivered again. C5: at most `options.prefetch` deliveries are
    /// unsettled at once. C6: subscriptions on one queue share its messages.
    async fn subscribe(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>>;

    /// Lists up to `limit` dead letters of a work queue without removing them (C11).
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Replays dead letters back to their work queue with the same id and
    /// attempt 1; each is removed from the DLQ only after its republish is
    /// confirmed (C11). Returns how many were replayed.
    async fn replay(&self, queue: &str, which: Replay) -> Result<usize>;

    /// Removes every dead letter of a work queue (C11). Returns how many.
    async fn purge_dead_letters(&self, queue: &str) -> Result<usize>;

    /// Closes the connection. Unsettled deliveries are released for
    /// redelivery (C4).
    async fn close(&self) -> Result<()>;
}

/// An open subscription: a stream of deliveries from one work queue.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription or the broker is
    /// closed. A transient error (a reconnect in progress) may be followed by
    /// more deliveries.
    async fn next(&mut self) -> Option<Result<Delivery>>;
}
