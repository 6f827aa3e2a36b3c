//! The broker contract every backend implements.

use std::fmt;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::confirmation::Confirmation;
use crate::dead_letter::{DeadLetter, DeadLetterCursor, Replay};
use crate::delivery::Delivery;
use crate::envelope::Message;
use crate::error::{Error, ErrorKind, Result};
use crate::topology::{Finding, Topology};

/// A shared, dynamically chosen broker: what a program holds when it picks
/// its backend at run time from a URL.
pub type SharedBroker = Arc<dyn Broker>;

/// Options for [`Broker::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// At most this many deliveries are unsettled at once in this
    /// subscription (C5). Default 10.
    pub prefetch: NonZeroU16,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            prefetch: NonZeroU16::new(10).expect("10 is not zero"),
        }
    }
}

impl SubscribeOptions {
    /// Options with the given prefetch limit.
    pub fn prefetch(prefetch: NonZeroU16) -> Self {
        SubscribeOptions { prefetch }
    }
}

/// How many messages published for later (C24) a broker holds, not yet
/// due: what [`Broker::scheduled`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scheduled {
    /// Messages held.
    pub held: u64,
    /// Whether the broker holds them for every topic space together
    /// (RabbitMQ's ladder is shared by the virtual host), so that `held`
    /// counts those of all topic spaces, not only the one asked about.
    pub all_topic_spaces: bool,
}

impl Scheduled {
    /// `held` messages, of one topic space or (`all_topic_spaces`) of all.
    pub fn new(held: u64, all_topic_spaces: bool) -> Self {
        Scheduled {
            held,
            all_topic_spaces,
        }
    }
}

/// A message the broker holds for later (C24), as
/// [`Broker::list_scheduled`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduledMessage {
    /// Its id.
    pub id: String,
    /// Its routing key.
    pub routing_key: String,
    /// When it is due.
    pub due: SystemTime,
}

impl ScheduledMessage {
    /// A held message.
    pub fn new(id: impl Into<String>, routing_key: impl Into<String>, due: SystemTime) -> Self {
        ScheduledMessage {
            id: id.into(),
            routing_key: routing_key.into(),
            due,
        }
    }
}

/// What a broker can tell about one work queue; `None` where it cannot tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The work queue.
    pub queue: String,
    /// Messages waiting to be delivered.
    pub ready: Option<u64>,
    /// Messages delivered and not yet settled.
    pub in_flight: Option<u64>,
    /// Messages waiting out a retry delay in the broker.
    pub waiting_retries: Option<u64>,
    /// Records in the queue's DLQ.
    pub dead_letters: Option<u64>,
    /// Subscriptions consuming from the queue.
    pub consumers: Option<u64>,
}

impl QueueStats {
    /// Stats of `queue` with nothing known yet.
    pub fn new(queue: impl Into<String>) -> Self {
        QueueStats {
            queue: queue.into(),
            ..QueueStats::default()
        }
    }
}

/// What [`Broker::try_send`] did with a message.
#[derive(Debug)]
pub enum TrySend {
    /// The broker took it (or refused it) at once: what
    /// [`Broker::send`] would have returned.
    Done(Result<Confirmation>),
    /// The broker needs to wait for something: the message, untouched, to
    /// hand to [`Broker::send`].
    Later(Message),
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
    /// [`ErrorKind::InvalidName`] naming the culprit.
    async fn declare(&self, topology: &Topology) -> Result<()>;

    /// Deletes the queues of `topology`, their dead letters and, when no
    /// queue is left bound to it, the topic space. For tests and teardown.
    async fn delete(&self, topology: &Topology) -> Result<()>;

    /// Hands a message to the broker and returns before the broker has
    /// confirmed it; the [`Confirmation`] resolves once it has.
    ///
    /// # Behavior
    /// C1: the confirmation is `Ok` only once the broker has durably
    /// accepted the message; a message no queue would receive fails with
    /// [`ErrorKind::Unroutable`]. C2: payload, content type, headers, id and
    /// routing key arrive unchanged. Errors found before the message leaves
    /// (an invalid routing key or id, a payload over the limit, a closed
    /// connection) come back from `send` itself. Many sends can be in flight
    /// at once; a backend whose client bounds unconfirmed publishes waits
    /// here for room.
    ///
    /// This is the backend's primitive: it neither traces nor counts.
    /// Applications publish through a [`Publisher`](crate::Publisher) or
    /// [`publish`](Broker::publish), which do both.
    async fn send(&self, topic_space: &str, message: Message) -> Result<Confirmation>;

