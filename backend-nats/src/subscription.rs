//! Subscriptions on queues (pull consumers) and how deliveries are settled.
//!
//! Each subscription has a client of its own: a stored message whose
//! headers async-nats cannot parse closes the client's connection at every
//! delivery, and that must cost nothing to publishers or other queues.
//! After such a disconnect the subscription looks for the culprit among the
//! messages just delivered (see `quarantine.rs`).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use async_trait::async_trait;
use futures::FutureExt;
use ticketrail_core::wire::Attempt;
use ticketrail_core::{
    DeadLetter, DeadLetterReason, Delivery, Envelope, Error, ErrorKind, Result, RetryRequest,
    Settle, Subscription,
};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::connection::{open_client, Connection, Disconnects, QueueInfo};
use crate::failures::{self, BySequence, FailureRecord};
use crate::pull::{Pulled, Puller};
use crate::{dead_letters, error, headers, quarantine, topology};

/// The delay of a nak meant as "deliver again now". nats-server 2.9 does not
/// count a redelivery after a plain `-NAK` (the next delivery says
/// `delivered: 1` again), which would let a crash loop go on for ever (C13);
/// a nak with a delay is counted.
const IMMEDIATE: Duration = Duration::from_millis(1);

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// At most this many pull requests are open at once.
const MAX_OPEN_PULLS: usize = 2;

/// What JetStream's acknowledgement subject says about a delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AckInfo {
    pub(crate) delivered: u64,
    pub(crate) stream_sequence: u64,
    pub(crate) published: SystemTime,
}

/// Reads `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<nanos>.<pending>`
/// (and the longer form with a domain and account hash first).
pub(crate) fn ack_info(reply: &str) -> Option<AckInfo> {
    // Read for every delivery: the tokens stay on the stack, and the
    // subject is walked once, byte by byte (its tokens are too short for a
    // search per token to pay).
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let mut tokens = [""; 16];
    let mut count = 0;
    let mut start = 0;
    for (at, &byte) in rest.as_bytes().iter().enumerate() {
        if byte == b'.' {
            *tokens.get_mut(count)? = rest.get(start..at)?;
            count += 1;
            start = at + 1;
        }
    }
    *tokens.get_mut(count)? = rest.get(start..)?;
    count += 1;
    let rest = match count {
        7 => &tokens[2..count],
        n if n >= 9 => &tokens[4..count],
        _ => return None,
    };
    let nanos: u64 = rest[3].parse().ok()?;
    Some(AckInfo {
        delivered: rest[0].parse().ok()?,
        stream_sequence: rest[1].parse().ok()?,
        published: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
    })
}

/// Reads the acknowledgement subject of a delivery from the consumer whose
/// subject prefix is `prefix` (`$JS.ACK.<stream>.<consumer>.`): the prefix
/// compared, the five numbers after it read in one pass. `None` for any
/// other form (with a domain and account hash, or from another consumer):
/// [`ack_info`] reads those.
fn ack_info_after(prefix: &str, reply: &str) -> Option<AckInfo> {
    // Every delivery's subject is read here, so no token is split out:
    // digits are folded into their number as they come. A number of 19
    // digits or fewer cannot overflow; a longer one is left to `ack_info`.
    let rest = reply.strip_prefix(prefix)?.as_bytes();
    let mut numbers = [0u64; 5];
    let mut at = 0;
    let mut number = 0u64;
    let mut digits = 0u32;
    for &byte in rest {
        let digit = byte.wrapping_sub(b'0');
        if digit < 10 {
            number = number.wrapping_mul(10).wrapping_add(u64::from(digit));
            digits += 1;
        } else if byte == b'.' && (1..=19).contains(&digits) {
            *numbers.get_mut(at)? = number;
            at += 1;
            number = 0;
            digits = 0;
        } else {
            return None;
        }
    }
    if !(1..=19).contains(&digits) {
        return None;
    }
    *numbers.get_mut(at)? = number;
    if at != 4 {
        return None;
    }
    let [delivered, stream_sequence, _, nanos, _] = numbers;
    Some(AckInfo {
        delivered,
        stream_sequence,
        published: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
    })
}

