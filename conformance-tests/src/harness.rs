//! What the suite needs from a backend beyond the [`Broker`] trait.

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;
use ticketrail_core::{Result, SharedBroker};

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
    /// The backend's name in the report (`memory`, `rabbitmq`, `nats`).
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
}

/// A throwaway broker server the suite owns and restarts (C15).
#[async_trait]
pub trait Restartable: Send + Sync {
    /// Opens a connection to the throwaway server.
    async fn connect(&self) -> Result<SharedBroker>;

    /// Stops the server, keeping its data.
    async fn halt(&mut self) -> Result<()>;

    /// Starts the halted server again with its data, on the same port.
    async fn resume(&mut self) -> Result<()>;

    /// Stops the server for good and removes its data.
    async fn remove(&mut self) -> Result<()>;
}

/// Adds to a failed connect how to start the broker, when the broker could
/// not be reached at all (a missing broker is a loud failure, never a skip).
pub(crate) fn with_start_hint(e: ticketrail_core::Error, hint: &str) -> ticketrail_core::Error {
    if !e.is_transient() {
        return e;
    }
    ticketrail_core::Error::new(e.kind(), format!("{} (is it running? {hint})", e.message()))
        .with_source(e)
}
