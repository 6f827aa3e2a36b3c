//! Dead-letter records (C10) and the replay selection (C11).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// The longest last-error text kept in a dead-letter record, in bytes.
pub const MAX_ERROR_LEN: usize = 4096;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The retry policy gave up after its maximum number of attempts (C8).
    Exhausted,
    /// The handler returned a permanent error (C9).
    Permanent,
    /// The payload could not be decoded (C9).
    Undecodable,
    /// The broker's delivery limit was reached: the message kept killing its
    /// consumer before it could be settled (C13).
    DeliveryLimit,
}

impl DeadLetterReason {
    /// The wire form: `exhausted`, `permanent`, `undecodable`, `delivery-limit`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::DeliveryLimit => "delivery-limit",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadLetterReason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exhausted" => Ok(DeadLetterReason::Exhausted),
            "permanent" => Ok(DeadLetterReason::Permanent),
            "undecodable" => Ok(DeadLetterReason::Undecodable),
            "delivery-limit" => Ok(DeadLetterReason::DeliveryLimit),
            other => Err(Error::config(format!(
                "unknown dead-letter reason `{other}`"
            ))),
        }
    }
}

/// A message in a dead-letter queue, with why it is there (C10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original message: payload, headers, id and routing key unchanged.
    /// `attempt` is the attempt that failed last.
    pub envelope: Envelope,
    /// The work queue the message came from, and where replay sends it.
    pub queue: String,
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The last error, at most [`MAX_ERROR_LEN`] bytes.
    pub last_error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: SystemTime,
    /// When the last attempt failed.
    pub last_failed_at: SystemTime,
}

/// Which dead letters to replay (C11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every message in the dead-letter queue.
    All,
    /// The message with this id.
    Id(String),
}

impl Replay {
    /// Whether this selection takes the message with `id`.
    pub fn selects(&self, id: &str) -> bool {
        match self {
            Replay::All => true,
            Replay::Id(wanted) => wanted == id,
        }
    }
}

/// Cuts `text` to at most [`MAX_ERROR_LEN`] bytes on a character boundary,
/// marking the cut with `…`.
pub fn bound_error_text(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_LEN - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_wire_form() {
        for reason in [
            DeadLetterReason::Exhausted,
            DeadLetterReason::Permanent,
            DeadLetterReason::Undecodable,
            DeadLetterReason::DeliveryLimit,
        ] {
            assert_eq!(reason.as_str().parse::<DeadLetterReason>().unwrap(), reason);
        }
        assert!("nope".parse::<DeadLetterReason>().is_err());
    }

    #[test]
    fn error_text_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let bounded = bound_error_text(&long);
        assert!(bounded.len() <= MAX_ERROR_LEN);
        assert!(bounded.ends_with('…'));
        assert_eq!(bound_error_text("short"), "short");
    }
}
