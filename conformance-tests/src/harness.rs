//! What the suite needs from a backend beyond the [`Broker`](ticketrail_core::Broker)
//! trait, and the one place that makes a harness from a backend's name.

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;
use ticketrail_core::{Error, Result, SharedBroker};

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

/// A backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The backend's name in the report (`memory`, `rabbitmq`, `nats`,
    /// `rabbitmq-cluster`, `nats-cluster`).
    fn name(&self) -> &'static str;

    /// Opens a new connection. Closing it (after aborting the tasks that use
    /// it) is how the suite kills a consumer.
    async fn connect(&self) -> Result<SharedBroker>;

    /// Publishes as a plain client of the broker would, with no ticketrail
    /// headers (C17), with `message_id` as the broker's message id if given.
    async fn publish_foreign(
        &self,
        topic_space: &str,
        routing_key: &str,
        payload: &[u8],
        message_id: Option<&str>,
    ) -> Result<()>;

    /// How long a killed consumer's unsettled delivery may take to be
    /// delivered again.
    fn redelivery_timeout(&self) -> Duration {
        Duration::from_secs(10)
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

    /// Stops the server, keeping its data (on a cluster: the node that
    /// matters most, the one that leads the work queue).
    async fn halt(&self) -> Result<()>;

    /// Starts the halted server again with its data, on the same port.
    async fn resume(&self) -> Result<()>;

    /// Stops the server for good and removes its data.
    async fn remove(&self) -> Result<()>;
}

/// The harness of a backend by its name, for the runner, the drill and the
/// bench: `memory`, `rabbitmq` (at `AMQP_URL`), `nats` (at `NATS_URL`).
pub async fn harness_for(name: &str) -> Result<Box<dyn Harness>> {
    Ok(match name {
        "memory" => Box::new(MemoryHarness::default()),
        "rabbitmq" => Box::new(RabbitHarness::from_env()),
        "nats" => Box::new(NatsHarness::from_env()),
        other => {
            return Err(Error::config(format!(
                "no backend `{other}` (memory, rabbitmq, nats)"
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
