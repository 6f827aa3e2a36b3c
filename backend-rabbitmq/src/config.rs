//! Settings of the RabbitMQ backend.

use std::fmt;
use std::time::Duration;

use ticketrail_core::{redact_url, Error, Result};

/// How to reach RabbitMQ and how to behave when it goes away.
///
/// The URL may name several nodes of a cluster, comma-separated in the host
/// part (`amqp://app:secret@10.0.0.1:5672,10.0.0.2:5672/%2f`): connections
/// go to the first that answers, and move on to the next when theirs goes
/// away.
///
/// ```
/// use std::time::Duration;
/// use ticketrail_rabbitmq::RabbitConfig;
///
/// let config = RabbitConfig::from_url("amqp://guest:secret@127.0.0.1:5672,127.0.0.1:5673/%2f")?
///     .connect_timeout(Duration::from_secs(3));
/// assert_eq!(config.addresses(), ["127.0.0.1:5672", "127.0.0.1:5673"]);
/// // Debug output never shows the password.
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    /// The URL as given, for messages (always redacted).
    pub(crate) url: String,
    /// One URL per node, each in the form lapin takes.
    pub(crate) nodes: Vec<Node>,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_payload: usize,
    pub(crate) reconnect_initial: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) connection_name: String,
    pub(crate) tls_ca_pem: Option<String>,
    pub(crate) heartbeat: u16,
    pub(crate) publish_timeout: Duration,
}

/// The heartbeat asked for unless the URL or [`RabbitConfig::heartbeat`]
/// says otherwise: lapin gives up on a connection after twice this with
/// nothing read, checking every half, so a silently dropped connection is
/// noticed within 8 to 10 s.
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(4);

/// How long a publish may wait for its confirm unless the URL or
/// [`RabbitConfig::publish_timeout`] says otherwise.
pub(crate) const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// One node of the broker.
#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) url: String,
    pub(crate) address: String,
}

