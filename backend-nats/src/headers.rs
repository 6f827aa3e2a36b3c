//! NATS headers to text and back, and raw header blocks read without the
//! client's parser. What the headers mean (names, records, bounds) is
//! core's wire format; this file only converts async-nats' types.

use std::str::FromStr;
use std::time::SystemTime;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use ticketrail_core::wire::{self, Attempt, Bookkeeping, Incoming};
use ticketrail_core::{Envelope, Error, Headers, Message, Result};

/// The deduplication id of JetStream.
pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
/// Where a message's content type travels on NATS (no property for it).
pub(crate) const CONTENT_TYPE: &str = "Content-Type";
/// Headers the server or client sets for themselves start with this.
const NATS_PREFIX: &str = "Nats-";
/// A JetStream publish succeeds only if the subject's last message has
/// this sequence (0: the subject has none).
pub(crate) const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The first line of every header block.
const VERSION: &str = "NATS/1.0";

fn name(name: &str) -> Result<HeaderName> {
    HeaderName::from_str(name).map_err(|_| {
        Error::invalid_name(format!(
            "`{}` is not a valid NATS header name (printable ASCII, no `:`)",
            wire::quote(name)
        ))
    })
}

fn value(header: &str, text: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text).map_err(|_| {
        Error::invalid_name(format!(
            "header `{header}` holds a line break, which NATS headers cannot carry"
        ))
    })
}

/// The headers of a message published for the first time: the
/// application's, the id (NATS has no message-id property; `Nats-Msg-Id`
/// would make the server deduplicate every publish, at a quarter of the
/// throughput) and the content type.
pub(crate) fn outgoing(message: &Message) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (key, text) in &message.headers {
        headers.insert(name(key)?, value(key, text)?);
    }
    headers.insert(
        HeaderName::from_static(wire::ID),
        value(wire::ID, &message.id)?,
    );
    if let Some(content_type) = &message.content_type {
        headers.insert(
            HeaderName::from_static(CONTENT_TYPE),
            value(CONTENT_TYPE, content_type)?,
        );
    }
    Ok(headers)
}

/// The headers of a copy of a delivered message (a dead letter, a replay):
/// the application's, the content type and `bookkeeping`, deduplicated
/// under `msg_id`. Names and values came in through NATS, or were escaped
/// by the wire format; one that does not fit is left out.
pub(crate) fn copy(
    envelope: &Envelope,
    app: &Headers,
    bookkeeping: &Bookkeeping,
    msg_id: &str,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut insert = |key: &str, text: &str| {
        if let (Ok(k), Ok(v)) = (name(key), value(key, text)) {
            headers.insert(k, v);
        }
    };
    for (key, text) in app {
        insert(key, text);
    }
    for (key, text) in bookkeeping {
        insert(key, text);
    }
    if let Some(content_type) = &envelope.content_type {
        insert(CONTENT_TYPE, content_type);
    }
    insert(MSG_ID, msg_id);
    headers
}

/// About how many bytes a header block takes on the wire (it counts
/// against `max_payload`).
pub(crate) fn block_size(headers: &HeaderMap) -> usize {
    VERSION.len()
        + 4
        + headers
            .iter()
            .map(|(k, values)| {
                let k: &str = k.as_ref();
                values
                    .iter()
                    .map(|v| k.len() + 2 + v.as_str().len() + 2)
                    .sum::<usize>()
            })
            .sum::<usize>()
}

/// What a header block holds, read as text: the application's headers
/// and bookkeeping (the server's own left out), and apart from them the
/// content type, ticketrail's id and the broker's id.
#[derive(Default)]
struct Text {
    headers: Headers,
    content_type: Option<String>,
    id: Option<String>,
    msg_id: Option<String>,
}

/// Every header as text, the server's own left out; content type and ids
/// apart.
fn text_headers(headers: Option<&HeaderMap>) -> Text {
    let mut text = Text::default();
    if let Some(map) = headers {
        for (key, values) in map.iter() {
            let key: &str = key.as_ref();
            let Some(last) = values.last() else { continue };
            let value = || last.as_str().to_owned();
            if key == CONTENT_TYPE {
                text.content_type = Some(value());
            } else if key == wire::ID {
                text.id = Some(value());
            } else if key == MSG_ID {
                text.msg_id = Some(value());
            } else if !key.starts_with(NATS_PREFIX) {
                text.headers.insert(key.to_owned(), value());
            }
        }
    }
    text
}

/// What a delivered message says about itself, in core's terms.
pub(crate) fn incoming(
    headers: Option<&HeaderMap>,
    routing_key: String,
    payload: bytes::Bytes,
    stored_at: SystemTime,
    attempt: Attempt,
) -> Incoming {
    let text = text_headers(headers);
    let mut incoming = from_text(
        text.headers,
        text.content_type,
        text.msg_id,
        routing_key,
        payload,
        stored_at,
        attempt,
    );
    incoming.id = text.id;
    incoming
}

fn from_text(
    text: Headers,
    content_type: Option<String>,
    msg_id: Option<String>,
    routing_key: String,
    payload: bytes::Bytes,
    stored_at: SystemTime,
    attempt: Attempt,
) -> Incoming {
    let mut incoming = Incoming::new(routing_key, payload);
    incoming.headers = text;
    incoming.content_type = content_type;
    incoming.broker_id = msg_id;
    incoming.stored_at = Some(stored_at);
    incoming.attempt = attempt;
    incoming
}

/// A header block as stored, read without the client's parser.
#[derive(Debug, Default)]
pub(crate) struct RawBlock {
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<String>,
    pub(crate) msg_id: Option<String>,
    /// What the client (async-nats) cannot read in it, or what makes it
    /// read the message as a server status instead; empty if readable.
    pub(crate) problems: Vec<String>,
}

