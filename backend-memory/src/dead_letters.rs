//! Walking a queue's dead letters (C10, C11).

use std::sync::Arc;

use async_trait::async_trait;
use ticketrail_core::{DeadLetterCursor, DeadLetterEntry, DeadLetterHandle, Envelope, Result};

use crate::connection::Connection;
use crate::error;
use crate::store::Queue;

/// A cursor over the dead letters of one queue that were there when it was
/// opened, by order of arrival.
pub(crate) struct MemoryCursor {
    queue: Arc<Queue>,
    connection: Arc<Connection>,
    /// The next key to look at, and the first one not to.
    from: u64,
    to: u64,
}

impl MemoryCursor {
    pub(crate) fn new(queue: Arc<Queue>, connection: Arc<Connection>) -> Self {
        let to = queue.dead_letter_end();
        MemoryCursor {
            queue,
            connection,
            from: 0,
            to,
        }
    }
}

#[async_trait]
impl DeadLetterCursor for MemoryCursor {
    async fn next(&mut self) -> Option<Result<DeadLetterEntry>> {
        if let Err(e) = self.connection.ensure_open() {
            return Some(Err(e));
        }
        let (key, record) = self.queue.dead_letter_in(self.from, self.to)?;
        self.from = key + 1;
        let handle = MemoryDeadLetter {
            queue: Arc::clone(&self.queue),
            connection: Arc::clone(&self.connection),
            key,
        };
        Some(Ok(DeadLetterEntry::new(
            crate::BACKEND,
            record,
            Box::new(handle),
        )))
    }
}

struct MemoryDeadLetter {
    queue: Arc<Queue>,
    connection: Arc<Connection>,
    key: u64,
}

#[async_trait]
impl DeadLetterHandle for MemoryDeadLetter {
    async fn replay(self: Box<Self>, envelope: Envelope) -> Result<()> {
        self.connection.ensure_open()?;
        // In memory the republish is accepted at once; the record leaves
        // the DLQ in the same step.
        self.queue
            .take_dead_letter(self.key)
            .ok_or_else(|| error::dead_letter_gone(&self.queue.name))?;
        self.queue.replay(envelope);
        Ok(())
    }

    async fn remove(self: Box<Self>) -> Result<()> {
        self.connection.ensure_open()?;
        self.queue
            .take_dead_letter(self.key)
            .map(drop)
            .ok_or_else(|| error::dead_letter_gone(&self.queue.name))
    }
}
