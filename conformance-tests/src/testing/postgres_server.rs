//! A PostgreSQL server of a test's own, for drills that restart it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::{Error, ErrorKind, Result};
use tokio::process::{Child, Command};

use super::{free_port, io, wait_for_port, ServerProcess};

/// A PostgreSQL cluster in a temporary directory, on a free port, with a
/// superuser `ticketrail` and trust authentication on loopback. It runs as
/// the `postgres` user when the test runs as root (PostgreSQL refuses
/// root). Halting is an immediate shutdown (SIGQUIT: no checkpoint, crash
/// recovery at the next start); resuming starts it again on the same port
/// and data.
pub struct PostgresServer {
    /// The port it listens on.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// The uid and gid it runs as, when the test runs as root.
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PostgresServer {
    /// Creates the cluster and starts it.
    pub async fn start() -> Result<Self> {
        let bin = binaries()?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("ticketrail-pg-{}", &id[..12]));
        std::fs::create_dir_all(&dir).map_err(io("creating the server's directory"))?;
        let owner = if is_root() {
            let owner = postgres_user().await?;
            chown(&dir, owner).await?;
            Some(owner)
        } else {
            None
        };
        let mut server = PostgresServer {
            port: free_port()?,
            dir,
            bin,
            owner,
            child: None,
        };
        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(server.dir.join("data"))
            .args([
                "-U",
                "ticketrail",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let output = initdb.output().await.map_err(io("running initdb"))?;
        if !output.status.success() {
            return Err(Error::new(
                ErrorKind::Database,
                format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ));
        }
        server.launch().await?;
        Ok(server)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }
}

#[async_trait]
impl ServerProcess for PostgresServer {
    fn url(&self) -> String {
        format!("postgres://ticketrail@127.0.0.1:{}/postgres", self.port)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("server.log"))
            .map_err(io("creating the server's log"))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            // A process killed loses nothing without fsync: its writes are
            // in the kernel's cache. Only a machine crash would.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting postgres"))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30), "throwaway PostgreSQL").await?;
        // The port opens before recovery ends; a query proves it is ready.
        let url = self.url();
        for _ in 0..150 {
            if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                let ready = sqlx::query("SELECT 1").execute(&mut conn).await.is_ok();
                let _ = sqlx::Connection::close(conn).await;
                if ready {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "throwaway PostgreSQL on port {} never answered a query",
                self.port
            ),
        ))
    }

    async fn halt(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        let halted = self.halt().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        halted
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory of the newest PostgreSQL's server programs: Debian keeps
/// them out of the path, in `/usr/lib/postgresql/<version>/bin`.
fn binaries() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "no PostgreSQL server programs in /usr/lib/postgresql/*/bin; \
             install them with `scripts/brokers postgres` (apt-get install postgresql)",
        )
    })
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn postgres_user() -> Result<(u32, u32)> {
    let id = |flag: &'static str| async move {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .await
            .map_err(io("running id"))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<u32>()
            .map_err(|_| {
                Error::new(
                    ErrorKind::Config,
                    "no `postgres` user to run a throwaway PostgreSQL as (PostgreSQL refuses root)",
                )
            })
    };
    Ok((id("-u").await?, id("-g").await?))
}

async fn chown(dir: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()
        .await
        .map_err(io("running chown"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!("chown of {} failed", dir.display()),
        ))
    }
}