/// A subscription's own client, shared with its deliveries: once the last
/// of them lets go, what was sent on it (acks above all) is flushed before
/// the connection closes, or those acks would be lost and their messages
/// delivered again.
pub(crate) struct OwnClient(Client);

impl std::ops::Deref for OwnClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.0
    }
}

impl Drop for OwnClient {
    fn drop(&mut self) {
        let client = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.flush().await;
                let _ = client.drain().await;
            });
        }
    }
}

/// A subscription: never has more messages requested or unsettled than it
/// has prefetch slots (C5), and asks for more as slots free up, before the
/// last request has run out, so the pipe stays full. Competing
/// subscriptions share the queue's durable consumer (C6).
pub(crate) struct NatsSubscription {
    shared: Arc<Shared>,
    disconnects: Arc<Disconnects>,
    seen_disconnects: u64,
    puller: Puller,
    prefetch: usize,
    /// What `try_next` took from the inbox but only `next` can finish.
    held: Option<Held>,
    /// Whether failure records are read through direct gets.
    direct_records: bool,
    /// `$JS.ACK.<stream>.<consumer>.`, how its deliveries' acknowledgement
    /// subjects begin.
    ack_prefix: String,
}

/// What a subscription shares with the settlements of its deliveries: one
/// reference for each delivery to count, not one for each part (seven
/// atomic increments and as many decrements a message, before).
struct Shared {
    conn: Arc<Connection>,
    /// Flushed and closed once the subscription and every delivery of it
    /// let go.
    client: OwnClient,
    info: Arc<QueueInfo>,
    /// Prefetch slots: a delivery holds one until it is settled or dropped.
    slots: Semaphore,
    /// Woken when a delivery is settled and its slot freed.
    freed: Notify,
    /// The deliveries being handled, kept alive on the server.
    in_hand: InHand,
    /// The failure records this subscription wrote.
    written: Mutex<failures::Written>,
}

/// What `try_next` took and left to `next`.
enum Held {
    /// The end of a pull request, or the server's refusal.
    Pulled(Pulled),
    /// A stored message that needs the broker before it is delivered, or
    /// is settled here.
    Accepted(Accepted),
}

impl NatsSubscription {
    pub(crate) async fn open(
        conn: Arc<Connection>,
        info: Arc<QueueInfo>,
        prefetch: usize,
    ) -> Result<Self> {
        let disconnects = Arc::new(Disconnects::default());
        let name = format!("ticketrail consuming {}", info.name);
        let client = open_client(&conn.config, &name, Some(Arc::clone(&disconnects))).await?;
        // Pulls end before `ack_wait` does, so a message released by a dead
        // consumer never meets that consumer's pull requests on the server.
        let expires = PULL_EXPIRES
            .min(conn.config.ack_wait / 2)
            .max(Duration::from_millis(100));
        let puller = Puller::new(client.clone(), &info.stream, &info.consumer, expires).await?;
        let direct_records = failures::direct_gets(&conn, &info.stream).await;
        let ack_prefix = format!("$JS.ACK.{}.{}.", info.stream, info.consumer);
        let progress_acks = conn.server.progress_acks;
        let ack_wait = conn.config.ack_wait;
        let shared = Arc::new(Shared {
            conn,
            client: OwnClient(client.clone()),
            info,
            slots: Semaphore::new(prefetch),
            freed: Notify::new(),
            in_hand: InHand::default(),
            written: Mutex::default(),
        });
        if progress_acks {
            keep_alive(Arc::downgrade(&shared), client, ack_wait);
        }
        Ok(NatsSubscription {
            shared,
            seen_disconnects: disconnects.count(),
            disconnects,
            puller,
            prefetch,
            held: None,
            direct_records,
            ack_prefix,
        })
    }

    /// How many messages another pull request should ask for, if one is
    /// worth opening: the first one as soon as any slot is free, a second
    /// one once half of them are.
    fn pull_wanted(&self) -> Option<usize> {
        let free = self
            .shared
            .slots
            .available_permits()
            .saturating_sub(self.puller.outstanding());
        let worth_it = match self.puller.open_requests() {
            0 => free > 0,
            n => n < MAX_OPEN_PULLS && free * 2 >= self.prefetch,
        };
        worth_it.then_some(free)
    }

