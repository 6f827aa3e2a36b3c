//! Acks of one channel, coalesced: settled deliveries that form an unbroken
//! run of delivery tags are acked with one `multiple` ack.
//!
//! A `multiple` ack settles every unacked delivery up to its tag, so it is
//! sent only up to the lowest delivery still in hand (being handled, being
//! copied to a wait queue or DLQ, or being nacked); the settled deliveries
//! above it are acked one by one, all in one go. An ack waits at most 1 ms
//! for others to share its frame, and not at all once half the prefetch
//! window is waiting; acks that arrive while a batch is on the wire form the
//! next one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use ticketrail_core::{Error, Result};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::connection::Owned;
use crate::error::map;

/// Who hears how an ack went.
enum Reply {
    /// A settlement awaiting it: told once the ack is sent.
    Waiting(oneshot::Sender<Result<()>>),
    /// Nobody: the ack was queued and its delivery settled. Holds the
    /// pipeline, and with it the channel's connection, open until the ack
    /// is sent; closing the connection first would requeue the message.
    Queued { _open: Arc<Acks> },
}

/// The ack pipeline of one consumer channel, on a connection of its own
/// that is closed once the last delivery taken from it is settled.
pub(crate) struct Acks {
    /// Closed (on drop) once nothing taken from it is unsettled.
    _connection: Owned,
    channel: Channel,
    /// Delivery tags handed out and not yet acked or nacked.
    in_hand: Arc<Mutex<InHand>>,
    /// Woken each time `in_hand` empties.
    emptied: Arc<Notify>,
    requests: mpsc::UnboundedSender<(u64, Reply)>,
}

/// The error of an ack the pipeline can no longer take.
fn stopped() -> Error {
    Error::closed("the channel's ack pipeline has stopped")
}

impl Acks {
    /// The ack pipeline of `channel` (of `connection`), whose prefetch
    /// limit is `prefetch`.
    pub(crate) fn new(connection: Owned, channel: Channel, prefetch: u16) -> Arc<Self> {
        let (requests, incoming) = mpsc::unbounded_channel();
        let in_hand = Arc::new(Mutex::new(InHand::default()));
        let emptied = Arc::new(Notify::new());
        let enough = usize::from(prefetch / 2).max(1);
        tokio::spawn(send_acks(
            channel.clone(),
            enough,
            Arc::clone(&in_hand),
            Arc::clone(&emptied),
            incoming,
        ));
        Arc::new(Acks {
            _connection: connection,
            channel,
            in_hand,
            emptied,
            requests,
        })
    }

    /// Whether no delivery taken from this channel is still unsettled.
    pub(crate) fn idle(&self) -> bool {
        self.in_hand.lock().expect("not poisoned").is_empty()
    }

    /// Returns once every delivery taken from this channel is settled and
    /// its ack or nack sent, those only queued by
    /// [`ack_queued`](Acks::ack_queued) too.
    pub(crate) async fn settled(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.idle() {
                return;
            }
            emptied.await;
        }
    }

    /// A delivery with `tag` was handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        self.in_hand.lock().expect("not poisoned").insert(tag);
    }

    /// Acks `tag`; returns once the ack (alone or in a batch) is sent.
    pub(crate) async fn ack(&self, tag: u64) -> Result<()> {
        let (reply, replied) = oneshot::channel();
        self.requests
            .send((tag, Reply::Waiting(reply)))
            .map_err(|_| stopped())?;
        replied.await.map_err(|_| stopped())?
    }

    /// Queues an ack of `tag` and returns at once, as a NATS ack returns
    /// once its client has queued it: an ack is not confirmed by the broker
    /// either way, and one lost with its connection means a redelivery,
    /// never a loss. One that cannot be sent is logged. Spares the
    /// settlement a reply channel and a boxed future per message.
    pub(crate) fn ack_queued(self: &Arc<Self>, tag: u64) -> Result<()> {
        self.requests
            .send((
                tag,
                Reply::Queued {
                    _open: Arc::clone(self),
                },
            ))
            .map_err(|_| stopped())
    }

    /// Nacks `tag` with requeue. Only once the nack is sent does the tag
    /// leave the hand, so no `multiple` ack can cover it first.
    pub(crate) async fn nack(&self, tag: u64) -> Result<()> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        let sent = self.channel.basic_nack(tag, options).await;
        settle_tags(&self.in_hand, &self.emptied, [tag]);
        sent.map_err(|e| map("nacking", e))
    }
}

