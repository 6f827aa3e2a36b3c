//! The effects drill: `drill effects-rabbitmq` and `drill effects-nats`.
//!
//! A load generator signs users up through an HTTP API (two processes)
//! whose handler commits the user and its welcome message in one
//! transaction (the outbox); two relays publish the messages; two workers
//! "send" each email as a row written in the inbox's transaction. Meanwhile
//! the API, relay and worker processes and the broker are killed (SIGKILL)
//! and started again at random, and PostgreSQL restarts once (an immediate
//! shutdown, then crash recovery). At the end every committed user must
//! have exactly one email: nothing lost on the way from the database to the
//! broker, nothing applied twice on the way back.
//!
//! Every server is a throwaway one of the drill's own.

mod node;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row;
use ticketrail_core::{Error, ErrorKind, QueueSpec, Result, Topology};
use ticketrail_postgres::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::harness::harness_for_url;
use crate::testing::{free_port, NatsServer, PostgresServer, RabbitNode, ServerProcess};

pub use node::run_node;

const TOPIC_SPACE: &str = "app.events";
const WORK_QUEUE: &str = "email.notifications";

/// What the effects drill found.
#[derive(Debug, Clone, Default)]
pub struct EffectsReport {
    /// Users committed.
    pub users: u64,
    /// Emails recorded.
    pub emails: u64,
    /// Users with more than one email.
    pub sent_twice: u64,
    /// Users without an email.
    pub missing: u64,
    /// Outbox rows never relayed.
    pub outbox_left: u64,
    /// Processes killed and the broker and database restarts, for the log.
    pub kills: u64,
    /// Sign-ups answered 202.
    pub accepted: u64,
}

/// The broker of the drill, killable.
enum Broker {
    Rabbit(RabbitNode),
    Nats(NatsServer),
}

impl Broker {
    async fn start(backend: &str) -> Result<Self> {
        match backend {
            "rabbitmq" => Ok(Broker::Rabbit(RabbitNode::start().await?)),
            "nats" => Ok(Broker::Nats(NatsServer::start().await?)),
            other => Err(Error::config(format!(
                "no effects drill for `{other}` (rabbitmq, nats)"
            ))),
        }
    }

    fn url(&self) -> String {
        match self {
            Broker::Rabbit(node) => node.url(),
            Broker::Nats(server) => server.url(),
        }
    }

    /// SIGKILL, then a start on the same port and data.
    async fn kill_and_restart(&mut self, down: Duration) -> Result<()> {
        match self {
            Broker::Rabbit(node) => node.kill().await?,
            Broker::Nats(server) => server.halt().await?,
        }
        tokio::time::sleep(down).await;
        match self {
            Broker::Rabbit(node) => node.launch().await,
            Broker::Nats(server) => server.launch().await,
        }
    }

    async fn remove(&mut self) -> Result<()> {
        match self {
            Broker::Rabbit(node) => node.remove().await,
            Broker::Nats(server) => server.remove().await,
        }
    }
}