    /// The settlement of `message`, which holds `slot` until it is settled
    /// or dropped.
    fn settle(
        &self,
        message: async_nats::Message,
        ack: AckInfo,
        slot: SemaphorePermit<'_>,
    ) -> NatsSettle {
        let reply = message.reply.expect("a stored message has a reply subject");
        if self.shared.conn.server.progress_acks {
            self.shared
                .in_hand
                .insert((ack.stream_sequence, ack.delivered), reply.clone());
        }
        // Given back by the settlement's `Drop`.
        slot.forget();
        NatsSettle {
            shared: Arc::clone(&self.shared),
            reply: Some(reply),
            sequence: ack.stream_sequence,
            failure: None,
            // A redelivery's record is read before it is handed out.
            record_unread: ack.delivered > 1,
            delivered: ack.delivered,
        }
    }

    /// What becomes of a pulled message: delivered, looked up first (a
    /// redelivery), or settled here (not this queue's, unreadable).
    fn accept(&self, mut message: async_nats::Message, slot: SemaphorePermit<'_>) -> Accepted {
        let ack = message
            .reply
            .as_deref()
            .and_then(|reply| ack_info_after(&self.ack_prefix, reply).or_else(|| ack_info(reply)));
        let Some(ack) = ack else {
            tracing::warn!(queue = %self.shared.info.name, reply = ?message.reply, "a stored message with an unknown acknowledgement subject; left alone");
            return Accepted::Skipped;
        };
        let subject = message.subject.as_str();
        let routing_key = match topology::replayed_to(&self.shared.info.stream, subject) {
            Some(queue) if queue == &*self.shared.info.name => None,
            Some(_) => return Accepted::SettleHere(Rare::NotOurs(self.settle(message, ack, slot))),
            None => {
                let key = subject
                    .strip_prefix(self.shared.info.space.as_str())
                    .and_then(|s| s.strip_prefix('.'))
                    .unwrap_or(subject);
                if !self.shared.info.exact_filter
                    && !topology::bound(&self.shared.info.bindings, key)
                {
                    return Accepted::SettleHere(Rare::NotOurs(self.settle(message, ack, slot)));
                }
                Some(key.to_owned())
            }
        };
        // A replay's routing key is in its headers; a subject is the queue's.
        let routing_key = routing_key.unwrap_or_else(|| subject.to_owned());
        let status = message.status.map(|s| {
            format!(
                "its header block starts with the status line `NATS/1.0 {} {}`, which NATS \
                 clients read as a message from the server",
                s.as_u16(),
                message.description.as_deref().unwrap_or_default()
            )
        });
        let incoming = headers::incoming(
            message.headers.as_ref(),
            routing_key,
            // Moved: what is left of the message is its reply subject.
            std::mem::take(&mut message.payload),
            ack.published,
            Attempt::Counted(1),
        );
        let pending = Pending {
            incoming,
            settle: self.settle(message, ack, slot),
            ack,
        };
        if let Some(why) = status {
            return Accepted::SettleHere(Rare::Unreadable(self.delivery(pending, None), why));
        }
        if ack.delivered > 1 {
            let written = self
                .shared
                .written
                .lock()
                .expect("not poisoned")
                .take(ack.stream_sequence, ack.delivered);
            return match written {
                // Retried from here and handled nowhere since: the record
                // this subscription wrote is the broker's.
                Some(record) => self.judge(pending, Some(record), true),
                None => Accepted::Redelivered(Box::new(pending)),
            };
        }
        Accepted::Deliver(self.delivery(pending, None))
    }

    fn delivery(&self, mut pending: Pending, failure: Option<FailureRecord>) -> Delivery {
        let retries = failure.map_or(0, |f| f.retries);
        pending.incoming.attempt = Attempt::Counted(u64::from(retries) + 1);
        pending.incoming.first_failed_at = failure.map(|f| f.first_failed_at);
        pending.settle.failure = failure;
        Delivery::decoded(
            Arc::clone(&self.shared.info.name),
            pending.incoming.decode(),
            Box::new(pending.settle),
        )
    }

