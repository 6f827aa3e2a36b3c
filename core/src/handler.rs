//! The user's code: a typed handler and the error it returns.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::envelope::Envelope;

/// What a handler sees besides the decoded message: the envelope (id,
/// attempt, routing key, headers) and the queue.
#[derive(Debug, Clone)]
pub struct Context {
    envelope: Arc<Envelope>,
    queue: Arc<str>,
}

impl Context {
    /// A context for a delivery of `envelope` from `queue`.
    pub fn new(envelope: Arc<Envelope>, queue: Arc<str>) -> Self {
        Context { envelope, queue }
    }

    /// The message id, kept across retries and replay: use it to make side
    /// effects idempotent.
    pub fn id(&self) -> &str {
        &self.envelope.id
    }

    /// 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.envelope.attempt
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The queue the message came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Retry according to the policy (a timeout, a 503, a broken connection).
    Retryable,
    /// Retrying cannot help (an invalid address, a 400): dead-letter at once.
    Permanent,
}

/// A handler's failure: retryable or permanent, with its cause.
///
/// Any `std::error::Error` converts into a retryable `HandlerError`, so `?`
/// works in handlers; say [`HandlerError::permanent`] when retrying is futile.
pub struct HandlerError {
    kind: FailureKind,
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retryable(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            error: error.into(),
        }
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            error: error.into(),
        }
    }

    /// Retryable or permanent.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether the policy may retry it.
    pub fn is_retryable(&self) -> bool {
        self.kind == FailureKind::Retryable
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        HandlerError::retryable(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    /// The error and its chain of sources, joined by `: `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// User code run for each message of a queue.
///
/// ```
/// use serde::Deserialize;
/// use ticketrail_core::{Context, Handler, HandlerError};
///
/// #[derive(Deserialize)]
/// struct Resize { image: String, width: u32 }
///
/// struct Resizer;
///
/// impl Handler for Resizer {
///     type Message = Resize;
///
///     async fn handle(&self, msg: Resize, ctx: &Context) -> Result<(), HandlerError> {
///         if msg.width == 0 {
///             return Err(HandlerError::permanent(format!("{}: width 0", ctx.id())));
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The message type, decoded by the consumer's codec.
    type Message: DeserializeOwned + Send + 'static;

    /// Handles one message. `Ok` acks it; an error retries or dead-letters it.
    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A shared handler is a handler, so a program can keep an `Arc` to the
/// state its handler builds up (counters, caches) while a consumer runs it.
impl<H: Handler> Handler for Arc<H> {
    type Message = H::Message;

    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        H::handle(self, message, ctx)
    }
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
pub struct HandlerFn<F, M> {
    f: F,
    _message: std::marker::PhantomData<fn(M)>,
}

// By hand: a derive would ask for `M: Clone` too.
impl<F: Clone, M> Clone for HandlerFn<F, M> {
    fn clone(&self) -> Self {
        HandlerFn {
            f: self.f.clone(),
            _message: std::marker::PhantomData,
        }
    }
}

/// Turns `async |message, ctx| -> Result<(), HandlerError>` into a [`Handler`].
///
/// ```
/// use ticketrail_core::{handler_fn, Context, HandlerError};
///
/// let handler = handler_fn(|n: u64, _ctx: Context| async move {
///     if n % 2 == 0 { Ok(()) } else { Err(HandlerError::retryable("odd")) }
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, M, Fut>(f: F) -> HandlerFn<F, M>
where
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    M: DeserializeOwned + Send + 'static,
{
    HandlerFn {
        f,
        _message: std::marker::PhantomData,
    }
}

impl<F, M, Fut> Handler for HandlerFn<F, M>
where
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
    M: DeserializeOwned + Send + 'static,
{
    type Message = M;

    fn handle(
        &self,
        message: M,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(message, ctx.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("smtp send failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn question_mark_gives_a_retryable_error_with_its_chain() {
        fn fails() -> Result<(), HandlerError> {
            Err(Outer(std::io::Error::other("connection reset")))?;
            Ok(())
        }
        let e = fails().unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "smtp send failed: connection reset");
        assert_eq!(
            HandlerError::permanent("bad address").kind(),
            FailureKind::Permanent
        );
    }
}
