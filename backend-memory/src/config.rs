//! Settings of the in-process broker.

/// Settings of a [`MemoryBroker`](crate::MemoryBroker).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// The largest payload accepted, in bytes. Default 16 MiB.
    pub max_payload: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_payload: 16 * 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Sets [`max_payload`](MemoryConfig::max_payload).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}
