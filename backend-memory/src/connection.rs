//! A connection to the in-process broker: access to its store, and the
//! closed flag that ends the connection's subscriptions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use ticketrail_core::{Envelope, Result};

use crate::config::MemoryConfig;
use crate::error;
use crate::schedule::{Router, Schedule};
use crate::store::{Queue, Registry};

/// The broker every connection of one [`MemoryBroker`](crate::MemoryBroker)
/// reaches.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) config: MemoryConfig,
    registry: Mutex<Registry>,
    /// Messages published for later (C24).
    pub(crate) schedule: Schedule,
}

impl Server {
    pub(crate) fn new(config: MemoryConfig) -> Arc<Self> {
        Arc::new(Server {
            config,
            registry: Mutex::new(Registry::default()),
            schedule: Schedule::default(),
        })
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every change to the registry is one insert or remove: a poisoned
        // lock is still sound.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Router for Server {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn route(&self, topic_space: &str, envelope: &Arc<Envelope>) -> Option<usize> {
        self.registry().route(topic_space, envelope, &[])
    }
}

/// One connection: closing it ends its subscriptions, and settlements of
/// its deliveries no longer arrive.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) server: Arc<Server>,
    closed_flag: AtomicBool,
    /// Woken when the connection is closed.
    pub(crate) closed: Notify,
}

impl Connection {
    pub(crate) fn open(server: Arc<Server>) -> Arc<Self> {
        Arc::new(Connection {
            server,
            closed_flag: AtomicBool::new(false),
            closed: Notify::new(),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed_flag.load(Ordering::Acquire)
    }

    pub(crate) fn close(&self) {
        self.closed_flag.store(true, Ordering::Release);
        self.closed.notify_waiters();
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(error::closed());
        }
        Ok(())
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.server.registry()
    }

    /// A declared queue.
    pub(crate) fn queue(&self, name: &str) -> Result<Arc<Queue>> {
        self.ensure_open()?;
        self.registry()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| error::not_declared(name))
    }
}
