//! Subscriptions on queues (pull consumers) and how deliveries are settled.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use ticketrail_core::{
    DeadLetter, DeadLetterReason, Delivery, Envelope, Error, ErrorKind, Result, RetryRequest,
    Settle, Subscription,
};

use futures::stream::SelectAll;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::broker::{Inner, QueueInfo};
use crate::headers;
use crate::topology;

/// The delay of a nak meant as "deliver again now". nats-server 2.9 does not
/// count a redelivery after a plain `-NAK` (the next delivery says
/// `delivered: 1` again), which would let a crash loop go on for ever (C13);
/// a nak with a delay is counted.
const IMMEDIATE: Duration = Duration::from_millis(1);

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// A subscription: never has more messages requested or unsettled than it
/// has prefetch slots (C5), and asks for more as slots free up, before the
/// last request has run out, so the pipe stays full. Competing
/// subscriptions share the queue's durable consumer (C6).
pub(crate) struct NatsSubscription {
    inner: Arc<Inner>,
    /// Shared with every delivery's settlement: one reference count per
    /// message, not a copy of the names and bindings.
    info: Arc<QueueInfo>,
    consumer: PullConsumer,
    slots: Arc<Semaphore>,
    prefetch: usize,
    /// Woken when a delivery is settled and its slot freed.
    freed: Arc<Notify>,
    /// The deliveries being handled, kept alive on the server.
    in_hand: Arc<InHand>,
    /// The open pull requests, each ending with a note of how many it had
    /// asked for and not received.
    pulls: SelectAll<PullStream>,
    /// Messages asked for and not yet received, over all open pulls.
    requested: usize,
    /// How many pulls are open.
    open_pulls: usize,
    /// Whether the consumer's filter is exactly the queue's one binding; if
    /// not, the subscription checks each routing key against the bindings.
    exact_filter: bool,
}

/// The deliveries of a subscription still being handled. The server would
/// deliver one again after `ack_wait`, while its handler still runs; every
/// half `ack_wait` each one gets a `+WPI` (work in progress) instead. This
/// goes on while any delivery is in hand, also after the subscription is
/// dropped (a graceful shutdown lets handlers finish).
#[derive(Default)]
pub(crate) struct InHand {
    replies: std::sync::Mutex<std::collections::HashMap<u64, async_nats::Subject>>,
}

impl InHand {
    fn keep_alive(self: &Arc<Self>, inner: &Arc<Inner>) {
        let in_hand = Arc::downgrade(self);
        let client = inner.client.clone();
        let every = (inner.config.ack_wait / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(in_hand) = in_hand.upgrade() else {
                    return;
                };
                let replies: Vec<async_nats::Subject> = in_hand
                    .replies
                    .lock()
                    .expect("not poisoned")
                    .values()
                    .cloned()
                    .collect();
                drop(in_hand);
                for reply in replies {
                    let _ = client.publish(reply, AckKind::Progress.into()).await;
                }
            }
        });
    }

    fn insert(&self, sequence: u64, reply: async_nats::Subject) {
        self.replies
            .lock()
            .expect("not poisoned")
            .insert(sequence, reply);
    }

    fn remove(&self, sequence: u64) {
        self.replies.lock().expect("not poisoned").remove(&sequence);
    }
}

/// An open pull request, as a stream.
type PullStream = std::pin::Pin<Box<dyn futures::Stream<Item = Pulled> + Send + Sync>>;

/// What an open pull request yields. Moved once per message; boxing the
/// large variant would cost an allocation per message instead.
#[allow(clippy::large_enum_variant)]
enum Pulled {
    Message(Result<jetstream::Message, String>),
    /// The request ended (filled or expired) with this many not received.
    Ended(Arc<AtomicUsize>),
}

/// At most this many pull requests are open at once.
const MAX_OPEN_PULLS: usize = 2;

