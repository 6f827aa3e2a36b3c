//! lapin's errors as ticketrail's: by lapin's error kinds and the AMQP
//! reply codes, never by their text.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use ticketrail_core::{Error, ErrorKind};

/// What a lapin error is to ticketrail.
pub(crate) fn kind_of(error: &lapin::Error) -> ErrorKind {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => ErrorKind::Auth,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Auth,
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => ErrorKind::Config,
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE)
            | AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR) => ErrorKind::PayloadTooLarge,
            AMQPErrorKind::Soft(AMQPSoftError::NOROUTE) => ErrorKind::Unroutable,
            // A node going away, or a quorum it cannot reach: try again.
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
            | AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR)
            | AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => ErrorKind::Connection,
            _ => ErrorKind::Broker,
        },
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::RuntimeShutdownError(_) => ErrorKind::Connection,
        // The connection is closed after a frame lapin cannot parse; a new
        // one can go on (the subscription isolates the message).
        lapin::ErrorKind::ParsingError(_) => ErrorKind::Connection,
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidChannel(_) => {
            ErrorKind::Closed
        }
        lapin::ErrorKind::AuthProviderError(_) => ErrorKind::Auth,
        _ => ErrorKind::Broker,
    }
}

/// Maps a lapin error met while `doing` something into a ticketrail error,
/// keeping lapin's error as the source.
pub(crate) fn map(doing: &str, error: lapin::Error) -> Error {
    Error::new(kind_of(&error), doing.to_owned()).with_source(error)
}

/// Whether lapin failed to parse a frame from the broker: a message with
/// properties it cannot read (a short string that is not UTF-8).
pub(crate) fn is_unparsable(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ParsingError(_))
}

/// Whether a connect failed because the broker's TLS certificate is not
/// trusted (rustls' own error, inside the I/O error lapin reports).
pub(crate) fn is_untrusted_certificate(error: &lapin::Error) -> bool {
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return false;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The broker's reply text of a channel or connection close, e.g.
/// `PRECONDITION_FAILED - inequivalent arg 'x-queue-type' ...`.
pub(crate) fn reply_text(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_message().to_string()),
        _ => None,
    }
}
