//! # ticketrail-memory
//!
//! An in-process broker: the reference implementation of the ticketrail
//! contract. Exact semantics, no network; delays run on tokio's clock, so
//! tests can run with time paused. Every rule of DESIGN.md holds except C15
//! (there is no broker process to restart).
//!
//! The crate has the file skeleton of every backend (see ADDING_A_BACKEND.md);
//! `store.rs` is the broker itself, which the other backends reach over the
//! network, and `schedule.rs` holds messages published for later (C24).
//!
//! ```
//! use ticketrail_core::{Broker, Message, QueueSpec, SubscribeOptions, Topology};
//! use ticketrail_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ticketrail_core::Result<()> {
//! let broker = MemoryBroker::new();
//! broker
//!     .declare(&Topology::new("app.events").queue(QueueSpec::new("email.notifications").bind("user.#")))
//!     .await?;
//! broker.publish("app.events", Message::new("user.welcome", "hi")).await?;
//! let mut sub = broker.subscribe("email.notifications", SubscribeOptions::default()).await?;
//! let mut delivery = sub.next().await.unwrap()?;
//! assert_eq!(delivery.envelope().payload, "hi");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod broker;
mod config;
mod connection;
mod dead_letters;
mod error;
mod headers;
mod publish;
mod schedule;
mod store;
mod subscription;
mod topology;

/// The name this backend goes by: [`Broker::backend`](ticketrail_core::Broker::backend), metric labels, span attributes.
pub(crate) const BACKEND: &str = "memory";

pub use broker::MemoryBroker;
pub use config::MemoryConfig;
pub use headers::RawMessage;
