//! Topic routing (C16), differentially: queues bound to random patterns of
//! `*`, `#` and a few words (and the overlapping sets that once failed on
//! NATS), every routing key of up to three words published, and what each
//! queue received compared with an independent matcher of the AMQP topic
//! rules. A key no binding matches must be refused as unroutable (C1).
//! On NATS, which can write `#` only as a last word, patterns keep it there.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ticketrail_conformance::testing::unique;
use ticketrail_conformance::{Harness, MemoryHarness, NatsHarness, RabbitHarness};
use ticketrail_core::{ErrorKind, Message, QueueSpec, SubscribeOptions, Topology};

const WORDS: [&str; 3] = ["a", "b", "c"];

/// AMQP topic matching by dynamic programming over words: `done[i][j]` says
/// the first `i` pattern words match the first `j` key words. Written apart
/// from ticketrail's own matcher on purpose.
fn amqp_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    let mut done = vec![vec![false; k.len() + 1]; p.len() + 1];
    done[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=k.len() {
            done[i][j] = match p[i - 1] {
                // `#`: zero words, or one more word into it.
                "#" => done[i - 1][j] || (j > 0 && done[i][j - 1]),
                "*" => j > 0 && done[i - 1][j - 1],
                word => j > 0 && k[j - 1] == word && done[i - 1][j - 1],
            };
        }
    }
    done[p.len()][k.len()]
}

/// Every routing key of one to three words.
fn keys() -> Vec<String> {
    let mut keys: Vec<String> = WORDS.iter().map(|w| w.to_string()).collect();
    for _ in 0..2 {
        let longer: Vec<String> = keys
            .iter()
            .filter(|k| k.split('.').count() == keys.last().unwrap().split('.').count())
            .flat_map(|k| WORDS.iter().map(move |w| format!("{k}.{w}")))
            .collect();
        keys.extend(longer);
    }
    keys
}

fn random_pattern(rng: &mut fastrand::Rng, hash_only_last: bool) -> String {
    let len = rng.usize(1..=3);
    let mut words: Vec<&str> = (0..len)
        .map(|_| match rng.usize(0..6) {
            0 => "*",
            1 => "#",
            n => WORDS[n % 3],
        })
        .collect();
    if hash_only_last {
        for i in 0..words.len() - 1 {
            if words[i] == "#" {
                words[i] = "*";
            }
        }
    }
    words.join(".")
}

/// Binding sets: those that once failed to declare on NATS, then random
/// ones from a fixed seed.
fn binding_sets(hash_only_last: bool) -> Vec<Vec<Vec<String>>> {
    let fixed: Vec<Vec<Vec<&str>>> = vec![
        vec![vec!["a.*"], vec!["*.b"]],
        vec![vec!["*.*"], vec!["a.#"]],
        vec![vec!["b.*.#"], vec!["*.a.#"]],
        vec![vec!["a.*", "*.b"]],
    ];
    let mut sets: Vec<Vec<Vec<String>>> = fixed
        .into_iter()
        .map(|set| {
            set.into_iter()
                .map(|q| q.into_iter().map(str::to_owned).collect())
                .collect()
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(20_261_129);
    for _ in 0..3 {
        let queues = rng.usize(3..=6);
        sets.push(
            (0..queues)
                .map(|_| {
                    let mut patterns: Vec<String> = (0..rng.usize(1..=2))
                        .map(|_| random_pattern(&mut rng, hash_only_last))
                        .collect();
                    patterns.sort();
                    patterns.dedup();
                    patterns
                })
                .collect(),
        );
    }
    sets
}

async fn routes_like_amqp(harness: &dyn Harness, hash_only_last: bool) {
    let broker = harness.connect().await.expect("connecting");
    for (n, set) in binding_sets(hash_only_last).into_iter().enumerate() {
        let prefix = unique("tr-route");
        let mut topology = Topology::new(format!("{prefix}.events"));
        for (i, patterns) in set.iter().enumerate() {
            let mut spec = QueueSpec::new(format!("{prefix}.q{i}"));
            for p in patterns {
                spec = spec.bind(p);
            }
            topology = topology.queue(spec);
        }
        broker
            .declare(&topology)
            .await
            .unwrap_or_else(|e| panic!("set {n} {set:?} did not declare: {e}"));
        let mut expected: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for key in keys() {
            let queues: Vec<usize> = set
                .iter()
                .enumerate()
                .filter(|(_, patterns)| patterns.iter().any(|p| amqp_matches(p, &key)))
                .map(|(i, _)| i)
                .collect();
            let published = broker
                .publish(&topology.topic_space, Message::new(&key, key.clone()))
                .await;
            match (queues.is_empty(), published) {
                (true, Err(e)) if e.kind() == ErrorKind::Unroutable => {}
                (true, other) => {
                    panic!("set {n} {set:?}: `{key}` matches no binding, yet publishing gave {other:?}")
                }
                (false, Ok(())) => {}
                (false, Err(e)) => panic!("set {n} {set:?}: `{key}` for queues {queues:?}: {e}"),
            }
            for q in queues {
                expected.entry(q).or_default().insert(key.clone());
            }
        }
        for (i, patterns) in set.iter().enumerate() {
            let want = expected.remove(&i).unwrap_or_default();
            let mut sub = broker
                .subscribe(&format!("{prefix}.q{i}"), SubscribeOptions::default())
                .await
                .expect("subscribing");
            let mut got = BTreeSet::new();
            // Every expected copy, then a quiet moment for unexpected ones.
            loop {
                let wait = if got.len() < want.len() {
                    Duration::from_secs(5)
                } else {
                    Duration::from_millis(300)
                };
                match tokio::time::timeout(wait, sub.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(mut d))) => {
                        let key = d.envelope().routing_key.clone();
                        assert!(
                            got.insert(key.clone()),
                            "set {n}: queue {i} {patterns:?} got `{key}` twice"
                        );
                        d.ack().await.expect("acking");
                    }
                    Ok(other) => panic!("set {n}: queue {i}: {other:?}"),
                }
            }
            assert_eq!(
                got, want,
                "set {n} {set:?}: queue {i} bound to {patterns:?} received other keys than AMQP's rules give"
            );
        }
        broker.delete(&topology).await.expect("cleaning up");
    }
    let _ = broker.close().await;
}

#[test]
fn the_independent_matcher_knows_the_rules() {
    assert!(amqp_matches("a.#", "a"));
    assert!(amqp_matches("#", "a.b.c"));
    assert!(amqp_matches("#.c", "c"));
    assert!(amqp_matches("a.*.c", "a.b.c"));
    assert!(!amqp_matches("a.*", "a"));
    assert!(!amqp_matches("*", "a.b"));
    assert!(amqp_matches("b.*.#", "b.a"));
    assert!(amqp_matches("a.#.c", "a.c"));
    assert_eq!(keys().len(), 3 + 9 + 27);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_routes_like_amqp() {
    routes_like_amqp(&MemoryHarness::default(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_routes_like_amqp() {
    routes_like_amqp(&RabbitHarness::from_env(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_routes_like_amqp() {
    routes_like_amqp(&NatsHarness::from_env(), true).await;
}
