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

/// A message whose consumer crashes after sending work-in-progress acks
/// still reaches the DLQ at the queue's delivery limit (C13): the server
/// keeps counting its deliveries. (nats-server 2.9.10 was once thought to
/// reset the count on a `+WPI`; measured again, it does not.)
#[tokio::test]
async fn nats_crash_loops_end_also_after_progress_acks() {
    use std::sync::atomic::AtomicBool;
    use ticketrail_core::{Consumer, DeadLetterReason, QueueSpec, Topology};
    let mut server = NatsServer::start().await.unwrap();
    let config = || {
        NatsConfig::from_url(&server.url())
            .unwrap()
            .ack_wait(Duration::from_millis(1000))
            .progress_acks(true)
    };
    let admin: ticketrail_core::SharedBroker =
        Arc::new(NatsBroker::connect(config()).await.unwrap());
    let topology =
        Topology::new("crash.events").queue(QueueSpec::new("crash.q").bind("#").delivery_limit(2));
    admin.declare(&topology).await.unwrap();
    admin
        .publish("crash.events", Message::new("a.b", "{}"))
        .await
        .unwrap();
    // Each consumer works past one work-in-progress ack (every 500 ms),
    // then is killed with the message in hand.
    let mut crashes = 0;
    let records = loop {
        let records = admin.dead_letters("crash.q", 10).await.unwrap();
        if !records.is_empty() {
            break records;
        }
        assert!(
            crashes < 8,
            "still not dead-lettered after {crashes} crashes"
        );
        let started = Arc::new(AtomicBool::new(false));
        let handler = {
            let started = Arc::clone(&started);
            handler_fn(move |_: serde_json::Value, _ctx: Context| {
                let started = Arc::clone(&started);
                async move {
                    started.store(true, Ordering::SeqCst);
                    std::future::pending::<Result<(), HandlerError>>().await
                }
            })
        };
        let broker: ticketrail_core::SharedBroker =
            Arc::new(NatsBroker::connect(config()).await.unwrap());
        let consumer = Consumer::new(broker.clone(), "crash.q", handler).spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !started.load(Ordering::SeqCst) {
            if !admin.dead_letters("crash.q", 1).await.unwrap().is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let stats = admin.queue_stats("crash.q").await;
                panic!("no redelivery after crash {crashes}; the queue: {stats:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        consumer.abort();
        let _ = broker.close().await;
        crashes += 1;
    };
    assert_eq!(
        records[0].reason,
        DeadLetterReason::DeliveryLimit,
        "{:?}",
        records[0]
    );
    assert!(
        crashes <= 4,
        "it took {crashes} crashes with a delivery limit of 2"
    );
    server.remove().await.unwrap();
}

/// A consumer stopped at any moment, also half-way through opening its
/// subscription, leaves no connection behind: lapin keeps a connection
/// open until told, and one left with a consumer on it would hold that
/// consumer's prefetch window of messages for as long as the process lives.
#[tokio::test]
async fn rabbitmq_consumers_stopped_while_subscribing_leave_no_connection() {
    use ticketrail_core::{Broker, Consumer, QueueSpec, Topology};
    use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};
    let mut node = RabbitNode::start().await.unwrap();
    let config = RabbitConfig::from_url(&node.url()).unwrap();
    let broker = RabbitBroker::connect(config.clone()).await.unwrap();
    let topology = Topology::new("abort.events").queue(QueueSpec::new("abort.q").bind("#"));
    broker.declare(&topology).await.unwrap();
    for i in 0..50 {
        broker
            .publish("abort.events", Message::new("k", i.to_string()))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let count = {
        let handled = Arc::clone(&handled);
        handler_fn(move |_: u32, _: Context| {
            let handled = Arc::clone(&handled);
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
    };
    // Stopped after 0..25 ms: many while connecting, some while the
    // channel, its prefetch limit or the consumer is being set up.
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..60 {
        let consumer = Consumer::new(Arc::new(broker.clone()), "abort.q", count.clone())
            .prefetch(10)
            .spawn();
        tokio::time::sleep(Duration::from_millis(rng.u64(0..25))).await;
        consumer.abort();
    }
    // Closing takes a round trip; then only the publishing connection is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    let connections = loop {
        let listed = node.ctl(&["list_connections", "-q", "name"]).await.unwrap();
        let connections = listed.lines().filter(|l| l.contains("->")).count();
        if connections <= 1 || Instant::now() > deadline {
            break connections;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(connections, 1, "connections left open by stopped consumers");

    // And every message is still there for a consumer that stays.
    let before = handled.load(Ordering::SeqCst);
    let stays = Consumer::new(Arc::new(broker.clone()), "abort.q", count.clone()).spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled.load(Ordering::SeqCst) < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        handled.load(Ordering::SeqCst) >= 50,
        "handled {} of 50 ({before} before the consumer that stays)",
        handled.load(Ordering::SeqCst)
    );
    stays.shutdown().await.unwrap();
    node.remove().await.unwrap();
}

/// A retry RabbitMQ keeps in its wait queue past its time (as 3.10 clusters
/// sometimes do: the queue stops expiring messages) is brought back by the
/// subscription's sweep, and counts as the retry it is. The stall is staged
/// with a copy whose due time is long past in a wait queue whose TTL (64 s,
/// a delay tier) has not run out.
#[tokio::test]
async fn rabbitmq_retries_kept_past_their_time_are_brought_back() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use std::time::SystemTime;
    use ticketrail_core::{to_unix_millis, wire, Broker, Consumer, QueueSpec, Topology};
    use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let name = format!(
        "tr-sweep-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let queue = format!("{name}.q");
    let broker = RabbitBroker::connect(RabbitConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let topology = Topology::new(format!("{name}.events")).queue(QueueSpec::new(&queue).bind("#"));
    broker.declare(&topology).await.unwrap();

    // The wait queue of the 64 s tier, declared as the backend declares it
    // (the backend's own declare later must agree), holding one copy that
    // was due 30 s ago.
    let wait = format!("{queue}.wait.64000ms");
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", queue.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(64_000));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(wait.as_str().into(), durable, args)
        .await
        .unwrap();
    let ms = |at: SystemTime| AMQPValue::LongString(to_unix_millis(at).to_string().into());
    let now = SystemTime::now();
    let mut headers = FieldTable::default();
    headers.insert(wire::ATTEMPT.into(), AMQPValue::LongString("2".into()));
    headers.insert(
        wire::ROUTING_KEY.into(),
        AMQPValue::LongString("jobs.one".into()),
    );
    headers.insert(wire::PUBLISHED_AT.into(), ms(now - Duration::from_secs(40)));
    headers.insert(
        wire::FIRST_FAILED_AT.into(),
        ms(now - Duration::from_secs(40)),
    );
    headers.insert(wire::RETRY_DUE.into(), ms(now - Duration::from_secs(30)));
    let confirm = channel
        .basic_publish(
            "".into(),
            wait.as_str().into(),
            BasicPublishOptions::default(),
            b"7",
            lapin::BasicProperties::default()
                .with_message_id("stalled-retry".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = {
        let seen = Arc::clone(&seen);
        handler_fn(move |n: u32, ctx: Context| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock()
                    .unwrap()
                    .push((n, ctx.attempt(), ctx.envelope().id.clone()));
                Ok::<_, HandlerError>(())
            }
        })
    };
    let started = Instant::now();
    let consumer = Consumer::new(Arc::new(broker.clone()), queue.clone(), handler).spawn();
    // A sweep every 5 s; the TTL would take 64.
    while seen.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    consumer.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(7, 2, "stalled-retry".to_owned())],
        "after {took:?}"
    );
    let stats = broker.queue_stats(&queue).await.unwrap();
    assert_eq!(stats.waiting_retries, Some(0), "{stats:?}");
    // The wait queue was made as 0.1.0 made them, without its tier's
    // marker exchange: the sweep marked the tier, so deleting finds it.
    let marker = channel
        .exchange_declare(
            "ticketrail.tier.64000ms".into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(marker.is_ok(), "no tier marker: {marker:?}");
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
    let look = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let left = look
        .queue_declare(wait.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(left.is_err(), "`{wait}` outlived delete: {left:?}");
    let _ = connection.close(200, "done".into()).await;
}

/// A node that stops answering (hung, its port still open) costs a client
/// that closes its connect timeout, not forever: lapin waits for the
/// broker's close-ok, and a failure drill once hung there.
#[tokio::test]
async fn rabbitmq_close_is_bounded_when_the_broker_stops_answering() {
    use ticketrail_conformance::testing::Freezer;
    use ticketrail_core::{Broker, ErrorKind, QueueSpec, Topology};
    use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};
    let mut node = RabbitNode::start().await.unwrap();
    let url = node.url();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .and_then(|port| port.parse().ok())
        .expect("a port in the node's URL");
    let freezer = Freezer::start(([127, 0, 0, 1], port).into()).await.unwrap();
    let relayed = url.replace(&format!(":{port}/"), &format!(":{}/", freezer.port()));
    let config = RabbitConfig::from_url(&relayed)
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let broker = RabbitBroker::connect(config).await.unwrap();
    let topology = Topology::new("frozen.events").queue(QueueSpec::new("frozen.q").bind("#"));
    broker.declare(&topology).await.unwrap();
    broker
        .publish("frozen.events", Message::new("k", "through the relay"))
        .await
        .expect("the relay forwards until frozen");

    freezer.freeze();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(30), broker.close())
        .await
        .expect("close() still waiting for the broker after 30 s");
    let err = closed.expect_err("a close the broker never confirmed reported success");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().contains("closing the connection"),
        "the error names what timed out: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "close took {:?} with a 2 s connect timeout",
        started.elapsed()
    );
    let after = broker
        .publish("frozen.events", Message::new("k", "after close"))
        .await
        .expect_err("publishing after close");
    assert_eq!(after.kind(), ErrorKind::Closed, "{after}");
    drop(freezer);
    node.remove().await.unwrap();
}

/// Two queues of one topic space, and a restart: on nats-server before
/// 2.10 a queue's consumer takes a single filter subject, so it reads the
/// whole stream and acknowledges the other queue's messages to pass over
/// them. The other queue's messages, not yet consumed, must survive a
/// restart of the server all the same.
#[tokio::test]
async fn nats_a_queue_keeps_its_messages_across_a_restart_when_another_passed_over_them() {
    use ticketrail_conformance::testing::ServerProcess as _;
    use ticketrail_core::{Consumer, QueueSpec, Topology};
    let mut server = NatsServer::start().await.unwrap();
    let url = server.url();
    let connect = || async {
        let broker: ticketrail_core::SharedBroker = Arc::new(
            NatsBroker::connect(NatsConfig::from_url(&url).unwrap())
                .await
                .unwrap(),
        );
        broker
    };
    let broker = connect().await;
    let topology = Topology::new("two.events")
        .queue(QueueSpec::new("two.a").bind("a.#"))
        .queue(QueueSpec::new("two.b").bind("b.#"));
    broker.declare(&topology).await.unwrap();
    let n = 300;
    for i in 0..n {
        for key in ["a.x", "b.x"] {
            broker
                .publish("two.events", Message::new(key, format!("{i}")))
                .await
                .unwrap();
        }
    }
    // Drains `queue`: how many messages its handler saw.
    let drain = |broker: ticketrail_core::SharedBroker, queue: &'static str| async move {
        let handled = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&handled);
        let consumer = Consumer::new(
            broker.clone(),
            queue,
            handler_fn(move |_: serde_json::Value, _ctx: Context| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }),
        )
        .spawn();
        let deadline = Instant::now() + Duration::from_secs(15);
        while handled.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Passing over the other queue's messages: acknowledged by now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        consumer.shutdown().await.unwrap();
        handled.load(Ordering::SeqCst)
    };
    assert_eq!(drain(broker.clone(), "two.a").await, n);
    let before = broker.queue_stats("two.b").await.unwrap();
    let _ = broker.close().await;
    server.halt().await.unwrap();
    server.launch().await.unwrap();
    let broker = connect().await;
    let after = broker.queue_stats("two.b").await.unwrap();
    assert_eq!(
        drain(broker.clone(), "two.b").await,
        n,
        "queue b held {before:?} before the restart and {after:?} after"
    );
    server.remove().await.unwrap();
}