    /// A redelivery: reads what the broker keeps of its earlier failures, so
    /// the attempt counts retries only, and a message whose consumer kept
    /// dying goes to the DLQ after the queue's delivery limit (C13).
    async fn redelivered(&self, pending: Pending) -> Accepted {
        let failure = match failures::read(
            &self.shared.conn,
            &self.shared.info.stream,
            &self.shared.info.consumer,
            pending.ack.stream_sequence,
            self.direct_records,
        )
        .await
        {
            Ok(failure) => failure,
            Err(e) => {
                // Without it, every redelivery counts as a retry: a few
                // attempts fewer, never a lost message.
                tracing::warn!(queue = %self.shared.info.name, error = %e, "failure record unavailable");
                return self.judge(pending, None, false);
            }
        };
        self.judge(pending, failure, true)
    }

    /// Hands out a redelivery with its failure record (`known`: read, or
    /// written here; `None` then means it has none), or dead-letters it
    /// when it came back unsettled more often than the queue's delivery
    /// limit (C13).
    fn judge(&self, mut pending: Pending, failure: Option<FailureRecord>, known: bool) -> Accepted {
        pending.settle.record_unread = !known;
        let delivered = pending.ack.delivered;
        let retries = failure.map_or(0, |f| u64::from(f.retries));
        let released = delivered.saturating_sub(1 + retries);
        let limit = u64::from(self.shared.info.delivery_limit);
        let delivery = self.delivery(pending, failure);
        if released > limit {
            return Accepted::SettleHere(Rare::AtLimit(
                delivery,
                format!(
                "delivered {delivered} times, {released} of them again after its consumer died \
                 or released it without settling, more than the queue's delivery limit of \
                 {limit}; its consumer likely crashed while handling it"
            ),
            ));
        }
        Accepted::Deliver(delivery)
    }

    /// `accept` once a prefetch slot is free; `None` if the subscription's
    /// slots are gone.
    async fn accept_when_free(&self, message: async_nats::Message) -> Option<Accepted> {
        let slot = self.shared.slots.acquire().await.ok()?;
        Some(self.accept(message, slot))
    }

    /// Settles here what `accept` did not hand out.
    async fn settle_here(&self, rare: Rare) {
        let (mut delivery, reason, why) = match rare {
            Rare::NotOurs(settle) => {
                // On servers that take one filter subject the consumer gets
                // every message of the stream: another queue's is passed
                // over (its own consumer has its own interest in it).
                if let Err(e) = Box::new(settle).ack().await {
                    tracing::warn!(queue = %self.shared.info.name, error = %e, "could not pass over a message for another queue");
                }
                return;
            }
            Rare::AtLimit(delivery, why) => (delivery, DeadLetterReason::DeliveryLimit, why),
            Rare::Unreadable(delivery, why) => (delivery, DeadLetterReason::Unreadable, why),
        };
        tracing::warn!(queue = %self.shared.info.name, id = %delivery.envelope().id, reason = %reason, why = %why, "dead-lettered before its handler ran");
        if let Err(e) = delivery.dead_letter(reason, &why).await {
            tracing::error!(queue = %self.shared.info.name, error = %e, "dead-lettering failed; the message will be delivered again");
        }
    }

    /// After the connection broke: looks for a message the client cannot
    /// parse among those just delivered, and forgets the open requests.
    async fn after_disconnect(&mut self) {
        self.puller.forget_requests();
        match quarantine::scan(&self.shared.conn, &self.shared.info).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(queue = %self.shared.info.name, quarantined = n, "messages the NATS client cannot parse were moved to the DLQ (reason unreadable)")
            }
            Err(e) => {
                tracing::warn!(queue = %self.shared.info.name, error = %e, "could not look for unreadable messages after a disconnect")
            }
        }
    }
}

/// A pulled message on its way to becoming a delivery.
struct Pending {
    incoming: ticketrail_core::wire::Incoming,
    settle: NatsSettle,
    ack: AckInfo,
}

