//! Envelopes to AMQP properties and back, and dead-letter records as headers.

use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use ticketrail_core::{
    from_unix_millis, to_unix_millis, DeadLetter, DeadLetterReason, Envelope, Error, Headers,
    Message, Result,
};

/// Framework bookkeeping travels in headers with this prefix; it never
/// reaches the application's headers.
const PREFIX: &str = "x-tr-";
pub(crate) const ATTEMPT: &str = "x-tr-attempt";
pub(crate) const ROUTING_KEY: &str = "x-tr-routing-key";
pub(crate) const FIRST_FAILED_AT: &str = "x-tr-first-failed-at";
const LAST_FAILED_AT: &str = "x-tr-last-failed-at";
const REASON: &str = "x-tr-reason";
const ERROR: &str = "x-tr-error";
const QUEUE: &str = "x-tr-queue";
const PUBLISHED_AT: &str = "x-tr-published-at";

/// Headers RabbitMQ adds on its own, which are not the application's.
const BROKER_HEADERS: [&str; 9] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-received-from",
];

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn prefix(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn key(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        Error::invalid_name(format!(
            "header name `{}…` is {} bytes long; AMQP allows 255",
            prefix(name, 40),
            name.len()
        ))
    })
}

/// The AMQP properties of a message published for the first time.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties> {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(key(name)?, long(value));
    }
    let mut props = BasicProperties::default()
        .with_message_id(
            key(&message.id)
                .map_err(|_| Error::invalid_name("message id is longer than 255 bytes"))?,
        )
        .with_delivery_mode(2)
        .with_timestamp(to_unix_millis(SystemTime::now()) / 1000)
        .with_headers(headers);
    if let Some(content_type) = &message.content_type {
        props = props.with_content_type(
            ShortString::try_new(content_type.as_str())
                .map_err(|_| Error::config("content type is longer than 255 bytes"))?,
        );
    }
    Ok(props)
}

/// The properties of a copy of a delivered message (a retry, a dead letter
/// or a replay): the application's headers and metadata, plus `extra`
/// bookkeeping headers.
pub(crate) fn copy_properties(envelope: &Envelope, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &envelope.headers {
        // Names came in through AMQP, so they fit in a short string.
        if let Ok(name) = ShortString::try_new(name.as_str()) {
            headers.insert(name, long(value));
        }
    }
    headers.insert(ROUTING_KEY.into(), long(&envelope.routing_key));
    headers.insert(
        PUBLISHED_AT.into(),
        AMQPValue::LongLongInt(to_unix_millis(envelope.published_at) as i64),
    );
    for (name, value) in extra {
        headers.insert((*name).into(), value.clone());
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(to_unix_millis(envelope.published_at) / 1000)
        .with_headers(headers);
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

/// Bookkeeping headers for a retry copy.
pub(crate) fn retry_headers(
    attempt: u32,
    first_failed_at: SystemTime,
    error: &str,
) -> Vec<(&'static str, AMQPValue)> {
    vec![
        (ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt))),
        (
            FIRST_FAILED_AT,
            AMQPValue::LongLongInt(to_unix_millis(first_failed_at) as i64),
        ),
        (ERROR, long(error)),
    ]
}

/// Bookkeeping headers for a dead-letter record (C10). The error text is cut
/// to `error_budget` bytes so the record fits in one frame.
pub(crate) fn record_headers(
    record: &DeadLetter,
    error_budget: usize,
) -> Vec<(&'static str, AMQPValue)> {
    let error = prefix(&record.last_error, error_budget);
    vec![
        (REASON, long(record.reason.as_str())),
        (ERROR, long(error)),
        (QUEUE, long(&record.queue)),
        (ATTEMPT, AMQPValue::LongLongInt(i64::from(record.attempts))),
        (
            FIRST_FAILED_AT,
            AMQPValue::LongLongInt(to_unix_millis(record.first_failed_at) as i64),
        ),
        (
            LAST_FAILED_AT,
            AMQPValue::LongLongInt(to_unix_millis(record.last_failed_at) as i64),
        ),
    ]
}

/// A header value as text: strings as they are, numbers and booleans
/// written out; tables, arrays and bytes are not text and are left out.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => format!("{}e-{}", d.value, d.scale),
        AMQPValue::FieldTable(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => return None,
    })
}

