//! Which nats-server versions the conformance suite has run on, and what
//! the others change for ticketrail (README: "Broker versions").

use crate::connection::version_before;

/// Logs which server a connection reached and what of it is used, and
/// warns about a version the suite has not run on.
pub(crate) fn log_server(version: &str, address: &str, several_filters: bool, progress_acks: bool) {
    let tested = ["2.9.", "2.15."].iter().any(|v| version.starts_with(v));
    if tested {
        tracing::info!(broker = %address, version, several_filters, progress_acks, "connected to nats-server");
    } else if version_before(version, (2, 9)) {
        tracing::warn!(broker = %address, version, "nats-server older than 2.9 is not supported by ticketrail");
    } else {
        tracing::warn!(
            broker = %address,
            version,
            several_filters,
            progress_acks,
            "connected to a nats-server version the ticketrail suite has not run on (tested: 2.9, 2.15)"
        );
    }
}
