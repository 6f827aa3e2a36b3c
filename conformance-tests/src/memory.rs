//! The in-process broker under test.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::{Result, SharedBroker};
use ticketrail_memory::{MemoryBroker, RawMessage};

use crate::harness::{Foreign, Harness};

/// Runs the suite on one [`MemoryBroker`]; each `connect` is a new
/// connection to it.
#[derive(Debug, Default)]
pub struct MemoryHarness {
    broker: MemoryBroker,
}

impl MemoryHarness {
    /// The broker every connection of this harness reaches.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self) -> Result<SharedBroker> {
        Ok(Arc::new(self.broker.connect()))
    }

    async fn publish_foreign(&self, topic_space: &str, message: Foreign<'_>) -> Result<()> {
        let mut raw = RawMessage::new(message.routing_key, message.payload.to_vec());
        raw.message_id = message.message_id.map(str::to_owned);
        for (key, value) in message.headers {
            raw.headers.insert((*key).to_owned(), (*value).to_owned());
        }
        self.broker.publish_raw(topic_space, raw).await
    }

    fn redelivery_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
}
