//! `ticketrail db migrate` and `ticketrail outbox stats` against a
//! throwaway PostgreSQL database (`DATABASE_URL`'s server).

use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;
use ticketrail::postgres::Store;
use ticketrail::{QueueSpec, Topology};
use ticketrail_conformance::testing::TestDatabase;
use ticketrail_conformance::{Harness, MemoryHarness};

fn run(args: &[&str], code: i32) -> (String, String) {
    let output = Command::cargo_bin("ticketrail")
        .expect("the binary is built")
        .args(args)
        .timeout(Duration::from_secs(60))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "ticketrail {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_stats_show_a_refused_row_with_its_error() {
    let db = TestDatabase::create().await.expect("a test database");
    let url = db.url();
    let (out, _) = run(&["db", "migrate", "--database", &url], 0);
    assert!(out.contains("applied migration 1"), "{out}");
    let (out, _) = run(&["db", "migrate", "--database", &url], 0);
    assert!(out.contains("up to date (schema version 1)"), "{out}");
    let (out, _) = run(
        &[
            "db",
            "migrate",
            "--database",
            &url,
            "--schema",
            "jobs",
            "--prefix",
            "tr_",
        ],
        0,
    );
    assert!(out.contains(r#""jobs"."tr_outbox""#), "{out}");

    // Two rows: one the broker takes, one no queue receives.
    let store = Store::new(db.pool().clone());
    let memory = MemoryHarness::default();
    let broker = memory.connect().await.expect("memory");
    broker
        .declare(&Topology::new("app.events").queue(QueueSpec::new("q").bind("user.#")))
        .await
        .expect("declares");
    let outbox = store.outbox("app.events").expect("an outbox");
    let mut tx = db.pool().begin().await.expect("begins");
    outbox
        .publish(&mut tx, "user.welcome", &1)
        .await
        .expect("stores");
    let refused = outbox
        .publish(&mut tx, "billing.invoice", &2)
        .await
        .expect("stores");
    tx.commit().await.expect("commits");
    let pass = store.relay(broker).run_once().await.expect("relays");
    assert_eq!((pass.sent, pass.refused), (1, 1), "{pass:?}");

    let (out, _) = run(&["outbox", "stats", "--database", &url, "--json"], 0);
    let stats: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(stats["pending"], 1, "{stats}");
    assert_eq!(stats["refused"], 1, "{stats}");
    assert_eq!(stats["sent_kept"], 1, "{stats}");
    assert_eq!(
        stats["refused_rows"][0]["message_id"],
        refused.as_str(),
        "{stats}"
    );
    assert_eq!(
        stats["refused_rows"][0]["error_kind"], "unroutable",
        "{stats}"
    );
    let (table, _) = run(&["outbox", "stats", "--database", &url], 0);
    assert!(
        table.contains("refused by the broker") && table.contains(&refused),
        "{table}"
    );

    // A wrong password is named as a login failure, and never printed.
    let wrong = url.replacen("://", "://nobody:s3cret-pw@", 1);
    let wrong = match wrong.split_once('@') {
        Some((user, rest)) => format!("{user}@{}", rest.split_once('@').map_or(rest, |(_, r)| r)),
        None => wrong,
    };
    let (_, err) = run(&["outbox", "stats", "--database", &wrong], 1);
    assert!(!err.contains("s3cret-pw"), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");
}
