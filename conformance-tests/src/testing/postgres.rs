//! A throwaway PostgreSQL database per test, on the server `DATABASE_URL`
//! names (the outbox and inbox rules, C19 and C20).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use ticketrail_core::{Error, ErrorKind, Result};

/// The server the tests use unless `DATABASE_URL` names another: the role
/// `scripts/brokers postgres` makes on a fresh machine.
pub const DEFAULT_DATABASE_URL: &str = "postgres://ticketrail:ticketrail@127.0.0.1:5432/postgres";

/// `DATABASE_URL`, or the default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// A database of its own, created on the test server and dropped when the
/// value is dropped (also when the test fails).
#[derive(Debug)]
pub struct TestDatabase {
    server: PgConnectOptions,
    name: String,
    pool: PgPool,
}

impl TestDatabase {
    /// Creates `tr_<random>` on the server of [`database_url`]. A server
    /// that cannot be reached is an error naming the command that starts it.
    pub async fn create() -> Result<Self> {
        let url = database_url();
        let server: PgConnectOptions = url.parse().map_err(|e| {
            Error::config(format!(
                "DATABASE_URL `{}` is not a PostgreSQL URL",
                ticketrail_core::redact_url(&url)
            ))
            .with_source(e)
        })?;
        let name = format!("tr_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let mut admin = connect(&server).await?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .map_err(|e| failed("creating a test database", e))?;
        let _ = admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(server.clone().database(&name))
            .await
            .map_err(|e| failed("connecting to the test database", e))?;
        Ok(TestDatabase { server, name, pool })
    }

    /// A pool on the test database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The test database's URL (with the server's credentials).
    pub fn url(&self) -> String {
        self.server
            .clone()
            .database(&self.name)
            .to_url_lossy()
            .to_string()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Dropped inside a runtime or not, on a thread of its own: close
        // the pool, then drop the database with every session it has.
        let (server, name, pool) = (self.server.clone(), self.name.clone(), self.pool.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            runtime.block_on(async move {
                pool.close().await;
                if let Ok(mut admin) = connect(&server).await {
                    let _ =
                        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                            .execute(&mut admin)
                            .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = dropped.join();
    }
}

async fn connect(server: &PgConnectOptions) -> Result<PgConnection> {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(server))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "PostgreSQL at {}:{} did not answer within 10 s; start it with `scripts/brokers postgres`",
                    server.get_host(),
                    server.get_port()
                ),
            )
        })?
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "cannot connect to PostgreSQL at {}:{} as `{}` (DATABASE_URL); start it with `scripts/brokers postgres`",
                    server.get_host(),
                    server.get_port(),
                    server.get_username()
                ),
            )
            .with_source(e)
        })
}

fn failed(doing: &str, e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Database, format!("PostgreSQL: {doing}")).with_source(e)
}
