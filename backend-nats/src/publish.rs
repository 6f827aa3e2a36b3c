//! Publishing to a topic space's stream: the stream's acknowledgement is the
//! confirm (C1); a subject no stream captures is unroutable, and for a
//! stream that captures more than its bindings, the bindings are checked
//! here first.

use ticketrail_core::{Confirmation, Message, Result};

use crate::connection::Connection;
use crate::{headers, topology};

/// Hands a message to JetStream; the confirmation awaits the stream's ack.
pub(crate) async fn send(
    conn: &Connection,
    topic_space: &str,
    message: Message,
) -> Result<Confirmation> {
    let limit = match conn.server.max_payload {
        0 => usize::MAX,
        limit => limit,
    };
    message.check(topic_space, limit, "the NATS server (max_payload)")?;
    conn.check_routable(topic_space, &message.routing_key)
        .await?;
    let headers = headers::outgoing(&message)?;
    let subject = topology::subject(topic_space, &message.routing_key);
    let stored = conn.send(subject, headers, message.payload).await?;
    Ok(Confirmation::new(message.id, async move {
        stored.await.map(drop)
    }))
}
