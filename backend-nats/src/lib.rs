//! # ticketrail-nats
//!
//! The NATS JetStream backend of ticketrail, on async-nats, for
//! nats-server 2.9 or newer with JetStream enabled.
//!
//! How the contract maps onto JetStream:
//! - a topic space is a stream (interest retention, file storage) whose
//!   subjects are `<space>.<pattern>` for every binding; `#` as the last
//!   word is captured as both `<prefix>` and `<prefix>.>` so it also matches
//!   zero words (C16); publishing to a subject no stream captures is
//!   [`Unroutable`](ticketrail_core::ErrorKind::Unroutable) (C1);
//! - a queue is a durable pull consumer with explicit acks, filtered to its
//!   bindings (several filter subjects from 2.10); a subscription pulls no
//!   more than its free prefetch slots (C5);
//! - every publish waits for the stream's acknowledgement; the id travels
//!   in `Ticketrail-Id` (a foreign message's `Nats-Msg-Id` is its id);
//! - a retry is a `Nak` with the delay: the message stays in the stream
//!   (C7, C12). The broker keeps each message's first failure and retry
//!   count, so the attempt counts retries, and a redelivery after a crash
//!   counts against the queue's delivery limit instead (C13);
//! - a message published for later waits on a subject of its own: from
//!   2.12 in the stream, held by a consumer nothing reads, and the server
//!   publishes it at its time; before, in the stream `TR_LATER_<stream>`,
//!   and the movers of the connections using the space publish it (C24);
//! - dead letters go to the stream `TR_DLQ_<stream>` under
//!   `Nats-Msg-Id = stream:sequence:queue`, then the original is
//!   terminated (C10); replays reach their queue by a subject of its own.
//!
//! The crate has the file skeleton of every backend (see
//! ADDING_A_BACKEND.md). Its extra files: `pull.rs` (pull requests of its
//! own), `failures.rs` (first failures and retries kept in the broker),
//! `quarantine.rs` (messages the client cannot parse, moved to the DLQ),
//! `scheduled.rs` (listing and cancelling messages published for later),
//! `mover.rs` (publishing them at their time on servers before 2.12)
//! and `versions.rs` (what each server version changes).

mod broker;
mod config;
mod connection;
mod dead_letters;
mod error;
mod failures;
mod headers;
mod mover;
mod publish;
mod pull;
mod quarantine;
mod scheduled;
mod subscription;
mod topology;
mod versions;

/// The name this backend goes by: [`Broker::backend`](ticketrail_core::Broker::backend), metric labels, span attributes.
pub(crate) const BACKEND: &str = "nats";

pub use broker::NatsBroker;
pub use config::NatsConfig;
