//! Runs the conformance suite against one backend:
//! `ticketrail-conformance memory|rabbitmq|nats [RULE...]`.

use std::process::ExitCode;

use ticketrail_conformance::{
    run_rule, run_suite, Harness, MemoryHarness, NatsHarness, RabbitHarness,
};

fn usage() -> ExitCode {
    eprintln!("usage: ticketrail-conformance <memory|rabbitmq|nats> [C01 C07 ...]");
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
    let harness: Box<dyn Harness> = match backend.as_str() {
        "memory" => Box::new(MemoryHarness::default()),
        "rabbitmq" => Box::new(RabbitHarness::from_env()),
        "nats" => Box::new(NatsHarness::from_env()),
        _ => return usage(),
    };
    let only: Vec<String> = args.collect();
    if only.is_empty() {
        let summary = run_suite(&*harness).await;
        return if summary.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut failed = false;
    for id in only {
        match run_rule(&*harness, &id).await {
            Some(verdict) => {
                failed |= matches!(verdict, ticketrail_conformance::Verdict::Failed(_));
                println!(
                    "conformance {} {} {verdict}",
                    harness.name(),
                    id.to_uppercase()
                );
            }
            None => {
                eprintln!("no rule `{id}`");
                return usage();
            }
        }
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
