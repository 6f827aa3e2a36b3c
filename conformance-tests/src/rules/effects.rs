//! C19, C20: effects once, through the PostgreSQL outbox and inbox.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use sqlx::{PgConnection, PgPool, Row};
use ticketrail_core::trace::TRACEPARENT;
use ticketrail_core::{
    Consumer, Context, Fixed, Handler, HandlerError, QueueSpec, Replay, SharedBroker, Subscription,
};
use ticketrail_postgres::{InboxHandler, Store};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{
    ensure, expect_nothing, job_message, prefetch, receive, wait_until, Doing, Job, Scenario,
};
use crate::testing::TestDatabase;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

/// A database of its own for one rule, or the rule fails saying how to get one.
async fn database() -> Result<TestDatabase, Skip> {
    TestDatabase::create()
        .await
        .map_err(|e| Skip::Failed(format!("a test database: {e}")))
}

/// Turns a sqlx error into a check failure that says what was being done.
fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> String {
    move |e| format!("{what}: {e}")
}

async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, String> {
    pool.begin().await.map_err(sql("beginning a transaction"))
}

/// Receives `n` deliveries, acks each, and returns their ids.
async fn receive_ids(sub: &mut Box<dyn Subscription>, n: usize) -> Result<Vec<String>, String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let mut d = receive(sub, WAIT)
            .await
            .map_err(|e| format!("delivery {} of {n}: {e}", i + 1))?;
        ids.push(d.envelope().id.clone());
        d.ack().await.doing("acking")?;
    }
    Ok(ids)
}

