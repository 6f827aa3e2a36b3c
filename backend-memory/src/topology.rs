//! Declaring and deleting topic spaces and queues in the store.

use std::sync::Arc;

use ticketrail_core::{Finding, FindingStatus, Result, Topology};

use crate::connection::Connection;
use crate::store::{Binding, Queue};

/// Declares the queues of `topology` and binds them (C16); idempotent.
pub(crate) fn declare(connection: &Connection, topology: &Topology) -> Result<()> {
    connection.ensure_open()?;
    topology.validate()?;
    let mut registry = connection.registry();
    let mut bindings = registry
        .spaces
        .get(&topology.topic_space)
        .cloned()
        .unwrap_or_default();
    for spec in &topology.queues {
        let queue = match registry.queues.get(&spec.name) {
            Some(queue) => {
                queue.set_delivery_limit(spec.delivery_limit);
                Arc::clone(queue)
            }
            None => {
                let queue = Arc::new(Queue::new(&spec.name, spec.delivery_limit));
                registry
                    .queues
                    .insert(spec.name.clone(), Arc::clone(&queue));
                queue
            }
        };
        for pattern in &spec.bindings {
            let bound = bindings
                .iter()
                .any(|b| &b.pattern == pattern && Arc::ptr_eq(&b.queue, &queue));
            if !bound {
                bindings.push(Binding {
                    pattern: pattern.clone(),
                    queue: Arc::clone(&queue),
                });
            }
        }
    }
    registry
        .spaces
        .insert(topology.topic_space.clone(), bindings);
    Ok(())
}

/// Deletes the queues of `topology` with their dead letters, and the topic
/// space once no queue is bound to it.
pub(crate) fn delete(connection: &Connection, topology: &Topology) -> Result<()> {
    connection.ensure_open()?;
    let mut registry = connection.registry();
    for spec in &topology.queues {
        if let Some(queue) = registry.queues.remove(&spec.name) {
            queue.delete();
            for bindings in registry.spaces.values_mut() {
                bindings.retain(|b| !Arc::ptr_eq(&b.queue, &queue));
            }
        }
    }
    if registry
        .spaces
        .get(&topology.topic_space)
        .is_some_and(Vec::is_empty)
    {
        registry.spaces.remove(&topology.topic_space);
    }
    Ok(())
}

/// What the store has of `topology`'s space, queues and bindings.
pub(crate) fn inspect(connection: &Connection, topology: &Topology) -> Result<Vec<Finding>> {
    connection.ensure_open()?;
    topology.validate()?;
    let registry = connection.registry();
    let space = &topology.topic_space;
    let bindings = registry.spaces.get(space);
    let mut findings = vec![match bindings {
        Some(_) => Finding::new(
            format!("topic space {space}"),
            FindingStatus::Matches,
            "there",
        ),
        None => Finding::new(
            format!("topic space {space}"),
            FindingStatus::Missing,
            "not there; `declare` creates it",
        ),
    }];
    for spec in &topology.queues {
        let object = format!("queue {}", spec.name);
        let queue = registry.queues.get(&spec.name);
        findings.push(match queue {
            None => Finding::new(
                object,
                FindingStatus::Missing,
                "not there; `declare` creates it",
            ),
            Some(queue) if queue.delivery_limit() != spec.delivery_limit => Finding::new(
                object,
                FindingStatus::Differs,
                format!(
                    "delivery limit {}, not {}; `declare` sets it",
                    queue.delivery_limit(),
                    spec.delivery_limit
                ),
            ),
            Some(_) => Finding::new(
                object,
                FindingStatus::Matches,
                format!("delivery limit {}", spec.delivery_limit),
            ),
        });
        for pattern in &spec.bindings {
            let bound = bindings.is_some_and(|bindings| {
                bindings.iter().any(|b| {
                    &b.pattern == pattern && queue.is_some_and(|q| Arc::ptr_eq(&b.queue, q))
                })
            });
            let object = format!("binding {space} -> {} ({pattern})", spec.name);
            findings.push(if bound {
                Finding::new(object, FindingStatus::Matches, "there")
            } else {
                Finding::new(
                    object,
                    FindingStatus::Missing,
                    "not there; `declare` adds it",
                )
            });
        }
    }
    Ok(findings)
}
