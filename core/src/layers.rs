//! Layers around a [`Handler`]: a timeout, a concurrency limit shared by
//! several consumers, or your own. A layer is a
//! [`tower_layer::Layer`], so layers compose as tower's do (a
//! `tower::ServiceBuilder` stacks them too, and yields a handler);
//! [`Consumer::layer`](crate::Consumer::layer) puts one around a
//! consumer's handler.
//!
//! Flow control that decides whether a delivery is taken at all (the
//! circuit breaker, the rate limit) is not a layer but a setting of the
//! [`Consumer`](crate::Consumer): a layer runs only once a delivery is in
//! hand, and a delivery held waiting would hold its prefetch slot.
//!
//! A layer of your own is a few lines:
//!
//! ```
//! use ticketrail_core::layers::Layer;
//! use ticketrail_core::{Context, Handler, HandlerError};
//!
//! /// Logs how long each message took.
//! struct Timed;
//!
//! impl<H> Layer<H> for Timed {
//!     type Service = TimedHandler<H>;
//!     fn layer(&self, inner: H) -> TimedHandler<H> {
//!         TimedHandler(inner)
//!     }
//! }
//!
//! struct TimedHandler<H>(H);
//!
//! impl<H: Handler> Handler for TimedHandler<H> {
//!     type Message = H::Message;
//!
//!     async fn handle(&self, message: H::Message, ctx: &Context) -> Result<(), HandlerError> {
//!         let started = std::time::Instant::now();
//!         let outcome = self.0.handle(message, ctx).await;
//!         tracing::info!(id = ctx.id(), took = ?started.elapsed(), ok = outcome.is_ok(), "handled");
//!         outcome
//!     }
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::handler::{Context, Handler, HandlerError};

pub use tower_layer::Layer;

/// Fails an attempt still running after a limit as a retryable error
/// ("handler timed out after ..."): the handler's future is dropped. The
/// same as [`Consumer::handler_timeout`](crate::Consumer::handler_timeout),
/// as a layer.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// Attempts end after `limit`.
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl<H> Layer<H> for TimeoutLayer {
    type Service = Timeout<H>;

    fn layer(&self, inner: H) -> Timeout<H> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// A handler whose attempts end after a limit; see [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<H> {
    inner: H,
    limit: Duration,
}

impl<H: Handler> Handler for Timeout<H> {
    type Message = H::Message;

    async fn handle(&self, message: H::Message, ctx: &Context) -> Result<(), HandlerError> {
        match tokio::time::timeout(self.limit, self.inner.handle(message, ctx)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(HandlerError::retryable(format!(
                "handler timed out after {:?}",
                self.limit
            ))),
        }
    }
}

/// At most `n` handlers at once across every consumer whose handler it
/// wraps (clones share the limit): for a downstream several queues call,
/// such as one mail provider. A delivery waiting for its turn holds its
/// consumer's prefetch slot.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimitLayer {
    /// At most `n` at once (at least 1).
    pub fn new(n: usize) -> Self {
        ConcurrencyLimitLayer {
            permits: Arc::new(Semaphore::new(n.max(1))),
        }
    }
}

impl<H> Layer<H> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<H>;

    fn layer(&self, inner: H) -> ConcurrencyLimit<H> {
        ConcurrencyLimit {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

/// A handler that runs only while it holds one of a shared number of
/// permits; see [`ConcurrencyLimitLayer`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<H> {
    inner: H,
    permits: Arc<Semaphore>,
}

impl<H: Handler> Handler for ConcurrencyLimit<H> {
    type Message = H::Message;

    async fn handle(&self, message: H::Message, ctx: &Context) -> Result<(), HandlerError> {
        // A free permit is taken without a future; the semaphore is never
        // closed.
        let _permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => self
                .permits
                .acquire()
                .await
                .map_err(HandlerError::retryable)?,
        };
        self.inner.handle(message, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::envelope::Message;
    use crate::handler::handler_fn;

    fn context() -> Context {
        let envelope = Message::new("k", "1").into_envelope(std::time::SystemTime::now());
        Context::new(Arc::new(envelope), Arc::from("q"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_fails_a_slow_attempt_as_retryable() {
        let slow = handler_fn(|_: u32, _ctx: Context| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<(), HandlerError>(())
        });
        let timed = TimeoutLayer::new(Duration::from_secs(1)).layer(slow);
        let e = timed.handle(1, &context()).await.unwrap_err();
        assert!(e.is_retryable());
        assert!(e.to_string().contains("timed out after 1s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_limit_bounds_the_handlers_of_every_consumer_it_wraps() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let handler = |running: Arc<AtomicUsize>, most: Arc<AtomicUsize>| {
            handler_fn(move |_: u32, _ctx: Context| {
                let (running, most) = (Arc::clone(&running), Arc::clone(&most));
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            })
        };
        let limit = ConcurrencyLimitLayer::new(2);
        let a = Arc::new(limit.layer(handler(Arc::clone(&running), Arc::clone(&most))));
        let b = Arc::new(limit.layer(handler(Arc::clone(&running), Arc::clone(&most))));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..6 {
            let h = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            calls.spawn(async move { h.handle(1, &context()).await });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
