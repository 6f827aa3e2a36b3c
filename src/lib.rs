#![doc = include_str!("../README.md")]

// What applications use, by name: a change here is a change of the
// public API (see public-api.txt).
pub use ticketrail_core::{
    handler_fn, redact_url, Broker, CircuitBreaker, Codec, Confirmation, Consumer, ConsumerState,
    Context, DeadLetter, DeadLetterReason, Envelope, Error, ErrorKind, Exponential,
    ExponentialBuilder, FailureKind, Fixed, Handler, HandlerError, HandlerFn, Headers, Health,
    HealthProbe, Json, Message, NoRetry, Pause, Publisher, QueueSpec, QueueStats, Replay, Result,
    RetryDecision, RetryPolicy, RunningConsumer, SharedBroker, Topology,
};
pub use ticketrail_core::{layers, metrics, trace};

/// What [`Broker::inspect`] reports: each object of a topology as the
/// broker has it, and how it differs from the declaration; and what
/// [`Broker::scheduled`] counts and [`Broker::list_scheduled`] lists.
pub mod inspect {
    pub use ticketrail_core::{Finding, FindingStatus, Scheduled, ScheduledMessage};
}

/// For authors of backends and tools below the [`Consumer`]: the
/// subscription and settlement traits, dead-letter cursors, the wire form
/// of ticketrail's headers, and the checks every backend shares. An
/// application does not need any of it.
pub mod backend {
    pub use ticketrail_core::wire;
    pub use ticketrail_core::{
        async_trait, from_unix_millis, new_message_id, to_unix_millis, topic_matches,
        truncate_error_text, truncate_text, validate_name, validate_pattern, validate_routing_key,
        BoxError, Capabilities, DeadLetterCursor, DeadLetterEntry, DeadLetterHandle, Delivery,
        RetryRequest, Settle, SubscribeOptions, Subscription, TrySend, MAX_ERROR_LEN, MAX_NAME_LEN,
        REPLAYED_FROM,
    };
}

/// The in-process broker (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub mod memory {
    pub use ticketrail_memory::*;
}

/// The RabbitMQ backend (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use ticketrail_rabbitmq::*;
}

/// The NATS JetStream backend (feature `nats`).
#[cfg(feature = "nats")]
pub mod nats {
    pub use ticketrail_nats::*;
}

/// The transactional outbox and idempotent inbox on PostgreSQL (feature
/// `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use ticketrail_postgres::*;
}

/// Connects to the broker a URL names, so a program can pick its backend at
/// run time: `memory://` (a new in-process broker), `amqp://` or `amqps://`
/// (RabbitMQ), `nats://` or `tls://` (NATS JetStream). A scheme whose
/// feature is off is an [`ErrorKind::Unsupported`] error naming the feature.
pub async fn connect(url: &str) -> Result<SharedBroker> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme)
        .unwrap_or("");
    match scheme {
        "memory" => connect_memory(),
        "amqp" | "amqps" => connect_rabbitmq(url).await,
        "nats" | "tls" => connect_nats(url).await,
        _ => Err(Error::config(format!(
            "broker URL must start with memory://, amqp://, amqps://, nats:// or tls://; got `{}`",
            redact_url(url)
        ))),
    }
}

#[cfg(feature = "memory")]
fn connect_memory() -> Result<SharedBroker> {
    Ok(std::sync::Arc::new(memory::MemoryBroker::new()))
}

#[cfg(not(feature = "memory"))]
fn connect_memory() -> Result<SharedBroker> {
    Err(missing_feature("memory"))
}

#[cfg(feature = "rabbitmq")]
async fn connect_rabbitmq(url: &str) -> Result<SharedBroker> {
    let broker = rabbitmq::RabbitBroker::connect(rabbitmq::RabbitConfig::from_url(url)?).await?;
    Ok(std::sync::Arc::new(broker))
}

#[cfg(not(feature = "rabbitmq"))]
async fn connect_rabbitmq(_url: &str) -> Result<SharedBroker> {
    Err(missing_feature("rabbitmq"))
}

#[cfg(feature = "nats")]
async fn connect_nats(url: &str) -> Result<SharedBroker> {
    let broker = nats::NatsBroker::connect(nats::NatsConfig::from_url(url)?).await?;
    Ok(std::sync::Arc::new(broker))
}

#[cfg(not(feature = "nats"))]
async fn connect_nats(_url: &str) -> Result<SharedBroker> {
    Err(missing_feature("nats"))
}

#[allow(dead_code)] // unused when every backend feature is on
fn missing_feature(feature: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "this build has no {feature} backend; enable the `{feature}` feature of ticketrail"
        ),
    )
}
