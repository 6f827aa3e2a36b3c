//! C1, C2, C16, C17: what goes in comes out, where it should.

use std::collections::BTreeMap;
use std::time::Duration;

use ticketrail_core::{ErrorKind, Message, QueueSpec, SubscribeOptions};

use super::{checked, Skip};
use crate::harness::{Foreign, Harness};
use crate::support::{ensure, expect_nothing, job_message, receive, Doing, Scenario};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);
/// Sends in flight at once in C1.
const PIPELINED: usize = 50;

pub(crate) async fn c01_confirmed_publish(h: &dyn Harness) -> Result<(), Skip> {
    let queues = vec![QueueSpec::new("orders").bind("orders.*")];
    let sc = Scenario::new(h, "c01", queues).await?;
    checked(
        sc.run(|sc| async move {
            let id = sc.publish_job("orders.created", "routed").await?;
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("orders"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            let mut d = receive(&mut sub, WAIT).await?;
            ensure!(
                d.envelope().id == id,
                "received {} instead of {id}",
                d.envelope().id
            );
            d.ack().await.doing("acking")?;

            let err = sc.publish_job("audit.login", "nobody-listens").await;
            match err {
                Ok(_) => {
                    return Err("a message no queue is bound for was reported published".to_owned())
                }
                Err(e) if e.contains(&ErrorKind::Unroutable.to_string()) => {}
                Err(e) => return Err(format!("expected an unroutable error, got: {e}")),
            }

            // Pipelined: many sends in flight, confirmations awaited in order.
            let mut sent = std::collections::BTreeSet::new();
            let mut confirmations = Vec::new();
            for n in 0..PIPELINED {
                let message = job_message("orders.created", &format!("pipelined-{n}"));
                let confirmation = sc.broker.send(sc.space(), message).await.doing("sending")?;
                sent.insert(confirmation.id().to_owned());
                confirmations.push(confirmation);
            }
            for confirmation in confirmations {
                confirmation.await.doing("awaiting a confirmation")?;
            }
            let mut received = std::collections::BTreeSet::new();
            while received.len() < sent.len() {
                let mut d = receive(&mut sub, WAIT).await?;
                received.insert(d.envelope().id.clone());
                d.ack().await.doing("acking")?;
            }
            ensure!(
                received == sent,
                "confirmed {} sends but received other ids",
                sent.len()
            );
            let unroutable = match sc
                .broker
                .send(sc.space(), job_message("audit.login", "x"))
                .await
            {
                Ok(confirmation) => confirmation.await,
                Err(e) => Err(e),
            };
            match unroutable {
                Ok(()) => Err("a send no queue is bound for was confirmed".to_owned()),
                Err(e) if e.kind() == ErrorKind::Unroutable => Ok(()),
                Err(e) => Err(format!(
                    "expected an unroutable error from a send, got: {e}"
                )),
            }
        })
        .await,
    )
}

pub(crate) async fn c02_round_trip(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c02", vec![QueueSpec::new("q").bind("orders.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let payload: Vec<u8> = vec![0, 159, 146, 150, b'{', 0xff, b'\n', 0xc3];
            let mut headers = BTreeMap::new();
            headers.insert(
                "greeting".to_owned(),
                "héllo wörld 🌍 こんにちは".to_owned(),
            );
            headers.insert("tenant".to_owned(), "acme".to_owned());
            headers.insert(
                "trace-id".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-01".to_owned(),
            );
            let mut message = Message::new("orders.eu.created", payload.clone())
                .id(format!("c02-{}", uuid::Uuid::new_v4()))
                .content_type("application/x-ticketrail-test; charset=binary");
            message.headers = headers.clone();
            let sent = message.clone();
            sc.broker
                .publish(sc.space(), message)
                .await
                .doing("publishing")?;

            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            let mut d = receive(&mut sub, WAIT).await?;
            let got = d.envelope().clone();
            d.ack().await.doing("acking")?;
            ensure!(
                got.id == sent.id,
                "id {:?} arrived as {:?}",
                sent.id,
                got.id
            );
            ensure!(
                got.routing_key == sent.routing_key,
                "routing key {:?} arrived as {:?}",
                sent.routing_key,
                got.routing_key
            );
            ensure!(
                got.payload == sent.payload,
                "payload {:?} arrived as {:?}",
                sent.payload,
                got.payload
            );
            ensure!(
                got.content_type == sent.content_type,
                "content type {:?} arrived as {:?}",
                sent.content_type,
                got.content_type
            );
            ensure!(
                got.headers == headers,
                "headers {headers:?} arrived as {:?}",
                got.headers
            );
            ensure!(
                got.attempt == 1,
                "first delivery has attempt {}",
                got.attempt
            );
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c16_topic_routing(h: &dyn Harness) -> Result<(), Skip> {
    let queues = vec![
        QueueSpec::new("created-a").bind("shop.*.created"),
        QueueSpec::new("created-b").bind("shop.*.created"),
        QueueSpec::new("everything").bind("shop.#"),
        QueueSpec::new("orders").bind("shop.order.#"),
        QueueSpec::new("other").bind("audit.*"),
    ];
    let sc = Scenario::new(h, "c16", queues).await?;
    checked(
        sc.run(|sc| async move {
            let order = sc
                .publish_job("shop.order.created", "order-created")
                .await?;
            let item = sc
                .publish_job("shop.order.item.created", "item-created")
                .await?;
            let bare = sc.publish_job("shop.order", "bare-order").await?;
            let expected: [(&str, Vec<&String>); 5] = [
                ("created-a", vec![&order]),
                ("created-b", vec![&order]),
                ("everything", vec![&order, &item, &bare]),
                ("orders", vec![&order, &item, &bare]),
                ("other", vec![]),
            ];
            for (queue, ids) in expected {
                let mut sub = sc
                    .broker
                    .subscribe(&sc.queue(queue), SubscribeOptions::default())
                    .await
                    .doing("subscribing")?;
                let mut got = Vec::new();
                for _ in 0..ids.len() {
                    let mut d = receive(&mut sub, WAIT).await.map_err(|e| {
                        format!(
                            "queue `{queue}` after {} of {} copies: {e}",
                            got.len(),
                            ids.len()
                        )
                    })?;
                    got.push(d.envelope().id.clone());
                    d.ack().await.doing("acking")?;
                }
                expect_nothing(
                    &mut sub,
                    Duration::from_millis(300),
                    &format!("queue `{queue}` should have no more copies"),
                )
                .await?;
                let mut want: Vec<String> = ids.into_iter().cloned().collect();
                want.sort();
                got.sort();
                ensure!(
                    got == want,
                    "queue `{queue}` received {got:?}, expected {want:?}"
                );
            }
            Ok(())
        })
        .await,
    )
}

pub(crate) async fn c17_foreign_messages(h: &dyn Harness) -> Result<(), Skip> {
    let sc = Scenario::new(h, "c17", vec![QueueSpec::new("q").bind("legacy.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let foreign_id = format!("legacy-{}", uuid::Uuid::new_v4());
            let with_id = Foreign {
                message_id: Some(&foreign_id),
                ..Foreign::new("legacy.signup", br#"{"key":"with-id"}"#)
            };
            h.publish_foreign(sc.space(), with_id)
                .await
                .doing("publishing with a plain client")?;
            h.publish_foreign(
                sc.space(),
                Foreign::new("legacy.signup", br#"{"key":"without-id"}"#),
            )
            .await
            .doing("publishing with a plain client, no message id")?;
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), SubscribeOptions::default())
                .await
                .doing("subscribing")?;
            for expect_id in [Some(foreign_id.as_str()), None] {
                let mut d = receive(&mut sub, WAIT).await?;
                let env = d.envelope().clone();
                d.ack().await.doing("acking")?;
                ensure!(
                    env.attempt == 1,
                    "foreign message has attempt {}",
                    env.attempt
                );
                ensure!(
                    env.routing_key == "legacy.signup",
                    "routing key arrived as {:?}",
                    env.routing_key
                );
                match expect_id {
                    Some(id) => ensure!(
                        env.id == id,
                        "broker message id {id:?} arrived as id {:?}",
                        env.id
                    ),
                    None => ensure!(
                        !env.id.is_empty(),
                        "a foreign message without id got an empty id"
                    ),
                }
            }
            expect_nothing(&mut sub, QUIET, "both foreign messages were acked").await
        })
        .await,
    )
}
