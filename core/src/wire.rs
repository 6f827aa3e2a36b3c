//! The wire format: how ticketrail's bookkeeping travels in message headers,
//! spelled the same on every broker, and how a delivered message is read
//! back with every value a publisher could forge bounded.
//!
//! A backend converts its client's header values to and from text and says
//! what its broker itself knows about a delivery ([`Incoming`]); everything
//! else (names, the dead-letter record, the id fallback, the bounds) lives
//! here, once.
//!
//! What a stranger can write into headers is never trusted beyond what the
//! broker itself vouches for: an attempt number counts only when the broker
//! counted it or the message came back through this queue's own retry path,
//! times are bounded by the clock, and every value set aside is noted, so a
//! dead-letter record says what was odd about its message.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::envelope::{from_unix_millis, to_unix_millis, Envelope, Headers};
use crate::error::{Error, Result};
use crate::id::new_message_id;
use crate::topology::validate_routing_key;

/// Every bookkeeping header starts with this; the application never sees them.
pub const PREFIX: &str = "Ticketrail-";
/// The message id, on brokers without a message-id property of their own.
pub const ID: &str = "Ticketrail-Id";
/// The attempt a retried copy is delivered as.
pub const ATTEMPT: &str = "Ticketrail-Attempt";
/// The routing key the message was first published with (copies are
/// delivered under another one).
pub const ROUTING_KEY: &str = "Ticketrail-Routing-Key";
/// When the message was first published, in Unix milliseconds.
pub const PUBLISHED_AT: &str = "Ticketrail-Published-At";
/// When its first attempt failed, in Unix milliseconds.
pub const FIRST_FAILED_AT: &str = "Ticketrail-First-Failed-At";
/// When its last attempt failed (dead-letter records).
pub const LAST_FAILED_AT: &str = "Ticketrail-Last-Failed-At";
/// Why it was dead-lettered (dead-letter records).
pub const REASON: &str = "Ticketrail-Reason";
/// The last error, escaped (dead-letter records).
pub const ERROR: &str = "Ticketrail-Error";
/// The work queue a dead letter came from, and where replay sends it.
pub const SOURCE_QUEUE: &str = "Ticketrail-Queue";
/// How many attempts were made (dead-letter records).
pub const ATTEMPTS: &str = "Ticketrail-Attempts";
/// What was odd about the message, one note a line, escaped.
pub const NOTES: &str = "Ticketrail-Notes";
/// Where a dead letter's payload is kept when the record and the payload
/// together do not fit in one message.
pub const PAYLOAD_REF: &str = "Ticketrail-Payload-Ref";
/// When a retried copy waiting in the broker is due back, in Unix
/// milliseconds: lets a backend notice, and bring back itself, a retry its
/// broker failed to return on time.
pub const RETRY_DUE: &str = "Ticketrail-Retry-Due";

/// [`PAYLOAD_REF`] of a copy whose body holds the original headers and
/// payload together ([`wrap`]), because its headers would not fit in the
/// broker's header frame next to the bookkeeping.
pub const PAYLOAD_IN_BODY: &str = "body";

/// The longest message id, in bytes (an AMQP short string).
pub const MAX_ID_LEN: usize = 255;
/// How far ahead of this machine's clock a publisher's time may be before it
/// is taken as wrong.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest foreign value quoted in a note.
const QUOTE_LEN: usize = 64;

/// Whether a header name is one of ticketrail's own.
pub fn is_bookkeeping(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// Checks a message id: 1 to 255 bytes, no control characters.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid_name("message id is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid_name(format!(
            "message id `{}…` is {} bytes long; the limit is {MAX_ID_LEN}",
            quote(id),
            id.len()
        )));
    }
    // Printable ASCII (every generated id) needs no decoding of characters.
    if id
        .bytes()
        .fold(true, |plain, b| plain & b.is_ascii_graphic())
    {
        return Ok(());
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(Error::invalid_name(format!(
            "message id `{}` contains {c:?}, a control character",
            quote(id)
        )));
    }
    Ok(())
}

/// A time in its wire form: Unix milliseconds, as text.
pub fn encode_time(at: SystemTime) -> String {
    to_unix_millis(at).to_string()
}