    /// Hands a message to the broker to deliver at `at` (at once if `at` has
    /// passed); the [`Confirmation`] resolves once the broker has stored it.
    ///
    /// # Behavior
    /// C24: confirmed like [`send`](Broker::send) (C1) once the broker holds
    /// the message, which then waits in the broker, not in this process:
    /// no process of ours needs to run for it to be delivered. At its time
    /// it is routed to the queues bound then, with the same id, headers and
    /// trace context (C2); never before `at`, and late by at most
    /// max(1 s, 1 %) under normal load. It holds no consumer's prefetch
    /// slot while it waits. A backend that cannot hold a message for later
    /// says so in [`Capabilities::scheduling`] and fails here with
    /// [`ErrorKind::Unsupported`]; the default does that.
    ///
    /// Like `send`, the primitive: [`Publisher::publish_at`](crate::Publisher::publish_at)
    /// traces and counts.
    async fn send_at(
        &self,
        topic_space: &str,
        message: Message,
        at: SystemTime,
    ) -> Result<Confirmation> {
        let _ = (topic_space, message, at);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot hold a message for later delivery",
                self.backend()
            ),
        ))
    }

    /// [`send`](Broker::send) without a future, for a broker that takes a
    /// message without waiting for anything (the in-process one): its
    /// answer, as `send` would give it; or the message back, untouched,
    /// when only `send` can take it. The default always hands it back.
    ///
    /// Publishers try this first, so such a broker costs no future per
    /// publish.
    fn try_send(&self, topic_space: &str, message: Message) -> TrySend {
        let _ = topic_space;
        TrySend::Later(message)
    }

    /// Publishes a message and returns once the broker has confirmed it.
    ///
    /// # Behavior
    /// C1 and C2, as [`send`](Broker::send) followed by awaiting its
    /// confirmation; and, unlike a bare `send`, the publish is traced (C18)
    /// and counted in the [`metrics`](crate::metrics), as through a
    /// [`Publisher`](crate::Publisher).
    async fn publish(&self, topic_space: &str, message: Message) -> Result<()> {
        let metrics = crate::metrics::PublisherMetrics::new(self.backend(), topic_space);
        crate::publisher::send_observed(self, topic_space, message, &metrics)
            .await?
            .await
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

    /// Walks the DLQ of a work queue from its oldest record (C10, C11).
    ///
    /// # Behavior
    /// Records met and neither replayed nor removed stay in the DLQ. A
    /// record the client cannot parse is returned with reason
    /// [`Unreadable`](crate::DeadLetterReason::Unreadable); the walk never
    /// hangs on one.
    async fn dead_letter_cursor(&self, queue: &str) -> Result<Box<dyn DeadLetterCursor>>;

    /// Lists up to `limit` dead letters of a work queue, oldest first,
    /// without removing them (C11).
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut cursor = self.dead_letter_cursor(queue).await?;
        let walked = async {
            let mut records = Vec::new();
            while records.len() < limit {
                match cursor.next().await {
                    Some(entry) => records.push(entry?.into_record()),
                    None => break,
                }
            }
            Ok(records)
        }
        .await;
        closing(cursor, walked).await
    }

    /// Replays dead letters back to their work queue with the same id and
    /// attempt 1; each is removed from the DLQ only after its republish is
    /// confirmed (C11). Returns how many were replayed; replaying an id that
    /// is not in the DLQ is [`ErrorKind::NotFound`].
    async fn replay(&self, queue: &str, which: Replay) -> Result<usize> {
        let mut cursor = self.dead_letter_cursor(queue).await?;
        let walked = async {
            let mut replayed = 0;
            while let Some(entry) = cursor.next().await {
                let entry = entry?;
                if !which.selects(&entry.record().envelope.id) {
                    continue;
                }
                entry.replay().await?;
                replayed += 1;
                if matches!(which, Replay::Id(_)) {
                    break;
                }
            }
            Ok(replayed)
        }
        .await;
        match (closing(cursor, walked).await?, which) {
            (0, Replay::Id(id)) => Err(Error::new(
                ErrorKind::NotFound,
                format!("no dead letter with id `{id}` in the DLQ of `{queue}`"),
            )),
            (n, _) => Ok(n),
        }
    }

    /// Removes every dead letter of a work queue (C11). Returns how many.
    async fn purge_dead_letters(&self, queue: &str) -> Result<usize> {
        let mut cursor = self.dead_letter_cursor(queue).await?;
        let walked = async {
            let mut purged = 0;
            while let Some(entry) = cursor.next().await {
                entry?.remove().await?;
                purged += 1;
            }
            Ok(purged)
        }
        .await;
        closing(cursor, walked).await
    }

    /// Compares what the broker has with what declaring `topology` would
    /// make, object by object, changing nothing: for an operator checking a
    /// broker before going live, or migrating queues made by other code.
    async fn inspect(&self, topology: &Topology) -> Result<Vec<Finding>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot inspect topic space `{}`",
                self.backend(),
                topology.topic_space
            ),
        ))
    }

    /// How many messages published for later to `topic_space` (C24) the
    /// broker holds, not yet due; `None` on a broker that cannot hold
    /// them, which the default says. They are not counted in any queue's
    /// [`QueueStats::ready`] before their time.
    async fn scheduled(&self, topic_space: &str) -> Result<Option<Scheduled>> {
        let _ = topic_space;
        Ok(None)
    }

    /// Up to `limit` of the messages published for later to `topic_space`
    /// that the broker holds, soonest first. A broker that cannot read them
    /// without taking them fails with [`ErrorKind::Unsupported`], which the
    /// default does.
    async fn list_scheduled(
        &self,
        topic_space: &str,
        limit: usize,
    ) -> Result<Vec<ScheduledMessage>> {
        let _ = (topic_space, limit);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot list the messages it holds for later",
                self.backend()
            ),
        ))
    }

    /// Cancels the message with this id published for later to
    /// `topic_space`: `false` if none is held (delivered already, or never
    /// scheduled). [`ErrorKind::Unsupported`] where the broker cannot, the
    /// default.
    async fn cancel_scheduled(&self, topic_space: &str, id: &str) -> Result<bool> {
        let _ = (topic_space, id);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot cancel a message it holds for later",
                self.backend()
            ),
        ))
    }

    /// The names of the work queues of `topic_space` the broker has,
    /// sorted. [`ErrorKind::Unsupported`] where the broker cannot list them
    /// (AMQP lists no queues), the default.
    async fn queues(&self, topic_space: &str) -> Result<Vec<String>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot list the queues of `{topic_space}`: name them",
                self.backend()
            ),
        ))
    }

    /// What the broker can tell about a work queue: ready, in flight,
    /// waiting retries, dead letters, consumers.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} backend cannot report statistics of `{queue}`",
                self.backend()
            ),
        ))
    }

    /// Why the broker refuses publishes now, if it does: RabbitMQ's
    /// `connection.blocked` reason while a memory or disk alarm lasts.
    /// Publishes meanwhile fail with [`ErrorKind::Blocked`]. The default
    /// never is.
    fn publishing_blocked(&self) -> Option<String> {
        None
    }

    /// A line saying which broker this is connected to, for logs and
    /// reports (`RabbitMQ 3.10.8 at 127.0.0.1:5672`).
    fn describe(&self) -> String {
        self.backend().to_owned()
    }

    /// Closes the connection. Unsettled deliveries are released for
    /// redelivery (C4).
    async fn close(&self) -> Result<()>;
}

