//! The errors of the in-process broker, named in one place.

use ticketrail_core::{Error, ErrorKind};

pub(crate) fn closed() -> Error {
    Error::closed("the memory broker connection is closed")
}

pub(crate) fn not_declared(queue: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("queue `{queue}` is not declared"),
    )
}

pub(crate) fn space_not_declared(space: &str) -> Error {
    Error::new(
        ErrorKind::Unroutable,
        format!("topic space `{space}` is not declared"),
    )
}

pub(crate) fn no_binding(space: &str, routing_key: &str) -> Error {
    Error::new(
        ErrorKind::Unroutable,
        format!("no queue of `{space}` is bound to a pattern matching `{routing_key}`"),
    )
}

pub(crate) fn settled_after_close(queue: &str) -> Error {
    // Like a broker whose connection went away: the settlement never
    // arrives, and the message goes back when the delivery is dropped.
    Error::closed(format!(
        "connection closed before the delivery from `{queue}` was settled"
    ))
}

pub(crate) fn dead_letter_gone(queue: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("the dead letter of `{queue}` was replayed or removed meanwhile"),
    )
}
