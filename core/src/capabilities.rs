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
}

impl Capabilities {
    /// Capabilities with every optional rule off.
    pub const NONE: Capabilities = Capabilities { reconnect: false };

    /// Sets [`reconnect`](Capabilities::reconnect).
    pub const fn with_reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }
}
