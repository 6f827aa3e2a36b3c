//! RabbitMQ under test: the shared broker at `AMQP_URL`, and a throwaway
//! node for C15.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};
use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};

use crate::harness::{with_start_hint, Foreign, Harness, Restartable};
use crate::testing::{RabbitNode, Throwaway};

/// The default RabbitMQ URL when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Runs the suite on RabbitMQ at `AMQP_URL` (default [`DEFAULT_AMQP_URL`]).
#[derive(Debug, Clone)]
pub struct RabbitHarness {
    url: String,
    /// See [`Harness::prefix`].
    prefix: String,
    /// Whether C15 may start a throwaway server (not when checking a
    /// broker someone runs).
    throwaway: bool,
}

impl RabbitHarness {
    /// The URL this harness connects to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness for `AMQP_URL`.
    pub fn from_env() -> Self {
        RabbitHarness {
            url: std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned()),
            prefix: "tr".to_owned(),
            throwaway: true,
        }
    }

    /// The harness for checking the broker at `url`: names start with
    /// `prefix`, and no throwaway server is started.
    pub fn checking(url: &str, prefix: &str) -> Self {
        RabbitHarness {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            throwaway: false,
        }
    }

    /// Connects the suite's way (short timeouts) to `url`.
    pub async fn connect_url(url: &str) -> Result<SharedBroker> {
        let config = RabbitConfig::from_url(url)?
            .connect_timeout(Duration::from_secs(5))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1));
        RabbitBroker::connect(config)
            .await
            .map(|b| Arc::new(b) as SharedBroker)
            .map_err(|e| {
                with_start_hint(
                    e,
                    "start it with `rabbitmq-server -detached`, or set AMQP_URL",
                )
            })
    }
}

#[async_trait]
impl Harness for RabbitHarness {
    fn name(&self) -> &'static str {
        "rabbitmq"
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
        Duration::from_secs(10)
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn restartable(&self) -> Result<Option<Box<dyn Restartable>>> {
        if !self.throwaway {
            return Ok(None);
        }
        Ok(Some(Box::new(Throwaway::new(
            RabbitNode::start().await?,
            |url| Box::pin(RabbitHarness::connect_url(url)),
        ))))
    }
}

/// Publishes as a plain lapin client would: no ticketrail headers, the
/// broker's message id if given, confirmed.
pub(crate) async fn plain_publish(
    url: &str,
    topic_space: &str,
    message: Foreign<'_>,
) -> Result<()> {
    let raw = |doing: &'static str| {
        move |e: lapin::Error| Error::new(ErrorKind::Broker, doing).with_source(e)
    };
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(raw("connecting a plain AMQP client"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(raw("opening a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(raw("confirm mode"))?;
    let mut properties = BasicProperties::default();
    if let Some(id) = message.message_id {
        properties = properties.with_message_id(id.into());
    }
    if !message.headers.is_empty() {
        let mut table = FieldTable::default();
        for (key, value) in message.headers {
            table.insert((*key).into(), AMQPValue::LongString((*value).into()));
        }
        properties = properties.with_headers(table);
    }
    let confirmation = channel
        .basic_publish(
            topic_space.into(),
            message.routing_key.into(),
            BasicPublishOptions::default(),
            message.payload,
            properties,
        )
        .await
        .map_err(raw("publishing"))?
        .await
        .map_err(raw("waiting for the confirm"))?;
    let _ = connection.close(200, "done".into()).await;
    if confirmation.is_ack() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Broker,
            "the plain publish was not confirmed",
        ))
    }
}