/// One node process of the drill's own binary.
struct Node {
    role: &'static str,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, broker: &str, database: &str) -> Result<()> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::config("finding the drill's own binary").with_source(e))?;
        let child = Command::new(exe)
            .args(["effects-node", self.role, broker, database])
            .arg(self.port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::config("starting a node").with_source(e))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown, no goodbye to the broker or the database.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// Runs the effects drill on `backend` (`rabbitmq` or `nats`) with `users`
/// sign-ups at about `rate` a second.
pub async fn run_effects_drill(backend: &str, users: u64, rate: u64) -> Result<EffectsReport> {
    let mut database = PostgresServer::start().await?;
    let mut broker = Broker::start(backend).await?;
    let outcome = drill(&mut database, &mut broker, users, rate).await;
    let _ = broker.remove().await;
    let _ = database.remove().await;
    outcome
}

async fn drill(
    database: &mut PostgresServer,
    broker: &mut Broker,
    users: u64,
    rate: u64,
) -> Result<EffectsReport> {
    let (broker_url, database_url) = (broker.url(), database.url());
    prepare(&broker_url, &database_url).await?;

    let mut nodes = Vec::new();
    for role in ["api", "api", "relay", "relay", "worker", "worker"] {
        let mut node = Node {
            role,
            port: free_port()?,
            child: None,
        };
        node.start(&broker_url, &database_url)?;
        nodes.push(node);
    }
    let api_ports: Vec<u16> = nodes
        .iter()
        .filter(|n| n.role == "api")
        .map(|n| n.port)
        .collect();

    // The load: sign-ups at a steady rate, each tried again (a new user
    // then) until one is answered 202.
    let accepted = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(generate(api_ports, users, rate, Arc::clone(&accepted)));

    // The chaos, until the load is done: a kill every 0.3 to 1 s, the
    // broker twice, PostgreSQL once half-way.
    let mut report = EffectsReport::default();
    let mut broker_kills = 0;
    let mut database_restarted = false;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(users / rate.max(1) * 4 + 120);
    while !load.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1000))).await;
        let done = accepted.load(Ordering::Relaxed) as f64 / users as f64;
        report.kills += 1;
        if !database_restarted && done > 0.5 {
            database_restarted = true;
            tracing::info!("drill: restarting PostgreSQL");
            database.halt().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            database.launch().await?;
        } else if broker_kills < 2 && done > 0.25 * f64::from(broker_kills + 1) {
            broker_kills += 1;
            tracing::info!("drill: killing the broker");
            broker.kill_and_restart(Duration::from_millis(500)).await?;
        } else {
            let victim = fastrand::usize(..nodes.len());
            let node = &mut nodes[victim];
            tracing::info!(role = node.role, "drill: killing a node");
            node.kill().await;
            tokio::time::sleep(Duration::from_millis(fastrand::u64(200..800))).await;
            node.start(&broker_url, &database_url)?;
        }
    }
    if !load.is_finished() {
        load.abort();
        return Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "the load did not finish in time: {} of {users} sign-ups accepted",
                accepted.load(Ordering::Relaxed)
            ),
        ));
    }
    report.accepted = load
        .await
        .map_err(|e| Error::config("the load generator panicked").with_source(e))?;

    // Everything up; wait for the last emails.
    let store = Store::connect(&database_url).await?;
    let settle_by = Instant::now() + Duration::from_secs(180);
    loop {
        count(&store, &mut report).await?;
        let settled = report.missing == 0 && report.outbox_left == 0;
        if settled || Instant::now() > settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A duplicate still on its way would show within a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    count(&store, &mut report).await?;
    for node in &mut nodes {
        node.kill().await;
    }
    store.pool().close().await;
    Ok(report)
}

/// The tables, the outbox and the broker's topology.
async fn prepare(broker_url: &str, database_url: &str) -> Result<()> {
    let store = Store::connect(database_url).await?;
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL);
         CREATE TABLE sent_emails (user_id bigint NOT NULL, message_id text NOT NULL)",
    )
    .execute(store.pool())
    .await
    .map_err(|e| Error::new(ErrorKind::Database, "creating the drill's tables").with_source(e))?;
    store.pool().close().await;
    let harness = harness_for_url(broker_url, "tr")?;
    let broker = harness.connect_to(broker_url).await?;
    broker
        .declare(&Topology::new(TOPIC_SPACE).queue(QueueSpec::new(WORK_QUEUE).bind("user.#")))
        .await?;
    broker.close().await
}

/// Users, emails, users emailed twice or not at all, rows not relayed.
async fn count(store: &Store, report: &mut EffectsReport) -> Result<()> {
    let row = sqlx::query(
        "SELECT
            (SELECT count(*) FROM users),
            (SELECT count(*) FROM sent_emails),
            (SELECT count(*) FROM (SELECT user_id FROM sent_emails
                                   GROUP BY user_id HAVING count(*) > 1) twice),
            (SELECT count(*) FROM users u
             WHERE NOT EXISTS (SELECT 1 FROM sent_emails s WHERE s.user_id = u.id))",
    )
    .fetch_one(store.pool())
    .await
    .map_err(|e| Error::new(ErrorKind::Database, "counting the drill's effects").with_source(e))?;
    let n = |i: usize| row.get::<i64, _>(i).max(0) as u64;
    report.users = n(0);
    report.emails = n(1);
    report.sent_twice = n(2);
    report.missing = n(3);
    report.outbox_left = store.outbox_stats(0).await?.pending;
    Ok(())
}

/// Signs `users` up at about `rate` a second over four connections in
/// turn, each request to one of `ports`; a failed request is tried again
/// on the next API. Returns how many were answered 202.
async fn generate(ports: Vec<u16>, users: u64, rate: u64, accepted: Arc<AtomicU64>) -> u64 {
    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    let mut next = Instant::now();
    let mut attempt = 0usize;
    for user in 0..users {
        next += interval;
        tokio::time::sleep_until(next.into()).await;
        loop {
            let port = ports[attempt % ports.len()];
            attempt += 1;
            let email = format!("user{user}-{attempt}@example.com");
            match tokio::time::timeout(Duration::from_secs(3), sign_up(port, &email)).await {
                Ok(Ok(202)) => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        accepted.fetch_add(1, Ordering::Relaxed);
    }
    accepted.load(Ordering::Relaxed)
}

/// `POST /users` over HTTP/1.1; the status code.
async fn sign_up(port: u16, email: &str) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "POST /users HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{email}",
        email.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}
