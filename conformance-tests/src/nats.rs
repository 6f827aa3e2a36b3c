//! NATS JetStream under test: the shared server at `NATS_URL`, and a
//! throwaway server for C15.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_trait::async_trait;
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};
use ticketrail_nats::{NatsBroker, NatsConfig};

use crate::harness::{with_start_hint, Foreign, Harness, Restartable};
use crate::testing::{NatsServer, Throwaway};

/// The default NATS URL when `NATS_URL` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How long the server waits for a settlement before it redelivers, in the
/// suite: short, so that C4 and C13 do not wait long for killed consumers.
const ACK_WAIT: Duration = Duration::from_secs(3);

/// Runs the suite on NATS at `NATS_URL` (default [`DEFAULT_NATS_URL`]).
#[derive(Debug, Clone)]
pub struct NatsHarness {
    url: String,
    /// See [`Harness::prefix`].
    prefix: String,
    /// Whether C15 may start a throwaway server (not when checking a
    /// broker someone runs).
    throwaway: bool,
}

impl NatsHarness {
    /// The URL this harness connects to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness for `NATS_URL`.
    pub fn from_env() -> Self {
        NatsHarness {
            url: std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned()),
            prefix: "tr".to_owned(),
            throwaway: true,
        }
    }

    /// The harness for checking the broker at `url`: names start with
    /// `prefix`, and no throwaway server is started.
    pub fn checking(url: &str, prefix: &str) -> Self {
        NatsHarness {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            throwaway: false,
        }
    }

    /// Connects the suite's way (short timeouts) to `url`.
    pub async fn connect_url(url: &str) -> Result<SharedBroker> {
        Self::connect_replicated(url, 1).await
    }

    /// Connects the suite's way to `url`, with streams of `replicas` copies.
    pub async fn connect_replicated(url: &str, replicas: usize) -> Result<SharedBroker> {
        let config = NatsConfig::from_url(url)?
            .connect_timeout(Duration::from_secs(5))
            .ack_wait(ACK_WAIT)
            .replicas(replicas);
        NatsBroker::connect(config).await.map(|b| Arc::new(b) as SharedBroker)
            .map_err(|e| with_start_hint(e, "start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`, or set NATS_URL"))
    }
}

#[async_trait]
impl Harness for NatsHarness {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn broker_url(&self) -> Option<String> {
        Some(self.url.clone())
    }

    async fn connect_to(&self, url: &str) -> Result<SharedBroker> {
        Self::connect_url(url).await
    }

    async fn connect(&self) -> Result<SharedBroker> {
        Self::connect_url(&self.url).await
    }

    async fn publish_foreign(&self, topic_space: &str, message: Foreign<'_>) -> Result<()> {
        plain_publish(&self.url, topic_space, message).await
    }

    fn redelivery_timeout(&self) -> Duration {
        ACK_WAIT + Duration::from_secs(7)
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn restartable(&self) -> Result<Option<Box<dyn Restartable>>> {
        if !self.throwaway {
            return Ok(None);
        }
        Ok(Some(Box::new(Throwaway::new(
            NatsServer::start().await?,
            |url| Box::pin(NatsHarness::connect_url(url)),
        ))))
    }
}

/// Publishes as a plain async-nats client would: no ticketrail headers,
/// `Nats-Msg-Id` if an id is given, and waits for the stream's ack.
pub(crate) async fn plain_publish(
    url: &str,
    topic_space: &str,
    message: Foreign<'_>,
) -> Result<()> {
    let raw = |doing: &'static str| {
        move |e: Box<dyn std::error::Error + Send + Sync>| {
            Error::new(ErrorKind::Broker, doing).with_source(e)
        }
    };
    let servers: Vec<&str> = url.trim_start_matches("nats://").split(',').collect();
    let client = async_nats::connect(servers)
        .await
        .map_err(|e| raw("connecting a plain NATS client")(e.into()))?;
    let mut headers = HeaderMap::new();
    if let Some(id) = message.message_id {
        headers.insert("Nats-Msg-Id", id);
    }
    for (key, value) in message.headers {
        headers.insert(*key, *value);
    }
    // A request, so the stream's acknowledgement says it is stored.
    client
        .request_with_headers(
            format!("{topic_space}.{}", message.routing_key),
            headers,
            message.payload.to_vec().into(),
        )
        .await
        .map_err(|e| raw("publishing with a plain client")(e.into()))?;
    let _ = client.drain().await;
    Ok(())
}
