//! The one error type of ticketrail.

use std::fmt;

/// A boxed error from a broker client or the operating system.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form a program can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker could not be reached or the connection broke.
    Connection,
    /// The broker refused the credentials.
    Auth,
    /// No queue would receive the message (C1).
    Unroutable,
    /// The payload is larger than the broker accepts.
    PayloadTooLarge,
    /// A queue, topic space, pattern or routing key is not acceptable.
    InvalidName,
    /// A setting is invalid (retry policy, URL, option).
    Config,
    /// An operation did not finish in time.
    Timeout,
    /// The backend cannot do this.
    Unsupported,
    /// The broker, connection or subscription is closed.
    Closed,
    /// A delivery was settled twice.
    AlreadySettled,
    /// A payload could not be encoded.
    Encode,
    /// The named queue, topic space or message does not exist.
    NotFound,
    /// The broker rejected an operation for another reason.
    Broker,
    /// The application's database refused or failed a statement (the
    /// outbox and inbox of `ticketrail-postgres`).
    Database,
    /// The broker refuses publishes for now: a resource alarm (RabbitMQ's
    /// memory or disk watermark) or a full stream. Nothing was published;
    /// the message says the broker's reason. Transient: it clears when the
    /// broker has room again.
    Blocked,
}

impl ErrorKind {
    /// A short snake_case name for machines: metric labels, the
    /// `error.type` of spans, JSON output (`payload_too_large`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Auth => "auth",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::InvalidName => "invalid_name",
            ErrorKind::Config => "config",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadySettled => "already_settled",
            ErrorKind::Encode => "encode",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Broker => "broker",
            ErrorKind::Database => "database",
            ErrorKind::Blocked => "blocked",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection error",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::InvalidName => "invalid name",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadySettled => "already settled",
            ErrorKind::Encode => "encode error",
            ErrorKind::NotFound => "not found",
            ErrorKind::Broker => "broker error",
            ErrorKind::Database => "database error",
            ErrorKind::Blocked => "publishing blocked by the broker",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every ticketrail operation: a [`kind`](Error::kind), a message
/// naming what was wrong, and the underlying cause as [`source`](std::error::Error::source).
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a message saying what was wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind and the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying again later may succeed (a broken connection, a timeout,
    /// a closed channel), as opposed to a mistake that will fail every time.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Closed | ErrorKind::Blocked
        )
    }

    /// Shorthand for an [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidName`] error.
    pub fn invalid_name(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidName, message)
    }

    /// Shorthand for an [`ErrorKind::Closed`] error.
    pub fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_message_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Connection, "cannot reach 127.0.0.1:1").with_source(io);
        assert_eq!(
            err.to_string(),
            "connection error: cannot reach 127.0.0.1:1: refused"
        );
        assert!(err.is_transient());
        assert!(std::error::Error::source(&err).is_some());
        assert!(!Error::config("bad").is_transient());
    }
}