/// Reads a time written by [`encode_time`]; `None` unless it is a whole,
/// non-negative number of milliseconds.
pub fn decode_time(text: &str) -> Option<SystemTime> {
    text.trim().parse::<u64>().ok().map(from_unix_millis)
}

/// Text with `%` and every control character written as `%XX`, so any error
/// text fits in a header of any broker (NATS headers hold no line breaks).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '%' || c.is_ascii_control() {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]; a `%` not followed by two hex digits stays.
pub fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first bytes of a foreign value, for a note: never more than a
/// line's worth, control characters escaped.
pub fn quote(text: &str) -> String {
    let mut end = QUOTE_LEN.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    escape(&text[..end])
}

/// The first bytes of a wrapped body.
const WRAP_MAGIC: &[u8] = b"TRWRAP1\n";

#[derive(serde::Serialize, serde::Deserialize)]
struct Wrapped {
    headers: Headers,
    content_type: Option<String>,
}

/// A body carrying a message's application headers, content type and
/// payload together, for a copy whose headers leave no room for ticketrail's
/// bookkeeping in the broker's header frame. Marked with
/// [`PAYLOAD_REF`]` = `[`PAYLOAD_IN_BODY`]; read back by [`Incoming::decode`].
pub fn wrap(envelope: &Envelope) -> Bytes {
    let meta = serde_json::to_vec(&Wrapped {
        headers: envelope.headers.clone(),
        content_type: envelope.content_type.clone(),
    })
    .expect("a map of strings always encodes");
    let mut body = Vec::with_capacity(WRAP_MAGIC.len() + 4 + meta.len() + envelope.payload.len());
    body.extend_from_slice(WRAP_MAGIC);
    body.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    body.extend_from_slice(&meta);
    body.extend_from_slice(&envelope.payload);
    body.into()
}

/// The headers, content type and payload of a body made by [`wrap`].
fn unwrap(body: &Bytes) -> Option<(Headers, Option<String>, Bytes)> {
    let rest = body.strip_prefix(WRAP_MAGIC)?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let meta = rest.get(4..4 + len)?;
    let wrapped: Wrapped = serde_json::from_slice(meta).ok()?;
    let start = WRAP_MAGIC.len() + 4 + len;
    Some((wrapped.headers, wrapped.content_type, body.slice(start..)))
}

/// Bookkeeping headers to write: a name of this module and its text value.
pub type Bookkeeping = Vec<(&'static str, String)>;

/// The bookkeeping of any copy of a delivered message (a retry, a dead
/// letter, a replay): its id, original routing key and publish time.
pub fn copy_headers(envelope: &Envelope) -> Bookkeeping {
    vec![
        (ID, envelope.id.clone()),
        (ROUTING_KEY, envelope.routing_key.clone()),
        (PUBLISHED_AT, encode_time(envelope.published_at)),
    ]
}

/// The bookkeeping of a retried copy: the copy's, the attempt it will be
/// delivered as, and when the first attempt failed.
pub fn retry_headers(envelope: &Envelope, request: &crate::RetryRequest) -> Bookkeeping {
    let mut headers = copy_headers(envelope);
    headers.push((ATTEMPT, request.next_attempt.to_string()));
    headers.push((FIRST_FAILED_AT, encode_time(request.first_failed_at)));
    headers
}

/// When a retry scheduled now, to wait `tier`, is due ([`RETRY_DUE`]).
pub fn retry_due(tier: std::time::Duration) -> (&'static str, String) {
    (RETRY_DUE, encode_time(SystemTime::now() + tier))
}

/// Reads [`RETRY_DUE`].
pub fn decode_retry_due(text: &str) -> Option<SystemTime> {
    text.trim().parse::<u64>().ok().map(from_unix_millis)
}

/// Joins notes into one header value.
fn encode_notes(notes: &[String]) -> String {
    escape(&notes.join("\n"))
}

fn decode_notes(text: &str) -> Vec<String> {
    unescape(text)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How a backend knows which attempt a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The broker counted the deliveries itself (NATS JetStream): this is
    /// the attempt, whatever the headers say.
    Counted(u64),
    /// The message came back through this queue's own retry path (a wait
    /// queue of its own, the broker's own retry timer): the attempt header,
    /// written by ticketrail when it scheduled the retry, is read.
    Retried,
    /// The message came straight from a publisher: attempt 1, whatever its
    /// headers claim.
    Fresh,
    /// A message of a DLQ: its record's bookkeeping is read by
    /// [`DeadLetter::from_wire`](crate::DeadLetter::from_wire), bounded there.
    Recorded,
}

/// A delivered message as a backend read it off its client, before its
/// bookkeeping is taken out of the headers.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The routing key the broker delivered it under.
    pub routing_key: String,
    /// The payload, unchanged.
    pub payload: Bytes,
    /// Every header as text, bookkeeping included; the broker's own headers
    /// (AMQP `x-death`, NATS `Nats-*`) left out.
    pub headers: Headers,
    /// The content type, from the broker's property or header for it.
    pub content_type: Option<String>,
    /// ticketrail's id (the [`ID`] header), for a backend that takes it
    /// out as it reads the headers: it spares `headers` an entry on every
    /// delivery. Read as that header would be; `None` looks in `headers`.
    pub id: Option<String>,
    /// The broker's own message id, if it has one (AMQP `message-id`,
    /// NATS `Nats-Msg-Id`).
    pub broker_id: Option<String>,
    /// When the broker stored or stamped the message, if it says.
    pub stored_at: Option<SystemTime>,
    /// How the attempt is known.
    pub attempt: Attempt,
    /// When the first attempt failed, if the backend keeps that itself
    /// (NATS keeps it in the broker, not in the message).
    pub first_failed_at: Option<SystemTime>,
}

