//! Publishing: a message's AMQP properties, publishes to a topic space with
//! their confirms (C1), and copies of delivered messages (retries, dead
//! letters, replays) straight to a queue.

use std::time::SystemTime;

use bytes::Bytes;
use lapin::types::ShortString;
use lapin::BasicProperties;
use ticketrail_core::wire::{self, Bookkeeping};
use ticketrail_core::{to_unix_millis, Confirmation, Envelope, Error, Headers, Message, Result};

use crate::connection::Link;
use crate::headers::{self, field_table};

/// Room kept in a header frame for what [`headers::header_frame_size`]
/// does not count exactly.
const FRAME_MARGIN: usize = 512;

fn short(what: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid_name(format!(
            "{what} `{}…` is {} bytes long; AMQP allows 255",
            wire::quote(value),
            value.len()
        ))
    })
}

/// The AMQP properties of a message published for the first time: the id,
/// content type and time in AMQP's own properties, where plain clients read
/// them; no bookkeeping headers.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties> {
    let mut headers = lapin::types::FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(short("header name", name)?, headers::long(value));
    }
    let mut props = BasicProperties::default()
        .with_message_id(short("message id", &message.id)?)
        .with_delivery_mode(2)
        .with_timestamp(to_unix_millis(SystemTime::now()) / 1000)
        .with_headers(headers);
    if let Some(content_type) = &message.content_type {
        props = props.with_content_type(short("content type", content_type)?);
    }
    Ok(props)
}

/// Hands a message to the topic exchange; the confirmation awaits the
/// broker's confirm (C1).
pub(crate) async fn send(link: &Link, topic_space: &str, message: Message) -> Result<Confirmation> {
    message.check(topic_space, link.config.max_payload, "RabbitMQ")?;
    let properties = properties(&message)?;
    let confirm = link
        .send(
            topic_space,
            &message.routing_key,
            message.payload.clone(),
            properties,
        )
        .await?;
    Ok(Confirmation::new(message.id, confirm))
}

/// A copy of a delivered message, ready to publish.
pub(crate) struct Copy {
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
}

fn copy_properties(
    envelope: &Envelope,
    app: &Headers,
    bookkeeping: &Bookkeeping,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(to_unix_millis(envelope.published_at) / 1000)
        .with_headers(field_table(app, bookkeeping));
    // The id and content type came in through AMQP or were checked at
    // publish, so they fit; a foreign one that did not was replaced.
    if let Ok(id) = ShortString::try_new(envelope.id.as_str()) {
        props = props.with_message_id(id);
    }
    if let Some(content_type) = envelope
        .content_type
        .as_deref()
        .and_then(|c| ShortString::try_new(c).ok())
    {
        props = props.with_content_type(content_type);
    }
    props
}

/// The copy of `envelope` with `bookkeeping` added. If the headers would
/// not fit in one frame next to the bookkeeping, the application's headers
/// travel in the body instead (see [`wire::wrap`]): the copy is still made,
/// never refused.
pub(crate) fn copy(envelope: &Envelope, mut bookkeeping: Bookkeeping, frame_max: usize) -> Copy {
    let properties = copy_properties(envelope, &envelope.headers, &bookkeeping);
    if headers::header_frame_size(&properties) + FRAME_MARGIN <= frame_max {
        return Copy {
            properties,
            body: envelope.payload.clone(),
        };
    }
    bookkeeping.push(headers::wrapped_marker());
    Copy {
        properties: copy_properties(envelope, &Headers::new(), &bookkeeping),
        body: wire::wrap(envelope),
    }
}

/// Publishes a copy straight to `queue` and waits for the confirm.
pub(crate) async fn publish_copy(
    link: &Link,
    queue: &str,
    envelope: &Envelope,
    bookkeeping: Bookkeeping,
) -> Result<()> {
    let copy = copy(envelope, bookkeeping, link.frame_max().await);
    link.publish_to_queue(queue, copy.body, copy.properties)
        .await
}
