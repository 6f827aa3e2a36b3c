//! What the suite needs from a backend beyond the [`Broker`](ticketrail_core::Broker)
//! trait, and the one place that makes a harness from a backend's name.

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};

use crate::{MemoryHarness, NatsHarness, RabbitHarness};

/// The result of one rule on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The rule holds.
    Passed,
    /// The backend declares it cannot honour the rule; why.
    NotApplicable(String),
    /// The rule does not hold; what was seen.
    Failed(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Passed => f.write_str("passed"),
            Verdict::NotApplicable(why) => write!(f, "n/a ({why})"),
            Verdict::Failed(what) => write!(f, "failed: {what}"),
        }
    }
}

/// A message as a plain client of the broker publishes it (C17, C18).
#[derive(Debug, Clone, Copy, Default)]
pub struct Foreign<'a> {
    /// The routing key.
    pub routing_key: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// The broker's message id (AMQP `message-id`, `Nats-Msg-Id`), if any.
    pub message_id: Option<&'a str>,
    /// Headers, as the broker carries them.
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> Foreign<'a> {
    /// A message with `payload` and no id or headers.
    pub fn new(routing_key: &'a str, payload: &'a [u8]) -> Self {
        Foreign {
            routing_key,
            payload,
            ..Foreign::default()
        }
    }
}

/// A backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The backend's name in the report (`memory`, `rabbitmq`, `nats`,
    /// `rabbitmq-cluster`, `nats-cluster`).
    fn name(&self) -> &'static str;

    /// The first word of every name a rule declares: `tr-c08-<unique>.q`.
    /// `ticketrail check --prefix` picks it, so that the broker's policies
    /// for those names apply as they would to production queues.
    fn prefix(&self) -> &str {
        "tr"
    }

    /// Opens a new connection. Closing it (after aborting the tasks that use
    /// it) is how the suite kills a consumer.
    async fn connect(&self) -> Result<SharedBroker>;

    /// Publishes as a plain client of the broker would, with no ticketrail
    /// headers (C17): the message's id as the broker's message id if given,
    /// its headers as the broker's headers (C18's `traceparent`).
    async fn publish_foreign(&self, topic_space: &str, message: Foreign<'_>) -> Result<()>;

    /// How long a killed consumer's unsettled delivery may take to be
    /// delivered again.
    fn redelivery_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// The broker's URL, for a rule that connects its own way (through a
    /// [`FaultProxy`](crate::testing::FaultProxy), C21); `None` for the
    /// in-process broker, which has no network.
    fn broker_url(&self) -> Option<String> {
        None
    }

    /// Connects the suite's way to `url`, a variant of
    /// [`broker_url`](Harness::broker_url) (another address, settings in
    /// its query).
    async fn connect_to(&self, url: &str) -> Result<SharedBroker> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("the {} harness connects to no URL (`{url}`)", self.name()),
        ))
    }

    /// A throwaway broker that the suite may restart (C15); `None` where the
    /// backend has no server to restart.
    async fn restartable(&self) -> Result<Option<Box<dyn Restartable>>> {
        Ok(None)
    }

    /// Stops and removes whatever servers the harness started itself.
    async fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// A throwaway broker server the suite owns and restarts (C15).
#[async_trait]
pub trait Restartable: Send + Sync {
    /// Opens a connection to the throwaway server.
    async fn connect(&self) -> Result<SharedBroker>;

    /// The throwaway server's URL, for connecting another way (through a
    /// fault proxy); `None` where there is no single one.
    fn url(&self) -> Option<String> {
        None
    }

    /// Stops the server, keeping its data; on a cluster, kills (SIGKILL)
    /// the node that leads `queue`, the one whose loss matters most.
    async fn halt(&self, queue: &str) -> Result<()>;

    /// Starts the halted server (node) again with its data, on the same port.
    async fn resume(&self) -> Result<()>;

    /// Stops the server for good and removes its data.
    async fn remove(&self) -> Result<()>;
}

/// The harness of a backend by its name, for the runner, the drill and the
/// bench: `memory`, `rabbitmq` (at `AMQP_URL`), `nats` (at `NATS_URL`),
/// `rabbitmq-cluster` and `nats-cluster` (throwaway three-node clusters it
/// starts; [`Harness::finish`] removes them).
pub async fn harness_for(name: &str) -> Result<Box<dyn Harness>> {
    Ok(match name {
        "memory" => Box::new(MemoryHarness::default()),
        "rabbitmq" => Box::new(RabbitHarness::from_env()),
        "nats" => Box::new(NatsHarness::from_env()),
        "rabbitmq-cluster" => Box::new(crate::clusters::RabbitClusterHarness::start().await?),
        "nats-cluster" => Box::new(crate::clusters::NatsClusterHarness::start().await?),
        other => {
            return Err(Error::config(format!(
                "no backend `{other}` (memory, rabbitmq, nats, rabbitmq-cluster, nats-cluster)"
            )))
        }
    })
}

/// The harness for the broker at `url` (`amqp://`, `amqps://`, `nats://`,
/// `tls://`), declaring only names that start with `prefix` and starting no
/// throwaway servers: what `ticketrail check` runs the rules on.
pub fn harness_for_url(url: &str, prefix: &str) -> Result<Box<dyn Harness>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    Ok(match scheme {
        "amqp" | "amqps" => Box::new(RabbitHarness::checking(url, prefix)),
        "nats" | "tls" => Box::new(NatsHarness::checking(url, prefix)),
        _ => {
            return Err(Error::config(format!(
                "broker URL must start with amqp://, amqps://, nats:// or tls://; got `{}`",
                ticketrail_core::redact_url(url)
            )))
        }
    })
}

/// Adds to a failed connect how to start the broker, when the broker could
/// not be reached at all (a missing broker is a loud failure, never a skip).
pub(crate) fn with_start_hint(e: Error, hint: &str) -> Error {
    if !e.is_transient() {
        return e;
    }
    Error::new(e.kind(), format!("{} (is it running? {hint})", e.message())).with_source(e)
}