impl Incoming {
    /// An incoming message with no headers, attempt 1.
    pub fn new(routing_key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Incoming {
            routing_key: routing_key.into(),
            payload: payload.into(),
            headers: Headers::new(),
            content_type: None,
            id: None,
            broker_id: None,
            stored_at: None,
            attempt: Attempt::Fresh,
            first_failed_at: None,
        }
    }
}

/// A delivered message read back: the envelope, what the broker knows of
/// its earlier failures, and notes on what was odd about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message as the handler sees it.
    pub envelope: Envelope,
    /// When an earlier attempt first failed, if one did.
    pub first_failed_at: Option<SystemTime>,
    /// Whether `envelope.attempt` was counted by the broker itself, so a
    /// message delivered more often than its policy allows can be taken for
    /// one that crashed its consumer (C13).
    pub attempt_counted: bool,
    /// What was set aside or bounded, one sentence each; kept in the
    /// message's dead-letter record if it gets one.
    pub notes: Vec<String>,
    /// The bookkeeping headers taken out of the message, for reading a
    /// dead-letter record; the id header is not among them (it became the
    /// envelope's id, or was set aside with a note).
    pub bookkeeping: Headers,
}

impl Incoming {
    /// Takes the bookkeeping out of the headers and reads the envelope,
    /// bounding every value a publisher could have forged.
    pub fn decode(self) -> Decoded {
        self.decode_at(SystemTime::now())
    }

