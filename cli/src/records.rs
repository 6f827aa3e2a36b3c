//! Dead-letter records as the command line shows them: JSON objects, table
//! rows, the filters that select them, and the failure groups of `dlq stats`.

use std::sync::LazyLock;
use std::time::SystemTime;

use base64::Engine;
use regex::Regex;
use serde_json::{json, Map, Value};
use ticketrail::DeadLetter;

use crate::Filters;

/// A time as RFC 3339, UTC, to the millisecond.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The whole C10 record as one JSON object: what `dlq list --json` and
/// `dlq export` print, one per line.
pub(crate) fn to_json(record: &DeadLetter) -> Value {
    let envelope = &record.envelope;
    let headers: Map<String, Value> = envelope
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let (payload, encoding) = match std::str::from_utf8(&envelope.payload) {
        Ok(text) => (text.to_owned(), "utf-8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&envelope.payload),
            "base64",
        ),
    };
    json!({
        "id": envelope.id,
        "queue": record.queue,
        "routing_key": envelope.routing_key,
        "reason": record.reason.as_str(),
        "attempts": record.attempts,
        "last_error": record.last_error,
        "first_failed_at": rfc3339(record.first_failed_at),
        "last_failed_at": rfc3339(record.last_failed_at),
        "published_at": rfc3339(envelope.published_at),
        "headers": headers,
        "content_type": envelope.content_type,
        "payload": payload,
        "payload_encoding": encoding,
        "notes": record.notes,
        "group": group_of(record).id,
    })
}

/// The error on one line.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `record` is one the filters select.
pub(crate) fn selects(filters: &Filters, record: &DeadLetter, now: SystemTime) -> bool {
    if let Some(reason) = filters.reason {
        if record.reason != reason {
            return false;
        }
    }
    if !filters.ids.is_empty() && !filters.ids.contains(&record.envelope.id) {
        return false;
    }
    if let Some(since) = filters.since {
        let cutoff = now.checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH);
        if record.last_failed_at < cutoff {
            return false;
        }
    }
    if let Some(text) = &filters.grep {
        let payload = std::str::from_utf8(&record.envelope.payload).unwrap_or("");
        let found = [
            record.last_error.as_str(),
            record.envelope.id.as_str(),
            record.envelope.routing_key.as_str(),
            payload,
        ]
        .iter()
        .any(|field| field.contains(text.as_str()));
        if !found {
            return false;
        }
    }
    if let Some(group) = &filters.group {
        if group_of(record).id != *group {
            return false;
        }
    }
    true
}

/// A failure group: records with the same reason whose errors differ only
/// in numbers, ids, e-mail addresses or quoted values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// A short, stable fingerprint: 8 hex digits.
    pub(crate) id: String,
    /// The error with the variable parts replaced: `user <email> not found (code <n>)`.
    pub(crate) pattern: String,
}

/// What varies between errors of one group, most specific first.
static VARIABLE: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r#""[^"]*"|'[^']*'|`[^`]*`"#, "<quoted>"),
        (r"[\w.+-]+@[\w-]+(\.[\w-]+)+", "<email>"),
        (
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
            "<uuid>",
        ),
        (
            r"\b(0x)?[0-9a-fA-F]*[0-9][0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*\b",
            "<hex>",
        ),
        (
            r"\b(0x)?[0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*[0-9][0-9a-fA-F]*\b",
            "<hex>",
        ),
        (r"[-+]?\d+(\.\d+)?", "<n>"),
    ]
    .into_iter()
    .map(|(pattern, mark)| (Regex::new(pattern).expect("a valid pattern"), mark))
    .collect()
});

/// The group of `record`'s failure.
pub(crate) fn group_of(record: &DeadLetter) -> Group {
    let mut pattern = one_line(&record.last_error);
    for (regex, mark) in VARIABLE.iter() {
        // Hex ids only when long enough to be ids, not words like `cafe`.
        if *mark == "<hex>" {
            pattern = regex
                .replace_all(&pattern, |c: &regex::Captures<'_>| {
                    let found = &c[0];
                    if found.len() >= 8 {
                        (*mark).to_owned()
                    } else {
                        found.to_owned()
                    }
                })
                .into_owned();
        } else {
            pattern = regex.replace_all(&pattern, *mark).into_owned();
        }
    }
    let id = format!(
        "{:08x}",
        fnv1a(format!("{}\n{pattern}", record.reason).as_bytes()) as u32
    );
    Group { id, pattern }
}

/// FNV-1a, 64 bits: a fingerprint that stays the same across runs,
/// machines and Rust versions (std's hasher promises none of that).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ticketrail::{DeadLetterReason, Envelope, Message};

    fn record(error: &str) -> DeadLetter {
        let envelope: Envelope = Message::new("user.signup", "{}").into_envelope(SystemTime::now());
        DeadLetter {
            envelope,
            queue: "q".into(),
            reason: DeadLetterReason::Permanent,
            last_error: error.into(),
            attempts: 1,
            first_failed_at: SystemTime::now(),
            last_failed_at: SystemTime::now(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn errors_that_differ_in_variable_parts_share_a_group() {
        let same = [
            "user 17 not found (request 4bf92f3577b34da6a3ce929d0e0e4736)",
            "user 2048 not found (request 00f067aa0ba902b700f067aa0ba902b7)",
        ];
        let groups: Vec<Group> = same.iter().map(|e| group_of(&record(e))).collect();
        assert_eq!(groups[0], groups[1]);
        assert_eq!(groups[0].pattern, "user <n> not found (request <hex>)");

        let mail = group_of(&record("mail for ada@example.com bounced: 'mailbox full'"));
        let other = group_of(&record(
            "mail for bob@test.example.org bounced: \"no such user\"",
        ));
        assert_eq!(mail, other);
        assert_eq!(mail.pattern, "mail for <email> bounced: <quoted>");

        let uuid = group_of(&record(
            "order 5f0c3bde-7b1c-4b8e-9d35-3c0c2f4c1a2b is locked",
        ));
        assert_eq!(uuid.pattern, "order <uuid> is locked");

        // Different words, different groups; short hex-looking words stay.
        assert_ne!(
            group_of(&record("disk full")),
            group_of(&record("disk gone"))
        );
        assert_eq!(
            group_of(&record("cafe 12 closed")).pattern,
            "cafe <n> closed"
        );
    }

    #[test]
    fn the_group_depends_on_the_reason_and_is_stable() {
        let mut exhausted = record("timeout");
        exhausted.reason = DeadLetterReason::Exhausted;
        assert_ne!(group_of(&exhausted), group_of(&record("timeout")));
        // Stable across runs and versions: a fixed fingerprint.
        assert_eq!(
            group_of(&record("timeout")).id,
            group_of(&record("timeout")).id
        );
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn payloads_that_are_not_text_are_base64() {
        let mut r = record("x");
        r.envelope.payload = vec![0xff, 0x00, 0x01].into();
        let json = to_json(&r);
        assert_eq!(json["payload_encoding"], "base64");
        assert_eq!(json["payload"], "/wAB");
        r.envelope.payload = "héllo".into();
        assert_eq!(to_json(&r)["payload"], "héllo");
    }
}
