//! The failure drill: `drill <backend> [--messages N]`, for any backend
//! `harness_for` knows (memory, rabbitmq, nats, and the clusters).
//!
//! Publishes N messages with unique ids (default 5,000) while three
//! competing consumers are killed and restarted at random, the broker (a
//! throwaway server the drill starts itself) restarts twice, and the handler
//! fails 10% of messages once and 1% for good. Then it accounts for every id
//! and prints `drill <backend>: published N, handled N, dead-lettered N,
//! lost N, duplicates N`. Exits non-zero if anything is lost.

use std::process::ExitCode;
use std::sync::Arc;

use ticketrail_conformance::{harness_for, run_drill};

const USAGE: &str =
    "usage: drill <memory|rabbitmq|nats|rabbitmq-cluster|nats-cluster> [--messages N]";

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
    let mut messages = 5_000;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--messages", Some(n)) => messages = n,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let harness = match harness_for(&backend).await {
        Ok(harness) => Arc::from(harness),
        Err(e) => {
            eprintln!("drill {backend}: failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = run_drill(Arc::clone(&harness), messages).await;
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
