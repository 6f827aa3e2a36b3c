//! What a backend can honour beyond the rules every backend must.

/// The optional rules of the contract a backend honours. The conformance
/// suite reports a rule whose capability is `false` as not applicable, never
/// as passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// C15: publishers and consumers resume by themselves after the broker
    /// restarts. An in-process broker cannot restart, so it has nothing to
    /// resume from.
    pub reconnect: bool,
    /// C24: [`Broker::send_at`](crate::Broker::send_at) holds a message in
    /// the broker for later delivery.
    pub scheduling: bool,
}

impl Capabilities {
    /// Capabilities with every optional rule off.
    pub const NONE: Capabilities = Capabilities {
        reconnect: false,
        scheduling: false,
    };

    /// Sets [`reconnect`](Capabilities::reconnect).
    pub const fn with_reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Sets [`scheduling`](Capabilities::scheduling).
    pub const fn with_scheduling(mut self, scheduling: bool) -> Self {
        self.scheduling = scheduling;
        self
    }
}
