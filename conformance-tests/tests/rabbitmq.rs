//! The whole conformance suite on the RabbitMQ at `AMQP_URL` (default
//! 127.0.0.1:5672), rules in order, one at a time: C7 and C12 measure
//! timing, and C15 restarts a throwaway node of its own. Every rule must
//! pass; none may be n/a. A broker that cannot be reached fails the test,
//! naming the command that starts it. Afterwards no queue of the suite may
//! be left behind.

use ticketrail_conformance::{run_suite, RabbitHarness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_every_rule() {
    let summary = run_suite(&RabbitHarness::from_env()).await;
    assert_eq!(
        summary.failed, 0,
        "rules failed on RabbitMQ; see the lines above"
    );
    assert_eq!(summary.not_applicable, 0, "RabbitMQ must honour every rule");
    assert_eq!(summary.passed, 17);

    // What the suite declared it also deleted (checked where rabbitmqctl is at hand).
    if let Ok(out) = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output()
    {
        if out.status.success() {
            let listing = String::from_utf8_lossy(&out.stdout);
            let left: Vec<&str> = listing.lines().filter(|q| q.starts_with("tr-")).collect();
            assert!(left.is_empty(), "the suite left queues behind: {left:?}");
        }
    }
}