/// Reads a stored header block as text, noting everything async-nats would
/// not accept: bytes that are not UTF-8 (it drops the whole connection), a
/// first line other than `NATS/1.0` or one with a status code (it takes the
/// message for a server status), a line without a colon, a name with a
/// space or another character it refuses.
pub(crate) fn read_block(block: &[u8]) -> RawBlock {
    let mut raw = RawBlock::default();
    if block.is_empty() {
        return raw;
    }
    if std::str::from_utf8(block).is_err() {
        raw.problems
            .push("its header block is not UTF-8".to_owned());
    }
    let text = String::from_utf8_lossy(block);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    match first.strip_prefix(VERSION) {
        None => raw.problems.push(format!(
            "its header block starts with `{}`, not `{VERSION}`",
            wire::quote(first)
        )),
        Some(rest) if !rest.trim().is_empty() => raw.problems.push(format!(
            "its header block starts with a status line `{}`, which NATS clients read as a \
             message from the server",
            wire::quote(first)
        )),
        Some(_) => {}
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((key, val)) = line.split_once(':') else {
            raw.problems.push(format!(
                "its header line `{}` has no colon",
                wire::quote(line)
            ));
            continue;
        };
        if key.is_empty() || key.contains(|c: char| !c.is_ascii_graphic()) {
            raw.problems.push(format!(
                "its header name `{}` is not printable ASCII without spaces",
                wire::quote(key)
            ));
        }
        let val = val.trim().to_owned();
        if key == CONTENT_TYPE {
            raw.content_type = Some(val);
        } else if key == MSG_ID {
            raw.msg_id = Some(val);
        } else if !key.starts_with(NATS_PREFIX) {
            raw.headers.insert(key.to_owned(), val);
        }
    }
    raw
}

impl RawBlock {
    /// The message as core reads it.
    pub(crate) fn into_incoming(
        self,
        routing_key: &str,
        payload: bytes::Bytes,
        stored_at: SystemTime,
        attempt: Attempt,
    ) -> Incoming {
        from_text(
            self.headers,
            self.content_type,
            self.msg_id,
            routing_key.to_owned(),
            payload,
            stored_at,
            attempt,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_value_with_a_line_break_is_refused_by_name() {
        let message = Message::new("a.b", "x").header("note", "two\nlines");
        let err = outgoing(&message).unwrap_err();
        assert!(err.message().contains("`note`"), "{err}");
    }

    #[test]
    fn foreign_messages_keep_their_headers_and_lose_the_servers() {
        let mut map = HeaderMap::new();
        map.insert("X-Legacy", "yes");
        map.insert("Nats-Msg-Id", "legacy-1");
        map.insert("Nats-Expected-Stream", "S");
        let decoded = incoming(
            Some(&map),
            "legacy.key".to_owned(),
            bytes::Bytes::from_static(b"{}"),
            SystemTime::now(),
            Attempt::Counted(1),
        )
        .decode();
        assert_eq!(decoded.envelope.headers.len(), 1);
        assert_eq!(decoded.envelope.headers["X-Legacy"], "yes");
        assert_eq!(decoded.envelope.id, "legacy-1");
    }

    #[test]
    fn the_id_is_read_apart_from_the_headers_and_checked_as_one() {
        let read = |id: &str| {
            let mut map = HeaderMap::new();
            map.insert("X-App", "kept");
            map.insert(wire::ID, id);
            map.insert(CONTENT_TYPE, "application/json");
            map.insert(MSG_ID, "broker-1");
            incoming(
                Some(&map),
                "user.welcome".to_owned(),
                bytes::Bytes::from_static(b"{}"),
                SystemTime::now(),
                Attempt::Counted(1),
            )
            .decode()
        };
        let ok = read("order-42");
        assert_eq!(ok.envelope.id, "order-42");
        assert_eq!(ok.envelope.headers.len(), 1, "{:?}", ok.envelope.headers);
        assert_eq!(ok.envelope.headers["X-App"], "kept");
        assert_eq!(
            ok.envelope.content_type.as_deref(),
            Some("application/json")
        );
        assert!(ok.notes.is_empty(), "{:?}", ok.notes);
        // A forged id over the limit is set aside for the broker's, and said so.
        let forged = read(&"x".repeat(300));
        assert_eq!(forged.envelope.id, "broker-1");
        assert!(
            forged.notes.iter().any(|n| n.contains(wire::ID)),
            "{:?}",
            forged.notes
        );
    }

    #[test]
    fn raw_blocks_say_what_the_client_cannot_read() {
        let ok = read_block(b"NATS/1.0\r\nA: b\r\nContent-Type: text/plain\r\n\r\n");
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!(ok.headers["A"], "b");
        assert_eq!(ok.content_type.as_deref(), Some("text/plain"));
        for (block, says) in [
            (
                &b"NATS/1.0 100 Idle Heartbeat\r\nA: b\r\n\r\n"[..],
                "status line",
            ),
            (b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n", "UTF-8"),
            (b"NATS/1.0\r\nNoColonHere\r\n\r\n", "no colon"),
            (b"NATS/1.0\r\nBad Name: v\r\n\r\n", "printable"),
            (b"NATS/2.0\r\nA: b\r\n\r\n", "not `NATS/1.0`"),
        ] {
            let raw = read_block(block);
            assert!(
                raw.problems.iter().any(|p| p.contains(says)),
                "{block:?}: {:?}",
                raw.problems
            );
        }
    }
}
