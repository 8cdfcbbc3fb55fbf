//! Event sourcing and CQRS end to end on the embedded SQLite backend:
//! users register and update their profile, orders are placed, a users read
//! model follows the events, and `get_user` / `list_users` read it.
//!
//! Run with `cargo run -p busway --example event_sourcing`.

// Shared with the tests (`tests/event_sourcing.rs`), hence public items used by some only.
#[allow(dead_code, missing_docs, unreachable_pub)]
mod domain;

use domain::{CommandResult, Directory, OrderItem, UserPage, UserView};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Directory::start(&dir.path().join("busway.db")).await?;

    for (id, name) in [("user_1", "Ann"), ("user_2", "Bob"), ("user_3", "Cleo")] {
        let done: CommandResult = app
            .commands
            .send(
                "create_user",
                &json!({"user_id": id, "command": "register", "email": format!("{id}@example.com"), "name": name}),
            )
            .await?;
        println!(
            "registered {} (version {}, position {})",
            done.id, done.version, done.position
        );
    }
    let user: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_1"}))
        .await?;
    println!("get_user: {user:?}");

    app.commands
        .send::<CommandResult>(
            "update_user",
            &json!({"user_id": "user_1", "command": "update_profile", "changes": {"name": "Ann Smith"}}),
        )
        .await?;
    app.commands
        .send::<CommandResult>(
            "create_order",
            &json!({"order_id": "order_1", "user_id": "user_1",
                    "items": [OrderItem { sku: "book".into(), quantity: 2, price: 12.5 }]}),
        )
        .await?;
    // Read after write through the same buses: never stale.
    let user: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_1"}))
        .await?;
    println!("after the update: {user:?}");
    let page: UserPage = app
        .queries
        .query("list_users", &json!({"page": 1, "page_size": 2}))
        .await?;
    println!(
        "list_users page 1 of {}: {:?}",
        page.total,
        page.users.iter().map(|u| &u.name).collect::<Vec<_>>()
    );

    let refused = app
        .commands
        .send::<CommandResult>(
            "create_user",
            &json!({"user_id": "user_1", "command": "register", "email": "x@example.com", "name": "X"}),
        )
        .await;
    println!(
        "registering user_1 again: {}",
        refused.err().map(|e| e.to_string()).unwrap_or_default()
    );
    println!("query cache: {:?}", app.queries.stats());
    app.stop().await
}
