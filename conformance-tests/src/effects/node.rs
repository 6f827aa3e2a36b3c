//! One process of the effects drill: the sign-up API, a relay or a worker,
//! each its own process so the drill can SIGKILL it. Started as
//! `drill effects-node <role> <broker URL> <database URL> [port]`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use ticketrail_core::{Consumer, Context, Exponential, HandlerError, Result, SharedBroker};
use ticketrail_postgres::{InboxHandler, Outbox, Store};

use super::{TOPIC_SPACE, WORK_QUEUE};
use crate::harness::harness_for_url;

/// What a role needs of the world: the broker and the database, both
/// perhaps down right now (the drill restarts them).
struct World {
    broker: SharedBroker,
    store: Store,
}

/// The message the API stores with each user.
#[derive(Serialize, Deserialize)]
struct Welcome {
    user_id: i64,
}

/// The worker's effect: one row per email, in the inbox's transaction.
struct SendWelcome;

impl InboxHandler for SendWelcome {
    type Message = Welcome;

    async fn handle(
        &self,
        welcome: Welcome,
        ctx: &Context,
        db: &mut PgConnection,
    ) -> std::result::Result<(), HandlerError> {
        sqlx::query("INSERT INTO sent_emails (user_id, message_id) VALUES ($1, $2)")
            .bind(welcome.user_id)
            .bind(ctx.id())
            .execute(db)
            .await?;
        Ok(())
    }
}

/// Runs `role` until killed.
pub async fn run_node(role: &str, broker_url: &str, database_url: &str, port: u16) -> Result<()> {
    let world = connect(broker_url, database_url).await?;
    match role {
        "api" => api(world, port).await,
        "relay" => {
            let relay = world
                .store
                .relay(world.broker)
                .poll_interval(Duration::from_millis(500))
                .spawn();
            std::future::pending::<()>().await;
            relay.shutdown().await
        }
        "worker" => {
            // Patient retries: a database or broker restart must not turn
            // a welcome email into a dead letter.
            let policy = Exponential::builder()
                .initial(Duration::from_millis(200))
                .max_delay(Duration::from_secs(2))
                .max_attempts(50)
                .build()?;
            let worker = Consumer::new(world.broker, WORK_QUEUE, world.store.inbox(SendWelcome))
                .retry_policy(policy)
                .prefetch(20)
                .spawn();
            std::future::pending::<()>().await;
            worker.shutdown().await
        }
        other => Err(ticketrail_core::Error::config(format!(
            "no role `{other}` (api, relay, worker)"
        ))),
    }
}

/// Connects to both, trying again while either is down (a node may be
/// started again while the drill has the broker or database stopped).
async fn connect(broker_url: &str, database_url: &str) -> Result<World> {
    let harness = harness_for_url(broker_url, "tr")?;
    let mut last = None;
    for _ in 0..240 {
        let connected = async {
            let broker = harness.connect_to(broker_url).await?;
            let store = Store::connect(database_url).await?;
            Ok::<_, ticketrail_core::Error>(World { broker, store })
        };
        match connected.await {
            Ok(world) => return Ok(world),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.expect("tried at least once"))
}

#[derive(Clone)]
struct Api {
    store: Store,
    outbox: Arc<Outbox>,
}

/// `POST /users` with an email as the body: the user and its welcome
/// message commit together; 202 once they have.
async fn api(world: World, port: u16) -> Result<()> {
    let state = Api {
        outbox: Arc::new(world.store.outbox(TOPIC_SPACE)?),
        store: world.store,
    };
    let app = Router::new()
        .route("/users", post(sign_up))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            ticketrail_core::Error::config(format!("binding port {port}")).with_source(e)
        })?;
    axum::serve(listener, app)
        .await
        .map_err(|e| ticketrail_core::Error::config("serving the API").with_source(e))
}

async fn sign_up(State(api): State<Api>, email: String) -> StatusCode {
    let committed = async {
        let mut tx = api.store.pool().begin().await.map_err(|e| e.to_string())?;
        let user_id: i64 = sqlx::query("INSERT INTO users (email) VALUES ($1) RETURNING id")
            .bind(&email)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        api.outbox
            .publish(&mut tx, "user.created", &Welcome { user_id })
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())
    };
    match committed.await {
        Ok(()) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}