pub(crate) async fn c19_outbox(h: &dyn Harness) -> Result<(), Skip> {
    let db = database().await?;
    let sc = Scenario::new(h, "c19", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let pool = db.pool();
            let store = Store::new(pool.clone());
            store.migrate().await.doing("migrating")?;
            let outbox = store.outbox(sc.space()).doing("opening the outbox")?;
            let relay = store.relay(sc.broker.clone()).batch(20);
            let job = |key: &str| Job {
                key: key.to_owned(),
            };

            // A rolled-back transaction publishes nothing, ever.
            let mut tx = begin(pool).await?;
            let rolled_back = outbox
                .publish(&mut tx, "jobs.a", &job("rolled-back"))
                .await
                .doing("writing a row that rolls back")?;
            tx.rollback().await.map_err(sql("rolling back"))?;

            // A row whose transaction took the smaller id but commits after
            // a later one was relayed is still published.
            let mut late = begin(pool).await?;
            let late_id = outbox
                .publish(&mut late, "jobs.a", &job("late-commit"))
                .await
                .doing("writing the late row")?;
            let mut early = begin(pool).await?;
            let early_id = outbox
                .publish(&mut early, "jobs.a", &job("early-commit"))
                .await
                .doing("writing the early row")?;
            early
                .commit()
                .await
                .map_err(sql("committing the early row"))?;
            let pass = relay.run_once().await.doing("relaying the early row")?;
            ensure!(
                pass.sent == 1,
                "first pass sent {} rows, expected 1",
                pass.sent
            );
            late.commit()
                .await
                .map_err(sql("committing the late row"))?;
            let pass = relay.run_once().await.doing("relaying the late row")?;
            ensure!(
                pass.sent == 1,
                "second pass sent {} rows, expected 1 (the late commit)",
                pass.sent
            );

            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), prefetch(50))
                .await
                .doing("subscribing")?;
            let got: BTreeSet<String> = receive_ids(&mut sub, 2).await?.into_iter().collect();
            let want: BTreeSet<String> = [early_id.clone(), late_id].into_iter().collect();
            ensure!(
                got == want,
                "received ids {got:?}, expected the committed rows' {want:?}"
            );

            // A relay that died after the broker's confirm and before its
            // "sent" committed: the row goes again, with the same id.
            sqlx::query(&format!(
                "UPDATE {} SET sent_at = NULL WHERE message_id = $1",
                store.tables().outbox()
            ))
            .bind(&early_id)
            .execute(pool)
            .await
            .map_err(sql("unmarking a sent row"))?;
            relay.run_once().await.doing("relaying the unmarked row")?;
            let again = receive_ids(&mut sub, 1).await?;
            ensure!(
                again == [early_id.clone()],
                "resent {again:?}, expected the same id {early_id}"
            );

            // Two relays side by side send each of 200 rows once.
            let mut tx = begin(pool).await?;
            let mut many = BTreeSet::new();
            for i in 0..200 {
                many.insert(
                    outbox
                        .publish(&mut tx, "jobs.b", &job(&format!("many-{i}")))
                        .await
                        .doing("writing 200 rows")?,
                );
            }
            tx.commit().await.map_err(sql("committing 200 rows"))?;
            let other = store.relay(sc.broker.clone()).batch(20);
            let (one, two) = tokio::join!(relay.run_once(), other.run_once());
            let (one, two) = (one.doing("relay one")?, two.doing("relay two")?);
            ensure!(
                one.sent + two.sent == 200,
                "two relays sent {} + {} rows, expected 200 in all",
                one.sent,
                two.sent
            );
            let ids = receive_ids(&mut sub, 200).await?;
            let distinct: BTreeSet<String> = ids.iter().cloned().collect();
            ensure!(
                ids.len() == distinct.len() && distinct == many,
                "two relays delivered {} messages, {} distinct, {} of the 200 rows",
                ids.len(),
                distinct.len(),
                distinct.intersection(&many).count()
            );
            expect_nothing(
                &mut sub,
                QUIET,
                "no row may be sent twice, and never a rolled-back one",
            )
            .await?;
            ensure!(
                !ids.contains(&rolled_back),
                "the rolled-back row was published"
            );

            // A row no queue receives is kept with its error, and waits
            // before it is tried again.
            let mut tx = begin(pool).await?;
            let refused_id = outbox
                .publish(&mut tx, "nobody.listens", &job("unroutable"))
                .await
                .doing("writing an unroutable row")?;
            tx.commit()
                .await
                .map_err(sql("committing the unroutable row"))?;
            let pass = relay
                .run_once()
                .await
                .doing("relaying the unroutable row")?;
            ensure!(
                pass.refused == 1 && pass.sent == 0,
                "unroutable row: {pass:?}"
            );
            let pass = relay.run_once().await.doing("relaying again at once")?;
            ensure!(
                pass.refused == 0,
                "the refused row was tried again at once: {pass:?}"
            );
            let stats = store.outbox_stats(10).await.doing("outbox stats")?;
            ensure!(
                stats.refused == 1
                    && stats.refused_rows.len() == 1
                    && stats.refused_rows[0].message_id == refused_id
                    && stats.refused_rows[0].error_kind == "unroutable",
                "stats after a refusal: {stats:?}"
            );

            // A row stored inside a trace carries it (C18 through the
            // outbox): the handler's attempts join the request's trace.
            super::tracing::exporter();
            let tracer = opentelemetry::global::tracer("c19");
            let request = opentelemetry::Context::current_with_span(tracer.start("POST /users"));
            let trace = request.span().span_context().trace_id();
            let stored = async {
                let mut tx = begin(pool).await?;
                let id = outbox
                    .publish(&mut tx, "jobs.d", &job("traced"))
                    .await
                    .doing("writing a row inside a trace")?;
                tx.commit().await.map_err(sql("committing it"))?;
                Ok::<_, String>(id)
            }
            .with_context(request.clone())
            .await?;
            request.span().end();
            relay.run_once().await.doing("relaying the traced row")?;
            let mut d = receive(&mut sub, WAIT).await?;
            let carried = d.envelope().headers.get(TRACEPARENT).cloned();
            d.ack().await.doing("acking")?;
            ensure!(
                d.envelope().id == stored,
                "received {} instead of the traced row {stored}",
                d.envelope().id
            );
            let carried = carried.ok_or("the relayed message carries no traceparent")?;
            ensure!(
                carried.contains(&trace.to_string()),
                "the relayed message's traceparent {carried} is not in the request's trace {trace}"
            );
            let stored_span = super::tracing::spans_of(trace).into_iter().any(|s| {
                s.span_kind == SpanKind::Producer
                    && carried.contains(&s.span_context.span_id().to_string())
            });
            ensure!(
                stored_span,
                "no publish span of the outbox row is the message's parent in trace {trace}"
            );

            // A spawned relay polling once a minute is woken by the commit.
            let running = store
                .relay(sc.broker.clone())
                .poll_interval(Duration::from_secs(60))
                .spawn();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut tx = begin(pool).await?;
            let woken = outbox
                .publish(&mut tx, "jobs.c", &job("notified"))
                .await
                .doing("writing a row for the spawned relay")?;
            tx.commit().await.map_err(sql("committing it"))?;
            let got = receive_ids(&mut sub, 1)
                .await
                .map_err(|e| format!("a relay polling once a minute, woken by NOTIFY: {e}"))?;
            running.shutdown().await.doing("stopping the relay")?;
            ensure!(
                got == [woken.clone()],
                "the spawned relay sent {got:?}, expected {woken}"
            );
            Ok(())
        })
        .await,
    )
}

