//! Throwaway three-node clusters on loopback: RabbitMQ nodes joined with
//! `rabbitmqctl`, and nats-server 2.15 nodes routed to each other with
//! JetStream. Each node has its own name, ports, data directory and config;
//! a node can be killed with SIGKILL and started again with its data.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use ticketrail_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{free_port, io, wait_for_nats, RabbitNode, ServerProcess};

/// A RabbitMQ cluster: nodes started on their own, then joined to the first.
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

#[derive(Deserialize)]
struct QueueLeader {
    name: String,
    leader: Option<String>,
}

impl RabbitCluster {
    /// Starts `size` nodes and joins them into one cluster.
    pub async fn start(size: usize) -> Result<Self> {
        let started = futures::future::join_all((0..size).map(|_| RabbitNode::start())).await;
        let nodes = started.into_iter().collect::<Result<Vec<_>>>()?;
        let first = nodes[0].name().to_owned();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["reset"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
        }
        let cluster = RabbitCluster { nodes };
        cluster.await_running(size, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Waits until `count` nodes run, as the first live node sees it.
    async fn await_running(&self, count: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            for node in &self.nodes {
                if let Ok(status) = node.ctl(&["cluster_status", "--formatter", "json"]).await {
                    let running = serde_json::from_str::<serde_json::Value>(&status)
                        .ok()
                        .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                        .unwrap_or(0);
                    if running >= count {
                        return Ok(());
                    }
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the RabbitMQ cluster did not have {count} nodes running within {within:?}"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One URL naming every node.
    pub fn url(&self) -> String {
        format!(
            "amqp://guest:guest@{}/%2f",
            loopback_hosts(self.nodes.iter().map(|n| n.port))
        )
    }

    /// The URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// How many nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The node leading quorum queue `queue`.
    pub async fn leader_of(&self, queue: &str) -> Result<usize> {
        let mut last = None;
        for node in &self.nodes {
            let listing = match node
                .ctl(&["list_queues", "name", "leader", "--formatter", "json"])
                .await
            {
                Ok(listing) => listing,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let queues: Vec<QueueLeader> = serde_json::from_str(&listing).map_err(|e| {
                Error::new(ErrorKind::Broker, "reading rabbitmqctl's queue list").with_source(e)
            })?;
            let leader = queues
                .into_iter()
                .find(|q| q.name == queue)
                .and_then(|q| q.leader)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("queue `{queue}` has no leader"),
                    )
                })?;
            return self
                .nodes
                .iter()
                .position(|n| n.name() == leader)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("the leader {leader} is not a node of this cluster"),
                    )
                });
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Connection, "no node answered")))
    }

    /// Kills node `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill().await
    }

    /// Starts node `i` again with its data; it rejoins the cluster.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].launch().await?;
        self.await_running(self.nodes.len(), Duration::from_secs(60))
            .await
    }

    /// Stops every node and removes their data.
    pub async fn remove(&mut self) -> Result<()> {
        // The others first: stopping the last disc node of a cluster is the
        // one that waits for nobody.
        let mut first_error = None;
        for node in self.nodes.iter_mut().rev() {
            if let Err(e) = node.remove().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The nats-server 2.15 binary clusters run: `NATS_SERVER_215_BIN`, else
/// the one `scripts/brokers nats215` installs in the workspace's `.brokers`.
/// (On 2.9 a new stream of three replicas cannot be placed while a node is
/// down; fixed in 2.12.)
pub fn nats_server_215_binary() -> Result<String> {
    if let Ok(binary) = std::env::var("NATS_SERVER_215_BIN") {
        return Ok(binary);
    }
    let installed =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.brokers/venv/bin/nats-server");
    if installed.exists() {
        return Ok(installed.display().to_string());
    }
    Err(Error::config(
        "nats-server 2.15 is not installed: run `scripts/brokers nats215` (or set NATS_SERVER_215_BIN)",
    ))
}

/// One node of a NATS cluster.
struct NatsNode {
    name: String,
    port: u16,
    http_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A NATS cluster with JetStream: every node routes to every other.
pub struct NatsCluster {
    binary: String,
    nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream is up on each.
    pub async fn start(size: usize) -> Result<Self> {
        let binary = nats_server_215_binary()?;
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let cluster_ports = (0..size).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let name = format!("tr-{id}-{}", i + 1);
            let dir = std::env::temp_dir().join(format!("ticketrail-{name}"));
            std::fs::create_dir_all(dir.join("store")).map_err(io("creating a node's store"))?;
            let (port, http_port) = (free_port()?, free_port()?);
            let conf = format!(
                "server_name: \"{name}\"\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http_port}\"\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{\n  name: \"tr-{id}\"\n  listen: \"127.0.0.1:{cluster_port}\"\n  routes: [{routes}]\n}}\n",
                store = dir.join("store").display(),
                routes = routes.join(", "),
            );
            std::fs::write(dir.join("server.conf"), conf).map_err(io("writing a node's config"))?;
            nodes.push(NatsNode {
                name,
                port,
                http_port,
                dir,
                child: None,
            });
        }
        let mut cluster = NatsCluster { binary, nodes };
        for i in 0..size {
            cluster.launch(i)?;
        }
        for i in 0..size {
            cluster.await_healthy(i, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    fn launch(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(node.dir.join("server.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting nats-server 2.15"))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `i` says JetStream is ready
    /// (`/healthz?js-enabled-only=true`).
    async fn await_healthy(&self, i: usize, within: Duration) -> Result<()> {
        let node = &self.nodes[i];
        let what = format!("NATS node {}", node.name);
        if !wait_for_nats(node.port, &node.name, within, &what).await? {
            return Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "{what}: another nats-server answers on 127.0.0.1:{}",
                    node.port
                ),
            ));
        }
        let deadline = Instant::now() + within;
        loop {
            if healthz(node.http_port).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("NATS node {} was not healthy within {within:?}", node.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One URL naming every node.
    pub fn url(&self) -> String {
        format!(
            "nats://{}",
            loopback_hosts(self.nodes.iter().map(|n| n.port))
        )
    }

    /// How many nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The node leading the stream that holds queue `queue` (its consumer
    /// is named after it).
    pub async fn leader_of(&self, queue: &str) -> Result<usize> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(
                self.url()
                    .trim_start_matches("nats://")
                    .split(',')
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Connection, "connecting to the cluster").with_source(e)
            })?;
        let js = async_nats::jetstream::new(client);
        let consumer = queue.replace('.', "_");
        let names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names())
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "listing streams").with_source(e))?;
        for name in names {
            let Ok(mut stream) = js.get_stream(&name).await else {
                continue;
            };
            if stream.consumer_info(&consumer).await.is_err() {
                continue;
            }
            let info = stream.info().await.map_err(|e| {
                Error::new(ErrorKind::Connection, "reading the stream").with_source(e)
            })?;
            let leader = info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .ok_or_else(|| {
                    Error::new(ErrorKind::NotFound, format!("stream {name} has no leader"))
                })?;
            return self
                .nodes
                .iter()
                .position(|n| n.name == leader)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("{leader} is not a node of this cluster"),
                    )
                });
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("no stream holds queue `{queue}`"),
        ))
    }

    /// Kills node `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill().await.map_err(io("killing a NATS node"))?;
        }
        Ok(())
    }

    /// Starts node `i` again with its data and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.launch(i)?;
        self.await_healthy(i, Duration::from_secs(60)).await
    }

    /// Stops every node and removes their data.
    pub async fn remove(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i).await?;
            let _ = std::fs::remove_dir_all(&self.nodes[i].dir);
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // The children are killed on drop; their stores go with them.
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.dir);
        }
    }
}

/// Whether a NATS node's monitoring port says JetStream is ready.
async fn healthz(http_port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await else {
        return false;
    };
    let request = "GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200")
}

/// `127.0.0.1:<port>` of each node, comma-separated: the host list of a URL
/// naming every node of a cluster.
fn loopback_hosts(ports: impl Iterator<Item = u16>) -> String {
    ports
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}
