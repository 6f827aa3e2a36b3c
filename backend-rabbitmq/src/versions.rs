//! Which RabbitMQ versions the conformance suite has run on, and what the
//! others change for ticketrail (README: "Broker versions").

/// `major.minor` of the versions the whole suite and the drills have passed on.
const TESTED: &[(u32, u32)] = &[(3, 10)];

/// `major.minor` of a version string such as `3.10.8` or `4.1.0-rc.1`.
pub(crate) fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Logs which broker a connection reached, and warns about a version the
/// suite has not run on.
pub(crate) fn log_server(server: &str, address: &str) {
    let version = server.rsplit(' ').next().unwrap_or_default();
    match major_minor(version) {
        Some(v) if TESTED.contains(&v) => {
            tracing::info!(broker = %address, server, "connected to RabbitMQ");
        }
        Some((major, _)) if major >= 4 => tracing::warn!(
            broker = %address,
            server,
            "connected to a RabbitMQ version the ticketrail suite has not run on; expected to \
             work: delivery limits are set explicitly (4.0 defaults them to 20), retries use \
             wait queues, not 4.3's delayed retry, and from 4.3 the delivery count counts only \
             failed deliveries (see the README's broker versions)"
        ),
        _ => tracing::warn!(
            broker = %address,
            server,
            "connected to a RabbitMQ version the ticketrail suite has not run on (tested: 3.10)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_by_major_and_minor() {
        assert_eq!(major_minor("3.10.8"), Some((3, 10)));
        assert_eq!(major_minor("4.1.0-rc.1"), Some((4, 1)));
        assert_eq!(major_minor("unknown"), None);
    }
}
