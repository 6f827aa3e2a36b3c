#![doc = include_str!("../README.md")]

mod error;
mod inbox;
pub mod metrics;
mod migrate;
mod outbox;
mod relay;
mod store;
mod tables;

pub use inbox::{Inbox, InboxHandler};
pub use migrate::SCHEMA_VERSION;
pub use outbox::Outbox;
pub use relay::{Relay, RelayConfig, RelayPass, RunningRelay};
pub use store::{Deleted, OutboxStats, RefusedRow, Retention, Store};
pub use tables::Tables;
