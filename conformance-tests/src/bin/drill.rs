//! The failure drill: `drill <backend> [--messages N]`, for any backend
//! `harness_for` knows (memory, rabbitmq, nats, and the clusters).
//!
//! Publishes N messages with unique ids (default 5,000) while three
//! competing consumers are killed and restarted at random, the broker (a
//! throwaway server the drill starts itself) restarts twice, and the handler
//! fails 10% of messages once and 1% for good. Then it accounts for every id
//! and prints `drill <backend>: published N, handled N, dead-lettered N,
//! lost N, duplicates N`. Exits non-zero if anything is lost.
//!
//! `drill <backend> --scheduled` publishes 1,000 messages (`--messages`)
//! for 1 to 60 s ahead while the throwaway broker restarts twice, and
//! prints `drill <backend> scheduled: scheduled N, delivered N, lost N,
//! early N, duplicates N, late median/max`, and the lateness of those due
//! away from the restarts; it exits non-zero if one is lost or early.
//!
//! `drill effects-rabbitmq` and `drill effects-nats` run the effects drill
//! (the outbox and inbox on PostgreSQL, see the `effects` module): 4,000
//! sign-ups at 250 a second (`--users`, `--rate`) while the API, relays,
//! workers and broker are killed at random and PostgreSQL restarts once;
//! it prints `drill-effects <broker>: users N, emails sent N, sent twice N,
//! missing N, outbox left N` and exits non-zero unless every user has
//! exactly one email. With the inbox's duplicate check taken out, the same
//! run showed 30 (NATS) and 43 (RabbitMQ) users emailed twice.

use std::process::ExitCode;
use std::sync::Arc;

use ticketrail_conformance::{
    harness_for, run_drill_with, run_effects_drill, run_node, run_scheduled_drill,
};

const USAGE: &str =
    "usage: drill <memory|rabbitmq|nats|rabbitmq-cluster|nats-cluster> [--messages N] \
     [--silent-drops | --scheduled]\n       \
     drill <effects-rabbitmq|effects-nats> [--users N] [--rate PER_SECOND]";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let Some(backend) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if backend == "effects-node" {
        // One process of the effects drill, started by the drill itself.
        let rest: Vec<String> = args.collect();
        let [role, broker, database, port] = &rest[..] else {
            eprintln!("usage: drill effects-node <role> <broker URL> <database URL> <port>");
            return ExitCode::from(2);
        };
        let port = port.parse().unwrap_or(0);
        return match run_node(role, broker, database, port).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("drill effects-node {role}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut messages: Option<usize> = None;
    let mut silent_drops = false;
    let mut scheduled = false;
    let mut users = 4_000;
    let mut rate = 250;
    let mut rest: Vec<String> = args.collect();
    if let Some(at) = rest.iter().position(|a| a == "--silent-drops") {
        rest.remove(at);
        silent_drops = true;
    }
    if let Some(at) = rest.iter().position(|a| a == "--scheduled") {
        rest.remove(at);
        scheduled = true;
    }
    let mut args = rest.into_iter();
    while let Some(arg) = args.next() {
        match (
            arg.as_str(),
            args.next().and_then(|v| v.parse::<u64>().ok()),
        ) {
            ("--messages", Some(n)) => messages = Some(n as usize),
            ("--users", Some(n)) => users = n,
            ("--rate", Some(n)) => rate = n,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(broker) = backend.strip_prefix("effects-") {
        return match run_effects_drill(broker, users, rate).await {
            Ok(r) => {
                println!(
                    "drill-effects {broker}: users {}, emails sent {}, sent twice {}, missing {}, \
                     outbox left {} ({} sign-ups accepted, {} kills and restarts)",
                    r.users, r.emails, r.sent_twice, r.missing, r.outbox_left, r.accepted, r.kills
                );
                if r.sent_twice == 0
                    && r.missing == 0
                    && r.outbox_left == 0
                    && r.users >= r.accepted
                {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("drill-effects {broker}: failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let harness = match harness_for(&backend).await {
        Ok(harness) => Arc::from(harness),
        Err(e) => {
            eprintln!("drill {backend}: failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if scheduled {
        let report = run_scheduled_drill(Arc::clone(&harness), messages.unwrap_or(1_000)).await;
        let finished = harness.finish().await;
        return match (report, finished) {
            (Ok(r), Ok(())) => {
                let ms = |d: std::time::Duration| d.as_millis();
                println!(
                    "drill {backend} scheduled: scheduled {}, delivered {}, lost {}, early {}, \
                     duplicates {}, late median {} ms max {} ms; due away from the two restarts \
                     (broker away {:?} ms): late median {} ms max {} ms",
                    r.scheduled,
                    r.delivered,
                    r.lost,
                    r.early,
                    r.duplicates,
                    ms(r.median_late),
                    ms(r.max_late),
                    r.outages.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
                    ms(r.median_late_steady),
                    ms(r.max_late_steady)
                );
                if r.lost == 0 && r.early == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            (Err(e), _) | (Ok(_), Err(e)) => {
                eprintln!("drill {backend} scheduled: failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let messages = messages.unwrap_or(5_000);
    let report = run_drill_with(Arc::clone(&harness), messages, silent_drops).await;
    let backend = if silent_drops {
        format!("{backend} with silent drops")
    } else {
        backend
    };
    let finished = harness.finish().await;
    match (report, finished) {
        (Ok(r), Ok(())) => {
            println!(
                "drill {backend}: published {}, handled {}, dead-lettered {}, lost {}, duplicates {}",
                r.published, r.handled, r.dead_lettered, r.lost, r.duplicates
            );
            for problem in &r.problems {
                println!("drill {backend}: problem: {problem}");
            }
            if r.lost == 0 && r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        (Err(e), _) | (Ok(_), Err(e)) => {
            eprintln!("drill {backend}: failed: {e}");
            ExitCode::FAILURE
        }
    }
}
