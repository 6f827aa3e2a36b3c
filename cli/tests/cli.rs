//! The `ticketrail` binary, driven as an operator would, against the shared
//! RabbitMQ (`AMQP_URL`) and NATS (`NATS_URL`) brokers. Every test uses
//! names of its own and deletes them.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;
use ticketrail::{
    handler_fn, Consumer, Context, HandlerError, Publisher, QueueSpec, SharedBroker, Topology,
};
use ticketrail_conformance::{Foreign, Harness, NatsHarness, RabbitHarness};

fn amqp_url() -> String {
    RabbitHarness::from_env().url().to_owned()
}

fn nats_url() -> String {
    NatsHarness::from_env().url().to_owned()
}

/// The binary, pointed at `url` through `TICKETRAIL_BROKER`.
fn cli(url: &str) -> Command {
    let mut cmd = Command::cargo_bin("ticketrail").expect("the binary is built");
    cmd.env("TICKETRAIL_BROKER", url)
        .timeout(Duration::from_secs(300));
    cmd
}

/// Runs the binary; its stdout, asserting it exited with `code`.
fn run(url: &str, args: &[&str], code: i32) -> String {
    let output = cli(url).args(args).output().expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "ticketrail {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn unique(what: &str) -> String {
    format!(
        "tr-cli-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn connect(url: &str) -> SharedBroker {
    ticketrail::connect(url).await.expect("connects")
}

/// A topology of one queue bound to `jobs.#`.
fn topology(name: &str) -> Topology {
    Topology::new(format!("{name}.events"))
        .queue(QueueSpec::new(format!("{name}.q")).bind("jobs.#"))
}

/// Waits until `queue`'s DLQ holds `n` records.
async fn wait_for_dlq(broker: &SharedBroker, queue: &str, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = broker.queue_stats(queue).await.unwrap().dead_letters;
        if got == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the DLQ of {queue} holds {got:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A worker that fails every message for good, with `error(n)` for payload `n`.
fn failing(handled: Arc<AtomicUsize>) -> impl ticketrail::Handler<Message = u64> + Clone {
    handler_fn(move |n: u64, _: Context| {
        let handled = Arc::clone(&handled);
        async move {
            if n % 7 == 3 {
                Err(HandlerError::permanent(format!(
                    "card {n} declined by the bank (code 51)"
                )))
            } else {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    })
}

#[test]
fn usage_errors_exit_2_and_errors_exit_1_without_the_password() {
    let output = Command::cargo_bin("ticketrail")
        .unwrap()
        .args(["dlq", "replay", "q"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "no selection is a usage error"
    );
    let output = Command::cargo_bin("ticketrail")
        .unwrap()
        .args(["--broker", "memory://", "stats", "q"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lives inside one program"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let secret = "s3cr3t-Pa55";
    let url = format!("amqp://guest:{secret}@127.0.0.1:1/%2f");
    let output = cli(&url).args(["stats", "q"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains(secret), "the password leaked: {all}");
    assert!(
        all.contains("127.0.0.1:1"),
        "the error names the broker: {all}"
    );
}

/// The issue's scenario: plain clients publish 200 messages, a worker
/// dead-letters 29 of them for good with errors that differ only in a
/// number; list, stats, dry run, replay, stats.
async fn scenario(url: &str, harness: &dyn Harness) {
    let name = unique("scenario");
    let broker = connect(url).await;
    let topology = topology(&name);
    let queue = topology.queues[0].name.clone();
    let space = topology.topic_space.clone();
    // Declared through the command line.
    let out = run(
        url,
        &[
            "topology", "declare", &space, "--queue", &queue, "--bind", "jobs.#",
        ],
        0,
    );
    assert!(out.contains("declared"), "{out}");
    let out = run(
        url,
        &[
            "topology", "check", &space, "--queue", &queue, "--bind", "jobs.#", "--json",
        ],
        0,
    );
    assert!(
        json_lines(&out)
            .iter()
            .all(|f| f["status"] != "differs" && f["status"] != "missing"),
        "after declare: {out}"
    );

    for n in 0..200u64 {
        let payload = n.to_string();
        harness
            .publish_foreign(&space, Foreign::new("jobs.pay", payload.as_bytes()))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let worker = Consumer::new(broker.clone(), queue.clone(), failing(Arc::clone(&handled)))
        .prefetch(50)
        .spawn();
    // 200 / 7 rounded: n % 7 == 3 for 29 of 0..200.
    wait_for_dlq(&broker, &queue, 29, Duration::from_secs(60)).await;
    worker.shutdown().await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 171);

    let listed = json_lines(&run(url, &["dlq", "list", &queue, "--json"], 0));
    assert_eq!(listed.len(), 29);
    let first = &listed[0];
    for field in [
        "id",
        "queue",
        "routing_key",
        "reason",
        "attempts",
        "last_error",
        "first_failed_at",
        "last_failed_at",
        "headers",
        "content_type",
        "payload",
        "payload_encoding",
    ] {
        assert!(first.get(field).is_some(), "no `{field}` in {first}");
    }
    assert_eq!(first["reason"], "permanent");
    assert_eq!(first["routing_key"], "jobs.pay");
    assert!(first["last_failed_at"].as_str().unwrap().ends_with('Z'));

    let table = run(url, &["dlq", "list", &queue], 0);
    assert!(
        table.contains("29 dead letter(s)") && table.contains("declined"),
        "{table}"
    );

    let id = first["id"].as_str().unwrap();
    let shown = run(url, &["dlq", "show", &queue, id], 0);
    assert!(shown.contains(id) && shown.contains("code 51"), "{shown}");

    let groups = json_lines(&run(url, &["dlq", "stats", &queue, "--json"], 0));
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["count"], 29);
    assert_eq!(groups[0]["reason"], "permanent");
    for field in ["group", "sample_error", "first_seen", "last_seen"] {
        assert!(
            groups[0].get(field).is_some(),
            "no `{field}` in {}",
            groups[0]
        );
    }
    let group = groups[0]["group"].as_str().unwrap().to_owned();
    let filtered = json_lines(&run(
        url,
        &["dlq", "list", &queue, "--group", &group, "--json"],
        0,
    ));
    assert_eq!(filtered.len(), 29);
    let grepped = json_lines(&run(
        url,
        &["dlq", "list", &queue, "--grep", "card 3 ", "--json"],
        0,
    ));
    assert_eq!(grepped.len(), 1, "--grep `card 3 `");

    let export = std::env::temp_dir().join(format!("{name}.jsonl"));
    run(
        url,
        &["dlq", "export", &queue, "-o", export.to_str().unwrap()],
        0,
    );
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(json_lines(&exported).len(), 29);
    let _ = std::fs::remove_file(&export);

    let dry = run(url, &["dlq", "replay", &queue, "--all", "--dry-run"], 0);
    assert!(dry.contains("would replay 29"), "{dry}");
    assert_eq!(
        json_lines(&run(url, &["dlq", "list", &queue, "--json"], 0)).len(),
        29
    );

    // Purge refuses without --yes when not on a terminal.
    let output = cli(url).args(["dlq", "purge", &queue]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--yes"));

    let replayed = run(url, &["dlq", "replay", &queue, "--all"], 0);
    assert!(replayed.contains("replayed 29"), "{replayed}");
    assert_eq!(run(url, &["dlq", "list", &queue, "--json"], 0), "");
    let stats = json_lines(&run(url, &["stats", &queue, "--json"], 0));
    assert_eq!(stats[0]["queue"], queue.as_str());
    assert_eq!(stats[0]["ready"], 29);
    assert_eq!(stats[0]["dead_letters"], 0);
    assert!(stats[0].get("in_flight").is_some() && stats[0].get("consumers").is_some());

    // Publish through the command line; the id comes back.
    let id = run(
        url,
        &[
            "publish",
            &space,
            "jobs.one",
            r#"{"n": 1}"#,
            "--header",
            "tenant=acme",
        ],
        0,
    );
    assert_eq!(id.trim().len(), 36, "a UUID: {id}");
    let output = cli(url)
        .args(["publish", &space, "jobs.one", "{not json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not JSON"));

    // Dead-letter them again, then purge with --yes.
    let worker = Consumer::new(
        broker.clone(),
        queue.clone(),
        handler_fn(|_: Value, _: Context| async { Err(HandlerError::permanent("no")) }),
    )
    .spawn();
    wait_for_dlq(&broker, &queue, 30, Duration::from_secs(30)).await;
    worker.shutdown().await.unwrap();
    let purged = run(
        url,
        &["dlq", "purge", &queue, "--reason", "permanent", "--yes"],
        0,
    );
    assert!(purged.contains("purged 30"), "{purged}");

    run(url, &["topology", "delete", &space, "--queue", &queue], 0);
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_scenario() {
    scenario(&amqp_url(), &RabbitHarness::from_env()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_scenario() {
    scenario(&nats_url(), &NatsHarness::from_env()).await;
}

/// Fills the DLQ of a fresh queue with `n` records of about 1 KiB through
/// a worker that fails them all for good.
async fn fill_dlq(url: &str, name: &str, n: u64) -> (SharedBroker, Topology) {
    let broker = connect(url).await;
    let topology = topology(name);
    broker.declare(&topology).await.unwrap();
    let queue = topology.queues[0].name.clone();
    let worker = Consumer::new(
        broker.clone(),
        queue.clone(),
        handler_fn(|_: Value, _: Context| async {
            Err(HandlerError::permanent(
                "order rejected: stock check failed",
            ))
        }),
    )
    .prefetch(500)
    .spawn();
    let publisher = Publisher::new(broker.clone(), topology.topic_space.clone());
    let filler = "x".repeat(1000);
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        if window.len() == 500 {
            let oldest: ticketrail::Confirmation = window.pop_front().unwrap();
            oldest.await.unwrap();
        }
        let message = serde_json::json!({ "n": i, "filler": filler });
        window.push_back(publisher.send("jobs.order", &message).await.unwrap());
    }
    for confirmation in window {
        confirmation.await.unwrap();
    }
    wait_for_dlq(&broker, &queue, n, Duration::from_secs(600)).await;
    worker.shutdown().await.unwrap();
    (broker, topology)
}

/// Fills the DLQ of a fresh queue with `n` records of about 1 KiB written
/// straight into it, as the backends write them (the record's headers,
/// `DeadLetter::wire_headers`): fast, for DLQs too large to fill through a
/// worker in a test.
async fn write_dlq(url: &str, name: &str, n: u64) -> (SharedBroker, Topology) {
    use ticketrail::{DeadLetter, DeadLetterReason, Message};
    let broker = connect(url).await;
    let topology = topology(name);
    broker.declare(&topology).await.unwrap();
    let queue = topology.queues[0].name.clone();
    let filler = "x".repeat(1000);
    let record = |i: u64| {
        let payload = serde_json::json!({ "n": i, "filler": filler }).to_string();
        let envelope = Message::new("jobs.order", payload)
            .content_type("application/json")
            .into_envelope(std::time::SystemTime::now());
        DeadLetter {
            envelope,
            queue: queue.clone(),
            reason: DeadLetterReason::Permanent,
            last_error: format!("order {i} rejected: stock check failed"),
            attempts: 1,
            first_failed_at: std::time::SystemTime::now(),
            last_failed_at: std::time::SystemTime::now(),
            notes: Vec::new(),
        }
    };
    if url.starts_with("amqp") {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let dlq = format!("{queue}.dlq");
        let mut window = std::collections::VecDeque::<lapin::PublisherConfirm>::new();
        for i in 0..n {
            let r = record(i);
            let mut headers = FieldTable::default();
            for (k, v) in r.wire_headers() {
                headers.insert(k.into(), AMQPValue::LongString(v.as_str().into()));
            }
            let properties = lapin::BasicProperties::default()
                .with_message_id(r.envelope.id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            if window.len() == 1000 {
                let oldest = window.pop_front().unwrap();
                assert!(oldest.await.unwrap().is_ack());
            }
            let confirm = channel
                .basic_publish(
                    "".into(),
                    dlq.as_str().into(),
                    BasicPublishOptions::default(),
                    &r.envelope.payload,
                    properties,
                )
                .await
                .unwrap();
            window.push_back(confirm);
        }
        for confirm in window {
            assert!(confirm.await.unwrap().is_ack());
        }
        let _ = connection.close(200, "filled".into()).await;
    } else {
        let client = async_nats::connect(url.trim_start_matches("nats://"))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let subject = format!("_tr_dlq.{}.{queue}", topology.topic_space.replace('.', "_"));
        let mut window = std::collections::VecDeque::new();
        for i in 0..n {
            let r = record(i);
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in r.wire_headers() {
                headers.insert(k, v.as_str());
            }
            headers.insert("Content-Type", "application/json");
            if window.len() == 1000 {
                let oldest: async_nats::jetstream::context::PublishAckFuture =
                    window.pop_front().unwrap();
                oldest.await.unwrap();
            }
            window.push_back(
                js.publish_with_headers(subject.clone(), headers, r.envelope.payload.clone())
                    .await
                    .unwrap(),
            );
        }
        for ack in window {
            ack.await.unwrap();
        }
    }
    wait_for_dlq(&broker, &queue, n, Duration::from_secs(60)).await;
    (broker, topology)
}

/// The peak resident memory of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// 100,000 records of 1 KiB (100 MiB if held) listed in bounded memory.
async fn big_dlq_listed_in_bounded_memory(url: &str) {
    const N: u64 = 100_000;
    let name = unique("big");
    let started = Instant::now();
    let (broker, topology) = write_dlq(url, &name, N).await;
    println!("wrote {N} records into the DLQ in {:?}", started.elapsed());
    let started = Instant::now();
    let queue = topology.queues[0].name.clone();
    let bin = assert_cmd::cargo::cargo_bin("ticketrail");
    let mut child = StdCommand::new(bin)
        .args(["dlq", "list", &queue, "--json"])
        .env("TICKETRAIL_BROKER", url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut ids = HashSet::new();
        for line in BufReader::new(stdout).lines() {
            let record: Value = serde_json::from_str(&line.unwrap()).unwrap();
            ids.insert(record["id"].as_str().unwrap().to_owned());
        }
        ids
    });
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss_kib(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    let ids = reader.join().unwrap();
    assert_eq!(ids.len() as u64, N, "every record listed once");
    println!(
        "listed {N} records in {:?}; peak RSS {} MiB",
        started.elapsed(),
        peak / 1024
    );
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB while listing 100 MiB of records"
    );
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_big_dlq_listed_in_bounded_memory() {
    big_dlq_listed_in_bounded_memory(&amqp_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_big_dlq_listed_in_bounded_memory() {
    big_dlq_listed_in_bounded_memory(&nats_url()).await;
}

/// 10,000 records replayed at a bounded rate, interrupted half way: every
/// message is then either still in the DLQ or back in the work queue,
/// exactly once.
async fn replay_interrupted(url: &str) {
    const N: u64 = 10_000;
    let name = unique("sigint");
    let (broker, topology) = fill_dlq(url, &name, N).await;
    let queue = topology.queues[0].name.clone();
    let dead: HashSet<String> = broker
        .dead_letters(&queue, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.envelope.id)
        .collect();
    assert_eq!(dead.len() as u64, N);

    let bin = assert_cmd::cargo::cargo_bin("ticketrail");
    let child = StdCommand::new(bin)
        .args(["dlq", "replay", &queue, "--all", "--rate", "1000"])
        .env("TICKETRAIL_BROKER", url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The count pass, then about half of ten seconds' replay.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let killed = StdCommand::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(130), "{stdout}");
    let line = stdout.lines().last().unwrap_or_default();
    assert!(line.starts_with("interrupted: replayed "), "{stdout}");
    let replayed: u64 = line["interrupted: replayed ".len()..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(replayed > 0 && replayed < N, "interrupted half way: {line}");

    let left: Vec<String> = broker
        .dead_letters(&queue, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.envelope.id)
        .collect();
    // The work queue: take everything, counting ids.
    let mut back = Vec::new();
    let mut sub = broker
        .subscribe(&queue, ticketrail::backend::SubscribeOptions::default())
        .await
        .unwrap();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        let mut delivery = delivery.unwrap();
        back.push(delivery.envelope().id.clone());
        delivery.ack().await.unwrap();
    }
    drop(sub);
    let mut all: Vec<&String> = left.iter().chain(back.iter()).collect();
    all.sort();
    let total = all.len();
    all.dedup();
    assert_eq!(
        total,
        all.len(),
        "a message in both the DLQ and the work queue, or twice"
    );
    assert_eq!(
        total as u64,
        N,
        "{} in the DLQ + {} back in the queue",
        left.len(),
        back.len()
    );
    assert_eq!(back.len() as u64, replayed, "the count it printed");
    assert!(all.iter().all(|id| dead.contains(*id)));
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_interrupted_half_way_loses_nothing() {
    replay_interrupted(&amqp_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_replay_interrupted_half_way_loses_nothing() {
    replay_interrupted(&nats_url()).await;
}

/// Under a pseudo-terminal (`script`), replay draws a progress bar with
/// count, rate and ETA; piped, it prints plain lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_progress_bar_on_a_terminal() {
    let url = amqp_url();
    let name = unique("pty");
    let (broker, topology) = fill_dlq(&url, &name, 300).await;
    let queue = topology.queues[0].name.clone();
    let bin = assert_cmd::cargo::cargo_bin("ticketrail");
    let command = format!("{} dlq replay {queue} --all --rate 100", bin.display());
    let output = StdCommand::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("TICKETRAIL_BROKER", &url)
        .env("COLUMNS", "120")
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{seen}");
    assert!(seen.contains("replaying ["), "no bar: {seen}");
    assert!(
        seen.contains("/300") && seen.contains("ETA"),
        "no count or ETA: {seen}"
    );
    assert!(seen.contains("/s"), "no rate: {seen}");
    assert!(seen.contains("replayed 300"), "{seen}");

    // Piped: plain progress lines instead.
    broker.delete(&topology).await.unwrap();
    let (broker, topology) = fill_dlq(&url, &name, 300).await;
    let out = run(
        &url,
        &["dlq", "replay", &queue, "--all", "--rate", "150"],
        0,
    );
    assert!(
        out.contains("replaying ") && out.contains(" of 300 ("),
        "{out}"
    );
    assert!(!out.contains('['), "a bar on a pipe: {out}");
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

/// `--first`: one replayed, its fate reported, and no going on without --yes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_first_reports_the_fate_of_one() {
    let url = amqp_url();
    let name = unique("first");
    let (broker, topology) = fill_dlq(&url, &name, 3).await;
    let queue = topology.queues[0].name.clone();
    // No worker: not handled within the wait.
    let out = run(
        &url,
        &["dlq", "replay", &queue, "--all", "--first", "--wait", "3s"],
        0,
    );
    assert!(out.contains("still pending"), "{out}");
    assert!(out.contains("pass --yes to replay the other 2"), "{out}");
    // A worker that fails it again: dead-lettered again, reported with the error.
    let worker = Consumer::new(
        broker.clone(),
        queue.clone(),
        handler_fn(|_: Value, _: Context| async {
            Err(HandlerError::permanent("still broken 42"))
        }),
    )
    .spawn();
    wait_for_dlq(&broker, &queue, 3, Duration::from_secs(30)).await;
    let out = run(
        &url,
        &["dlq", "replay", &queue, "--all", "--first", "--wait", "20s"],
        0,
    );
    assert!(
        out.contains("dead-lettered again") && out.contains("still broken 42"),
        "{out}"
    );
    worker.shutdown().await.unwrap();
    wait_for_dlq(&broker, &queue, 3, Duration::from_secs(30)).await;
    // A worker that handles it: handled, then --yes goes on with the rest.
    let worker = Consumer::new(
        broker.clone(),
        queue.clone(),
        handler_fn(|_: Value, _: Context| async { Ok::<_, HandlerError>(()) }),
    )
    .spawn();
    let out = run(
        &url,
        &["dlq", "replay", &queue, "--all", "--first", "--yes"],
        0,
    );
    assert!(out.contains("was handled"), "{out}");
    assert!(out.contains("replayed 2"), "{out}");
    worker.shutdown().await.unwrap();
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}

/// The tutorial's own topology (a classic queue with `x-dead-letter-*`
/// arguments, a DLQ with `x-message-ttl`) is reported as different, with
/// how to migrate; nothing is declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_check_explains_the_tutorials_classic_queue() {
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let url = amqp_url();
    let name = unique("tutorial");
    let (space, queue, dlq) = (
        format!("{name}.events"),
        format!("{name}.q"),
        format!("{name}.q.dlq"),
    );
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            space.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dlq_args = FieldTable::default();
    dlq_args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(7 * 24 * 3600 * 1000),
    );
    channel
        .queue_declare(dlq.as_str().into(), durable, dlq_args)
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    channel
        .queue_declare(queue.as_str().into(), durable, args)
        .await
        .unwrap();

    let args = [
        "topology", "check", &space, "--queue", &queue, "--bind", "user.#",
    ];
    let output = cli(&url).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("2 object(s) differ"), "{stderr}");
    let findings = json_lines(&run(
        &url,
        &[
            "topology", "check", &space, "--queue", &queue, "--bind", "user.#", "--json",
        ],
        1,
    ));
    let by_object = |object: &str| {
        findings
            .iter()
            .find(|f| f["object"] == object)
            .unwrap_or_else(|| panic!("no {object} in {findings:?}"))
            .clone()
    };
    assert_eq!(by_object(&format!("exchange {space}"))["status"], "matches");
    let q = by_object(&format!("queue {queue}"));
    assert_eq!(q["status"], "differs");
    let detail = q["detail"].as_str().unwrap();
    assert!(
        detail.contains("x-queue-type") || detail.contains("inequivalent"),
        "{detail}"
    );
    assert!(
        detail.contains("migrate") && detail.contains(".v2"),
        "{detail}"
    );
    assert_eq!(by_object(&format!("queue {dlq}"))["status"], "differs");

    // Nothing was declared or changed: the classic queue is still there as it was.
    let channel = connection.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    channel
        .queue_declare(queue.as_str().into(), durable, args)
        .await
        .expect("the classic queue is unchanged");
    for q in [&queue, &dlq] {
        channel
            .queue_delete(q.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    channel
        .exchange_delete(space.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

#[test]
fn check_passes_on_rabbitmq() {
    let out = run(&amqp_url(), &["check", "--prefix", &unique("check")], 0);
    assert!(out.contains("every rule held"), "{out}");
    assert!(out.contains("C15") && out.contains("skipped"), "{out}");
}

#[test]
fn check_passes_on_nats() {
    let out = run(&nats_url(), &["check", "--prefix", &unique("check")], 0);
    assert!(out.contains("every rule held"), "{out}");
}

/// With an operator policy capping the length or the TTL of every queue
/// under the prefix, the dead-letter rules fail, and the output says which
/// guarantee was not kept and that a policy may be overriding arguments.
#[test]
fn check_fails_under_an_operator_policy_and_says_why() {
    for (name, definition) in [
        ("len", r#"{"max-length":1}"#),
        ("ttl", r#"{"message-ttl":1}"#),
    ] {
        let prefix = unique(&format!("policy-{name}"));
        let policy = format!("{prefix}-policy");
        let set = StdCommand::new("rabbitmqctl")
            .args([
                "set_operator_policy",
                &policy,
                &format!("^{prefix}"),
                definition,
                "--apply-to",
                "queues",
            ])
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            set.status.success(),
            "{}",
            String::from_utf8_lossy(&set.stderr)
        );
        let output = cli(&amqp_url())
            .args(["check", "--prefix", &prefix, "--rules", "C8,C10,C11"])
            .output()
            .unwrap();
        let _ = StdCommand::new("rabbitmqctl")
            .args(["clear_operator_policy", &policy])
            .output();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stdout}{stderr}");
        assert!(stdout.contains("FAILED"), "{name}: {stdout}");
        assert!(
            stdout.contains("exhaustion")
                || stdout.contains("dead-letter record")
                || stdout.contains("DLQ operations"),
            "{name}: names the guarantee: {stdout}"
        );
        assert!(
            stderr.contains("operator policy") && stderr.contains(&prefix),
            "{name}: {stderr}"
        );
    }
}

/// A walk stopped part way (a count, a first record, Ctrl-C) hands back the
/// records its cursor held before the next walk starts, which then meets
/// them all: on RabbitMQ they were delivered unacknowledged, and a quorum
/// queue takes them back in its own time once their channel is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_walk_stopped_part_way_hands_every_record_back() {
    const N: usize = 5_000;
    let (broker, topology) = write_dlq(&amqp_url(), &unique("handback"), N as u64).await;
    let queue = topology.queues[0].name.clone();
    for round in 0..5 {
        let mut cursor = broker.dead_letter_cursor(&queue).await.unwrap();
        for _ in 0..10 {
            cursor.next().await.unwrap().unwrap();
        }
        cursor.close().await.unwrap();
        let met = broker.dead_letters(&queue, usize::MAX).await.unwrap().len();
        assert_eq!(met, N, "round {round}: the next walk met {met} of {N}");
    }
    broker.delete(&topology).await.unwrap();
    broker.close().await.unwrap();
}
