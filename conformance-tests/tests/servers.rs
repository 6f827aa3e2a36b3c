//! Tests that need throwaway servers of their own: TLS with a trusted and
//! an untrusted certificate, wrong credentials, and handlers slower than
//! NATS's `ack_wait`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ticketrail_conformance::testing::{NatsServer, RabbitNode, ServerProcess, TestCerts};
use ticketrail_core::{handler_fn, Context, HandlerError, Message};
use ticketrail_nats::{NatsBroker, NatsConfig};

/// One message through a broker reached over TLS.
async fn round_trip_over_tls(broker: &dyn ticketrail_core::Broker) {
    use ticketrail_core::{QueueSpec, Topology};
    let topology = Topology::new("tls.events").queue(QueueSpec::new("tls.q").bind("#"));
    broker.declare(&topology).await.unwrap();
    broker
        .publish("tls.events", Message::new("a.b", "over tls"))
        .await
        .unwrap();
    let mut sub = broker.subscribe("tls.q", Default::default()).await.unwrap();
    let mut delivery = sub.next().await.unwrap().unwrap();
    assert_eq!(delivery.envelope().payload, "over tls");
    delivery.ack().await.unwrap();
    broker.close().await.unwrap();
}

/// The error says the certificate is not trusted, and where.
fn refused_as_untrusted(err: &ticketrail_core::Error, port: u16) {
    assert!(err.to_string().contains("not trusted"), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// `amqps://` works with the test CA trusted, and is refused with a clear
/// error without it.
#[tokio::test]
async fn rabbitmq_over_tls_and_an_untrusted_certificate() {
    use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};
    let certs = TestCerts::generate().await.unwrap();
    let mut node = RabbitNode::start_with(Some(&certs)).await.unwrap();
    let url = node.url();
    assert!(url.starts_with("amqps://"));
    let trusted = RabbitConfig::from_url(&url)
        .unwrap()
        .tls_ca_file(&certs.ca)
        .unwrap();
    let broker = RabbitBroker::connect(trusted)
        .await
        .expect("TLS with the CA trusted");
    round_trip_over_tls(&broker).await;

    let untrusted = RabbitConfig::from_url(&url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let err = RabbitBroker::connect(untrusted).await.unwrap_err();
    refused_as_untrusted(&err, node.port);
    node.remove().await.unwrap();
}

/// `tls://` works with the test CA trusted, and is refused with a clear
/// error without it.
#[tokio::test]
async fn nats_over_tls_and_an_untrusted_certificate() {
    let certs = TestCerts::generate().await.unwrap();
    let cert = certs.cert.display().to_string();
    let key = certs.key.display().to_string();
    let mut server = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key])
        .await
        .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port);
    let trusted = NatsConfig::from_url(&url).unwrap().tls_ca_file(&certs.ca);
    let broker = NatsBroker::connect(trusted)
        .await
        .expect("TLS with the CA trusted");
    round_trip_over_tls(&broker).await;

    let untrusted = NatsConfig::from_url(&url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let err = NatsBroker::connect(untrusted).await.unwrap_err();
    refused_as_untrusted(&err, server.port);
    server.remove().await.unwrap();
}

/// A handler that runs longer than `ack_wait` keeps its message: the
/// subscription sends work-in-progress acks, so the server does not hand
/// the message to another consumer meanwhile.
#[tokio::test]
async fn nats_handler_slower_than_ack_wait_is_not_redelivered() {
    use ticketrail_core::{Consumer, QueueSpec, Topology};
    let mut server = NatsServer::start().await.unwrap();
    let config = || {
        NatsConfig::from_url(&server.url())
            .unwrap()
            .ack_wait(Duration::from_secs(1))
            // Off by default on 2.9 (see `progress_acks`): asked for here.
            .progress_acks(true)
    };
    let broker: ticketrail_core::SharedBroker =
        std::sync::Arc::new(NatsBroker::connect(config()).await.unwrap());
    let topology = Topology::new("slow.events").queue(QueueSpec::new("slow.q").bind("#"));
    broker.declare(&topology).await.unwrap();
    // Counts its calls; each takes 3.5 s.
    let calls = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (calls, finished) = (Arc::clone(&calls), Arc::clone(&finished));
        Arc::new(handler_fn(move |_: serde_json::Value, _ctx: Context| {
            let (calls, finished) = (Arc::clone(&calls), Arc::clone(&finished));
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3500)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }))
    };
    // Two consumers: a redelivery would go to the idle one at once.
    let first = Consumer::new(broker.clone(), "slow.q", Arc::clone(&handler)).spawn();
    let other: ticketrail_core::SharedBroker =
        std::sync::Arc::new(NatsBroker::connect(config()).await.unwrap());
    let second = Consumer::new(other.clone(), "slow.q", Arc::clone(&handler)).spawn();
    broker
        .publish("slow.events", Message::new("a.b", "{}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while finished.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the slow handler never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A redelivery during the handling would have reached the idle
    // consumer at once; give one a moment to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the message was delivered again while it was being handled"
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    server.remove().await.unwrap();
}

/// Wrong credentials are an authentication error, at once, and the
/// password appears nowhere in it.
#[tokio::test]
async fn wrong_nats_credentials_are_an_auth_error_not_a_hang() {
    let mut server = NatsServer::start_with(&["--user", "app", "--pass", "right-one"])
        .await
        .unwrap();
    let right = format!("nats://app:right-one@127.0.0.1:{}", server.port);
    let broker = NatsBroker::connect(NatsConfig::from_url(&right).unwrap()).await;
    assert!(
        broker.is_ok(),
        "the right credentials work: {:?}",
        broker.err()
    );
    let wrong = format!("nats://app:wr0ng-Secret@127.0.0.1:{}", server.port);
    let started = Instant::now();
    let err = NatsBroker::connect(
        NatsConfig::from_url(&wrong)
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
    assert_eq!(err.kind(), ticketrail_core::ErrorKind::Auth, "{err:?}");
    assert!(
        !format!("{err} {err:?}").contains("wr0ng-Secret"),
        "the password leaked: {err:?}"
    );
    server.remove().await.unwrap();
}