/// Delivery tags handed out and not yet settled, lowest first. A channel's
/// tags only grow, so a new one goes at the back and most settlements take
/// from near the front: no tree to keep balanced (a `BTreeSet` cost about
/// 430 instructions a delivery to insert and remove).
#[derive(Debug, Default)]
struct InHand {
    tags: VecDeque<u64>,
}

impl InHand {
    fn insert(&mut self, tag: u64) {
        match self.tags.back() {
            Some(&last) if last >= tag => {
                // Not seen on a channel; kept sorted all the same.
                let at = self.tags.partition_point(|&t| t < tag);
                if self.tags.get(at) != Some(&tag) {
                    self.tags.insert(at, tag);
                }
            }
            _ => self.tags.push_back(tag),
        }
    }

    fn remove(&mut self, tag: u64) {
        if let Ok(at) = self.tags.binary_search(&tag) {
            self.tags.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// How many of `settling` (sorted) one `multiple` ack may cover: those
    /// below the lowest tag in hand that `settling` does not hold, since a
    /// `multiple` ack settles every unacked delivery up to its tag.
    fn covered(&self, settling: &[u64]) -> usize {
        let mut next = 0;
        let mut blocker = u64::MAX;
        for &tag in &self.tags {
            while settling.get(next).is_some_and(|&t| t < tag) {
                next += 1;
            }
            if settling.get(next) != Some(&tag) {
                blocker = tag;
                break;
            }
        }
        settling.partition_point(|&t| t < blocker)
    }
}

/// How long an ack may wait for others to share its frame.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

/// Takes settled `tags` out of the hand, waking whoever waits for it to
/// empty.
fn settle_tags(in_hand: &Mutex<InHand>, emptied: &Notify, tags: impl IntoIterator<Item = u64>) {
    let mut in_hand = in_hand.lock().expect("not poisoned");
    for tag in tags {
        in_hand.remove(tag);
    }
    if in_hand.is_empty() {
        emptied.notify_waiters();
    }
}

async fn send_acks(
    channel: Channel,
    enough: usize,
    in_hand: Arc<Mutex<InHand>>,
    emptied: Arc<Notify>,
    mut incoming: mpsc::UnboundedReceiver<(u64, Reply)>,
) {
    while let Some(first) = incoming.recv().await {
        let mut batch = vec![first];
        // Wait a moment for a fuller batch: one ack frame per handful of
        // deliveries cost the broker a quarter more CPU per message than one
        // per half window. Never longer than ACK_DELAY, never past half the
        // prefetch window, so the broker keeps delivering.
        let deadline = tokio::time::Instant::now() + ACK_DELAY;
        while batch.len() < enough {
            match tokio::time::timeout_at(deadline, incoming.recv()).await {
                Ok(Some(more)) => batch.push(more),
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(more) = incoming.try_recv() {
            batch.push(more);
        }
        batch.sort_unstable_by_key(|(tag, _)| *tag);
        let acking: Vec<u64> = batch.iter().map(|(tag, _)| *tag).collect();
        let run_end = in_hand.lock().expect("not poisoned").covered(&acking);
        // All of the batch's frames are queued at once and their sending
        // awaited together: awaiting each ack before queueing the next cost
        // two thread hand-offs with lapin's I/O loop per ack, which made
        // every delivery above a retrying one slow to settle.
        let multiple = async {
            match run_end {
                0 => None,
                n => Some(
                    channel
                        .basic_ack(batch[n - 1].0, BasicAckOptions { multiple: true })
                        .await,
                ),
            }
        };
        let singles = futures::future::join_all(
            batch[run_end..]
                .iter()
                .map(|(tag, _)| channel.basic_ack(*tag, BasicAckOptions { multiple: false })),
        );
        let (multiple, singles) = futures::join!(multiple, singles);
        let mut results: Vec<Result<()>> = Vec::with_capacity(batch.len());
        if let Some(sent) = multiple {
            for _ in 0..run_end {
                results.push(
                    sent.as_ref()
                        .map(|_| ())
                        .map_err(|e| map("acking", e.clone())),
                );
            }
        }
        results.extend(
            singles
                .into_iter()
                .map(|sent| sent.map_err(|e| map("acking", e))),
        );
        settle_tags(&in_hand, &emptied, acking);
        for ((tag, reply), result) in batch.into_iter().zip(results) {
            match (reply, result) {
                (Reply::Waiting(reply), result) => {
                    let _ = reply.send(result);
                }
                (Reply::Queued { .. }, Ok(())) => {}
                (Reply::Queued { .. }, Err(e)) => {
                    tracing::warn!(tag, error = %e, "an ack could not be sent; the broker will deliver the message again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn in_hand(tags: &[u64]) -> InHand {
        let mut hand = InHand::default();
        tags.iter().for_each(|&tag| hand.insert(tag));
        hand
    }

    #[test]
    fn a_multiple_ack_stops_below_the_lowest_delivery_still_in_hand() {
        let hand = in_hand(&[1, 2, 3, 5, 6]);
        // 3 is still being handled (a retry's copy awaiting its confirm):
        // 1 and 2 go in one multiple ack, 5 and 6 one by one.
        assert_eq!(hand.covered(&[1, 2, 5, 6]), 2);
        assert_eq!(hand.covered(&[1, 2, 3, 5, 6]), 5);
        assert_eq!(hand.covered(&[2, 3]), 0, "1 is in hand below them");
        assert_eq!(hand.covered(&[]), 0);
        assert_eq!(InHand::default().covered(&[4, 7]), 2);
    }

    #[test]
    fn tags_leave_the_hand_in_any_order_and_it_empties() {
        let mut hand = in_hand(&[10, 11, 12, 13]);
        for tag in [12, 10, 99, 13] {
            hand.remove(tag);
        }
        assert!(!hand.is_empty());
        assert_eq!(hand.covered(&[13]), 0, "11 is still in hand");
        hand.remove(11);
        assert!(hand.is_empty());
        // A tag out of order (not seen on a channel) keeps the hand sorted.
        let hand = in_hand(&[5, 3, 4, 4]);
        assert_eq!(hand.tags, [3, 4, 5]);
    }

    /// Against the `BTreeSet` this replaced, over random deliveries and
    /// settlements: the same multiple acks, the same emptiness.
    #[test]
    fn the_same_multiple_acks_as_a_set_would_give() {
        let mut rng = fastrand::Rng::with_seed(15);
        let (mut hand, mut model) = (InHand::default(), BTreeSet::new());
        let mut next_tag = 1;
        for _ in 0..20_000 {
            if model.len() < 50 && rng.bool() {
                let n = rng.u64(1..5);
                for _ in 0..n {
                    hand.insert(next_tag);
                    model.insert(next_tag);
                    next_tag += 1;
                }
                continue;
            }
            // A batch: some of the tags in hand, sorted, settled together.
            let mut batch: Vec<u64> = model.iter().copied().filter(|_| rng.u8(..) < 96).collect();
            batch.sort_unstable();
            let blocker = model
                .iter()
                .find(|tag| !batch.contains(tag))
                .copied()
                .unwrap_or(u64::MAX);
            let expected = batch.iter().take_while(|&&tag| tag < blocker).count();
            assert_eq!(
                hand.covered(&batch),
                expected,
                "{model:?} settling {batch:?}"
            );
            for tag in batch {
                hand.remove(tag);
                model.remove(&tag);
            }
            assert_eq!(hand.is_empty(), model.is_empty());
            assert!(hand.tags.iter().eq(model.iter()));
        }
    }
}
