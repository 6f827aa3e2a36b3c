//! Subscriptions on queues of the store, and how their deliveries are settled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use ticketrail_core::{DeadLetter, Delivery, Envelope, Result, RetryRequest, Settle, Subscription};

use crate::connection::Connection;
use crate::error;
use crate::store::{Queue, Stored};

/// A subscription on one queue, with its own prefetch window.
pub(crate) struct MemorySubscription {
    window: Arc<Window>,
}

/// What a subscription shares with its deliveries' settlements: one
/// reference each, not one per field.
struct Window {
    queue: Arc<Queue>,
    connection: Arc<Connection>,
    prefetch: usize,
    /// Deliveries handed out and not yet settled.
    unsettled: AtomicUsize,
}

impl MemorySubscription {
    pub(crate) fn new(queue: Arc<Queue>, connection: Arc<Connection>, prefetch: usize) -> Self {
        queue.consumers.fetch_add(1, Ordering::AcqRel);
        MemorySubscription {
            window: Arc::new(Window {
                queue,
                connection,
                prefetch,
                unsettled: AtomicUsize::new(0),
            }),
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.window.queue.consumers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        // Most calls find a message waiting: take it without registering
        // for wake-ups (each registration takes the notifier's lock).
        if let Some(delivery) = self.take() {
            return delivery;
        }
        loop {
            // Register for wake-ups before looking again, so none is missed.
            let changed = self.window.queue.changed.notified();
            let closed = self.window.connection.closed.notified();
            tokio::pin!(changed, closed);
            changed.as_mut().enable();
            closed.as_mut().enable();
            let _waiting = self.window.queue.wait_for_change();
            if let Some(delivery) = self.take() {
                return delivery;
            }
            tokio::select! {
                () = changed => {}
                () = closed => {}
            }
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        self.take()?.and_then(Result::ok)
    }
}

impl MemorySubscription {
    /// What `next` returns now, if it need not wait: the end of the
    /// subscription or a delivery. `None` while the queue is empty or the
    /// prefetch window full.
    fn take(&self) -> Option<Option<Result<Delivery>>> {
        let window = &self.window;
        if window.connection.is_closed() || window.queue.is_deleted() {
            return Some(None);
        }
        if window.unsettled.load(Ordering::Acquire) >= window.prefetch {
            return None;
        }
        let mut stored = window.queue.pop()?;
        window.unsettled.fetch_add(1, Ordering::AcqRel);
        let first_failed_at = stored.first_failed_at;
        let notes = std::mem::take(&mut stored.notes);
        let envelope = Arc::clone(&stored.envelope);
        let settle = MemorySettle {
            window: Arc::clone(window),
            stored: Some(stored),
        };
        let delivery = Delivery::new(Arc::clone(&window.queue.name), envelope, Box::new(settle))
            .with_first_failed_at(first_failed_at);
        Some(Some(Ok(if notes.is_empty() {
            delivery
        } else {
            delivery.with_notes(notes)
        })))
    }
}

/// Settles one delivery; dropped unsettled, it puts the message back (C4).
struct MemorySettle {
    /// The subscription's window: freeing a slot of a full one wakes it.
    window: Arc<Window>,
    stored: Option<Stored>,
}

impl MemorySettle {
    /// Takes the message out of this delivery and frees its prefetch slot.
    fn finish(&mut self) -> Result<Stored> {
        let window = &self.window;
        if window.connection.is_closed() {
            return Err(error::settled_after_close(&window.queue.name));
        }
        let stored = self
            .stored
            .take()
            .expect("settled once: Delivery guarantees it");
        window.queue.settled();
        // Only a subscription whose window was full waits for a free slot.
        if window.unsettled.fetch_sub(1, Ordering::AcqRel) >= window.prefetch {
            window.queue.changed.notify_waiters();
        }
        Ok(stored)
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if let Some(stored) = self.stored.take() {
            let window = &self.window;
            window.queue.settled();
            window.unsettled.fetch_sub(1, Ordering::AcqRel);
            window.queue.release(stored);
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.finish().map(drop)
    }

    fn try_ack(&mut self) -> Option<Result<()>> {
        Some(self.finish().map(drop))
    }

    async fn nack(mut self: Box<Self>) -> Result<()> {
        let stored = self.finish()?;
        self.window.queue.release(stored);
        Ok(())
    }

    async fn retry(mut self: Box<Self>, envelope: &Envelope, request: RetryRequest) -> Result<()> {
        let stored = self.finish()?;
        let mut again = Arc::unwrap_or_clone(stored.envelope);
        again.attempt = request.next_attempt;
        let mut next = Stored::fresh(again);
        next.first_failed_at = Some(request.first_failed_at);
        tracing::debug!(queue = %self.window.queue.name, id = %envelope.id, after = ?request.after, "retry scheduled in the broker");
        // The wait lives in the broker, not in the consumer (C12), on
        // tokio's clock.
        self.window.queue.push_after(next, request.after);
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, record: DeadLetter) -> Result<()> {
        self.finish()?;
        self.window.queue.add_dead_letter(record);
        Ok(())
    }
}
