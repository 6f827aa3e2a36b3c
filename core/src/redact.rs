//! Keeping secrets out of errors, logs and `Debug` output.

/// A URL with its password replaced by `***`, for errors and logs.
///
/// ```
/// use ticketrail_core::redact_url;
///
/// assert_eq!(redact_url("amqp://guest:secret@localhost:5672/%2f"), "amqp://guest:***@localhost:5672/%2f");
/// assert_eq!(redact_url("nats://token@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
/// assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            // A lone user part may be a token (NATS): hide it too.
            None => format!("{scheme}://***@{host}{path}"),
        },
        None => url.to_owned(),
    }
}