/// What becomes of a pulled message.
enum Accepted {
    /// Handed to the consumer.
    Deliver(Delivery),
    /// Delivered before: its failure record is read first.
    Redelivered(Box<Pending>),
    /// Settled by the subscription itself.
    SettleHere(Rare),
    /// Without JetStream metadata: left alone.
    Skipped,
}

/// A pulled message the subscription settles itself.
enum Rare {
    /// Another queue's (a replay addressed elsewhere, or a subject outside
    /// the bindings): acked and passed over.
    NotOurs(NatsSettle),
    /// Over the delivery limit: dead-lettered, with why.
    AtLimit(Delivery, String),
    /// Readable only in part: dead-lettered, with why.
    Unreadable(Delivery, String),
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            let accepted = match self.held.take() {
                Some(Held::Accepted(accepted)) => accepted,
                Some(Held::Pulled(pulled)) => match self.take(Some(pulled)).await? {
                    Ok(Some(accepted)) => accepted,
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                },
                None => {
                    if self.shared.conn.is_closed() {
                        return None;
                    }
                    if self.disconnects.count() != self.seen_disconnects {
                        self.seen_disconnects = self.disconnects.count();
                        Box::pin(self.after_disconnect()).await;
                    }
                    // Opening a pull is rare (about once per half window):
                    // boxed, it keeps this future small.
                    if let Some(free) = self.pull_wanted() {
                        if let Err(e) = Box::pin(self.puller.request(free)).await {
                            return Some(Err(e));
                        }
                    }
                    let pulled = tokio::select! {
                        pulled = self.puller.next() => pulled,
                        () = self.shared.freed.notified() => continue,
                        () = self.disconnects.notify.notified() => continue,
                    };
                    match self.take(pulled).await? {
                        Ok(Some(accepted)) => accepted,
                        Ok(None) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
            };
            let accepted = match accepted {
                Accepted::Redelivered(pending) => Box::pin(self.redelivered(*pending)).await,
                other => other,
            };
            match accepted {
                Accepted::Deliver(delivery) => return Some(Ok(delivery)),
                Accepted::SettleHere(rare) => Box::pin(self.settle_here(rare)).await,
                Accepted::Skipped | Accepted::Redelivered(_) => {}
            }
        }
    }

    /// Stops the pull inbox, then releases what was pulled and not handed
    /// out, so it is delivered again at once rather than after `ack_wait`
    /// (a consumer replaced while messages arrive, C14).
    async fn close(&mut self) {
        let left = self
            .puller
            .close(self.shared.conn.config.request_timeout)
            .await;
        match self.held.take() {
            Some(Held::Accepted(Accepted::Deliver(mut delivery))) => {
                let _ = delivery.nack().await;
            }
            Some(Held::Accepted(Accepted::Redelivered(pending))) => {
                let _ = Box::new(pending.settle).nack().await;
            }
            Some(Held::Accepted(Accepted::SettleHere(rare))) => self.settle_here(rare).await,
            Some(Held::Accepted(Accepted::Skipped)) | Some(Held::Pulled(_)) | None => {}
        }
        // Never handed to a handler: a plain nak, which nats-server 2.9 does
        // not count as a delivery. The server no longer serves this
        // subscription's requests, so they go to other consumers.
        for message in left {
            if let Some(reply) = message.reply {
                if let Err(e) = self
                    .shared
                    .client
                    .publish(reply, AckKind::Nak(None).into())
                    .await
                {
                    tracing::debug!(queue = %self.shared.info.name, error = %e, "could not release a pulled message; it is delivered again after ack_wait");
                }
            }
        }
        let _ = self.shared.client.flush().await;
    }

    /// Sends what the client has queued: the acks `try_ack` left there.
    async fn flush(&mut self) {
        if let Err(e) = self.shared.client.flush().await {
            tracing::debug!(queue = %self.shared.info.name, error = %e, "could not flush the acks; their messages are delivered again after ack_wait");
        }
    }