/// An open subscription: a stream of deliveries from one work queue.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription or the broker is
    /// closed.
    ///
    /// An error says the subscription was interrupted. A transient one
    /// ([`Error::is_transient`]) means it resumes by itself on the next
    /// call (the connection is being repaired); any other means it cannot
    /// go on, and the caller should open a new one.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// A delivery already at hand (received and buffered, within the
    /// prefetch window), taken without waiting; `None` when there is none,
    /// or when only [`next`](Subscription::next) can tell what comes next
    /// (an interruption, the end, a message that needs the broker first).
    ///
    /// The consumer takes deliveries this way while it can and awaits
    /// `next` only when none is at hand, so a busy queue costs no future
    /// per delivery. The default never has one at hand.
    fn try_next(&mut self) -> Option<Delivery> {
        None
    }

    /// Stops deliveries before the subscription is dropped at a graceful
    /// shutdown, and releases at once what the subscription received but
    /// never handed out. Deliveries already handed out are settled as
    /// usual afterwards.
    ///
    /// A broker that sends messages ahead (a pull request still open on the
    /// server) implements it, so that a message sent towards a subscription
    /// that is going away is not left to the redelivery timeout. When this
    /// returns, the broker sends the subscription nothing more. The default
    /// does nothing: the subscription is just dropped.
    async fn close(&mut self) {}

    /// Waits, at a graceful shutdown once the handlers are done, until the
    /// acks they queued without waiting ([`Settle::try_ack`](crate::Settle::try_ack)) are on their
    /// way to the broker, so that a process that exits next does not leave
    /// them unsent and their messages delivered again. The default has
    /// nothing to wait for.
    async fn flush(&mut self) {}
}

/// Closes `cursor` after a walk over it, whatever the walk ended with; the
/// walk's error, if any, is the one returned.
async fn closing<T>(cursor: Box<dyn DeadLetterCursor>, walked: Result<T>) -> Result<T> {
    let closed = cursor.close().await;
    let value = walked?;
    closed?;
    Ok(value)
}