/// What the inbox handler of C20 does with an attempt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    Succeed,
    /// Writes its effect, then fails: the effect must roll back.
    FailAfterWriting,
    Permanent,
    /// Writes its effect, holds the transaction a while, then succeeds.
    Slow,
}

/// Writes one row per attempt into `effects`, then acts as scripted by the
/// job's key and the attempt.
struct Effects {
    script: fn(&str, u32, usize) -> Act,
    calls: Arc<AtomicUsize>,
    replayed: Arc<AtomicUsize>,
}

impl InboxHandler for Effects {
    type Message = Job;

    async fn handle(
        &self,
        job: Job,
        ctx: &Context,
        db: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query(
            "INSERT INTO effects (queue, message_id, key, attempt) VALUES ($1, $2, $3, $4)",
        )
        .bind(ctx.queue())
        .bind(ctx.id())
        .bind(&job.key)
        .bind(ctx.attempt() as i32)
        .execute(&mut *db)
        .await?;
        let replays = self.replayed.load(Ordering::SeqCst);
        match (self.script)(&job.key, ctx.attempt(), replays) {
            Act::Succeed => Ok(()),
            Act::FailAfterWriting => Err(HandlerError::retryable("scripted failure after writing")),
            Act::Permanent => Err(HandlerError::permanent("scripted permanent failure")),
            Act::Slow => {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok(())
            }
        }
    }
}

/// Runs the inbox, then, for the key `killed`, never returns the first
/// time: the effects are committed, the ack never comes (a consumer killed
/// between commit and ack).
struct DiesAfterCommit<H> {
    inner: H,
    died: Arc<AtomicUsize>,
}

impl<H: Handler<Message = Job>> Handler for DiesAfterCommit<H> {
    type Message = Job;

