//! Envelopes to NATS headers and back, and dead-letter records as headers.

use std::str::FromStr;
use std::time::SystemTime;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use ticketrail_core::{
    from_unix_millis, to_unix_millis, DeadLetter, Envelope, Error, Headers, Message, Result,
};

pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
const CONTENT_TYPE: &str = "Content-Type";
/// Framework headers start with this; they never reach the application.
const PREFIX: &str = "Ticketrail-";
const ID: &str = "Ticketrail-Id";
pub(crate) const QUEUE: &str = "Ticketrail-Queue";
const PUBLISHED_AT: &str = "Ticketrail-Published-At";
const ROUTING_KEY: &str = "Ticketrail-Routing-Key";
const REASON: &str = "Ticketrail-Reason";
const ERROR: &str = "Ticketrail-Error";
const ATTEMPTS: &str = "Ticketrail-Attempts";
const FIRST_FAILED_AT: &str = "Ticketrail-First-Failed-At";
const LAST_FAILED_AT: &str = "Ticketrail-Last-Failed-At";

fn name(name: &str) -> Result<HeaderName> {
    HeaderName::from_str(name)
        .map_err(|_| Error::invalid_name(format!("`{name}` is not a valid NATS header name")))
}

fn value(header: &str, text: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text).map_err(|_| {
        Error::invalid_name(format!(
            "header `{header}` holds a line break, which NATS headers cannot carry"
        ))
    })
}

/// Text with `%`, CR and LF escaped, so any error text fits in a header.
fn escape(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn unescape(text: &str) -> String {
    text.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%25", "%")
}

fn insert(headers: &mut HeaderMap, key: &str, text: &str) -> Result<()> {
    headers.insert(name(key)?, value(key, text)?);
    Ok(())
}

/// The headers of a message published for the first time. The id goes in
/// `Ticketrail-Id`, not `Nats-Msg-Id`: server-side deduplication of every
/// publish cost a quarter of the publish throughput (BENCHMARKS.md).
pub(crate) fn outgoing(message: &Message) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (key, text) in &message.headers {
        insert(&mut headers, key, text)?;
    }
    headers.insert(HeaderName::from_static(ID), value(ID, &message.id)?);
    if let Some(content_type) = &message.content_type {
        headers.insert(
            HeaderName::from_static(CONTENT_TYPE),
            value(CONTENT_TYPE, content_type)?,
        );
    }
    Ok(headers)
}

/// The headers of a copy of a delivered message (a dead letter or a
/// replay): the application's headers and metadata, under `msg_id` for
/// deduplication, plus bookkeeping.
pub(crate) fn copy(envelope: &Envelope, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (key, text) in &envelope.headers {
        // These came in through NATS headers, so they are valid.
        let _ = insert(&mut headers, key, text);
    }
    let _ = insert(&mut headers, MSG_ID, msg_id);
    let _ = insert(&mut headers, ID, &envelope.id);
    let _ = insert(&mut headers, ROUTING_KEY, &envelope.routing_key);
    let _ = insert(
        &mut headers,
        PUBLISHED_AT,
        &to_unix_millis(envelope.published_at).to_string(),
    );
    if let Some(content_type) = &envelope.content_type {
        let _ = insert(&mut headers, CONTENT_TYPE, content_type);
    }
    headers
}

/// Adds the dead-letter record (C10) to a copy's headers.
pub(crate) fn add_record(headers: &mut HeaderMap, record: &DeadLetter) {
    let _ = insert(headers, REASON, record.reason.as_str());
    let _ = insert(headers, ERROR, &escape(&record.last_error));
    let _ = insert(headers, QUEUE, &record.queue);
    let _ = insert(headers, ATTEMPTS, &record.attempts.to_string());
    let _ = insert(
        headers,
        FIRST_FAILED_AT,
        &to_unix_millis(record.first_failed_at).to_string(),
    );
    let _ = insert(
        headers,
        LAST_FAILED_AT,
        &to_unix_millis(record.last_failed_at).to_string(),
    );
}

fn last<'a>(headers: Option<&'a HeaderMap>, key: &str) -> Option<&'a str> {
    headers?.get_last(key).map(HeaderValue::as_str)
}

fn millis(headers: Option<&HeaderMap>, key: &str) -> Option<SystemTime> {
    last(headers, key)?.parse().ok().map(from_unix_millis)
}

/// Reads an envelope: framework headers out, the application's headers in,
/// foreign messages (C17) made whole.
pub(crate) fn incoming(
    headers: Option<&HeaderMap>,
    routing_key: &str,
    payload: bytes::Bytes,
    stored_at: SystemTime,
    attempt: u32,
) -> Envelope {
    let mut app = Headers::new();
    if let Some(map) = headers {
        for (key, values) in map.iter() {
            let key: &str = key.as_ref();
            if key.starts_with(PREFIX) || key.starts_with("Nats-") || key == CONTENT_TYPE {
                continue;
            }
            if let Some(v) = values.last() {
                app.insert(key.to_owned(), v.as_str().to_owned());
            }
        }
    }
    Envelope {
        id: last(headers, ID)
            .or_else(|| last(headers, MSG_ID))
            .map(str::to_owned)
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        routing_key: last(headers, ROUTING_KEY)
            .map_or_else(|| routing_key.to_owned(), str::to_owned),
        payload,
        content_type: last(headers, CONTENT_TYPE).map(str::to_owned),
        headers: app,
        published_at: millis(headers, PUBLISHED_AT).unwrap_or(stored_at),
        attempt,
    }
}

/// Reads a DLQ message back as its record.
pub(crate) fn dead_letter(
    headers: Option<&HeaderMap>,
    envelope: Envelope,
    queue: &str,
) -> DeadLetter {
    let last_failed_at = millis(headers, LAST_FAILED_AT).unwrap_or(envelope.published_at);
    DeadLetter {
        queue: last(headers, QUEUE).unwrap_or(queue).to_owned(),
        reason: last(headers, REASON)
            .and_then(|r| r.parse().ok())
            .unwrap_or(ticketrail_core::DeadLetterReason::Exhausted),
        last_error: last(headers, ERROR).map(unescape).unwrap_or_default(),
        attempts: last(headers, ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(envelope.attempt),
        first_failed_at: millis(headers, FIRST_FAILED_AT).unwrap_or(last_failed_at),
        last_failed_at,
        envelope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_with_line_breaks_survives_a_header() {
        let text = "line one\r\nline two: 100% sure";
        assert_eq!(unescape(&escape(text)), text);
        assert!(HeaderValue::from_str(&escape(text)).is_ok());
    }

    #[test]
    fn a_header_value_with_a_line_break_is_refused_by_name() {
        let message = Message::new("a.b", "x").header("note", "two\nlines");
        let err = outgoing(&message).unwrap_err();
        assert!(err.message().contains("`note`"), "{err}");
    }

    #[test]
    fn foreign_messages_get_an_id_and_keep_their_headers() {
        let mut map = HeaderMap::new();
        map.insert("X-Legacy", "yes");
        let env = incoming(
            Some(&map),
            "legacy.key",
            bytes::Bytes::from_static(b"{}"),
            SystemTime::now(),
            1,
        );
        assert_eq!(env.headers.get("X-Legacy").map(String::as_str), Some("yes"));
        assert_eq!(env.id.len(), 36);
        let env = incoming(
            None,
            "legacy.key",
            bytes::Bytes::new(),
            SystemTime::now(),
            1,
        );
        assert!(env.headers.is_empty());
    }
}
