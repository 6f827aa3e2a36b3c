//! The suite on throwaway three-node clusters: `rabbitmq-cluster` and
//! `nats-cluster`. C15 and the drill kill (SIGKILL) the node that leads the
//! work queue, and start it again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};
use tokio::sync::Mutex;

use crate::harness::{Foreign, Harness, Restartable};
use crate::testing::{NatsCluster, RabbitCluster};
use crate::{nats, rabbitmq, NatsHarness, RabbitHarness};

const NODES: usize = 3;

/// What a cluster harness needs of its cluster.
#[async_trait]
trait Cluster: Send + Sync {
    async fn leader_of(&self, queue: &str) -> Result<usize>;
    async fn kill(&mut self, node: usize) -> Result<()>;
    async fn restart(&mut self, node: usize) -> Result<()>;
    async fn remove(&mut self) -> Result<()>;
}

#[async_trait]
impl Cluster for RabbitCluster {
    async fn leader_of(&self, queue: &str) -> Result<usize> {
        RabbitCluster::leader_of(self, queue).await
    }
    async fn kill(&mut self, node: usize) -> Result<()> {
        RabbitCluster::kill(self, node).await
    }
    async fn restart(&mut self, node: usize) -> Result<()> {
        RabbitCluster::restart(self, node).await
    }
    async fn remove(&mut self) -> Result<()> {
        RabbitCluster::remove(self).await
    }
}

#[async_trait]
impl Cluster for NatsCluster {
    async fn leader_of(&self, queue: &str) -> Result<usize> {
        NatsCluster::leader_of(self, queue).await
    }
    async fn kill(&mut self, node: usize) -> Result<()> {
        NatsCluster::kill(self, node).await
    }
    async fn restart(&mut self, node: usize) -> Result<()> {
        NatsCluster::restart(self, node).await
    }
    async fn remove(&mut self) -> Result<()> {
        NatsCluster::remove(self).await
    }
}

/// A cluster, the node that is down, and how to connect.
struct Shared {
    cluster: Mutex<Box<dyn Cluster>>,
    url: String,
    down: Mutex<Option<usize>>,
    connect: fn(String) -> futures::future::BoxFuture<'static, Result<SharedBroker>>,
}

/// Kills and restarts the leader of a queue: what C15 and the drill do to a
/// cluster.
struct LeaderKiller(Arc<Shared>);

#[async_trait]
impl Restartable for LeaderKiller {
    async fn connect(&self) -> Result<SharedBroker> {
        (self.0.connect)(self.0.url.clone()).await
    }

    async fn halt(&self, queue: &str) -> Result<()> {
        let mut cluster = self.0.cluster.lock().await;
        let leader = cluster.leader_of(queue).await?;
        tracing::info!(node = leader, queue, "killing the queue's leader");
        cluster.kill(leader).await?;
        *self.0.down.lock().await = Some(leader);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let Some(node) = self.0.down.lock().await.take() else {
            return Ok(());
        };
        self.0.cluster.lock().await.restart(node).await
    }

    async fn remove(&self) -> Result<()> {
        // The cluster is the harness's; it removes it in `finish`.
        self.resume().await
    }
}

/// The suite on a throwaway three-node RabbitMQ cluster.
pub struct RabbitClusterHarness(Arc<Shared>);

impl RabbitClusterHarness {
    /// Starts the cluster.
    pub async fn start() -> Result<Self> {
        let cluster = RabbitCluster::start(NODES).await?;
        Ok(RabbitClusterHarness(Arc::new(Shared {
            url: cluster.url(),
            cluster: Mutex::new(Box::new(cluster)),
            down: Mutex::new(None),
            connect: |url| Box::pin(async move { RabbitHarness::connect_url(&url).await }),
        })))
    }
}

/// The suite on a throwaway three-node NATS 2.15 cluster, streams with
/// three replicas.
pub struct NatsClusterHarness(Arc<Shared>);

impl NatsClusterHarness {
    /// Starts the cluster.
    pub async fn start() -> Result<Self> {
        let cluster = NatsCluster::start(NODES).await?;
        Ok(NatsClusterHarness(Arc::new(Shared {
            url: cluster.url(),
            cluster: Mutex::new(Box::new(cluster)),
            down: Mutex::new(None),
            connect: |url| {
                Box::pin(async move { NatsHarness::connect_replicated(&url, NODES).await })
            },
        })))
    }
}

/// Publishes like a plain client to the first node that takes it.
async fn publish_plain<F, Fut>(urls: Vec<String>, publish: F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut last = None;
    for url in urls {
        match publish(url).await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::new(ErrorKind::Connection, "no node")))
}

macro_rules! cluster_harness {
    ($harness:ident, $name:literal, $plain:path, $node_urls:expr, $redelivery:expr) => {
        #[async_trait]
        impl Harness for $harness {
            fn name(&self) -> &'static str {
                $name
            }

            async fn connect(&self) -> Result<SharedBroker> {
                (self.0.connect)(self.0.url.clone()).await
            }

            fn broker_url(&self) -> Option<String> {
                Some(self.0.url.clone())
            }

            async fn connect_to(&self, url: &str) -> Result<SharedBroker> {
                (self.0.connect)(url.to_owned()).await
            }

            async fn publish_foreign(&self, topic_space: &str, message: Foreign<'_>) -> Result<()> {
                let urls: Vec<String> = $node_urls(&self.0.url);
                publish_plain(urls, |url| async move {
                    $plain(&url, topic_space, message).await
                })
                .await
            }

            fn redelivery_timeout(&self) -> Duration {
                $redelivery
            }

            async fn restartable(&self) -> Result<Option<Box<dyn Restartable>>> {
                Ok(Some(Box::new(LeaderKiller(Arc::clone(&self.0)))))
            }

            async fn finish(&self) -> Result<()> {
                self.0.cluster.lock().await.remove().await
            }
        }
    };
}

/// One URL per node of a multi-host RabbitMQ URL.
fn amqp_nodes(url: &str) -> Vec<String> {
    let rest = url.trim_start_matches("amqp://guest:guest@");
    let (hosts, tail) = rest.split_once('/').unwrap_or((rest, ""));
    hosts
        .split(',')
        .map(|h| format!("amqp://guest:guest@{h}/{tail}"))
        .collect()
}

fn nats_nodes(url: &str) -> Vec<String> {
    vec![url.to_owned()]
}

cluster_harness!(
    RabbitClusterHarness,
    "rabbitmq-cluster",
    rabbitmq::plain_publish,
    amqp_nodes,
    Duration::from_secs(20)
);
cluster_harness!(
    NatsClusterHarness,
    "nats-cluster",
    nats::plain_publish,
    nats_nodes,
    Duration::from_secs(15)
);
