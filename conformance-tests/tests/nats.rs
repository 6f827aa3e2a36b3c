//! The whole conformance suite on the NATS server at `NATS_URL` (default
//! 127.0.0.1:4222), rules in order, one at a time: C7 and C12 measure
//! timing, and C15 restarts a throwaway server of its own. Every rule must
//! pass; none may be n/a; no stream of the suite may be left behind.

use futures::TryStreamExt;
use ticketrail_conformance::{run_suite, NatsHarness, DEFAULT_NATS_URL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_passes_every_rule_and_leaves_nothing_behind() {
    let summary = run_suite(&NatsHarness::from_env()).await;
    assert_eq!(
        summary.failed, 0,
        "rules failed on NATS; see the lines above"
    );
    assert_eq!(summary.not_applicable, 0, "NATS must honour every rule");
    assert_eq!(summary.passed, 17);

    let url = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let client = async_nats::connect(url).await.expect("NATS reachable");
    let streams: Vec<String> = async_nats::jetstream::new(client)
        .stream_names()
        .try_collect()
        .await
        .expect("streams listed");
    let left: Vec<&String> = streams.iter().filter(|s| s.starts_with("tr-")).collect();
    assert!(left.is_empty(), "the suite left streams behind: {left:?}");
}
