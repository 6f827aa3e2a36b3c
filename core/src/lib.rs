//! # ticketrail-core
//!
//! The contract of ticketrail, without any broker client: the [`Envelope`],
//! the [`Broker`] trait every backend implements, [`Delivery`] and its
//! settlement, typed [`Handler`]s over a [`Codec`], [`RetryPolicy`]s, the
//! [`Consumer`] loop, the [`Publisher`], dead-letter records and the one
//! [`Error`] type.
//!
//! Applications normally use the `ticketrail` facade crate, which re-exports
//! all of this together with the backends. The rules C1..C18 named in the
//! docs are those of DESIGN.md; the `ticketrail-conformance` suite proves
//! each one on each backend.

mod broker;
mod capabilities;
mod codec;
mod confirmation;
mod consumer;
mod dead_letter;
mod delivery;
mod envelope;
mod error;
mod handler;
mod id;
pub mod layers;
pub mod metrics;
mod publisher;
mod redact;
mod retry;
mod topology;
pub mod trace;
pub mod wire;

pub use broker::{
    Broker, QueueStats, Scheduled, ScheduledMessage, SharedBroker, SubscribeOptions, Subscription,
    TrySend,
};
pub use capabilities::Capabilities;
pub use codec::{Codec, Json};
pub use confirmation::Confirmation;
pub use consumer::{
    CircuitBreaker, Consumer, ConsumerState, Health, HealthProbe, Pause, RunningConsumer,
};
pub use dead_letter::{
    truncate_error_text, truncate_text, DeadLetter, DeadLetterCursor, DeadLetterEntry,
    DeadLetterHandle, DeadLetterReason, Replay, MAX_ERROR_LEN, REPLAYED_FROM,
};
pub use delivery::{Delivery, RetryRequest, Settle};
pub use envelope::{from_unix_millis, to_unix_millis, Envelope, Headers, Message};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use handler::{handler_fn, Context, FailureKind, Handler, HandlerError, HandlerFn};
pub use id::new_message_id;
pub use publisher::Publisher;
pub use redact::redact_url;
pub use retry::{Exponential, ExponentialBuilder, Fixed, NoRetry, RetryDecision, RetryPolicy};
pub use topology::{
    topic_matches, validate_name, validate_pattern, validate_routing_key, Finding, FindingStatus,
    QueueSpec, Topology, MAX_NAME_LEN,
};

/// Re-exported for backends implementing [`Broker`], [`Subscription`] and [`Settle`].
pub use async_trait::async_trait;
