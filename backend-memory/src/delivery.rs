//! Subscriptions and the settlement of deliveries in the in-process broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use ticketrail_core::{
    DeadLetter, Delivery, Envelope, Error, Result, RetryRequest, Settle, Subscription,
};

use crate::broker::Connection;
use crate::topology::{Queue, Stored};

/// A subscription on one queue, with its own prefetch window.
pub(crate) struct MemorySubscription {
    pub(crate) queue: Arc<Queue>,
    pub(crate) connection: Arc<Connection>,
    pub(crate) prefetch: usize,
    pub(crate) unsettled: Arc<AtomicUsize>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            // Register for wake-ups before looking, so none is missed.
            let changed = self.queue.changed.notified();
            let closed = self.connection.closed.notified();
            tokio::pin!(changed, closed);
            changed.as_mut().enable();
            closed.as_mut().enable();

            if self.connection.is_closed() || self.queue.is_deleted() {
                return None;
            }
            if self.unsettled.load(Ordering::Acquire) < self.prefetch {
                if let Some(stored) = self.queue.pop() {
                    self.unsettled.fetch_add(1, Ordering::AcqRel);
                    let first_failed_at = stored.first_failed_at;
                    let envelope = Arc::clone(&stored.envelope);
                    let settle = MemorySettle {
                        queue: Arc::clone(&self.queue),
                        connection: Arc::clone(&self.connection),
                        unsettled: Arc::clone(&self.unsettled),
                        stored: Some(stored),
                    };
                    return Some(Ok(Delivery::new(
                        Arc::clone(&self.queue.name),
                        envelope,
                        first_failed_at,
                        Box::new(settle),
                    )));
                }
            }
            tokio::select! {
                () = changed => {}
                () = closed => {}
            }
        }
    }
}

/// Settles one delivery; dropped unsettled, it puts the message back (C4).
struct MemorySettle {
    queue: Arc<Queue>,
    connection: Arc<Connection>,
    unsettled: Arc<AtomicUsize>,
    stored: Option<Stored>,
}

impl MemorySettle {
    /// Takes the message out of this delivery and frees its prefetch slot.
    fn finish(&mut self) -> Result<Stored> {
        if self.connection.is_closed() {
            // Like a broker whose connection went away: the settlement never
            // arrives, and the message goes back when this is dropped.
            return Err(Error::closed(format!(
                "connection closed before the delivery from `{}` was settled",
                self.queue.name
            )));
        }
        let stored = self
            .stored
            .take()
            .expect("settled once: Delivery guarantees it");
        self.unsettled.fetch_sub(1, Ordering::AcqRel);
        self.queue.changed.notify_waiters();
        Ok(stored)
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if let Some(stored) = self.stored.take() {
            self.unsettled.fetch_sub(1, Ordering::AcqRel);
            self.queue.release(stored);
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        self.finish().map(drop)
    }

    async fn nack(mut self: Box<Self>, _envelope: &Envelope) -> Result<()> {
        let stored = self.finish()?;
        self.queue.release(stored);
        Ok(())
    }

    async fn retry(mut self: Box<Self>, envelope: &Envelope, request: RetryRequest) -> Result<()> {
        let stored = self.finish()?;
        let mut again = Arc::unwrap_or_clone(stored.envelope);
        again.attempt = request.next_attempt;
        let mut next = Stored::fresh(again);
        next.first_failed_at = Some(request.first_failed_at);
        let queue = Arc::clone(&self.queue);
        tracing::debug!(queue = %queue.name, id = %envelope.id, after = ?request.after, "retry scheduled in the broker");
        // The wait lives in the broker, not in the consumer (C12): a task of
        // the broker's own, on tokio's clock.
        tokio::spawn(async move {
            tokio::time::sleep(request.after).await;
            queue.push(next);
        });
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, record: DeadLetter) -> Result<()> {
        self.finish()?;
        self.queue.add_dead_letter(record);
        Ok(())
    }
}
