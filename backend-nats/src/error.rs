//! async-nats' errors as ticketrail's: by async-nats' error kinds and
//! JetStream's API error codes, never by their text.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::ConnectErrorKind;
use ticketrail_core::{Error, ErrorKind};

/// What a JetStream API error code is to ticketrail.
pub(crate) fn api_kind(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::STREAM_NOT_FOUND
        | ErrorCode::CONSUMER_NOT_FOUND
        | ErrorCode::NO_MESSAGE_FOUND
        | ErrorCode::SEQUENCE_NOT_FOUND => ErrorKind::NotFound,
        ErrorCode::STREAM_SUBJECT_OVERLAP => ErrorKind::InvalidName,
        // No leader or not enough peers for now: a cluster electing a new
        // leader after losing a node, or one just started whose JetStream
        // is not up yet ("temporarily unavailable"). Trying again helps.
        ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NOT_LEADER
        | ErrorCode::CLUSTER_NO_PEERS
        | ErrorCode::CLUSTER_PEER_NOT_MEMBER => ErrorKind::Connection,
        _ => ErrorKind::Broker,
    }
}

/// A JetStream API error, met while `doing` something.
pub(crate) fn api(doing: &str, error: async_nats::jetstream::Error) -> Error {
    Error::new(api_kind(error.error_code()), doing.to_owned()).with_source(error)
}

/// A failed request to the JetStream API (no answer, a timeout).
pub(crate) fn request(doing: &str, error: async_nats::RequestError) -> Error {
    let kind = match error.kind() {
        // No server answered for JetStream: it is restarting or has no
        // leader for the stream right now.
        async_nats::RequestErrorKind::NoResponders => ErrorKind::Connection,
        async_nats::RequestErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, doing.to_owned()).with_source(error)
}

/// What a failed JetStream publish is to ticketrail: by the client's kind,
/// and for a refusal in the stream's acknowledgement by its API code.
pub(crate) fn publish_kind(error: &PublishError) -> ErrorKind {
    match error.kind() {
        PublishErrorKind::StreamNotFound => ErrorKind::Unroutable,
        PublishErrorKind::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::BrokenPipe => ErrorKind::Connection,
        _ => std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .map_or(ErrorKind::Broker, |e| refusal_kind(e.error_code())),
    }
}

/// What the stream's refusal of a message is to ticketrail. A stream or
/// account out of room (a full stream that discards new messages, storage
/// or memory limits) is [`ErrorKind::Blocked`]: it clears when consumers
/// make room, as RabbitMQ's resource alarms do.
pub(crate) fn refusal_kind(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::STREAM_STORE_FAILED
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED
        | ErrorCode::INSUFFICIENT_RESOURCES => ErrorKind::Blocked,
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => {
            ErrorKind::PayloadTooLarge
        }
        other => api_kind(other),
    }
}

/// What a failed connect is to ticketrail.
pub(crate) fn connect_kind(kind: ConnectErrorKind) -> ErrorKind {
    match kind {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            ErrorKind::Auth
        }
        ConnectErrorKind::TimedOut => ErrorKind::Timeout,
        ConnectErrorKind::ServerParse => ErrorKind::Config,
        _ => ErrorKind::Connection,
    }
}

/// A failure of the core client (a publish or a flush on a broken
/// connection).
pub(crate) fn client(
    doing: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::new(ErrorKind::Connection, doing.to_owned()).with_source(error)
}

/// Whether an error, or one of its sources, is rustls refusing the server's
/// certificate.
pub(crate) fn is_untrusted_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if is_untrusted_certificate(inner) {
                    return true;
                }
            }
        }
        source = e.source();
    }
    false
}
