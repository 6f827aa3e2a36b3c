//! Runs the conformance suite against one backend:
//! `ticketrail-conformance <backend> [RULE...]`, for any backend
//! `harness_for` knows.

use std::process::ExitCode;

use ticketrail_conformance::{harness_for, run_rule, run_suite, Verdict};

fn usage() -> ExitCode {
    eprintln!(
        "usage: ticketrail-conformance <memory|rabbitmq|nats|rabbitmq-cluster|nats-cluster> [C01 C07 ...]"
    );
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    quiet_scripted_panics();
    let mut args = std::env::args().skip(1);
    let Some(backend) = args.next() else {
        return usage();
    };
    let only: Vec<String> = args.collect();
    let harness = match harness_for(&backend).await {
        Ok(harness) => harness,
        Err(e) if e.kind() == ticketrail_core::ErrorKind::Config => {
            eprintln!("{e}");
            return usage();
        }
        Err(e) => {
            eprintln!("conformance {backend}: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    if only.is_empty() {
        failed = run_suite(&*harness).await.failed > 0;
    } else {
        for id in only {
            match run_rule(&*harness, &id).await {
                Some(verdict) => {
                    failed |= matches!(verdict, Verdict::Failed(_));
                    println!(
                        "conformance {} {} {verdict}",
                        harness.name(),
                        id.to_uppercase()
                    );
                }
                None => {
                    eprintln!("no rule `{id}`");
                    failed = true;
                }
            }
        }
    }
    if let Err(e) = harness.finish().await {
        eprintln!("conformance {backend}: tearing down: {e}");
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// C9 makes a handler panic on purpose; keep those out of the report, and
/// every other panic in it.
fn quiet_scripted_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let scripted = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with("scripted panic"));
        if !scripted {
            default(info);
        }
    }));
}
