//! # ticketrail-conformance
//!
//! The behaviour suite of ticketrail: one async function per rule of the
//! contract (C1..C17 in DESIGN.md), run against any backend through a
//! [`Harness`]. The binary prints one line per rule:
//!
//! ```text
//! cargo run -p ticketrail-conformance -- memory
//! conformance memory C01 passed
//! ...
//! conformance memory C15 n/a (the backend cannot reconnect: ...)
//! conformance memory: 16 passed, 1 n/a, 0 failed
//! ```
//!
//! Every rule uses fresh, unique names and deletes what it declared.

mod drill;
mod harness;
mod memory;
mod nats;
mod rabbitmq;
pub mod rules;
mod servers;
mod support;

pub use drill::{drill_target, run_drill, DrillReport, DrillTarget};
pub use harness::{Harness, Restartable, Verdict};
pub use memory::MemoryHarness;
pub use nats::{NatsHarness, DEFAULT_NATS_URL};
pub use rabbitmq::{RabbitHarness, DEFAULT_AMQP_URL};
pub use rules::{run_rule, run_suite, Rule, Summary, RULES};
