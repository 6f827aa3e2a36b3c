//! Settings of the RabbitMQ backend.

use std::fmt;
use std::time::Duration;

use ticketrail_core::{redact_url, Error, Result};

/// How to reach RabbitMQ and how to behave when it goes away.
///
/// ```
/// use std::time::Duration;
/// use ticketrail_rabbitmq::RabbitConfig;
///
/// let config = RabbitConfig::from_url("amqp://guest:secret@127.0.0.1:5672/%2f")?
///     .connect_timeout(Duration::from_secs(3));
/// // Debug output never shows the password.
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) url: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_payload: usize,
    pub(crate) reconnect_initial: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) connection_name: String,
    pub(crate) tls_ca_pem: Option<String>,
}

impl RabbitConfig {
    /// Settings for an `amqp://` or `amqps://` URL, e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed: lapin::uri::AMQPUri = url.parse().map_err(|e: String| {
            Error::config(format!("invalid RabbitMQ URL `{}`: {e}", redact_url(url)))
        })?;
        Ok(RabbitConfig {
            url: url.to_owned(),
            host: parsed.authority.host.clone(),
            port: parsed.authority.port,
            connect_timeout: Duration::from_secs(10),
            max_payload: 128 * 1024 * 1024,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connection_name: "ticketrail".to_owned(),
            tls_ca_pem: None,
        })
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

    /// `host:port` of the broker, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
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
            .finish()
    }
}