fn number(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// What a delivered AMQP message says about itself.
pub(crate) struct Incoming {
    pub(crate) envelope: Envelope,
    pub(crate) first_failed_at: Option<SystemTime>,
    /// The delivery's properties, moved here, not copied: the headers are
    /// read in place.
    props: BasicProperties,
}

/// Reads the envelope of a delivery: framework headers out, the
/// application's headers in, foreign messages (C17) made whole.
pub(crate) fn incoming(props: BasicProperties, routing_key: &str, payload: Vec<u8>) -> Incoming {
    let empty = FieldTable::default();
    let table = props.headers().as_ref().unwrap_or(&empty);
    let mut headers = Headers::new();
    for (name, value) in table.inner() {
        let name = name.as_str();
        if name.starts_with(PREFIX) || BROKER_HEADERS.contains(&name) {
            continue;
        }
        if let Some(value) = text(value) {
            headers.insert(name.to_owned(), value);
        }
    }
    let get = |name: &str| table.inner().get(name);
    let published_at = get(PUBLISHED_AT)
        .and_then(number)
        .map(|ms| from_unix_millis(ms.max(0) as u64))
        .or_else(|| {
            props
                .timestamp()
                .map(|s| from_unix_millis(s.saturating_mul(1000)))
        })
        .unwrap_or_else(SystemTime::now);
    let envelope = Envelope {
        id: props
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        routing_key: get(ROUTING_KEY)
            .and_then(text)
            .unwrap_or_else(|| routing_key.to_owned()),
        payload: payload.into(),
        content_type: props.content_type().as_ref().map(|c| c.as_str().to_owned()),
        headers,
        published_at,
        attempt: get(ATTEMPT)
            .and_then(number)
            .map_or(1, |a| a.clamp(1, i64::from(u32::MAX)) as u32),
    };
    let first_failed_at = get(FIRST_FAILED_AT)
        .and_then(number)
        .map(|ms| from_unix_millis(ms.max(0) as u64));
    Incoming {
        envelope,
        first_failed_at,
        props,
    }
}

impl Incoming {
    /// Reads a message of a DLQ as a dead-letter record. A message the
    /// broker dead-lettered itself (its delivery limit, C13) has no record
    /// headers; its `x-death` entry says where it came from and why.
    pub(crate) fn into_dead_letter(self, dlq_of: &str) -> DeadLetter {
        let empty = FieldTable::default();
        let table = self.props.headers().as_ref().unwrap_or(&empty);
        let get = |name: &str| table.inner().get(name);
        let death = get("x-death").and_then(|v| match v {
            AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|d| match d {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            }),
            _ => None,
        });
        let death_field = |name: &str| death.as_ref().and_then(|d| d.inner().get(name).cloned());
        let death_time = death_field("time")
            .and_then(|v| number(&v))
            .map(|s| from_unix_millis((s.max(0) as u64).saturating_mul(1000)));
        let reason = match get(REASON).and_then(text) {
            Some(reason) => reason.parse().unwrap_or(DeadLetterReason::Exhausted),
            None => DeadLetterReason::DeliveryLimit,
        };
        let last_error = get(ERROR).and_then(text).unwrap_or_else(|| {
            let broker_reason = death_field("reason").and_then(|v| text(&v)).unwrap_or_else(|| "unknown".into());
            format!(
                "dead-lettered by RabbitMQ ({broker_reason}): the message was delivered more often than \
                 the queue's delivery limit without being settled; its consumer likely crashed while handling it"
            )
        });
        let last_failed_at = get(LAST_FAILED_AT)
            .and_then(number)
            .map(|ms| from_unix_millis(ms.max(0) as u64))
            .or(death_time)
            .unwrap_or_else(SystemTime::now);
        let mut envelope = self.envelope;
        if get(ROUTING_KEY).is_none() {
            if let Some(AMQPValue::FieldArray(keys)) = death_field("routing-keys") {
                if let Some(key) = keys.as_slice().first().and_then(text) {
                    envelope.routing_key = key;
                }
            }
        }
        DeadLetter {
            queue: get(QUEUE)
                .and_then(text)
                .or_else(|| death_field("queue").and_then(|v| text(&v)))
                .unwrap_or_else(|| dlq_of.to_owned()),
            reason,
            last_error,
            attempts: envelope.attempt,
            first_failed_at: self.first_failed_at.unwrap_or(last_failed_at),
            last_failed_at,
            envelope,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_headers_of_odd_types_become_text_or_are_left_out() {
        let mut table = FieldTable::default();
        table.insert("count".into(), AMQPValue::LongInt(-7));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("ratio".into(), AMQPValue::Double(0.5));
        table.insert(
            "nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        table.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(3));
        let props = BasicProperties::default().with_headers(table);
        let incoming = incoming(props, "legacy.key", b"{}".to_vec());
        let headers = &incoming.envelope.headers;
        assert_eq!(headers.get("count").map(String::as_str), Some("-7"));
        assert_eq!(headers.get("flag").map(String::as_str), Some("true"));
        assert_eq!(headers.get("ratio").map(String::as_str), Some("0.5"));
        assert!(!headers.contains_key("nested"));
        assert!(!headers.contains_key("x-delivery-count"));
        assert!(!headers.keys().any(|k| k.starts_with(PREFIX)));
        assert_eq!(incoming.envelope.attempt, 3);
        assert_eq!(incoming.envelope.routing_key, "legacy.key");
        assert_eq!(
            incoming.envelope.id.len(),
            36,
            "a foreign message without id gets a UUID"
        );
    }
}
