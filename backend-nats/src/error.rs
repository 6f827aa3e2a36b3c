//! Mapping async-nats errors into ticketrail's.

use ticketrail_core::{Error, ErrorKind};

/// Maps an async-nats error met while `doing` something, keeping it as the source.
pub(crate) fn map<K>(doing: &str, error: async_nats::error::Error<K>) -> Error
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
{
    let text = error.to_string();
    let kind = classify(&text);
    Error::new(kind, doing.to_owned()).with_source(error)
}

/// Maps any other error from async-nats.
pub(crate) fn map_any(
    doing: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    let error = error.into();
    let kind = classify(&error.to_string());
    Error::new(kind, doing.to_owned()).with_source(error)
}

fn classify(text: &str) -> ErrorKind {
    let text = text.to_ascii_lowercase();
    if text.contains("no responders") || text.contains("no stream found") {
        ErrorKind::Unroutable
    } else if text.contains("authorization") || text.contains("authentication") {
        ErrorKind::Auth
    } else if text.contains("maximum payload")
        || text.contains("max_payload")
        || text.contains("exceeds")
    {
        ErrorKind::PayloadTooLarge
    } else if text.contains("timed out") || text.contains("timeout") {
        ErrorKind::Timeout
    } else if text.contains("not found") {
        ErrorKind::NotFound
    } else if text.contains("broken pipe")
        || text.contains("disconnected")
        || text.contains("connection")
    {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    }
}
