//! Bad input gets a clear error naming what was wrong, and loses nothing;
//! no secret appears in errors, logs or `Debug` output.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ticketrail_core::{Broker, ErrorKind, Message, QueueSpec, Topology};
use ticketrail_memory::{MemoryBroker, MemoryConfig};
use ticketrail_nats::{NatsBroker, NatsConfig};
use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};

const SECRET: &str = "s3cr3t-Pa55";

fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| ticketrail_conformance::DEFAULT_AMQP_URL.to_owned())
}

fn nats_url() -> String {
    std::env::var("NATS_URL")
        .unwrap_or_else(|_| ticketrail_conformance::DEFAULT_NATS_URL.to_owned())
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

async fn invalid_names_are_refused(broker: &dyn Broker) {
    let cases = [
        (Topology::new(""), "topic space name is empty"),
        (
            Topology::new("t.ok").queue(QueueSpec::new("")),
            "queue name is empty",
        ),
        (
            Topology::new("t.ok").queue(QueueSpec::new("has space")),
            "has space",
        ),
        (
            Topology::new("t.ok").queue(QueueSpec::new("q").bind("a..b")),
            "empty word",
        ),
        (
            Topology::new("t.ok").queue(QueueSpec::new("q").bind("a.b*")),
            "whole words",
        ),
        (
            Topology::new("t.ok").queue(QueueSpec::new("q*")),
            "not allowed",
        ),
    ];
    for (topology, says) in cases {
        let err = broker
            .declare(&topology)
            .await
            .expect_err("an invalid topology was declared");
        assert_eq!(err.kind(), ErrorKind::InvalidName, "{err}");
        assert!(
            err.to_string().contains(says),
            "`{err}` should say {says:?}"
        );
    }
    let err = broker
        .publish("t.ok", Message::new("a.*", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName, "{err}");
    assert!(err.to_string().contains("no wildcards"), "{err}");
    // A topic space that could never have been declared is named as such,
    // not as one that is merely missing.
    let err = broker
        .publish("t.*", Message::new("a", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidName, "{err}");
    assert!(err.to_string().contains("topic space name `t.*`"), "{err}");
}

#[tokio::test]
async fn memory_refuses_bad_names_and_oversized_payloads() {
    let broker = MemoryBroker::with_config(MemoryConfig::default().max_payload(1024));
    invalid_names_are_refused(&broker).await;
    let topology = Topology::new("big.events").queue(QueueSpec::new("big.q").bind("#"));
    broker.declare(&topology).await.unwrap();
    let err = broker
        .publish("big.events", Message::new("a", vec![0u8; 2048]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(
        err.to_string().contains("1024"),
        "the limit is named: {err}"
    );
    let err = broker
        .publish("small.events", Message::new("a", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unroutable, "{err}");
    assert!(
        err.to_string().contains("`small.events` is not declared"),
        "{err}"
    );
    // Nothing half-published: the queue is empty.
    let mut sub = broker.subscribe("big.q", Default::default()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), sub.next())
        .await
        .is_err());
}

#[tokio::test]
async fn rabbitmq_refuses_bad_names_and_oversized_payloads() {
    let config = RabbitConfig::from_url(&amqp_url())
        .unwrap()
        .max_payload(1024);
    let broker = RabbitBroker::connect(config)
        .await
        .expect("RabbitMQ reachable (rabbitmq-server -detached)");
    invalid_names_are_refused(&broker).await;
    let err = broker
        .declare(&Topology::new("amq.mine"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    let space = unique("tr-bad");
    let topology = Topology::new(format!("{space}.events"))
        .queue(QueueSpec::new(format!("{space}.q")).bind("#"));
    broker.declare(&topology).await.unwrap();
    let err = broker
        .publish(&topology.topic_space, Message::new("a", vec![0u8; 2048]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(
        err.to_string().contains("1024"),
        "the limit is named: {err}"
    );
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn nats_refuses_bad_names_and_payloads_over_max_payload() {
    let broker = NatsBroker::connect(NatsConfig::from_url(&nats_url()).unwrap())
        .await
        .expect("NATS reachable (nats-server -js)");
    invalid_names_are_refused(&broker).await;
    let err = broker
        .declare(&Topology::new("t.ok").queue(QueueSpec::new("q").bind("a.#.b")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("last word"), "{err}");
    let space = unique("tr-bad");
    let topology = Topology::new(format!("{space}.events"))
        .queue(QueueSpec::new(format!("{space}.q")).bind("#"));
    broker.declare(&topology).await.unwrap();
    let err = broker
        .publish(
            &topology.topic_space,
            Message::new("a", vec![0u8; 2 * 1024 * 1024]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(
        err.to_string().contains("max_payload"),
        "the limit is named: {err}"
    );
    let err = broker
        .publish(
            &topology.topic_space,
            Message::new("a", "x").header("note", "two\nlines"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`note`"), "{err}");
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

/// An error of a failed connect: within the timeout, naming host and port,
/// never the password.
fn failed_fast(err: &ticketrail_core::Error, started: Instant, port: u16) {
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "host and port named: {err}"
    );
    assert!(
        !format!("{err} {err:?}").contains(SECRET),
        "the password leaked: {err:?}"
    );
}

#[tokio::test]
async fn unreachable_brokers_fail_fast_naming_host_and_port() {
    let port = closed_port();
    let timeout = Duration::from_secs(3);

    let started = Instant::now();
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:{port}/%2f");
    let config = RabbitConfig::from_url(&url)
        .unwrap()
        .connect_timeout(timeout);
    failed_fast(
        &RabbitBroker::connect(config).await.unwrap_err(),
        started,
        port,
    );

    let started = Instant::now();
    let url = format!("nats://user:{SECRET}@127.0.0.1:{port}");
    let config = NatsConfig::from_url(&url).unwrap().connect_timeout(timeout);
    failed_fast(
        &NatsBroker::connect(config).await.unwrap_err(),
        started,
        port,
    );
}

#[tokio::test]
async fn wrong_rabbitmq_credentials_are_an_auth_error_not_a_hang() {
    let url = amqp_url().replacen("guest:guest", &format!("guest:{SECRET}"), 1);
    let started = Instant::now();
    let err = RabbitBroker::connect(
        RabbitConfig::from_url(&url)
            .unwrap()
            .connect_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Auth, "{err:?}");
    assert!(
        !format!("{err} {err:?}").contains(SECRET),
        "the password leaked: {err:?}"
    );
}

/// Collects what tracing writes, for the secrets check.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_secret_in_logs_errors_or_debug_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen = String::new();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let wrong = amqp_url().replacen("guest:guest", &format!("guest:{SECRET}"), 1);
            let config = RabbitConfig::from_url(&wrong)
                .unwrap()
                .connect_timeout(Duration::from_secs(3));
            seen += &format!("{config:?}\n");
            if let Err(e) = RabbitBroker::connect(config).await {
                seen += &format!("{e}\n{e:?}\n");
            }
            let port = closed_port();
            let config =
                NatsConfig::from_url(&format!("nats://user:{SECRET}@127.0.0.1:{port}")).unwrap();
            seen += &format!("{config:?}\n");
            if let Err(e) =
                NatsBroker::connect(config.connect_timeout(Duration::from_secs(1))).await
            {
                seen += &format!("{e}\n{e:?}\n");
            }
        })
    });
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(!seen.is_empty());
    assert!(
        !seen.contains(SECRET),
        "a secret in errors or Debug output:\n{seen}"
    );
    assert!(!logs.contains(SECRET), "a secret in the logs:\n{logs}");
}

/// A plain AMQP client's headers of every odd type are converted to text or
/// left out; the message is consumed, never a crash.
#[tokio::test]
async fn foreign_amqp_headers_of_odd_types_are_converted_or_left_out() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable};

    let broker = RabbitBroker::connect(RabbitConfig::from_url(&amqp_url()).unwrap())
        .await
        .expect("RabbitMQ reachable (rabbitmq-server -detached)");
    let space = unique("tr-odd");
    let queue = format!("{space}.q");
    let topology = Topology::new(format!("{space}.events")).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await.unwrap();

    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("count".into(), AMQPValue::LongLongInt(-42));
    headers.insert("small".into(), AMQPValue::ShortShortUInt(7));
    headers.insert("flag".into(), AMQPValue::Boolean(false));
    headers.insert("ratio".into(), AMQPValue::Float(1.5));
    headers.insert(
        "price".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 1999,
        }),
    );
    headers.insert("when".into(), AMQPValue::Timestamp(1_700_000_000));
    headers.insert(
        "nested".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    headers.insert(
        "list".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
    );
    headers.insert(
        "raw".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255])),
    );
    headers.insert("nothing".into(), AMQPValue::Void);
    headers.insert(
        ticketrail_core::wire::ATTEMPT.into(),
        AMQPValue::LongString("not a number".into()),
    );
    let properties = lapin::BasicProperties::default().with_headers(headers);
    let confirm = channel
        .basic_publish(
            topology.topic_space.as_str().into(),
            "legacy.odd".into(),
            BasicPublishOptions::default(),
            b"{}",
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = connection.close(200, "done".into()).await;

    let mut sub = broker.subscribe(&queue, Default::default()).await.unwrap();
    let mut delivery = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let env = delivery.envelope().clone();
    delivery.ack().await.unwrap();
    let text = |k: &str| env.headers.get(k).map(String::as_str);
    assert_eq!(text("count"), Some("-42"));
    assert_eq!(text("small"), Some("7"));
    assert_eq!(text("flag"), Some("false"));
    assert_eq!(text("ratio"), Some("1.5"));
    assert_eq!(text("price"), Some("1999e-2"));
    assert_eq!(text("when"), Some("1700000000"));
    for gone in [
        "nested",
        "list",
        "raw",
        "nothing",
        ticketrail_core::wire::ATTEMPT,
    ] {
        assert!(
            !env.headers.contains_key(gone),
            "`{gone}` should be left out: {:?}",
            env.headers
        );
    }
    assert_eq!(
        env.attempt, 1,
        "a plain publisher's attempt header is not trusted: this is the first attempt"
    );
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}
