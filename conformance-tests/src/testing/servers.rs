//! Throwaway broker servers that a test owns, restarts and removes (C15).
//! They run on free loopback ports with their own data directories; the
//! shared brokers are never touched.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};
use tokio::process::{Child, Command};

use crate::harness::Restartable;

/// A broker server process a test owns.
#[async_trait]
pub(crate) trait ServerProcess: Send + Sync {
    fn url(&self) -> String;
    async fn launch(&mut self) -> Result<()>;
    async fn halt(&mut self) -> Result<()>;
    async fn remove(&mut self) -> Result<()>;
}

/// Connects a broker client to a URL.
pub(crate) type Connector = for<'a> fn(&'a str) -> BoxFuture<'a, Result<SharedBroker>>;

/// A throwaway server and how to connect to it: what C15 restarts.
pub(crate) struct Throwaway<S> {
    pub(crate) server: S,
    pub(crate) connect: Connector,
}

#[async_trait]
impl<S: ServerProcess> Restartable for Throwaway<S> {
    async fn connect(&self) -> Result<SharedBroker> {
        (self.connect)(&self.server.url()).await
    }

    async fn halt(&mut self) -> Result<()> {
        self.server.halt().await
    }

    async fn resume(&mut self) -> Result<()> {
        self.server.launch().await
    }

    async fn remove(&mut self) -> Result<()> {
        self.server.remove().await
    }
}

/// A free TCP port on 127.0.0.1.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::new(ErrorKind::Connection, "finding a free port").with_source(e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Connection, "finding a free port").with_source(e))?
        .port();
    Ok(port)
}