    /// A delivery already pulled into the inbox, while no pull request is
    /// due and a prefetch slot is free; anything else is left to `next`.
    fn try_next(&mut self) -> Option<Delivery> {
        if self.held.is_some()
            || self.shared.conn.is_closed()
            || self.disconnects.count() != self.seen_disconnects
            || self.pull_wanted().is_some()
        {
            return None;
        }
        let slot = self.shared.slots.try_acquire().ok()?;
        match self.puller.try_next()? {
            Pulled::Stored(message) => match self.accept(message, slot) {
                Accepted::Deliver(delivery) => Some(delivery),
                other => {
                    self.held = Some(Held::Accepted(other));
                    None
                }
            },
            other => {
                self.held = Some(Held::Pulled(other));
                None
            }
        }
    }
}

impl NatsSubscription {
    /// What `pulled` comes to: `None` when the client is closed; an error
    /// when the server refuses; `Ok(None)` when there is nothing to deliver.
    async fn take(&mut self, pulled: Option<Pulled>) -> Option<Result<Option<Accepted>>> {
        let message = match pulled? {
            Pulled::Ended => return Some(Ok(None)),
            Pulled::Refused(why) => {
                return Some(Err(Error::new(
                    ErrorKind::Connection,
                    format!("pulling from `{}`: {why}", self.shared.info.name),
                )))
            }
            Pulled::Stored(message) => message,
        };
        let accepted = match self.shared.slots.try_acquire() {
            Ok(slot) => self.accept(message, slot),
            Err(_) => match Box::pin(self.accept_when_free(message)).await {
                Some(accepted) => accepted,
                None => return None,
            },
        };
        Some(Ok(Some(accepted)))
    }
}

/// The deliveries of a subscription still being handled. The server would
/// deliver one again after `ack_wait`, while its handler still runs; every
/// half `ack_wait` each one gets a `+WPI` (work in progress) instead. This
/// goes on while any delivery is in hand, also after the subscription is
/// dropped (a graceful shutdown lets handlers finish).
#[derive(Default)]
pub(crate) struct InHand {
    /// By stream sequence and delivery count: a message the server
    /// delivered again while an earlier delivery of it is still handled
    /// has an entry for each, and settling one leaves the other's.
    replies: Mutex<BySequence<(u64, u64), Subject>>,
}

impl InHand {
    fn insert(&self, delivery: (u64, u64), reply: Subject) {
        self.replies
            .lock()
            .expect("not poisoned")
            .insert(delivery, reply);
    }

    fn remove(&self, delivery: (u64, u64)) {
        self.replies.lock().expect("not poisoned").remove(&delivery);
    }
}

/// Sends every delivery in hand of `shared` a `+WPI` each half `ack_wait`,
/// for as long as the subscription or any delivery of it is there.
fn keep_alive(shared: Weak<Shared>, client: Client, ack_wait: Duration) {
    let every = (ack_wait / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let replies: Vec<Subject> = shared
                .in_hand
                .replies
                .lock()
                .expect("not poisoned")
                .values()
                .cloned()
                .collect();
            drop(shared);
            for reply in replies {
                let _ = client.publish(reply, AckKind::Progress.into()).await;
            }
        }
    });
}

/// Settles one JetStream message. Dropped unsettled, it is left for the
/// server to deliver again after `ack_wait`; its prefetch slot is freed
/// either way.
pub(crate) struct NatsSettle {
    /// The subscription's client, queue and bookkeeping; one of its
    /// prefetch slots is this delivery's.
    shared: Arc<Shared>,
    reply: Option<Subject>,
    sequence: u64,
    /// What the broker keeps of the message's earlier failures.
    failure: Option<FailureRecord>,
    /// A redelivery whose failure record could not be read: it may have
    /// one.
    record_unread: bool,
    /// How many times the message has been delivered, this time included.
    delivered: u64,
}

impl NatsSettle {
    fn take(&mut self) -> Subject {
        self.reply
            .take()
            .expect("settled once: Delivery guarantees it")
    }

    /// Sends an ack of `kind` on the subscription's client, unconfirmed.
    async fn send(&self, reply: Subject, kind: AckKind, doing: &str) -> Result<()> {
        self.shared
            .client
            .publish(reply, kind.into())
            .await
            .map_err(|e| error::client(&format!("{doing} message {}", self.sequence), e))
    }

