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

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use ticketrail_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};

use crate::connection::Owned;
use crate::error::map;

type Reply = oneshot::Sender<Result<()>>;

/// The ack pipeline of one consumer channel, on a connection of its own
/// that is closed once the last delivery taken from it is settled.
pub(crate) struct Acks {
    /// Closed (on drop) once nothing taken from it is unsettled.
    _connection: Owned,
    channel: Channel,
    /// Delivery tags handed out and not yet acked or nacked.
    in_hand: Arc<Mutex<BTreeSet<u64>>>,
    requests: mpsc::UnboundedSender<(u64, Reply)>,
}

impl Acks {
    /// The ack pipeline of `channel` (of `connection`), whose prefetch
    /// limit is `prefetch`.
    pub(crate) fn new(connection: Owned, channel: Channel, prefetch: u16) -> Arc<Self> {
        let (requests, incoming) = mpsc::unbounded_channel();
        let in_hand = Arc::new(Mutex::new(BTreeSet::new()));
        let enough = usize::from(prefetch / 2).max(1);
        tokio::spawn(send_acks(
            channel.clone(),
            enough,
            Arc::clone(&in_hand),
            incoming,
        ));
        Arc::new(Acks {
            _connection: connection,
            channel,
            in_hand,
            requests,
        })
    }

    /// Whether no delivery taken from this channel is still unsettled.
    pub(crate) fn idle(&self) -> bool {
        self.in_hand.lock().expect("not poisoned").is_empty()
    }

    /// A delivery with `tag` was handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        self.in_hand.lock().expect("not poisoned").insert(tag);
    }

    /// Acks `tag`; returns once the ack (alone or in a batch) is sent.
    pub(crate) async fn ack(&self, tag: u64) -> Result<()> {
        let (reply, replied) = oneshot::channel();
        self.requests
            .send((tag, reply))
            .map_err(|_| Error::closed("the channel's ack pipeline has stopped"))?;
        replied
            .await
            .map_err(|_| Error::closed("the channel's ack pipeline has stopped"))?
    }

    /// Nacks `tag` with requeue. Only once the nack is sent does the tag
    /// leave the hand, so no `multiple` ack can cover it first.
    pub(crate) async fn nack(&self, tag: u64) -> Result<()> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        let sent = self.channel.basic_nack(tag, options).await;
        self.in_hand.lock().expect("not poisoned").remove(&tag);
        sent.map_err(|e| map("nacking", e))
    }
}

/// How long an ack may wait for others to share its frame.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

async fn send_acks(
    channel: Channel,
    enough: usize,
    in_hand: Arc<Mutex<BTreeSet<u64>>>,
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
        let acking: BTreeSet<u64> = batch.iter().map(|(tag, _)| *tag).collect();
        // The lowest tag still in hand that this batch does not settle.
        let blocker = in_hand
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|tag| !acking.contains(tag))
            .copied()
            .unwrap_or(u64::MAX);
        let run_end = batch.iter().take_while(|(tag, _)| *tag < blocker).count();
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
        {
            let mut in_hand = in_hand.lock().expect("not poisoned");
            for tag in &acking {
                in_hand.remove(tag);
            }
        }
        for ((_, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}