/// Waits until something accepts connections on `port`.
pub(crate) async fn wait_for_port(port: u16, within: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("{what} did not accept connections on 127.0.0.1:{port} within {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::new(ErrorKind::Connection, what.to_owned()).with_source(e)
}

/// A RabbitMQ node of its own: node name, ports, data and log directories.
/// Started with `rabbitmq-server` (which, run as root, drops to the
/// `rabbitmq` user), stopped with `rabbitmqctl -n <node> stop`.
pub(crate) struct RabbitNode {
    /// The port clients connect to (`amqps://` with TLS).
    pub(crate) port: u16,
    /// The plain AMQP port (the same as `port` without TLS).
    tcp_port: u16,
    tls: bool,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitNode {
    pub(crate) async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a node; with `tls`, clients connect with `amqps://` on
    /// [`port`](RabbitNode::port) using these certificates.
    pub(crate) async fn start_with(tls: Option<&TestCerts>) -> Result<Self> {
        let port = free_port()?;
        let tcp_port = if tls.is_some() { free_port()? } else { port };
        let dist_port = free_port()?;
        let node = format!(
            "tr-{}@localhost",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let dir = std::env::temp_dir().join(format!("ticketrail-{}", node.replace('@', "-")));
        std::fs::create_dir_all(dir.join("mnesia"))
            .map_err(io("creating the node's data directory"))?;
        std::fs::create_dir_all(dir.join("log"))
            .map_err(io("creating the node's log directory"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")
            .map_err(io("writing enabled_plugins"))?;
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{tcp_port}\n");
        if let Some(certs) = tls {
            for (name, file) in [
                ("ca.pem", &certs.ca),
                ("server.pem", &certs.cert),
                ("server.key", &certs.key),
            ] {
                std::fs::copy(file, dir.join(name)).map_err(io("copying the test certificates"))?;
            }
            conf += &format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                ca = dir.join("ca.pem").display(),
                cert = dir.join("server.pem").display(),
                key = dir.join("server.key").display(),
            );
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).map_err(io("writing rabbitmq.conf"))?;
        // Run as root, Debian's wrapper starts the node as `rabbitmq`, which
        // must own its directories.
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .await
            .map_err(io("chown of the node's directory"))?;
        if !status.success() {
            return Err(Error::new(
                ErrorKind::Config,
                "chown of the throwaway node's directory failed (is this root?)",
            ));
        }
        let mut node = RabbitNode {
            port,
            tcp_port,
            tls: tls.is_some(),
            dist_port,
            node,
            dir,
            child: None,
        };
        node.launch().await?;
        Ok(node)
    }
}

#[async_trait]
impl ServerProcess for RabbitNode {
    fn url(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn launch(&mut self) -> Result<()> {
        let child = Command::new("rabbitmq-server")
            .current_dir(&self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.tcp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env(
                "RABBITMQ_FEATURE_FLAGS_FILE",
                self.dir.join("feature_flags"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(
                "starting rabbitmq-server (apt-get install rabbitmq-server)",
            ))?;
        self.child = Some(child);
        wait_for_port(
            self.port,
            Duration::from_secs(60),
            &format!("throwaway RabbitMQ node {}", self.node),
        )
        .await
    }

    async fn halt(&mut self) -> Result<()> {
        let output = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output()
            .await
            .map_err(io("running rabbitmqctl stop"))?;
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Broker,
                format!(
                    "rabbitmqctl -n {} stop failed: {}",
                    self.node,
                    String::from_utf8_lossy(&output.stderr)
                ),
            ));
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        let halted = self.halt().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        halted
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Not stopped by the test (it failed or panicked): stop it anyway.
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A certificate authority and a server certificate for 127.0.0.1 and
/// localhost, made with `openssl` in a temporary directory.
pub(crate) struct TestCerts {
    pub(crate) dir: PathBuf,
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl TestCerts {
    #[cfg_attr(not(test), allow(dead_code))] // used by the TLS tests
    pub(crate) async fn generate() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "ticketrail-certs-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(io("creating the certificate directory"))?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(io("writing the certificate extensions"))?;
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=ticketrail test CA",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .await
                .map_err(io("running openssl (apt-get install openssl)"))?;
            if !out.status.success() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "openssl {} failed: {}",
                        args[0],
                        String::from_utf8_lossy(&out.stderr)
                    ),
                ));
            }
        }
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status()
            .await;
        Ok(TestCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        })
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A nats-server with JetStream of its own, on a free port with a temporary
/// store directory. Halting kills the process; resuming starts it again on
/// the same port and store.
pub(crate) struct NatsServer {
    pub(crate) port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    pub(crate) async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts one with extra command-line arguments (e.g. `--user`).
    pub(crate) async fn start_with(extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("ticketrail-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(io("creating the server's store directory"))?;
        let mut server = NatsServer {
            port,
            dir,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.launch().await?;
        Ok(server)
    }
}

#[async_trait]
impl ServerProcess for NatsServer {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) -> Result<()> {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting nats-server (apt-get install nats-server)"))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20), "throwaway nats-server").await
    }

    async fn halt(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.map_err(io("stopping nats-server"))?;
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        self.halt().await?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // The child is killed on drop; the store goes with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ticketrail_nats::{NatsBroker, NatsConfig};

    /// One message through a broker reached over TLS.
    async fn round_trip_over_tls(broker: &dyn ticketrail_core::Broker) {
        use ticketrail_core::{Message, QueueSpec, Topology};
        let topology = Topology::new("tls.events").queue(QueueSpec::new("tls.q").bind("#"));
        broker.declare(&topology).await.unwrap();
        broker
            .publish("tls.events", Message::new("a.b", "over tls"))
            .await
            .unwrap();
        let mut sub = broker.subscribe("tls.q", Default::default()).await.unwrap();
        let mut delivery = sub.next().await.unwrap().unwrap();
        assert_eq!(delivery.envelope().payload, "over tls");
        delivery.ack().await.unwrap();
        broker.close().await.unwrap();
    }

    /// The error says the certificate is not trusted, and where.
    fn refused_as_untrusted(err: &ticketrail_core::Error, port: u16) {
        assert!(err.to_string().contains("not trusted"), "{err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    /// `amqps://` works with the test CA trusted, and is refused with a clear
    /// error without it.
    #[tokio::test]
    async fn rabbitmq_over_tls_and_an_untrusted_certificate() {
        use ticketrail_rabbitmq::{RabbitBroker, RabbitConfig};
        let certs = TestCerts::generate().await.unwrap();
        let mut node = RabbitNode::start_with(Some(&certs)).await.unwrap();
        let url = node.url();
        assert!(url.starts_with("amqps://"));
        let trusted = RabbitConfig::from_url(&url)
            .unwrap()
            .tls_ca_file(&certs.ca)
            .unwrap();
        let broker = RabbitBroker::connect(trusted)
            .await
            .expect("TLS with the CA trusted");
        round_trip_over_tls(&broker).await;

        let untrusted = RabbitConfig::from_url(&url)
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        let err = RabbitBroker::connect(untrusted).await.unwrap_err();
        refused_as_untrusted(&err, node.port);
        node.remove().await.unwrap();
    }

    /// `tls://` works with the test CA trusted, and is refused with a clear
    /// error without it.
    #[tokio::test]
    async fn nats_over_tls_and_an_untrusted_certificate() {
        let certs = TestCerts::generate().await.unwrap();
        let cert = certs.cert.display().to_string();
        let key = certs.key.display().to_string();
        let mut server = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key])
            .await
            .unwrap();
        let url = format!("tls://127.0.0.1:{}", server.port);
        let trusted = NatsConfig::from_url(&url).unwrap().tls_ca_file(&certs.ca);
        let broker = NatsBroker::connect(trusted)
            .await
            .expect("TLS with the CA trusted");
        round_trip_over_tls(&broker).await;

        let untrusted = NatsConfig::from_url(&url)
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        let err = NatsBroker::connect(untrusted).await.unwrap_err();
        refused_as_untrusted(&err, server.port);
        server.remove().await.unwrap();
    }

    /// A handler that runs longer than `ack_wait` keeps its message: the
    /// subscription sends work-in-progress acks, so the server does not hand
    /// the message to another consumer meanwhile.
    #[tokio::test]
    async fn nats_handler_slower_than_ack_wait_is_not_redelivered() {
        use crate::support::{job_message, Act, Scripted};
        use ticketrail_core::{Consumer, QueueSpec, Topology};
        let mut server = NatsServer::start().await.unwrap();
        let config = || {
            NatsConfig::from_url(&server.url())
                .unwrap()
                .ack_wait(Duration::from_secs(1))
                // Off by default on 2.9 (see `progress_acks`): asked for here.
                .progress_acks(true)
        };
        let broker: ticketrail_core::SharedBroker =
            std::sync::Arc::new(NatsBroker::connect(config()).await.unwrap());
        let topology = Topology::new("slow.events").queue(QueueSpec::new("slow.q").bind("#"));
        broker.declare(&topology).await.unwrap();
        let handler = Scripted::new(|_, _, _| Act::Work(Duration::from_millis(3500)));
        // Two consumers: a redelivery would go to the idle one at once.
        let first = Consumer::new(broker.clone(), "slow.q", handler.clone()).spawn();
        let other: ticketrail_core::SharedBroker =
            std::sync::Arc::new(NatsBroker::connect(config()).await.unwrap());
        let second = Consumer::new(other.clone(), "slow.q", handler.clone()).spawn();
        broker
            .publish("slow.events", job_message("a.b", "slow"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !handler.finished("slow") {
            assert!(Instant::now() < deadline, "{}", handler.describe());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            handler.calls("slow").len(),
            1,
            "redelivered while handled: {}",
            handler.describe()
        );
        first.shutdown().await.unwrap();
        second.shutdown().await.unwrap();
        server.remove().await.unwrap();
    }

    /// Wrong credentials are an authentication error, at once, and the
    /// password appears nowhere in it.
    #[tokio::test]
    async fn wrong_nats_credentials_are_an_auth_error_not_a_hang() {
        let mut server = NatsServer::start_with(&["--user", "app", "--pass", "right-one"])
            .await
            .unwrap();
        let right = format!("nats://app:right-one@127.0.0.1:{}", server.port);
        let broker = NatsBroker::connect(NatsConfig::from_url(&right).unwrap()).await;
        assert!(
            broker.is_ok(),
            "the right credentials work: {:?}",
            broker.err()
        );
        let wrong = format!("nats://app:wr0ng-Secret@127.0.0.1:{}", server.port);
        let started = Instant::now();
        let err = NatsBroker::connect(
            NatsConfig::from_url(&wrong)
                .unwrap()
                .connect_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(err.kind(), ticketrail_core::ErrorKind::Auth, "{err:?}");
        assert!(
            !format!("{err} {err:?}").contains("wr0ng-Secret"),
            "the password leaked: {err:?}"
        );
        server.remove().await.unwrap();
    }
}