    /// Sends an ack of `kind` and waits for the server to confirm it.
    async fn confirmed(&self, reply: Subject, kind: AckKind, doing: &str) -> Result<()> {
        self.shared
            .client
            .request(reply, kind.into())
            .await
            .map(drop)
            .map_err(|e| error::client(&format!("{doing} message {}", self.sequence), e))
    }

    /// Waits a second before a record the server had no room for (a full
    /// stream or account) is written again, holding the delivery (its
    /// progress acks keep it): a record that cannot be written yet must
    /// neither lose the message nor spend its deliveries. Says so once.
    async fn wait_for_room(&self, error: &Error, said: &mut bool) {
        if !*said {
            *said = true;
            tracing::warn!(
                queue = %self.shared.info.name,
                sequence = self.sequence,
                error = %error,
                "no room for a retry or dead-letter record; holding the message until there is"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    async fn forget_failures(&self) {
        // Nothing to clear where the redelivery's read found no record.
        if self.failure.is_none() && !self.record_unread {
            return;
        }
        if let Err(e) = failures::clear(
            &self.shared.conn,
            &self.shared.info.stream,
            &self.shared.info.consumer,
            self.sequence,
        )
        .await
        {
            // It expires on its own.
            tracing::debug!(queue = %self.shared.info.name, error = %e, "failure record not cleared");
        }
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        if self.shared.conn.server.progress_acks {
            self.shared.in_hand.remove((self.sequence, self.delivered));
        }
        // The slot first, then the wake-up, so the subscription sees it free.
        self.shared.slots.add_permits(1);
        self.shared.freed.notify_one();
        // Dropped unsettled, the message is not nacked: the server delivers
        // it again after `ack_wait`. A nak here would send it straight back
        // while pull requests of this (dying) connection may still wait on
        // the server; nats-server 2.9 takes a delivery to such a request back
        // and lowers the message's delivery count, so a message that kills
        // its consumer every time would never reach the DLQ (C13).
    }
}

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        // Like an AMQP ack, not confirmed by the server: a lost ack means a
        // redelivery, never a loss. Closing the broker flushes acks sent.
        let reply = self.take();
        self.send(reply, AckKind::Ack, "acking").await?;
        self.forget_failures().await;
        Ok(())
    }

    fn try_ack(&mut self) -> Option<Result<()>> {
        // The common case, an ack with no failure record to clear, needs
        // only room in the client's queue of commands: sent here when there
        // is, it costs no boxed future (for `ack`'s, which can hold a
        // record's purge, a large one). A send that would wait is dropped
        // before it queued anything, and `ack` sends it.
        if self.failure.is_some() || self.record_unread {
            return None;
        }
        let reply = self.reply.clone()?;
        let sent = self
            .shared
            .client
            .publish(reply, AckKind::Ack.into())
            .now_or_never()?;
        self.reply = None;
        Some(sent.map_err(|e| error::client(&format!("acking message {}", self.sequence), e)))
    }

    async fn nack(mut self: Box<Self>) -> Result<()> {
        let reply = self.take();
        self.send(reply, AckKind::Nak(Some(IMMEDIATE)), "nacking")
            .await
    }

    async fn retry(mut self: Box<Self>, _envelope: &Envelope, request: RetryRequest) -> Result<()> {
        // The failure is on record in the broker before the nak, so another
        // process handling the redelivery knows the attempt and when the
        // first one failed.
        let mut waited = false;
        let record = loop {
            let written = failures::record_retry(
                &self.shared.conn,
                &self.shared.info.stream,
                &self.shared.info.consumer,
                self.sequence,
                self.failure,
                request.first_failed_at,
            )
            .await;
            match written {
                Err(e) if e.kind() == ErrorKind::Blocked => {
                    self.wait_for_room(&e, &mut waited).await
                }
                written => break written?,
            }
        };
        self.shared.written.lock().expect("not poisoned").insert(
            self.sequence,
            self.delivered,
            record,
        );
        // The server keeps the message and delivers it again after the
        // delay: the wait lives in the stream (C12).
        let reply = self.take();
        self.send(
            reply,
            AckKind::Nak(Some(request.after)),
            "scheduling the retry of",
        )
        .await
    }

    async fn dead_letter(mut self: Box<Self>, mut record: DeadLetter) -> Result<()> {
        if let Some(failure) = self.failure {
            record.first_failed_at = failure.first_failed_at.min(record.last_failed_at);
        }
        // Written under `stream:sequence:queue`, so doing it again after a
        // crash stores one record; only then is the original terminated.
        let mut waited = false;
        loop {
            match dead_letters::write(&self.shared.conn, &self.shared.info, &record, self.sequence)
                .await
            {
                Err(e) if e.kind() == ErrorKind::Blocked => {
                    self.wait_for_room(&e, &mut waited).await
                }
                written => break written?,
            }
        }
        let reply = self.take();
        self.confirmed(reply, AckKind::Term, "terminating").await?;
        self.forget_failures().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_settled_leaves_a_later_delivery_of_the_same_message_in_hand() {
        // The server delivered message 7 again (after ack_wait) while its
        // first delivery was still handled: settling the first must not
        // stop the progress acks of the second.
        let in_hand = InHand::default();
        in_hand.insert((7, 1), Subject::from("$JS.ACK.S.C.1.7.7.1.0"));
        in_hand.insert((7, 2), Subject::from("$JS.ACK.S.C.2.7.8.1.0"));
        in_hand.remove((7, 1));
        let left: Vec<Subject> = in_hand.replies.lock().unwrap().values().cloned().collect();
        assert_eq!(left, [Subject::from("$JS.ACK.S.C.2.7.8.1.0")]);
    }

    #[test]
    fn both_forms_of_ack_subject_are_read() {
        let v1 = ack_info("$JS.ACK.S.C.3.42.7.1700000000000000000.5").unwrap();
        assert_eq!((v1.delivered, v1.stream_sequence), (3, 42));
        let v2 = ack_info("$JS.ACK._.HASH.S.C.2.43.8.1700000000000000000.0.TOKEN").unwrap();
        assert_eq!((v2.delivered, v2.stream_sequence), (2, 43));
        assert!(ack_info("$JS.ACK.S.C.x").is_none());
        assert!(ack_info("_INBOX.abc").is_none());
        assert!(ack_info("$JS.ACK.S.C.3..7.1700000000000000000.5").is_none());
        assert!(ack_info(&format!("$JS.ACK.{}", ["1"; 17].join("."))).is_none());
    }

    #[test]
    fn the_fast_reading_of_an_ack_subject_agrees_with_the_general_one() {
        let prefix = "$JS.ACK.S.C.";
        let read = |reply: &str| {
            ack_info_after(prefix, reply).map(|a| (a.delivered, a.stream_sequence, a.published))
        };
        let general =
            |reply: &str| ack_info(reply).map(|a| (a.delivered, a.stream_sequence, a.published));
        for reply in [
            "$JS.ACK.S.C.3.42.7.1700000000000000000.5",
            "$JS.ACK.S.C.1.1.1.0.0",
            "$JS.ACK.S.C.9999999999999999999.9.9.1.0",
        ] {
            assert!(read(reply).is_some(), "{reply}");
            assert_eq!(read(reply), general(reply), "{reply}");
        }
        // Other forms and other consumers are left to the general reading.
        for reply in [
            "$JS.ACK._.HASH.S.C.2.43.8.1700000000000000000.0.TOKEN",
            "$JS.ACK.S.CC.3.42.7.1700000000000000000.5",
            "$JS.ACK.S.C.3.42.7.1700000000000000000",
            "$JS.ACK.S.C.3.42.7.1700000000000000000.5.6",
            "$JS.ACK.S.C.3..7.1700000000000000000.5",
            "$JS.ACK.S.C.3.42.7.1700000000000000000.5.",
            "$JS.ACK.S.C.3.4x.7.1700000000000000000.5",
            "$JS.ACK.S.C.18446744073709551616.9.9.1.0",
            "$JS.ACK.S.C.",
        ] {
            assert_eq!(read(reply), None, "{reply}");
        }
        // Twenty digits, still a u64: read, by the general reading.
        let long = "$JS.ACK.S.C.18446744073709551615.9.9.1.0";
        assert_eq!(read(long), None);
        assert_eq!(general(long).map(|a| a.0), Some(u64::MAX));
    }
}