impl RabbitConfig {
    /// Settings for an `amqp://` or `amqps://` URL, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`, naming one node or several
    /// comma-separated ones.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |why: String| {
            Error::config(format!("invalid RabbitMQ URL `{}`: {why}", redact_url(url)))
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("no scheme".into()))?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let query = tail.split_once('?').map_or("", |(_, q)| q);
        let mut heartbeat = None;
        let mut publish_timeout = DEFAULT_PUBLISH_TIMEOUT;
        for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            match key {
                "heartbeat" => {
                    heartbeat = Some(value.parse::<u16>().map_err(|_| {
                        invalid(format!(
                            "heartbeat={value}: whole seconds from 0 to 65535 expected"
                        ))
                    })?)
                }
                "publish_timeout" => {
                    publish_timeout = seconds(value).ok_or_else(|| {
                        invalid(format!("publish_timeout={value}: seconds above 0 expected"))
                    })?
                }
                _ => {}
            }
        }
        let mut nodes = Vec::new();
        for host in hosts.split(',') {
            let node_url = format!("{scheme}://{userinfo}{host}{tail}");
            let parsed: lapin::uri::AMQPUri = node_url.parse().map_err(|e: String| invalid(e))?;
            nodes.push(Node {
                address: format!("{}:{}", parsed.authority.host, parsed.authority.port),
                url: node_url,
            });
        }
        Ok(RabbitConfig {
            url: url.to_owned(),
            nodes,
            connect_timeout: Duration::from_secs(10),
            max_payload: 128 * 1024 * 1024,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connection_name: "ticketrail".to_owned(),
            tls_ca_pem: None,
            heartbeat: heartbeat.unwrap_or(DEFAULT_HEARTBEAT.as_secs() as u16),
            publish_timeout,
        })
    }

    /// The AMQP heartbeat to ask for (whole seconds; 0 turns heartbeats
    /// off). A connection that goes silent, as one a NAT table, a load
    /// balancer's idle timeout or a partition dropped without a reset does,
    /// is given up after about twice this and reopened: the default 4 s
    /// notices within 10 s. Shorter costs a small frame each way per
    /// interval and risks dropping a connection whose process stalls (a
    /// long GC-free but CPU-starved pause) for that long. The URL sets it
    /// too: `?heartbeat=5`. RabbitMQ takes the lower of this and its own
    /// (60 s by default).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.as_secs().min(u64::from(u16::MAX)) as u16;
        self
    }

    /// How long a publish may wait for the broker's confirm before it fails
    /// with [`ErrorKind::Timeout`](ticketrail_core::ErrorKind::Timeout).
    /// Default 15 s; the URL sets it too: `?publish_timeout=15`.
    ///
    /// A publish that timed out may still have reached the broker: publish
    /// the same message (same id) again, and let the consumer's inbox or
    /// idempotence absorb the duplicate.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long connecting may take before it fails with a timeout naming
    /// the host and port. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The largest payload published, in bytes; larger ones fail before
    /// reaching the broker (whose own default limit is 128 MiB). Default 128 MiB.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Backoff between reconnect attempts: starts at `initial`, doubles up to
    /// `max`. Default 100 ms to 5 s.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect_initial = initial;
        self.reconnect_max = max;
        self
    }

    /// The connection name shown in the RabbitMQ management UI. Default `ticketrail`.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Trusts the certificate authority in this PEM file for `amqps://`, on
    /// top of the system's trust store.
    pub fn tls_ca_file(mut self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let pem = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read the CA certificate {}", path.display()))
                .with_source(e)
        })?;
        self.tls_ca_pem = Some(pem);
        Ok(self)
    }

    /// `host:port` of every node, in the order they are tried.
    pub fn addresses(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.address.as_str()).collect()
    }

    /// `host:port` of the nodes, for messages.
    pub fn address(&self) -> String {
        self.addresses().join(",")
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("max_payload", &self.max_payload)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("connection_name", &self.connection_name)
            .field("tls_ca", &self.tls_ca_pem.as_ref().map(|_| "custom"))
            .field("heartbeat", &self.heartbeat)
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

/// A positive number of seconds, fractions allowed.
fn seconds(value: &str) -> Option<Duration> {
    let secs: f64 = value.parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_nodes_share_credentials_and_vhost() {
        let config = RabbitConfig::from_url("amqps://u:p@a:5671,b,c:6000/vh?heartbeat=5").unwrap();
        let urls: Vec<&str> = config.nodes.iter().map(|n| n.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "amqps://u:p@a:5671/vh?heartbeat=5",
                "amqps://u:p@b/vh?heartbeat=5",
                "amqps://u:p@c:6000/vh?heartbeat=5"
            ]
        );
        assert_eq!(config.addresses(), ["a:5671", "b:5671", "c:6000"]);
        assert!(RabbitConfig::from_url("nope").is_err());
        let err = RabbitConfig::from_url("amqp://u:secret@a:notaport/").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn heartbeat_and_publish_timeout_come_from_the_url_or_the_defaults() {
        let plain = RabbitConfig::from_url("amqp://a/%2f").unwrap();
        assert_eq!(u64::from(plain.heartbeat), DEFAULT_HEARTBEAT.as_secs());
        assert_eq!(plain.publish_timeout, DEFAULT_PUBLISH_TIMEOUT);
        let set = RabbitConfig::from_url("amqp://a/%2f?heartbeat=3&publish_timeout=2.5").unwrap();
        assert_eq!(set.heartbeat, 3);
        assert_eq!(set.publish_timeout, Duration::from_millis(2500));
        let set = set.heartbeat(Duration::from_secs(7));
        assert_eq!(set.heartbeat, 7);
        for bad in ["?heartbeat=-1", "?heartbeat=soon", "?publish_timeout=0"] {
            let err = RabbitConfig::from_url(&format!("amqp://a/%2f{bad}")).unwrap_err();
            let key = bad[1..].split('=').next().unwrap();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }
}
