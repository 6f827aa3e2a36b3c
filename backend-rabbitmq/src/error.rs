//! Mapping lapin's errors into ticketrail's.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use ticketrail_core::{Error, ErrorKind};

/// Maps a lapin error met while `doing` something into a ticketrail error,
/// keeping lapin's error as the source.
pub(crate) fn map(doing: &str, error: lapin::Error) -> Error {
    let kind = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => ErrorKind::Auth,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Auth,
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => ErrorKind::Config,
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => ErrorKind::Connection,
            AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR) => ErrorKind::PayloadTooLarge,
            _ => ErrorKind::Broker,
        },
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::RuntimeShutdownError(_) => ErrorKind::Connection,
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidChannel(_) => {
            ErrorKind::Closed
        }
        lapin::ErrorKind::AuthProviderError(_) => ErrorKind::Auth,
        _ => ErrorKind::Broker,
    };
    Error::new(kind, doing.to_owned()).with_source(error)
}
