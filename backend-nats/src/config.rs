//! Settings of the NATS JetStream backend.

use std::fmt;
use std::time::Duration;

use ticketrail_core::{redact_url, Error, Result};

/// How to reach NATS and how the JetStream consumers behave.
///
/// The URL may name several servers of a cluster, comma-separated in the
/// host part (`nats://app:secret@10.0.0.1:4222,10.0.0.2:4222`): the client
/// connects to one that answers and moves to another when it goes away.
///
/// ```
/// use std::time::Duration;
/// use ticketrail_nats::NatsConfig;
///
/// let config = NatsConfig::from_url("nats://app:secret@127.0.0.1:4222")?.ack_wait(Duration::from_secs(60));
/// assert_eq!(config.address(), "127.0.0.1:4222");
/// assert!(!format!("{config:?}").contains("secret"));
/// let cluster = NatsConfig::from_url("nats://127.0.0.1:4222,127.0.0.1:4223")?.replicas(3);
/// assert_eq!(cluster.address(), "127.0.0.1:4222,127.0.0.1:4223");
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Clone)]
pub struct NatsConfig {
    /// The URL as given, for messages (always redacted).
    pub(crate) url: String,
    /// One URL per server, without credentials: what the client is given,
    /// so that its own logs never carry a secret.
    pub(crate) servers: Vec<String>,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) address: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) ack_wait: Duration,
    pub(crate) max_ack_pending: i64,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_on_initial_connect: bool,
    pub(crate) tls_ca_file: Option<std::path::PathBuf>,
    pub(crate) require_tls: bool,
    pub(crate) progress_acks: Option<bool>,
    pub(crate) replicas: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) publish_timeout: Duration,
}

/// The ping interval unless the URL or [`NatsConfig::heartbeat`] says
/// otherwise: async-nats gives a connection up when a third ping goes
/// unanswered, so a silently dropped connection is noticed within 9 s.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(3);

/// How long a whole publish may take unless the URL or
/// [`NatsConfig::publish_timeout`] says otherwise.
const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