    /// [`decode`](Incoming::decode) with `now` as the time.
    pub fn decode_at(self, now: SystemTime) -> Decoded {
        let mut notes = Vec::new();
        // Most messages carry only bookkeeping (ticketrail's own) or none
        // (a plain client's): the map is then kept whole, not rebuilt.
        let mut headers = self.headers;
        let mut bookkeeping = if headers.keys().all(|name| is_bookkeeping(name)) {
            std::mem::take(&mut headers)
        } else if headers.keys().any(|name| is_bookkeeping(name)) {
            let (bookkeeping, application) = std::mem::take(&mut headers)
                .into_iter()
                .partition(|(name, _)| is_bookkeeping(name));
            headers = application;
            bookkeeping
        } else {
            Headers::new()
        };
        // Moved into the envelope, not copied.
        let header_id = self.id.or_else(|| bookkeeping.remove(ID));
        let get = |name: &str| bookkeeping.get(name).map(String::as_str);
        let (mut payload, mut content_type) = (self.payload, self.content_type);
        if get(PAYLOAD_REF) == Some(PAYLOAD_IN_BODY) {
            // Only ticketrail's own copies (retried, dead-lettered) are wrapped.
            if matches!(self.attempt, Attempt::Retried | Attempt::Recorded) {
                match unwrap(&payload) {
                    Some((inner, inner_type, inner_payload)) => {
                        headers.extend(inner);
                        content_type = inner_type;
                        payload = inner_payload;
                    }
                    None => notes.push(format!(
                        "{PAYLOAD_REF} says the body is wrapped, but it is not; kept as it is"
                    )),
                }
            } else {
                notes.push(format!(
                    "{PAYLOAD_REF} ignored: the message came straight from a publisher"
                ));
            }
        }

        let id = choose_id(header_id, self.broker_id, &mut notes);

        let routing_key = match get(ROUTING_KEY) {
            Some(key) if validate_routing_key(key).is_ok() => key.to_owned(),
            Some(key) => {
                notes.push(format!(
                    "{ROUTING_KEY} `{}` is not a valid routing key; kept the broker's `{}`",
                    quote(key),
                    quote(&self.routing_key)
                ));
                self.routing_key
            }
            None => self.routing_key,
        };

        let stored_at = self
            .stored_at
            .map(|t| not_after(t, now, "the broker's timestamp", &mut notes));
        let published_at = match get(PUBLISHED_AT) {
            Some(text) => match decode_time(text) {
                Some(t) => not_after(t, now, PUBLISHED_AT, &mut notes),
                None => {
                    notes.push(format!(
                        "{PUBLISHED_AT} `{}` is not a time; ignored",
                        quote(text)
                    ));
                    stored_at.unwrap_or(now)
                }
            },
            None => stored_at.unwrap_or(now),
        };

        let claimed = get(ATTEMPT);
        let (attempt, attempt_counted) = match self.attempt {
            Attempt::Counted(n) => {
                if let Some(text) = claimed {
                    notes.push(format!(
                        "{ATTEMPT} `{}` ignored: the broker counted {n} deliveries",
                        quote(text)
                    ));
                }
                (u32::try_from(n).unwrap_or(u32::MAX).max(1), true)
            }
            Attempt::Retried => match claimed.map(|t| (t, t.trim().parse::<u32>())) {
                Some((_, Ok(n))) if n >= 1 => (n, false),
                Some((text, _)) => {
                    notes.push(format!(
                        "{ATTEMPT} `{}` is not an attempt number; taken as 1",
                        quote(text)
                    ));
                    (1, false)
                }
                None => (1, false),
            },
            Attempt::Recorded => (1, false),
            Attempt::Fresh => {
                if let Some(text) = claimed.filter(|t| t.trim() != "1") {
                    notes.push(format!(
                        "{ATTEMPT} `{}` ignored: the message came straight from a publisher, \
                         so this is attempt 1",
                        quote(text)
                    ));
                }
                (1, false)
            }
        };

        let first_failed_at = match (self.first_failed_at, self.attempt) {
            (Some(at), _) => Some(at),
            (None, Attempt::Retried) => get(FIRST_FAILED_AT).and_then(|text| match decode_time(text)
            {
                Some(t) => Some(t),
                None => {
                    notes.push(format!(
                        "{FIRST_FAILED_AT} `{}` is not a time; ignored",
                        quote(text)
                    ));
                    None
                }
            }),
            (None, Attempt::Recorded) => None,
            (None, _) => {
                if let Some(text) = get(FIRST_FAILED_AT) {
                    notes.push(format!(
                        "{FIRST_FAILED_AT} `{}` ignored: no earlier attempt of this message failed here",
                        quote(text)
                    ));
                }
                None
            }
        }
        .map(|t| bounded_between(t, published_at, now, FIRST_FAILED_AT, &mut notes));

        Decoded {
            envelope: Envelope {
                id,
                routing_key,
                payload,
                content_type,
                headers,
                published_at,
                attempt,
            },
            first_failed_at,
            attempt_counted,
            notes,
            bookkeeping,
        }
    }
}