impl NatsSubscription {
    pub(crate) fn new(
        inner: Arc<Inner>,
        info: QueueInfo,
        consumer: PullConsumer,
        slots: Arc<Semaphore>,
    ) -> Self {
        let exact_filter = matches!(info.bindings.as_slice(), [only] if !only.contains('#'));
        let prefetch = slots.available_permits();
        let in_hand = Arc::new(InHand::default());
        if inner.progress_acks {
            in_hand.keep_alive(&inner);
        }
        NatsSubscription {
            in_hand,
            inner,
            info: Arc::new(info),
            consumer,
            slots,
            prefetch,
            freed: Arc::new(Notify::new()),
            pulls: SelectAll::new(),
            requested: 0,
            open_pulls: 0,
            exact_filter,
        }
    }

    /// How many messages another pull request should ask for, if one is
    /// worth opening: the first one as soon as any slot is free, a second
    /// one once half of them are.
    fn pull_wanted(&self) -> Option<usize> {
        let free = self
            .slots
            .available_permits()
            .saturating_sub(self.requested);
        let worth_it = match self.open_pulls {
            0 => free > 0,
            n => n < MAX_OPEN_PULLS && free * 2 >= self.prefetch,
        };
        worth_it.then_some(free)
    }

    /// Opens a pull request for `free` messages.
    async fn open_pull(&mut self, free: usize) -> Result<()> {
        // Pulls end before `ack_wait` does, so a message released by a dead
        // consumer never meets that consumer's pull requests on the server.
        let expires = PULL_EXPIRES
            .min(self.inner.config.ack_wait / 2)
            .max(Duration::from_millis(100));
        let batch = self
            .consumer
            .batch()
            .max_messages(free)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("pulling from `{}`", self.info.name),
                )
                .with_source(e)
            })?;
        let outstanding = Arc::new(AtomicUsize::new(free));
        let counted = Arc::clone(&outstanding);
        let messages = batch.map(move |pulled| match pulled {
            Ok(message) => {
                counted.fetch_sub(1, Ordering::AcqRel);
                Pulled::Message(Ok(message))
            }
            Err(e) => Pulled::Message(Err(e.to_string())),
        });
        let ended = futures::stream::once(async move { Pulled::Ended(outstanding) });
        self.pulls.push(Box::pin(messages.chain(ended)));
        self.requested += free;
        self.open_pulls += 1;
        Ok(())
    }

    /// Turns a pulled message into a delivery, or says why it is settled
    /// here instead: it is not this queue's to handle (another queue's
    /// replay, a subject outside the bindings), or it has reached the
    /// server's delivery limit.
    fn accept(&self, message: jetstream::Message, slot: OwnedSemaphorePermit) -> Accepted {
        let (stream_sequence, delivered, stored_at) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.delivered,
                SystemTime::from(info.published),
            ),
            Err(e) => {
                tracing::warn!(queue = %self.info.name, error = %e, "message without JetStream metadata; skipped");
                return Accepted::Skipped;
            }
        };
        let routing_key = message
            .subject
            .as_str()
            .strip_prefix(self.info.space.as_str())
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(message.subject.as_str())
            .to_owned();
        let headers = message.headers.as_ref();
        let addressed_elsewhere = headers
            .and_then(|h| h.get_last(headers::QUEUE))
            .is_some_and(|q| q.as_str() != &*self.info.name);
        let unbound = !self.exact_filter && !topology::bound(&self.info.bindings, &routing_key);
        if addressed_elsewhere || unbound {
            return Accepted::SettleHere(Rare::NotOurs(Box::new(message)));
        }
        let attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
        let envelope = headers::incoming(
            headers,
            &routing_key,
            message.payload.clone(),
            stored_at,
            attempt,
        );
        let first_failed_at = if delivered > 1 {
            self.inner.first_failure(&self.info.stream, stream_sequence)
        } else {
            None
        };
        if let Some(reply) = message.reply.clone().filter(|_| self.inner.progress_acks) {
            self.in_hand.insert(stream_sequence, reply);
        }
        let settle = NatsSettle {
            in_hand: Arc::clone(&self.in_hand),
            inner: Arc::clone(&self.inner),
            info: Arc::clone(&self.info),
            sequence: stream_sequence,
            redelivered: delivered > 1,
            message: Some(message),
            slot: Some(slot),
            freed: Arc::clone(&self.freed),
        };
        let delivery = Delivery::new(
            Arc::clone(&self.info.name),
            envelope,
            first_failed_at,
            Box::new(settle),
        );
        let max_deliver = self.consumer.cached_info().config.max_deliver;
        if max_deliver > 0 && delivered >= max_deliver {
            return Accepted::SettleHere(Rare::AtLimit(delivery, delivered));
        }
        Accepted::Deliver(delivery)
    }

    /// `accept` once a prefetch slot is free; `None` if the subscription's
    /// slots are gone.
    async fn accept_when_free(&self, message: jetstream::Message) -> Option<Accepted> {
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        Some(self.accept(message, slot))
    }

    /// Settles here what `accept` did not hand out.
    async fn settle_here(&self, rare: Rare) {
        match rare {
            Rare::NotOurs(message) => {
                if let Err(e) = message.ack().await {
                    tracing::warn!(queue = %self.info.name, error = %e, "could not pass over a message for another queue");
                }
            }
            Rare::AtLimit(mut delivery, delivered) => {
                // The server delivers this message no more after this:
                // dead-letter it here rather than let it sit unseen (C13).
                let why = format!(
                    "delivered {delivered} times, the most the server allows for this queue"
                );
                if let Err(e) = delivery
                    .dead_letter(DeadLetterReason::DeliveryLimit, &why)
                    .await
                {
                    tracing::error!(queue = %self.info.name, error = %e, "dead-lettering at the delivery limit failed");
                }
            }
        }
    }
}