    async fn handle(&self, job: Job, ctx: &Context) -> Result<(), HandlerError> {
        let killed = job.key == "killed";
        self.inner.handle(job, ctx).await?;
        if killed && self.died.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

pub(crate) async fn c20_inbox(h: &dyn Harness) -> Result<(), Skip> {
    let db = database().await?;
    let sc = Scenario::new(
        h,
        "c20",
        vec![
            QueueSpec::new("q").bind("jobs.#"),
            QueueSpec::new("fan").bind("jobs.once"),
        ],
    )
    .await?;
    checked(
        sc.run(|sc| async move {
            let pool = db.pool();
            let store = Store::new(pool.clone());
            store.migrate().await.doing("migrating")?;
            sqlx::query(
                "CREATE TABLE effects (queue text, message_id text, key text, attempt integer)",
            )
            .execute(pool)
            .await
            .map_err(sql("creating the effects table"))?;
            let (calls, replayed, died) = (
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
            );
            let handler = || Effects {
                script: |key, attempt, replays| match (key, attempt) {
                    ("retried", 1) => Act::FailAfterWriting,
                    ("replayed", _) if replays == 0 => Act::Permanent,
                    ("concurrent", _) => Act::Slow,
                    _ => Act::Succeed,
                },
                calls: Arc::clone(&calls),
                replayed: Arc::clone(&replayed),
            };
            let policy = || Fixed::new(Duration::from_millis(300), 3).expect("a valid policy");
            let consumer = |broker: SharedBroker, queue: String| {
                Consumer::new(
                    broker,
                    queue,
                    DiesAfterCommit {
                        inner: store.inbox(handler()),
                        died: Arc::clone(&died),
                    },
                )
                .retry_policy(policy())
                .prefetch(4)
            };

            // The consumer that dies between commit and ack, alone first.
            let doomed_broker = h.connect().await.doing("connecting the doomed consumer")?;
            let doomed = consumer(doomed_broker.clone(), sc.queue("q")).spawn();
            let killed = sc.publish_job("jobs.killed", "killed").await?;
            wait_until(
                WAIT,
                || died.load(Ordering::SeqCst) == 1,
                || "the handler of `killed` did not commit".to_owned(),
            )
            .await?;
            doomed.abort();
            let _ = doomed_broker.close().await;

            // Two consumers on the queue, one on the fan-out copy.
            let workers = [
                consumer(sc.broker.clone(), sc.queue("q")).spawn(),
                consumer(sc.broker.clone(), sc.queue("q")).spawn(),
                consumer(sc.broker.clone(), sc.queue("fan")).spawn(),
            ];
            // Published twice with one id: a duplicate publish.
            let once = job_message("jobs.once", "once");
            for _ in 0..2 {
                sc.broker
                    .publish(sc.space(), once.clone())
                    .await
                    .doing("publishing `once`")?;
            }
            // Two copies of one id at once, each holding its transaction.
            let concurrent = job_message("jobs.concurrent", "concurrent");
            let (a, b) = tokio::join!(
                sc.broker.publish(sc.space(), concurrent.clone()),
                sc.broker.publish(sc.space(), concurrent.clone())
            );
            a.and(b).doing("publishing `concurrent` twice")?;
            let retried = sc.publish_job("jobs.retried", "retried").await?;
            let replayed_id = sc.publish_job("jobs.replayed", "replayed").await?;

            let queue = sc.queue("q");
            let records =
                crate::support::wait_for_dead_letters(&sc.broker, &queue, 1, WAIT).await?;
            ensure!(
                records[0].envelope.id == replayed_id,
                "dead-lettered {}, expected `replayed` ({replayed_id})",
                records[0].envelope.id
            );
            replayed.store(1, Ordering::SeqCst);
            sc.broker
                .replay(&queue, Replay::Id(replayed_id.clone()))
                .await
                .doing("replaying the dead letter")?;

            let effects = || async {
                let rows = sqlx::query("SELECT queue, message_id, key FROM effects")
                    .fetch_all(pool)
                    .await
                    .map_err(sql("reading the effects"))?;
                let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
                for r in rows {
                    let queue: String = r.get("queue");
                    let suffix = queue.rsplit('.').next().unwrap_or_default().to_owned();
                    *by.entry((suffix, r.get("key"))).or_default() += 1;
                }
                Ok::<_, String>(by)
            };
            let want: BTreeMap<(String, String), usize> = [
                ("q", "killed"),
                ("q", "once"),
                ("fan", "once"),
                ("q", "concurrent"),
                ("q", "retried"),
                ("q", "replayed"),
            ]
            .into_iter()
            .map(|(q, k)| ((q.to_owned(), k.to_owned()), 1))
            .collect();
            let deadline = tokio::time::Instant::now() + h.redelivery_timeout() + WAIT;
            let mut seen = effects().await?;
            while seen != want && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen = effects().await?;
            }
            // Let any duplicate still on its way show itself.
            tokio::time::sleep(QUIET).await;
            let seen = effects().await?;
            for worker in workers {
                worker.shutdown().await.doing("stopping a consumer")?;
            }
            ensure!(
                seen == want,
                "committed effects per (queue, key) were {seen:?}, expected one each: {want:?} \
                 ({} handler calls)",
                calls.load(Ordering::SeqCst)
            );
            let attempts: i32 = sqlx::query("SELECT attempt FROM effects WHERE message_id = $1")
                .bind(&retried)
                .fetch_one(pool)
                .await
                .map_err(sql("reading the retried effect"))?
                .get(0);
            ensure!(
                attempts == 2,
                "the retried message's effect is from attempt {attempts}, expected 2"
            );
            let markers: i64 = sqlx::query(&format!(
                "SELECT count(*) FROM {} WHERE message_id = $1",
                store.tables().inbox()
            ))
            .bind(&killed)
            .fetch_one(pool)
            .await
            .map_err(sql("counting markers"))?
            .get(0);
            ensure!(
                markers == 1,
                "`killed` has {markers} inbox markers, expected 1"
            );
            Ok(())
        })
        .await,
    )
}