/// The id of a delivered message: ticketrail's header, else the broker's
/// message id, else a new one (C17); a value that is not a valid id is set
/// aside with a note.
fn choose_id(header: Option<String>, broker: Option<String>, notes: &mut Vec<String>) -> String {
    for (source, candidate) in [(ID, header), ("the broker's message id", broker)] {
        let Some(candidate) = candidate else { continue };
        match validate_id(&candidate) {
            Ok(()) => return candidate,
            Err(e) => notes.push(format!("{source} set aside: {}", e.message())),
        }
    }
    new_message_id()
}

fn not_after(t: SystemTime, now: SystemTime, what: &str, notes: &mut Vec<String>) -> SystemTime {
    if t > now + CLOCK_SKEW {
        notes.push(format!(
            "{what} {} ms lies in the future; taken as now",
            to_unix_millis(t)
        ));
        now
    } else {
        t
    }
}

fn bounded_between(
    t: SystemTime,
    earliest: SystemTime,
    now: SystemTime,
    what: &str,
    notes: &mut Vec<String>,
) -> SystemTime {
    if t > now + CLOCK_SKEW {
        notes.push(format!(
            "{what} {} ms lies in the future; taken as now",
            to_unix_millis(t)
        ));
        now
    } else if t < earliest {
        notes.push(format!(
            "{what} {} ms is before the message was published; taken as its publish time",
            to_unix_millis(t)
        ));
        earliest
    } else {
        t
    }
}

impl crate::DeadLetter {
    /// The bookkeeping that carries this record (C10) on the wire: the
    /// copy's, plus reason, last error, source queue, attempts, failure
    /// times and notes. Backends add it to the copy they write to the DLQ.
    pub fn wire_headers(&self) -> Bookkeeping {
        let mut headers = copy_headers(&self.envelope);
        headers.extend([
            (REASON, self.reason.as_str().to_owned()),
            (ERROR, escape(&self.last_error)),
            (SOURCE_QUEUE, self.queue.clone()),
            (ATTEMPTS, self.attempts.to_string()),
            (FIRST_FAILED_AT, encode_time(self.first_failed_at)),
            (LAST_FAILED_AT, encode_time(self.last_failed_at)),
        ]);
        if !self.notes.is_empty() {
            headers.push((NOTES, encode_notes(&self.notes)));
        }
        headers
    }

    /// Reads a record back from a message of a DLQ. `fallback` fills what a
    /// record the broker dead-lettered itself (without ticketrail's headers)
    /// lacks. Every value is bounded as [`Incoming::decode`] bounds them.
    pub fn from_wire(decoded: Decoded, fallback: RecordFallback) -> crate::DeadLetter {
        Self::from_wire_at(decoded, fallback, SystemTime::now())
    }

