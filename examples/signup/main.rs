//! The seed's scenario, effects once: an HTTP API whose `POST /users`
//! inserts the user and the welcome message in one PostgreSQL transaction
//! and answers 202 at once; a relay that publishes committed messages; and
//! a worker whose "send" is a row in `sent_emails`, written in the inbox's
//! transaction, so a redelivered message sends nothing twice.
//!
//! ```text
//! cargo run --example signup --features postgres                       # memory broker
//! cargo run --example signup --features postgres,rabbitmq -- --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example signup --features postgres,nats -- --broker nats://127.0.0.1:4222
//!
//! curl -i -X POST localhost:3000/users -H 'content-type: application/json' -d '{"email":"ada@example.com"}'
//! curl localhost:3000/stats        # {"users":1,"emails_sent":1,"sent_twice":0,...}
//! ```
//!
//! `--database URL` (or `DATABASE_URL`) names the database, by default the
//! local test server's; `--listen ADDR` the address (127.0.0.1:3000).
//! `--demo N` posts N sign-ups itself, waits until each has its one email,
//! prints a summary and exits. `--cleanup` drops the example's tables and
//! queues at the end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use ticketrail::postgres::{InboxHandler, Outbox, Store};
use ticketrail::{Consumer, Context, Exponential, HandlerError, QueueSpec, Topology};

const EXCHANGE: &str = "app.events";
const QUEUE: &str = "email.notifications";

/// The message: enough for the worker to send without reading the API's
/// tables.
#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    user_id: i64,
    email: String,
}

/// The worker: "sends" by recording the email in the inbox's transaction.
struct SendWelcome;

impl InboxHandler for SendWelcome {
    type Message = Welcome;

    async fn handle(
        &self,
        welcome: Welcome,
        ctx: &Context,
        db: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if !welcome.email.contains('@') {
            return Err(HandlerError::permanent(format!(
                "bad address {:?}",
                welcome.email
            )));
        }
        sqlx::query("INSERT INTO sent_emails (user_id, message_id) VALUES ($1, $2)")
            .bind(welcome.user_id)
            .bind(ctx.id())
            .execute(db)
            .await?;
        Ok(())
    }
}

#[derive(Clone)]
struct Api {
    store: Store,
    outbox: Outbox,
}

#[derive(Deserialize)]
struct SignUp {
    email: String,
}

#[derive(Serialize)]
struct Accepted {
    user_id: i64,
    message_id: String,
}

/// `POST /users`: the user and its welcome message commit together, or
/// neither does.
async fn sign_up(
    State(api): State<Api>,
    Json(body): Json<SignUp>,
) -> Result<(StatusCode, Json<Accepted>), (StatusCode, String)> {
    let failed = |e: &dyn std::fmt::Display| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let mut tx = api.store.pool().begin().await.map_err(|e| failed(&e))?;
    let user_id: i64 = sqlx::query("INSERT INTO users (email) VALUES ($1) RETURNING id")
        .bind(&body.email)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| failed(&e))?
        .get(0);
    let welcome = Welcome {
        user_id,
        email: body.email,
    };
    let message_id = api
        .outbox
        .publish(&mut tx, "user.created", &welcome)
        .await
        .map_err(|e| failed(&e))?;
    tx.commit().await.map_err(|e| failed(&e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            user_id,
            message_id,
        }),
    ))
}

#[derive(Serialize)]
struct Stats {
    users: i64,
    emails_sent: i64,
    sent_twice: i64,
    missing: i64,
    outbox_pending: u64,
}

async fn stats(store: &Store) -> Result<Stats, Box<dyn std::error::Error>> {
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
    .await?;
    Ok(Stats {
        users: row.get(0),
        emails_sent: row.get(1),
        sent_twice: row.get(2),
        missing: row.get(3),
        outbox_pending: store.outbox_stats(0).await?.pending,
    })
}

/// `GET /stats`: users, emails sent, and how many users got two.
async fn get_stats(State(api): State<Api>) -> Result<Json<Stats>, (StatusCode, String)> {
    stats(&api.store)
        .await
        .map(Json)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

struct Options {
    broker: String,
    database: String,
    listen: SocketAddr,
    demo: Option<u32>,
    cleanup: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        broker: "memory://".to_owned(),
        database: std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            "postgres://ticketrail:ticketrail@127.0.0.1:5432/postgres".to_owned()
        }),
        listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
        demo: None,
        cleanup: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--broker" => options.broker = value("--broker")?,
            "--database" => options.database = value("--database")?,
            "--listen" => {
                options.listen = value("--listen")?
                    .parse()
                    .map_err(|e| format!("--listen: {e}"))?
            }
            "--demo" => {
                options.demo = Some(
                    value("--demo")?
                        .parse()
                        .map_err(|e| format!("--demo: {e}"))?,
                )
            }
            "--cleanup" => options.cleanup = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let options = options().map_err(|e| format!("{e}; see the example's doc comment"))?;

    let broker = ticketrail::connect(&options.broker).await?;
    let topology = Topology::new(EXCHANGE).queue(QueueSpec::new(QUEUE).bind("user.#"));
    broker.declare(&topology).await?;
    let store = Store::connect(&options.database).await?;
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS users (id bigserial PRIMARY KEY, email text NOT NULL);
         CREATE TABLE IF NOT EXISTS sent_emails (
             user_id bigint NOT NULL, message_id text NOT NULL,
             sent_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(store.pool())
    .await?;

    let relay = store.relay(broker.clone()).spawn();
    let worker = Consumer::new(broker.clone(), QUEUE, store.inbox(SendWelcome))
        .retry_policy(Exponential::default())
        .prefetch(10)
        .spawn();
    let api = Api {
        outbox: store.outbox(EXCHANGE)?,
        store: store.clone(),
    };
    let app = Router::new()
        .route("/users", post(sign_up))
        .route("/stats", get(get_stats))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "signup: listening on http://{address} ({})",
        broker.describe()
    );

    match options.demo {
        Some(n) => demo(address, &store, n).await?,
        None => {
            println!("POST /users {{\"email\": ...}}, GET /stats; Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
        }
    }
    server.abort();
    worker.shutdown().await?;
    relay.shutdown().await?;
    if options.cleanup {
        sqlx::query("DROP TABLE users, sent_emails")
            .execute(store.pool())
            .await?;
        broker.delete(&topology).await?;
    }
    broker.close().await?;
    Ok(())
}

/// Signs `n` users up through the API, as curl would, then waits until
/// every one has its email.
async fn demo(
    address: SocketAddr,
    store: &Store,
    n: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let before = stats(store).await?;
    let started = Instant::now();
    for i in 0..n {
        let status = post_user(address, &format!("user{i}@example.com")).await?;
        if status != 202 {
            return Err(format!("POST /users answered {status}").into());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = stats(store).await?;
    while now.emails_sent - before.emails_sent < i64::from(n) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = stats(store).await?;
    }
    println!(
        "signup: posted {n}, answered 202 each; users {}, emails sent {}, sent twice {}, \
         missing {}, outbox pending {} ({:.1} s)",
        now.users,
        now.emails_sent,
        now.sent_twice,
        now.missing,
        now.outbox_pending,
        started.elapsed().as_secs_f64()
    );
    if now.sent_twice != 0 || now.missing != 0 {
        return Err("some user has no email, or two".into());
    }
    Ok(())
}

/// `POST /users` over HTTP/1.1; the status code.
async fn post_user(address: SocketAddr, email: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({ "email": email }).to_string();
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!(
        "POST /users HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status = String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}
