//! # ticketrail-rabbitmq
//!
//! The RabbitMQ backend of ticketrail, on lapin. It needs RabbitMQ 3.10 or
//! newer and no plugins.
//!
//! How the contract maps onto RabbitMQ:
//! - a topic space is a durable topic exchange; a work queue is a quorum
//!   queue bound to it by pattern (C16);
//! - publishes are `mandatory` and wait for the publisher confirm, so an
//!   unroutable message is an error (C1);
//! - a retry publishes a copy (same id, attempt + 1) to a wait queue whose
//!   TTL dead-letters it back to the work queue, then acks the original:
//!   the wait lives in the broker (C7, C12). Wait queues exist per delay
//!   tier; a delay is rounded up to its tier, which keeps C7's bound;
//! - dead letters are copies with their record in `Ticketrail-*` headers
//!   (core's wire format), in the quorum queue `<queue>.dlq` (C10, C11);
//! - `x-delivery-limit` with at-least-once dead-lettering sends a message
//!   that keeps crashing its consumer to the DLQ (C13);
//! - connections are re-opened with backoff after they break, on the next
//!   node of the URL's list, topology is declared again and consumers
//!   resume (C15). Each subscription has a connection of its own.
//!
//! The crate has the file skeleton of every backend (see
//! ADDING_A_BACKEND.md). Its extra files: `acks.rs` (acks coalesced into
//! `multiple` acks), `ladder.rs` and `schedule.rs` (messages published for
//! later, C24), `raw.rs` (a small AMQP client that reads what lapin
//! cannot parse), `sweep.rs` (retries a wait queue kept past their time,
//! brought back by ticketrail) and `versions.rs` (what each RabbitMQ
//! version changes).

mod acks;
mod broker;
mod config;
mod connection;
mod dead_letters;
mod error;
mod headers;
mod ladder;
mod publish;
mod schedule;
// The raw reader is the backend's own; the test suite, which publishes and
// reads what lapin refuses, reaches it through the unstable `raw` feature.
// Not part of the API: no semver promise.
#[cfg(feature = "raw")]
#[doc(hidden)]
pub mod raw;
#[cfg(not(feature = "raw"))]
#[allow(unreachable_pub, dead_code)]
mod raw;
mod subscription;
mod sweep;
mod topology;
mod versions;

/// The name this backend goes by: [`Broker::backend`](ticketrail_core::Broker::backend), metric labels, span attributes.
pub(crate) const BACKEND: &str = "rabbitmq";

pub use broker::RabbitBroker;
pub use config::RabbitConfig;