    /// [`from_wire`](crate::DeadLetter::from_wire) with `now` as the time.
    pub fn from_wire_at(
        decoded: Decoded,
        fallback: RecordFallback,
        now: SystemTime,
    ) -> crate::DeadLetter {
        let Decoded {
            mut envelope,
            bookkeeping,
            mut notes,
            ..
        } = decoded;
        let get = |name: &str| bookkeeping.get(name).map(String::as_str);
        if let Some(text) = get(NOTES) {
            // The record's own notes first, then what reading it found.
            let mut kept = decode_notes(text);
            kept.append(&mut notes);
            notes = kept;
        }
        let reason = match get(REASON) {
            Some(text) => text.parse().unwrap_or_else(|_| {
                notes.push(format!(
                    "{REASON} `{}` is not a reason ticketrail knows; taken as {}",
                    quote(text),
                    fallback.reason
                ));
                fallback.reason
            }),
            None => fallback.reason,
        };
        let last_error = get(ERROR)
            .map(unescape)
            .map(|e| crate::dead_letter::truncate_error_text(&e))
            .unwrap_or(fallback.last_error);
        let last_failed_at = get(LAST_FAILED_AT)
            .and_then(decode_time)
            .or(fallback.failed_at)
            .unwrap_or(envelope.published_at);
        let last_failed_at = bounded_between(
            last_failed_at,
            envelope.published_at,
            now,
            LAST_FAILED_AT,
            &mut notes,
        );
        let first_failed_at = get(FIRST_FAILED_AT)
            .and_then(decode_time)
            .unwrap_or(last_failed_at);
        let first_failed_at = bounded_between(
            first_failed_at,
            envelope.published_at,
            last_failed_at,
            FIRST_FAILED_AT,
            &mut notes,
        );
        // A record says how many attempts were made; a message the broker
        // dead-lettered itself may still carry the attempt it was on.
        let claimed = get(ATTEMPTS).or_else(|| get(ATTEMPT));
        let attempts = match claimed.map(|t| (t, t.trim().parse::<u32>())) {
            Some((_, Ok(n))) if n >= 1 => n,
            Some((text, _)) => {
                notes.push(format!(
                    "the attempts `{}` are not a number; taken as {}",
                    quote(text),
                    envelope.attempt
                ));
                envelope.attempt
            }
            None => envelope.attempt,
        };
        envelope.attempt = attempts;
        // A DLQ belongs to one work queue: a record claiming another was
        // put there by hand.
        if let Some(claimed) = get(SOURCE_QUEUE).filter(|q| *q != fallback.queue) {
            notes.push(format!(
                "{SOURCE_QUEUE} `{}` ignored: the record is in the DLQ of `{}`",
                quote(claimed),
                fallback.queue
            ));
        }
        let queue = fallback.queue;
        crate::DeadLetter {
            envelope,
            queue,
            reason,
            last_error,
            attempts,
            first_failed_at,
            last_failed_at,
            notes,
        }
    }
}

/// What a backend knows of a dead letter that carries no record of
/// ticketrail's: one its broker dead-lettered itself (a delivery limit).
#[derive(Debug, Clone)]
pub struct RecordFallback {
    /// The work queue the DLQ belongs to: the record's queue, whatever its
    /// headers claim.
    pub queue: String,
    /// Why, as far as the broker says.
    pub reason: crate::DeadLetterReason,
    /// The error text to show.
    pub last_error: String,
    /// When the broker dead-lettered it, if it says.
    pub failed_at: Option<SystemTime>,
}

impl RecordFallback {
    /// A fallback for a dead letter of `queue` the broker moved there for a
    /// reason of its own (`why`), not its delivery limit.
    pub fn broker(queue: impl Into<String>, why: &str) -> Self {
        RecordFallback {
            queue: queue.into(),
            reason: crate::DeadLetterReason::Broker,
            last_error: format!("dead-lettered by the broker before a handler saw it: {why}"),
            failed_at: None,
        }
    }

