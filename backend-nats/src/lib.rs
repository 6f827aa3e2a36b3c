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
//! - a queue is a durable pull consumer with explicit acks; a subscription
//!   pulls no more than its free prefetch slots (C5);
//! - every publish waits for the stream's acknowledgement; the id travels
//!   in `Ticketrail-Id` (a foreign message's `Nats-Msg-Id` is its id);
//! - a retry is a `Nak` with the delay: the message stays in the stream
//!   (C7, C12). The attempt is the server's delivery count, so crashes count
//!   as attempts; the consumer dead-letters a message delivered more often
//!   than its policy allows (C13), and the consumer's `max_deliver` is a
//!   backstop a subscription enforces itself;
//! - dead letters go to the stream `<stream>_dlq` under
//!   `Nats-Msg-Id = stream:sequence`, then the original is terminated (C10).

mod broker;
mod config;
mod dead_letters;
mod delivery;
mod error;
mod headers;
mod topology;

pub use broker::NatsBroker;
pub use config::NatsConfig;
