//! Publishing into the store: a message is routed to every queue bound to
//! its routing key, or refused as unroutable (C1).

use std::sync::Arc;
use std::time::SystemTime;

use ticketrail_core::{
    validate_name, validate_routing_key, Confirmation, Envelope, Message, Result,
};

use crate::connection::Connection;
use crate::error;
use crate::headers::{self, RawMessage};
use crate::schedule;

/// Routes a message; in memory a message is accepted before this returns,
/// so its confirmation is already resolved.
pub(crate) fn send(
    connection: &Connection,
    topic_space: &str,
    message: Message,
) -> Result<Confirmation> {
    connection.ensure_open()?;
    // The topic space is checked where it is looked up: a declared one
    // was checked when it was declared.
    message.check_contents(connection.server.config.max_payload, "the memory broker")?;
    let id = message.id.clone();
    route(
        connection,
        topic_space,
        Arc::new(message.into_envelope(SystemTime::now())),
        &[],
    )?;
    Ok(Confirmation::confirmed(id))
}

/// Holds a message until `at` (C24). The topic space must be declared now;
/// the queues it goes to are those bound at its time.
pub(crate) fn send_at(
    connection: &Connection,
    topic_space: &str,
    message: Message,
    at: SystemTime,
) -> Result<Confirmation> {
    connection.ensure_open()?;
    message.check_contents(connection.server.config.max_payload, "the memory broker")?;
    if !connection.registry().spaces.contains_key(topic_space) {
        validate_name("topic space", topic_space)?;
        return Err(error::space_not_declared(topic_space));
    }
    let id = message.id.clone();
    schedule::hold(
        &connection.server,
        topic_space,
        message.into_envelope(SystemTime::now()),
        at,
    );
    Ok(Confirmation::confirmed(id))
}

/// Routes a message as a plain client publishes it.
pub(crate) fn send_raw(connection: &Connection, topic_space: &str, raw: RawMessage) -> Result<()> {
    connection.ensure_open()?;
    validate_routing_key(&raw.routing_key)?;
    let decoded = headers::decode(raw, SystemTime::now());
    route(
        connection,
        topic_space,
        Arc::new(decoded.envelope),
        &decoded.notes,
    )
}

fn route(
    connection: &Connection,
    topic_space: &str,
    envelope: Arc<Envelope>,
    notes: &[String],
) -> Result<()> {
    match connection.registry().route(topic_space, &envelope, notes) {
        Some(0) => Err(error::no_binding(topic_space, &envelope.routing_key)),
        Some(_) => Ok(()),
        None => {
            validate_name("topic space", topic_space)?;
            Err(error::space_not_declared(topic_space))
        }
    }
}