    /// A fallback for a dead letter of `queue` the broker moved there after
    /// its delivery limit.
    pub fn delivery_limit(queue: impl Into<String>, broker_says: &str) -> Self {
        RecordFallback {
            queue: queue.into(),
            reason: crate::DeadLetterReason::DeliveryLimit,
            last_error: format!(
                "dead-lettered by the broker ({broker_says}): the message was delivered more \
                 often than the queue's delivery limit without being settled; its consumer \
                 likely crashed while handling it"
            ),
            failed_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeadLetter, DeadLetterReason};

    fn at(ms: u64) -> SystemTime {
        from_unix_millis(ms)
    }

    fn incoming(headers: &[(&str, &str)], attempt: Attempt) -> Incoming {
        let mut msg = Incoming::new("orders.created", "{}");
        msg.headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        msg.attempt = attempt;
        msg.stored_at = Some(at(1_000));
        msg
    }

    const NOW: u64 = 10_000_000;

    #[test]
    fn escaping_round_trips_any_text() {
        for text in [
            "plain",
            "line one\r\nline two",
            "100% sure %0A not a newline",
            "tab\there\u{7f}",
            "é ü 🌍",
            "%",
            "%4",
            "ends with %",
        ] {
            let escaped = escape(text);
            assert!(!escaped.contains(['\r', '\n']), "{escaped:?}");
            assert_eq!(unescape(&escaped), text, "{escaped:?}");
        }
    }

    #[test]
    fn application_headers_stay_and_bookkeeping_leaves() {
        let decoded = incoming(
            &[
                ("tenant", "acme"),
                (ID, "abc"),
                (ROUTING_KEY, "user.welcome"),
            ],
            Attempt::Fresh,
        )
        .decode_at(at(NOW));
        assert_eq!(decoded.envelope.id, "abc");
        assert_eq!(decoded.envelope.routing_key, "user.welcome");
        assert_eq!(decoded.envelope.headers.len(), 1);
        assert_eq!(decoded.envelope.headers["tenant"], "acme");
        assert!(decoded.notes.is_empty(), "{:?}", decoded.notes);
    }

    #[test]
    fn a_forged_attempt_is_not_trusted_and_is_noted() {
        let decoded = incoming(&[(ATTEMPT, "99999999999")], Attempt::Fresh).decode_at(at(NOW));
        assert_eq!(decoded.envelope.attempt, 1);
        assert!(!decoded.attempt_counted);
        assert!(
            decoded.notes[0].contains("99999999999"),
            "{:?}",
            decoded.notes
        );

        let decoded = incoming(&[(ATTEMPT, "3")], Attempt::Counted(1)).decode_at(at(NOW));
        assert_eq!(decoded.envelope.attempt, 1);
        assert!(decoded.attempt_counted);
        assert_eq!(decoded.notes.len(), 1);

        let decoded = incoming(&[(ATTEMPT, "3")], Attempt::Retried).decode_at(at(NOW));
        assert_eq!(decoded.envelope.attempt, 3);
        assert!(decoded.notes.is_empty());

        let decoded = incoming(&[(ATTEMPT, "-1")], Attempt::Retried).decode_at(at(NOW));
        assert_eq!(decoded.envelope.attempt, 1);
        assert_eq!(decoded.notes.len(), 1);
    }

    #[test]
    fn forged_times_are_bounded_by_the_clock_and_the_publish_time() {
        let decoded = incoming(
            &[
                (PUBLISHED_AT, "2000"),
                (FIRST_FAILED_AT, &u64::MAX.to_string()),
            ],
            Attempt::Retried,
        )
        .decode_at(at(NOW));
        assert_eq!(decoded.first_failed_at, Some(at(NOW)));
        let decoded = incoming(
            &[(PUBLISHED_AT, "2000"), (FIRST_FAILED_AT, "-5")],
            Attempt::Retried,
        )
        .decode_at(at(NOW));
        assert_eq!(decoded.first_failed_at, None);
        assert!(decoded.notes[0].contains("-5"), "{:?}", decoded.notes);
        let decoded = incoming(
            &[(PUBLISHED_AT, "2000"), (FIRST_FAILED_AT, "5")],
            Attempt::Retried,
        )
        .decode_at(at(NOW));
        assert_eq!(decoded.first_failed_at, Some(at(2000)));
        let decoded =
            incoming(&[(PUBLISHED_AT, "99999999999999")], Attempt::Fresh).decode_at(at(NOW));
        assert_eq!(decoded.envelope.published_at, at(NOW));
        // A fresh message has failed nowhere yet.
        let decoded = incoming(&[(FIRST_FAILED_AT, "5000")], Attempt::Fresh).decode_at(at(NOW));
        assert_eq!(decoded.first_failed_at, None);
        assert_eq!(decoded.notes.len(), 1);
    }

    #[test]
    fn ids_fall_back_from_header_to_broker_to_new() {
        let mut msg = incoming(&[], Attempt::Fresh);
        msg.broker_id = Some("legacy-7".into());
        assert_eq!(msg.decode_at(at(NOW)).envelope.id, "legacy-7");
        let long = "x".repeat(300);
        let mut msg = incoming(&[(ID, &long)], Attempt::Fresh);
        msg.broker_id = Some("legacy-8".into());
        let decoded = msg.decode_at(at(NOW));
        assert_eq!(decoded.envelope.id, "legacy-8");
        assert_eq!(decoded.notes.len(), 1);
        let decoded = incoming(&[(ID, "")], Attempt::Fresh).decode_at(at(NOW));
        assert_eq!(decoded.envelope.id.len(), 36);
    }

    #[test]
    fn an_invalid_routing_key_header_is_set_aside() {
        let decoded = incoming(&[(ROUTING_KEY, "a b.>")], Attempt::Fresh).decode_at(at(NOW));
        assert_eq!(decoded.envelope.routing_key, "orders.created");
        assert_eq!(decoded.notes.len(), 1);
    }

    fn record() -> DeadLetter {
        DeadLetter {
            envelope: Envelope {
                id: "id-1".into(),
                routing_key: "user.welcome".into(),
                payload: Bytes::from_static(b"{}"),
                content_type: Some("application/json".into()),
                headers: [("tenant".to_owned(), "acme".to_owned())].into(),
                published_at: at(1_000),
                attempt: 3,
            },
            queue: "email.notifications".into(),
            reason: DeadLetterReason::Exhausted,
            last_error: "smtp down\r\nfor good: 100%".into(),
            attempts: 3,
            first_failed_at: at(2_000),
            last_failed_at: at(5_000),
            notes: vec!["one odd thing".into(), "another".into()],
        }
    }

    #[test]
    fn a_record_round_trips_through_headers() {
        let original = record();
        let mut msg = Incoming::new("email.notifications.dlq", original.envelope.payload.clone());
        msg.attempt = Attempt::Recorded;
        msg.content_type = original.envelope.content_type.clone();
        msg.headers = original.envelope.headers.clone();
        for (name, value) in original.wire_headers() {
            msg.headers.insert(name.to_owned(), value);
        }
        let fallback = RecordFallback::delivery_limit("email.notifications", "x");
        let back = DeadLetter::from_wire_at(msg.decode_at(at(NOW)), fallback, at(NOW));
        assert_eq!(back, original);
    }

    #[test]
    fn a_wrapped_copy_is_unwrapped_only_when_ticketrail_made_it() {
        let original = record();
        let body = wrap(&original.envelope);
        let read = |attempt| {
            let mut msg = Incoming::new("q", body.clone());
            msg.headers = [(PAYLOAD_REF.to_owned(), PAYLOAD_IN_BODY.to_owned())].into();
            msg.attempt = attempt;
            msg.decode_at(at(NOW))
        };
        let decoded = read(Attempt::Recorded);
        assert_eq!(decoded.envelope.payload, original.envelope.payload);
        assert_eq!(decoded.envelope.headers, original.envelope.headers);
        assert_eq!(
            decoded.envelope.content_type,
            original.envelope.content_type
        );
        let decoded = read(Attempt::Fresh);
        assert_eq!(decoded.envelope.payload, body);
        assert_eq!(decoded.notes.len(), 1);
        let mut msg = Incoming::new("q", "not wrapped");
        msg.headers = [(PAYLOAD_REF.to_owned(), PAYLOAD_IN_BODY.to_owned())].into();
        msg.attempt = Attempt::Retried;
        let decoded = msg.decode_at(at(NOW));
        assert_eq!(decoded.envelope.payload, "not wrapped");
        assert_eq!(decoded.notes.len(), 1);
    }

    #[test]
    fn a_forged_record_is_bounded() {
        let mut msg = Incoming::new("q.dlq", "{}");
        msg.attempt = Attempt::Recorded;
        msg.stored_at = Some(at(1_000));
        msg.headers = [
            (REASON, "vanished"),
            (ATTEMPTS, "lots"),
            (LAST_FAILED_AT, "99999999999999999"),
            (FIRST_FAILED_AT, "99999999999999998"),
            (SOURCE_QUEUE, "bad queue *"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let fallback = RecordFallback::delivery_limit("q", "delivery_limit");
        let record = DeadLetter::from_wire_at(msg.decode_at(at(NOW)), fallback, at(NOW));
        assert_eq!(record.reason, DeadLetterReason::DeliveryLimit);
        assert_eq!(record.queue, "q");
        assert!(
            record.notes.iter().any(|n| n.contains("bad queue")),
            "{:?}",
            record.notes
        );
        assert_eq!(record.attempts, 1);
        assert_eq!(record.last_failed_at, at(NOW));
        assert!(record.first_failed_at <= record.last_failed_at);
        assert!(record.notes.len() >= 3, "{:?}", record.notes);
    }
}
