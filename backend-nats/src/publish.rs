//! Publishing to a topic space's stream: the stream's acknowledgement is the
//! confirm (C1); a subject no stream captures is unroutable, and for a
//! stream that captures more than its bindings, the bindings are checked
//! here first.

use ticketrail_core::{Confirmation, Error, ErrorKind, Message, Result};

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
    let limit = conn.config.publish_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let headers = headers::outgoing(&message)?;
    let subject = topology::subject(topic_space, &message.routing_key);
    let Message {
        id,
        routing_key,
        payload,
        ..
    } = message;
    let handed = async {
        conn.check_routable(topic_space, &routing_key).await?;
        conn.send(subject, headers, payload).await
    };
    let stored = tokio::time::timeout_at(deadline, handed)
        .await
        .map_err(|_| unconfirmed(limit))??;
    Ok(Confirmation::new(id, async move {
        tokio::time::timeout_at(deadline, stored)
            .await
            .map_err(|_| unconfirmed(limit))?
            .map(drop)
    }))
}

/// The error of a publish that took longer than the publish timeout.
fn unconfirmed(limit: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "no acknowledgement from JetStream within {limit:?}: the message may or may not \
             have been stored; publishing it again may store it twice, which an idempotent \
             consumer absorbs (the publish timeout is set by NatsConfig::publish_timeout or \
             ?publish_timeout=)"
        ),
    )
}
