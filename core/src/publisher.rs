//! Typed publishing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::broker::{Broker, SharedBroker, TrySend};
use crate::codec::{Codec, Json};
use crate::confirmation::Confirmation;
use crate::envelope::Message;
use crate::error::Result;
use crate::metrics::PublisherMetrics;
use crate::trace::PublishSpan;

/// Publishes typed messages to one topic space. Cheap to clone; clones share
/// the broker connection, so many publishes can be in flight at once.
///
/// ```no_run
/// # async fn demo(broker: ticketrail_core::SharedBroker) -> ticketrail_core::Result<()> {
/// use ticketrail_core::Publisher;
///
/// let publisher = Publisher::new(broker, "app.events");
/// let id = publisher.publish("user.welcome", &serde_json::json!({"to": "ada@example.com"})).await?;
/// println!("published {id}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher<C: Codec = Json> {
    broker: SharedBroker,
    topic_space: Arc<str>,
    codec: C,
    metrics: PublisherMetrics,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("broker", &self.broker)
            .field("topic_space", &self.topic_space)
            .finish()
    }
}

impl Publisher<Json> {
    /// A JSON publisher to `topic_space`.
    pub fn new(broker: SharedBroker, topic_space: impl Into<String>) -> Self {
        let topic_space: String = topic_space.into();
        let metrics = PublisherMetrics::new(broker.backend(), &topic_space);
        Publisher {
            broker,
            topic_space: Arc::from(topic_space),
            codec: Json,
            metrics,
        }
    }
}

impl<C: Codec> Publisher<C> {
    /// Uses another codec.
    pub fn with_codec<C2: Codec>(self, codec: C2) -> Publisher<C2> {
        Publisher {
            broker: self.broker,
            topic_space: self.topic_space,
            codec,
            metrics: self.metrics,
        }
    }

    /// Encodes `message` and publishes it with a fresh id; returns the id
    /// once the broker has confirmed it (C1). The broker checks the routing key.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        routing_key: &str,
        message: &T,
    ) -> Result<String> {
        let message = self.encode(routing_key, message)?;
        self.send_message(message).await?.id_once_confirmed().await
    }

    /// Publishes a prepared message (C1).
    pub async fn publish_message(&self, message: Message) -> Result<()> {
        self.send_message(message).await?.await
    }

    /// Encodes `message` and hands it to the broker with a fresh id; returns
    /// without waiting for the broker's confirm. The message is published
    /// once the returned [`Confirmation`] resolves to `Ok` (C1).
    ///
    /// For publishing many messages fast: keep a window of confirmations
    /// and await the oldest, as one would with the raw clients.
    ///
    /// ```no_run
    /// # async fn demo(publisher: ticketrail_core::Publisher) -> ticketrail_core::Result<()> {
    /// use std::collections::VecDeque;
    ///
    /// let mut in_flight = VecDeque::new();
    /// for n in 0..10_000 {
    ///     if in_flight.len() == 256 {
    ///         let oldest: ticketrail_core::Confirmation = in_flight.pop_front().unwrap();
    ///         oldest.await?;
    ///     }
    ///     in_flight.push_back(publisher.send("user.welcome", &serde_json::json!({ "n": n })).await?);
    /// }
    /// for confirmation in in_flight {
    ///     confirmation.await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        routing_key: &str,
        message: &T,
    ) -> Result<Confirmation> {
        let message = self.encode(routing_key, message)?;
        self.send_message(message).await
    }

    /// Encodes `message` and publishes it with a fresh id, to be delivered
    /// at `at`; returns the id once the broker holds it (C1, C24). The
    /// message waits in the broker, so this process may exit; at its time
    /// it goes to the queues bound then. A time already passed delivers at
    /// once.
    ///
    /// ```no_run
    /// # async fn demo(publisher: ticketrail_core::Publisher) -> ticketrail_core::Result<()> {
    /// use std::time::{Duration, SystemTime};
    ///
    /// let tomorrow = SystemTime::now() + Duration::from_secs(24 * 3600);
    /// publisher.publish_at(tomorrow, "trial.expire", &serde_json::json!({"user": 7})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_at<T: Serialize + ?Sized>(
        &self,
        at: SystemTime,
        routing_key: &str,
        message: &T,
    ) -> Result<String> {
        let message = self.encode(routing_key, message)?;
        self.send_message_at(message, at)
            .await?
            .id_once_confirmed()
            .await
    }

    /// [`publish_at`](Publisher::publish_at) `delay` from now.
    pub async fn publish_after<T: Serialize + ?Sized>(
        &self,
        delay: Duration,
        routing_key: &str,
        message: &T,
    ) -> Result<String> {
        self.publish_at(SystemTime::now() + delay, routing_key, message)
            .await
    }

    /// Hands a prepared message to the broker to deliver at `at`, without
    /// waiting for the broker's confirm; see [`Publisher::publish_at`].
    pub async fn send_message_at(&self, message: Message, at: SystemTime) -> Result<Confirmation> {
        send_observed_at(
            &*self.broker,
            &self.topic_space,
            message,
            Some(at),
            &self.metrics,
        )
        .await
    }

    /// `message` encoded, with a fresh id and the codec's content type.
    fn encode<T: Serialize + ?Sized>(&self, routing_key: &str, message: &T) -> Result<Message> {
        let payload = self.codec.encode(message)?;
        Ok(Message::new(routing_key, payload).content_type(self.codec.content_type()))
    }

    /// Hands a prepared message to the broker; see [`Publisher::send`].
    pub async fn send_message(&self, message: Message) -> Result<Confirmation> {
        send_observed(&*self.broker, &self.topic_space, message, &self.metrics).await
    }
}

/// Hands `message` to `broker` inside a `publish` span whose context goes
/// into the message's headers (C18), and counts it in `metrics` once the
/// broker answers.
pub(crate) async fn send_observed(
    broker: &(impl Broker + ?Sized),
    topic_space: &str,
    message: Message,
    metrics: &PublisherMetrics,
) -> Result<Confirmation> {
    send_observed_at(broker, topic_space, message, None, metrics).await
}

/// [`send_observed`], held in the broker until `at` when there is one.
async fn send_observed_at(
    broker: &(impl Broker + ?Sized),
    topic_space: &str,
    mut message: Message,
    at: Option<SystemTime>,
    metrics: &PublisherMetrics,
) -> Result<Confirmation> {
    let span = PublishSpan::start(
        broker.backend(),
        topic_space,
        &message.id,
        &message.routing_key,
        &mut message.headers,
    );
    let sent = match at {
        Some(at) => broker.send_at(topic_space, message, at).await,
        None => match broker.try_send(topic_space, message) {
            TrySend::Done(sent) => sent,
            TrySend::Later(message) => broker.send(topic_space, message).await,
        },
    };
    match sent {
        Ok(confirmation) => Ok(confirmation.observed(metrics.clone(), span)),
        Err(e) => {
            metrics.sent(Some(e.kind()));
            span.end(Some(&e));
            Err(e)
        }
    }
}