impl NatsConfig {
    /// Settings for a `nats://` or `tls://` URL, e.g. `nats://127.0.0.1:4222`.
    pub fn from_url(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::config(format!(
                "invalid NATS URL `{}`: no scheme",
                redact_url(url)
            )));
        };
        if !matches!(scheme, "nats" | "tls") {
            return Err(Error::config(format!(
                "invalid NATS URL `{}`: the scheme must be nats:// or tls://",
                redact_url(url)
            )));
        }
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_port.is_empty() {
            return Err(Error::config(format!(
                "invalid NATS URL `{}`: no host",
                redact_url(url)
            )));
        }
        let credentials =
            authority
                .rsplit_once('@')
                .map(|(userinfo, _)| match userinfo.split_once(':') {
                    Some((user, password)) => {
                        Credentials::UserPassword(user.to_owned(), password.to_owned())
                    }
                    None => Credentials::Token(userinfo.to_owned()),
                });
        let tail = &rest[authority.len()..];
        let invalid =
            |why: String| Error::config(format!("invalid NATS URL `{}`: {why}", redact_url(url)));
        let mut heartbeat = DEFAULT_HEARTBEAT;
        let mut publish_timeout = DEFAULT_PUBLISH_TIMEOUT;
        let query = tail.split_once('?').map_or("", |(_, q)| q);
        for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let parsed = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| invalid(format!("{key}={value}: seconds above 0 expected")))
            };
            match key {
                "heartbeat" => heartbeat = parsed()?,
                "publish_timeout" => publish_timeout = parsed()?,
                _ => {}
            }
        }
        // The client is given no query: async-nats does not read one.
        let tail = tail.split_once('?').map_or(tail, |(path, _)| path);
        let mut servers = Vec::new();
        let mut addresses = Vec::new();
        for host in host_port.split(',') {
            if host.is_empty() {
                return Err(Error::config(format!(
                    "invalid NATS URL `{}`: an empty host in the list",
                    redact_url(url)
                )));
            }
            servers.push(format!("{scheme}://{host}{tail}"));
            addresses.push(if host.contains(':') {
                host.to_owned()
            } else {
                format!("{host}:4222")
            });
        }
        let address = addresses.join(",");
        Ok(NatsConfig {
            url: url.to_owned(),
            servers,
            credentials,
            address,
            connect_timeout: Duration::from_secs(10),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 100_000,
            request_timeout: Duration::from_secs(10),
            retry_on_initial_connect: false,
            tls_ca_file: None,
            require_tls: scheme == "tls",
            progress_acks: None,
            replicas: 1,
            heartbeat,
            publish_timeout,
        })
    }

    /// How often the client pings the server. A connection that goes
    /// silent, as one a NAT table, a load balancer's idle timeout or a
    /// partition dropped without a reset does, is given up when the third
    /// ping in a row goes unanswered and reconnected: the default 3 s
    /// notices within 9 s. Shorter costs a small frame each way per
    /// interval per connection, and risks dropping a connection whose
    /// process stalls that long. The URL sets it too: `?heartbeat=4`.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// How long a whole publish may take (checking its subject, sending it
    /// and awaiting the stream's acknowledgement) before it fails with
    /// [`ErrorKind::Timeout`](ticketrail_core::ErrorKind::Timeout). Default
    /// 15 s; the URL sets it too: `?publish_timeout=15`.
    ///
    /// A publish that timed out may still have been stored: publishing the
    /// same message (same id) again may store it twice, so the consumer
    /// should be idempotent (an inbox, `ticketrail::postgres`). Publishes
    /// carry no `Nats-Msg-Id`, so the stream's duplicate window does not
    /// catch the second copy.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long connecting may take before it fails naming the host and
    /// port. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the server waits for a delivery to be settled before it
    /// delivers it again: a consumer that dies holding a message releases it
    /// after this (C4). Keep handlers (and their timeout) shorter. Default 30 s.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// The server-side bound on unsettled messages per queue, across all its
    /// subscriptions. Messages waiting out a retry delay count against it:
    /// once this many wait, the server delivers nothing new until some come
    /// back, so it is kept far above any prefetch (which bounds what a
    /// subscription holds, C5). Default 100 000 (at 10 000, 100,000 messages
    /// with 10 % failing once held healthy throughput to 0.37 to 0.59 of a
    /// run without failures; at 100 000, 0.78 to 0.90). Declaring an existing
    /// queue again with another value updates it in place. A server whose
    /// account or stream limits it lower refuses the declare: set it here.
    pub fn max_ack_pending(mut self, max: i64) -> Self {
        self.max_ack_pending = max;
        self
    }

    /// How long a publish waits for its acknowledgement. Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Keep trying to reach the server at start-up until the connect timeout,
    /// instead of failing at the first refusal. Default off.
    pub fn retry_on_initial_connect(mut self, retry: bool) -> Self {
        self.retry_on_initial_connect = retry;
        self
    }

    /// Trusts the certificate authority in this PEM file, on top of the
    /// system's trust store (for `tls://` URLs and servers that require TLS).
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Whether subscriptions send work-in-progress acks (`+WPI`) every half
    /// `ack_wait` for deliveries still being handled, so a handler slower than
    /// `ack_wait` keeps its message. Default on. (nats-server 2.9.10 was once
    /// thought to reset a message's delivery count on a `+WPI`, which would
    /// let a message that crashes its consumer escape the delivery limit;
    /// measured again, on 2.9.10 and 2.15.1, it counts every delivery, and a
    /// test holds it to that.)
    pub fn progress_acks(mut self, on: bool) -> Self {
        self.progress_acks = Some(on);
        self
    }

    /// How many servers of a cluster keep a copy of each stream and of each
    /// queue's consumer state (JetStream replicas: 1, 3 or 5). Default 1;
    /// 3 on a three-node cluster, so losing a node loses nothing.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// The connect options for these settings, credentials included.
    pub(crate) fn connect_options(&self) -> async_nats::ConnectOptions {
        let options = match &self.credentials {
            Some(Credentials::UserPassword(user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Some(Credentials::Token(token)) => {
                async_nats::ConnectOptions::with_token(token.clone())
            }
            None => async_nats::ConnectOptions::new(),
        };
        let options = match &self.tls_ca_file {
            Some(path) => options.add_root_certificates(path.clone()),
            None => options,
        };
        options
            .require_tls(self.require_tls)
            .name("ticketrail")
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.request_timeout))
            .ping_interval(self.heartbeat)
            .max_reconnects(None)
    }

    /// `host:port` of the servers, comma-separated, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }
}

/// Credentials taken out of the URL.
#[derive(Clone)]
pub(crate) enum Credentials {
    UserPassword(String, String),
    Token(String),
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("ack_wait", &self.ack_wait)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("request_timeout", &self.request_timeout)
            .field("retry_on_initial_connect", &self.retry_on_initial_connect)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("require_tls", &self.require_tls)
            .field("progress_acks", &self.progress_acks)
            .field("replicas", &self.replicas)
            .field("heartbeat", &self.heartbeat)
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_and_publish_timeout_come_from_the_url_or_the_defaults() {
        let plain = NatsConfig::from_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(plain.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(plain.publish_timeout, DEFAULT_PUBLISH_TIMEOUT);
        let set = NatsConfig::from_url("nats://a:1,b:2?heartbeat=2&publish_timeout=0.5").unwrap();
        assert_eq!(set.heartbeat, Duration::from_secs(2));
        assert_eq!(set.publish_timeout, Duration::from_millis(500));
        assert_eq!(set.servers, ["nats://a:1", "nats://b:2"]);
        for bad in ["?heartbeat=0", "?heartbeat=often", "?publish_timeout=-3"] {
            let err = NatsConfig::from_url(&format!("nats://a:1{bad}")).unwrap_err();
            let key = bad[1..].split('=').next().unwrap();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }
}
