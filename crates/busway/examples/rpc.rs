//! Request-response: a `user_service` answering `get_user`, called with
//! many requests in flight. Runs on `memory://`; pass a URL to use another
//! backend (`cargo run -p busway --example rpc -- sqlite://demo.db`).

use std::future::IntoFuture;
use std::time::Duration;

use busway::{Bus, HandlerError, RpcError};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct GetUser {
    user_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let bus = Bus::connect(&url).await?;

    bus.register_request_handler("user_service", "get_user", |q: GetUser| async move {
        if q.user_id == 0 {
            return Err(HandlerError::new("user 0 does not exist"));
        }
        Ok(User {
            id: q.user_id,
            name: format!("user {}", q.user_id),
        })
    })
    .concurrency(8)
    .await?;

    let user: User = bus
        .request(
            "user_service",
            "get_user",
            &serde_json::json!({"user_id": 12345}),
        )
        .timeout(Duration::from_secs(5))
        .await?;
    println!("got {user:?}");

    // Many calls in flight at once (the reference `call_batch`).
    let calls = (1..=10).map(|id| {
        bus.request::<User>(
            "user_service",
            "get_user",
            &serde_json::json!({ "user_id": id }),
        )
        .into_future()
    });
    let users = futures::future::try_join_all(calls).await?;
    println!("{} users in one batch", users.len());

    match bus
        .request::<User>(
            "user_service",
            "get_user",
            &serde_json::json!({"user_id": 0}),
        )
        .await
    {
        Err(RpcError::Remote { message, .. }) => println!("error response: {message}"),
        other => anyhow::bail!("expected an error response, got {other:?}"),
    }
    bus.shutdown().await;
    Ok(())
}
