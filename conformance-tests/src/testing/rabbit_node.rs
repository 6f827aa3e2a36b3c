//! A RabbitMQ node of a test's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::{Error, ErrorKind, Result};
use tokio::process::{Child, Command};

use super::TestCerts;
use super::{free_port, io, wait_for_port, ServerProcess};

/// A RabbitMQ node of its own: node name, ports, data and log directories.
/// Started with `rabbitmq-server` (which, run as root, drops to the
/// `rabbitmq` user), stopped with `rabbitmqctl -n <node> stop`.
pub struct RabbitNode {
    /// The port clients connect to (`amqps://` with TLS).
    pub port: u16,
    /// The plain AMQP port (the same as `port` without TLS).
    tcp_port: u16,
    tls: bool,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitNode {
    /// The node's name (`tr-…@localhost`).
    pub fn name(&self) -> &str {
        &self.node
    }

    /// `rabbitmqctl -n <node> <args>`; its output, or an error with what it
    /// printed.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .await
            .map_err(io("running rabbitmqctl"))?;
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Broker,
                format!(
                    "rabbitmqctl -n {} {} failed: {}",
                    self.node,
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Kills the node's Erlang VM with SIGKILL, as a node lost would be:
    /// no goodbye to clients or peers. Its data stays for [`ServerProcess::launch`].
    pub async fn kill(&mut self) -> Result<()> {
        let pid = self.ctl(&["eval", "os:getpid()."]).await?;
        let pid = pid.trim().trim_matches('"');
        let status = Command::new("kill")
            .args(["-9", pid])
            .status()
            .await
            .map_err(io("running kill"))?;
        if !status.success() {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("kill -9 {pid} (node {}) failed", self.node),
            ));
        }
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
        Ok(())
    }

    /// Starts a node without TLS.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a node; with `tls`, clients connect with `amqps://` on
    /// [`port`](RabbitNode::port) using these certificates.
    pub async fn start_with(tls: Option<&TestCerts>) -> Result<Self> {
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
        }
        // No data directory of a throwaway node outlives it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
