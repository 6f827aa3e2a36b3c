//! AMQP properties and header values to text and back. What the headers
//! mean (names, records, bounds) is core's wire format; this file only
//! converts lapin's types.

use std::time::SystemTime;

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use ticketrail_core::wire::{self, Attempt, Bookkeeping, Incoming};
use ticketrail_core::{from_unix_millis, Headers};

use crate::{ladder, topology};

/// The header in which RabbitMQ records each dead-lettering of a message.
const X_DEATH: &str = "x-death";
/// `x-death` reasons: a message's TTL ran out (a wait queue's, or one a
/// publisher or policy set); the queue's delivery limit; its length limit;
/// a reject without requeue.
pub(crate) const EXPIRED: &str = "expired";
pub(crate) const DELIVERY_LIMIT: &str = "delivery_limit";
pub(crate) const MAXLEN: &str = "maxlen";
pub(crate) const REJECTED: &str = "rejected";

/// Headers RabbitMQ adds on its own, which are not the application's.
const BROKER_HEADERS: [&str; 9] = [
    X_DEATH,
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-received-from",
];

pub(crate) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A header value as text: strings as they are, numbers and booleans
/// written out; tables, arrays and bytes are not text and are left out.
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
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
        AMQPValue::DecimalValue(d) => format!("{}e-{}", d.value, d.scale),
        AMQPValue::Timestamp(t) => t.to_string(),
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
        _ => None,
    }
}

/// The application's and ticketrail's headers as an AMQP table.
pub(crate) fn field_table(app: &Headers, bookkeeping: &Bookkeeping) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in app {
        // Names that came in through AMQP fit in a short string; a name
        // over 255 bytes was refused at publish.
        if let Ok(name) = ShortString::try_new(name.as_str()) {
            table.insert(name, long(value));
        }
    }
    for (name, value) in bookkeeping {
        table.insert((*name).into(), long(value));
    }
    table
}

/// What RabbitMQ recorded when it last dead-lettered a message (the first
/// `x-death` entry).
#[derive(Debug, Default)]
pub(crate) struct Death {
    pub(crate) queue: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) time: Option<SystemTime>,
    pub(crate) routing_key: Option<String>,
}

pub(crate) fn death(props: &BasicProperties) -> Option<Death> {
    let table = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = table.inner().get(X_DEATH)? else {
        return None;
    };
    let AMQPValue::FieldTable(last) = deaths.as_slice().first()? else {
        return None;
    };
    let field = |name: &str| last.inner().get(name);
    Some(Death {
        queue: field("queue").and_then(text),
        reason: field("reason").and_then(text),
        time: field("time")
            .and_then(number)
            .map(|s| from_unix_millis((s.max(0) as u64).saturating_mul(1000))),
        routing_key: match field("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(text),
            _ => None,
        },
    })
}

/// Where a delivered message was read from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The work queue of this name.
    Work(&'a str),
    /// A DLQ.
    DeadLetters,
}

/// What a delivered message says about itself, in core's terms.
pub(crate) fn incoming(
    props: &BasicProperties,
    routing_key: &str,
    payload: Bytes,
    source: Source<'_>,
) -> Incoming {
    let mut headers = Headers::new();
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if BROKER_HEADERS.contains(&name) || name.starts_with(ladder::HEADER_PREFIX) {
                continue;
            }
            if let Some(value) = text(value) {
                headers.insert(name.to_owned(), value);
            }
        }
    }
    let attempt = match source {
        Source::DeadLetters => Attempt::Recorded,
        // Evidence the message came back through this queue's own retry
        // path: RabbitMQ expired it out of one of its wait queues.
        Source::Work(queue) => match death(props) {
            Some(Death {
                queue: Some(from),
                reason: Some(reason),
                ..
            }) if reason == EXPIRED && topology::is_wait_queue_of(queue, &from) => Attempt::Retried,
            _ => Attempt::Fresh,
        },
    };
    let mut incoming = Incoming::new(routing_key, payload);
    incoming.headers = headers;
    incoming.content_type = props.content_type().as_ref().map(|c| c.as_str().to_owned());
    incoming.broker_id = props.message_id().as_ref().map(|id| id.as_str().to_owned());
    incoming.stored_at = props
        .timestamp()
        .map(|s| from_unix_millis(s.saturating_mul(1000)));
    incoming.attempt = attempt;
    incoming
}

