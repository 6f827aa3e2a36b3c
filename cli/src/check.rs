//! `ticketrail check [--prefix P] [--rules C1,C7,...]`: the conformance
//! rules against the broker a team runs, on throwaway queues under a prefix
//! the user picks, so the broker's own policies for those names apply.

use std::io::Write;
use std::time::Instant;

use clap::Args;
use serde_json::json;
use ticketrail_conformance::{
    harness_for_url, Rule, Verdict, DATABASE_RULES, RESTART_RULES, RULES,
};

use crate::output::{json_line, table};
use crate::{Failure, Outcome};

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The first word of every queue and topic space the rules declare
    /// (and delete afterwards); pick one your broker's policies cover like
    /// production queues.
    #[arg(long, default_value = "ticketrail-check")]
    prefix: String,
    /// Only these rules, comma-separated: `C1,C7,C10`.
    #[arg(long, value_delimiter = ',', value_name = "RULES")]
    rules: Vec<String>,
    /// One JSON object per rule and line: rule, name, verdict, detail, seconds.
    #[arg(long)]
    json: bool,
}

/// `C7`, `c07`, `7` → `C07`.
fn rule_id(given: &str) -> Result<&'static Rule, Failure> {
    let digits = given.trim().trim_start_matches(['C', 'c']);
    let id = digits
        .parse::<u32>()
        .map(|n| format!("C{n:02}"))
        .unwrap_or_default();
    RULES.iter().find(|r| r.id == id).ok_or_else(|| {
        Failure::Error(format!(
            "no rule `{given}`: the rules are C1 to C{}",
            RULES.len()
        ))
    })
}

pub(crate) async fn run(url: &str, args: CheckArgs) -> Outcome {
    ticketrail::backend::validate_name("prefix", &args.prefix)?;
    let rules: Vec<&Rule> = if args.rules.is_empty() {
        RULES.iter().collect()
    } else {
        args.rules
            .iter()
            .map(|r| rule_id(r))
            .collect::<Result<_, _>>()?
    };
    let harness = harness_for_url(url, &args.prefix)?;
    let broker = harness.connect().await?;
    let server = broker.describe();
    let backend = broker.backend();
    let _ = broker.close().await;
    if !args.json {
        println!("checking {server}, on queues named `{}-...`", args.prefix);
    }
    let mut out = std::io::stdout().lock();
    let mut rows = Vec::new();
    let mut failed = 0;
    for rule in rules {
        let started = Instant::now();
        let (verdict, detail) = if RESTART_RULES.contains(&rule.id) {
            (
                "skipped",
                "restarts the broker: proven by the test suite on throwaway servers".to_owned(),
            )
        } else if DATABASE_RULES.contains(&rule.id) && std::env::var_os("DATABASE_URL").is_none() {
            (
                "skipped",
                "needs a PostgreSQL server: set DATABASE_URL (each run makes and drops a database of its own)"
                    .to_owned(),
            )
        } else {
            match (rule.run)(&*harness).await {
                Verdict::Passed => ("passed", String::new()),
                Verdict::NotApplicable(why) => ("n/a", why),
                Verdict::Failed(what) => {
                    failed += 1;
                    ("FAILED", what)
                }
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if args.json {
            json_line(
                &mut out,
                &json!({
                    "rule": rule.id,
                    "name": rule.name,
                    "verdict": verdict.to_lowercase(),
                    "detail": detail,
                    "seconds": (seconds * 10.0).round() / 10.0,
                }),
            )?;
        } else {
            writeln!(
                out,
                "{} {} ... {verdict} ({seconds:.1} s)",
                rule.id, rule.name
            )?;
        }
        rows.push((rule, verdict, detail));
    }
    if !args.json {
        let mut t = table(&["rule", "guarantee", "verdict", "what was seen"]);
        for (rule, verdict, detail) in &rows {
            t.add_row(vec![
                rule.id.to_owned(),
                rule.name.to_owned(),
                (*verdict).to_owned(),
                detail.clone(),
            ]);
        }
        writeln!(out, "{t}")?;
    }
    if failed > 0 {
        let hint = if backend == "rabbitmq" {
            format!(
                " A policy or operator policy matching `{}` may be overriding the queues' \
                 arguments (max-length, message-ttl, overflow, delivery-limit, dead-letter-*): \
                 compare `rabbitmqctl list_policies` and `rabbitmqctl list_operator_policies` \
                 with what ticketrail declares.",
                args.prefix
            )
        } else {
            " Stream or account limits (max_msgs, max_bytes, max_age) may be dropping messages: \
             `nats stream info`."
                .to_owned()
        };
        return Err(Failure::Error(format!(
            "{failed} rule(s) did not hold on this broker; its guarantees are not the ones \
             ticketrail promises.{hint}"
        )));
    }
    if !args.json {
        writeln!(out, "every rule held on {server}")?;
    }
    Ok(())
}