/// What becomes of a pulled message.
enum Accepted {
    /// Handed to the consumer.
    Deliver(Delivery),
    /// Settled by the subscription itself.
    SettleHere(Rare),
    /// Without JetStream metadata: left alone.
    Skipped,
}

/// A pulled message the subscription settles itself.
enum Rare {
    /// Another queue's (a replay addressed elsewhere, or a subject outside
    /// the bindings): acked and passed over.
    NotOurs(Box<jetstream::Message>),
    /// At the server's delivery limit, with its delivery count: dead-lettered.
    AtLimit(Delivery, i64),
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.inner.is_closed() {
                return None;
            }
            // Opening a pull is rare (about once per half window) and its
            // future is large: boxed, it keeps this one small, which is
            // allocated for every delivery.
            let opened = match self.pull_wanted() {
                Some(free) => Box::pin(self.open_pull(free)).await,
                None => Ok(()),
            };
            if let Err(e) = opened {
                tracing::warn!(queue = %self.info.name, error = %e, retry_in = ?backoff, "cannot pull; retrying");
                Box::pin(tokio::time::sleep(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            backoff = Duration::from_millis(100);
            if self.open_pulls == 0 {
                // Every slot holds an unsettled delivery: wait for one to free.
                self.freed.notified().await;
                continue;
            }
            let pulled = tokio::select! {
                pulled = self.pulls.next() => pulled,
                () = self.freed.notified() => continue,
            };
            match pulled {
                Some(Pulled::Message(Ok(message))) => {
                    self.requested = self.requested.saturating_sub(1);
                    // Waiting for a slot and settling here are rare, and
                    // their futures large: boxed, with the message moved
                    // in, they keep this future (one per delivery) small.
                    let accepted = match Arc::clone(&self.slots).try_acquire_owned() {
                        Ok(slot) => self.accept(message, slot),
                        Err(_) => Box::pin(self.accept_when_free(message)).await?,
                    };
                    match accepted {
                        Accepted::Deliver(delivery) => return Some(Ok(delivery)),
                        Accepted::SettleHere(rare) => Box::pin(self.settle_here(rare)).await,
                        Accepted::Skipped => {}
                    }
                }
                Some(Pulled::Message(Err(e))) => {
                    tracing::debug!(queue = %self.info.name, error = %e, "pull interrupted");
                }
                Some(Pulled::Ended(unreceived)) => {
                    self.requested = self
                        .requested
                        .saturating_sub(unreceived.load(Ordering::Acquire));
                    self.open_pulls -= 1;
                }
                None => self.open_pulls = 0,
            }
        }
    }
}

/// Settles one JetStream message. Dropped unsettled, it naks it for
/// immediate redelivery; its prefetch slot is freed either way.
struct NatsSettle {
    inner: Arc<Inner>,
    info: Arc<QueueInfo>,
    sequence: u64,
    /// Whether this is a redelivery, which may have a first failure on record.
    redelivered: bool,
    message: Option<jetstream::Message>,
    slot: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
    in_hand: Arc<InHand>,
}

impl NatsSettle {
    fn take(&mut self) -> jetstream::Message {
        self.message
            .take()
            .expect("settled once: Delivery guarantees it")
    }