/// About how many bytes the content header frame of these properties
/// takes: it must fit in one frame (`frame_max`), or RabbitMQ closes the
/// whole connection.
pub(crate) fn header_frame_size(props: &BasicProperties) -> usize {
    const FIXED: usize = 14 + 8 + 64; // class, weight, size, flags; numbers
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let strings = short(props.content_type())
        + short(props.content_encoding())
        + short(props.correlation_id())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.message_id())
        + short(props.kind())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id());
    FIXED + strings + props.headers().as_ref().map_or(0, table_size)
}

fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + 1 + value_size(value))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::FieldArray(a) => {
            4 + a
                .as_slice()
                .iter()
                .map(|v| 1 + value_size(v))
                .sum::<usize>()
        }
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        _ => 9,
    }
}

/// The bookkeeping that marks a wrapped copy.
pub(crate) fn wrapped_marker() -> (&'static str, String) {
    (wire::PAYLOAD_REF, wire::PAYLOAD_IN_BODY.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

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
        table.insert(wire::ATTEMPT.into(), AMQPValue::LongLongInt(3));
        let props = BasicProperties::default().with_headers(table);
        let decoded = incoming(
            &props,
            "legacy.key",
            Bytes::from_static(b"{}"),
            Source::Work("q"),
        )
        .decode();
        let headers = &decoded.envelope.headers;
        assert_eq!(headers.get("count").map(String::as_str), Some("-7"));
        assert_eq!(headers.get("flag").map(String::as_str), Some("true"));
        assert_eq!(headers.get("ratio").map(String::as_str), Some("0.5"));
        assert!(!headers.contains_key("nested"));
        assert!(!headers.contains_key("x-delivery-count"));
        assert!(!headers.keys().any(|k| wire::is_bookkeeping(k)));
        // Straight from a publisher: the attempt it claims is not trusted.
        assert_eq!(decoded.envelope.attempt, 1);
        assert_eq!(decoded.notes.len(), 1);
        assert_eq!(decoded.envelope.routing_key, "legacy.key");
        assert_eq!(
            decoded.envelope.id.len(),
            36,
            "a foreign message without id gets a UUID"
        );
    }

    fn death_from(queue: &str, reason: &str) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert("queue".into(), long(queue));
        death.insert("reason".into(), long(reason));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut table = FieldTable::default();
        table.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        table.insert(wire::ATTEMPT.into(), long("3"));
        table
    }

    #[test]
    fn only_a_return_from_the_queues_own_wait_queue_counts_as_a_retry() {
        let wait = topology::wait_queue_name("q", std::time::Duration::from_secs(1));
        let read = |table: FieldTable| {
            let props = BasicProperties::default().with_headers(table);
            incoming(&props, "q", Bytes::new(), Source::Work("q"))
                .decode()
                .envelope
                .attempt
        };
        assert_eq!(read(death_from(&wait, EXPIRED)), 3);
        assert_eq!(read(death_from("other.retry.1000ms", EXPIRED)), 1);
        assert_eq!(read(death_from(&wait, "rejected")), 1);
    }

    #[test]
    fn the_header_frame_estimate_is_never_below_the_real_size() {
        let mut table = FieldTable::default();
        table.insert("big".into(), long(&"x".repeat(10_000)));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_message_id("id".into());
        assert!(header_frame_size(&props) >= 10_000 + 3 + 4 + 2 + 3);
    }
}
