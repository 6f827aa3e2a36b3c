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
//! - dead letters are copies with their record in `x-tr-*` headers, in the
//!   quorum queue `<queue>.dlq` (C10, C11);
//! - `x-delivery-limit` with at-least-once dead-lettering sends a message
//!   that keeps crashing its consumer to the DLQ (C13);
//! - the connection is re-opened with backoff after it breaks, topology is
//!   declared again and consumers resume (C15).

mod acks;
mod broker;
mod config;
mod dead_letters;
mod delivery;
mod error;
mod headers;
mod link;
mod topology;

pub use broker::RabbitBroker;
pub use config::RabbitConfig;