    /// Sends an ack of `kind` and waits for the server to confirm it.
    async fn confirmed(
        &self,
        message: &jetstream::Message,
        kind: AckKind,
        doing: &str,
    ) -> Result<()> {
        let reply = message.reply.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Broker,
                "the message has no reply subject to settle it",
            )
        })?;
        self.inner
            .client
            .request(reply, kind.into())
            .await
            .map(drop)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    format!("{doing} message {}", self.sequence),
                )
                .with_source(e)
            })
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        if self.inner.progress_acks {
            self.in_hand.remove(self.sequence);
        }
        // The slot first, then the wake-up, so the subscription sees it free.
        drop(self.slot.take());
        self.freed.notify_one();
        // Dropped unsettled, the message is not nacked: the server delivers
        // it again after `ack_wait`. A nak here would send it straight back
        // while pull requests of this (dying) connection may still wait on
        // the server; nats-server 2.9 takes a delivery to such a request back
        // and lowers the message's delivery count, so a message that kills
        // its consumer every time would never reach the DLQ (C13).
        drop(self.message.take());
    }
}

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        // Like an AMQP ack, not confirmed by the server: a lost ack means a
        // redelivery, never a loss. Closing the broker flushes acks sent.
        let message = self.take();
        message.ack().await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("acking message {}", self.sequence),
            )
            .with_source(e)
        })?;
        if self.redelivered {
            self.inner.forget_failure(&self.info.stream, self.sequence);
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let message = self.take();
        message
            .ack_with(AckKind::Nak(Some(IMMEDIATE)))
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "nacking").with_source(e))
    }

    async fn retry(mut self: Box<Self>, _envelope: &Envelope, request: RetryRequest) -> Result<()> {
        // The server keeps the message and delivers it again after the delay:
        // the wait lives in the stream (C12).
        let message = self.take();
        self.inner.remember_first_failure(
            &self.info.stream,
            self.sequence,
            request.first_failed_at,
        );
        message
            .ack_with(AckKind::Nak(Some(request.after)))
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "scheduling the retry").with_source(e))
    }

    async fn dead_letter(mut self: Box<Self>, record: DeadLetter) -> Result<()> {
        let message = self.take();
        // Published under `stream:sequence`, so doing it again after a crash
        // stores one record; only then is the original terminated.
        let mut headers = headers::copy(
            &record.envelope,
            &format!("{}:{}", self.info.stream, self.sequence),
        );
        headers::add_record(&mut headers, &record);
        let subject = topology::dlq_subject(&self.info.stream, &self.info.name);
        if let Err(e) = self
            .inner
            .publish(subject, headers, record.envelope.payload.clone())
            .await
        {
            self.message = Some(message); // released on drop: nothing lost
            return Err(e);
        }
        self.confirmed(&message, AckKind::Term, "terminating")
            .await?;
        self.inner.forget_failure(&self.info.stream, self.sequence);
        Ok(())
    }
}
