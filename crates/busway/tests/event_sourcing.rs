//! Event sourcing and CQRS: aggregates, snapshots, upcasting, projections,
//! the outbox and the buses, on the memory and SQLite stores, with the
//! reference domain of `examples/event_sourcing`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/event_sourcing/domain.rs"]
#[allow(dead_code, missing_docs, unreachable_pub)]
mod domain;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::es::{
    Aggregate, Envelope, EventStore, ExpectedVersion, NewEvent, OnUndecodable, OutboxRelay,
    Projection, ProjectionError, ProjectionRunner, Repository, RepositoryError, SnapshotPolicy,
    StreamRead, TestFramework, Upcasters,
};
use busway::memory::{MemoryEventStore, MemoryTransport};
use busway::{Bus, Event};
use domain::{
    CommandResult, Directory, Order, OrderCommand, OrderError, OrderItem, User, UserCommand,
    UserError, UserEvent, UserPage, UserView,
};
use serde_json::{json, Map, Value};

fn register(email: &str, name: &str) -> UserCommand {
    UserCommand::Register {
        email: email.into(),
        name: name.into(),
    }
}

fn rename(name: &str) -> UserCommand {
    let mut changes = Map::new();
    changes.insert("name".into(), name.into());
    UserCommand::UpdateProfile { changes }
}

#[test]
fn given_when_then_without_a_broker() {
    TestFramework::<User>::given_no_previous_events()
        .when(register("ann@example.com", "Ann"))
        .then_expect_events(vec![UserEvent::Registered {
            email: "ann@example.com".into(),
            name: "Ann".into(),
        }]);
    TestFramework::<User>::given(vec![UserEvent::Registered {
        email: "ann@example.com".into(),
        name: "Ann".into(),
    }])
    .when(register("ann@example.com", "Ann"))
    .then_expect_error(UserError::AlreadyRegistered);
    TestFramework::<User>::given_no_previous_events()
        .when(register("not-an-email", "Ann"))
        .then_expect_error(UserError::InvalidEmail("not-an-email".into()));
    TestFramework::<User>::given_no_previous_events()
        .when(rename("Ann"))
        .then_expect_error(UserError::NotRegistered);
    let state = TestFramework::<User>::given(vec![UserEvent::Registered {
        email: "ann@example.com".into(),
        name: "Ann".into(),
    }])
    .when(rename("Ann Smith"))
    .state();
    assert_eq!(state.name, "Ann Smith");
    TestFramework::<Order>::given_no_previous_events()
        .when(OrderCommand::Create {
            user_id: "u1".into(),
            items: vec![],
        })
        .then_expect_error(OrderError::NoItems);
}

#[tokio::test]
async fn a_conflict_is_decided_again_on_fresh_state() -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let users = Repository::<User>::new(store.clone());
    users.execute("u1", register("a@b.test", "A")).await?;
    // Two writers load version 1; the second append conflicts.
    let stale = users.load("u1").await?;
    assert_eq!(stale.version, 1);
    users.execute("u1", rename("B")).await?;
    let event = busway::es::encode_event(
        &UserEvent::Updated {
            changes: Map::new(),
        },
        &Upcasters::new(),
    )?;
    let err = store
        .append(
            "user-u1",
            ExpectedVersion::Exact(stale.version),
            vec![event],
        )
        .await
        .expect_err("stale append");
    assert!(matches!(
        err,
        busway::es::AppendError::Conflict { actual: 2, .. }
    ));

    // Sixteen writers at once: with retries every command lands, in some order.
    let tasks = (0..16).map(|i| {
        let users = users.clone();
        tokio::spawn(async move {
            users
                .execute_retrying("u1", rename(&format!("n{i}")), 64)
                .await
        })
    });
    for task in futures::future::join_all(tasks).await {
        task??;
    }
    let loaded = users.load("u1").await?;
    ensure!(loaded.version == 18, "version {}", loaded.version);
    // Without retries, some lose with a typed conflict.
    let tasks = (0..16).map(|i| {
        let users = users.clone();
        tokio::spawn(async move { users.execute("u1", rename(&format!("m{i}"))).await })
    });
    let mut conflicts = 0;
    for task in futures::future::join_all(tasks).await {
        match task? {
            Ok(_) => {}
            Err(RepositoryError::Conflict { .. }) => conflicts += 1,
            Err(e) => return Err(e.into()),
        }
    }
    let after = users.load("u1").await?.version;
    ensure!(after + conflicts == 18 + 16, "{after} + {conflicts}");
    // A refused command writes nothing.
    let err = users
        .execute("u1", register("a@b.test", "A"))
        .await
        .expect_err("registered twice");
    assert!(matches!(
        err,
        RepositoryError::Rejected(UserError::AlreadyRegistered)
    ));
    ensure!(users.load("u1").await?.version == after);
    Ok(())
}

/// The same aggregate with a changed state shape.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct UserV2(User);

impl Aggregate for UserV2 {
    const TYPE: &'static str = "user";
    const SNAPSHOT_VERSION: u32 = 2;
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    fn handle(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        self.0.handle(command)
    }
    fn apply(&mut self, event: &UserEvent) {
        self.0.apply(event)
    }
}

async fn snapshot_reads_only_later_events(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let users = Repository::<User>::new(store.clone()).with_snapshots(SnapshotPolicy::Every(50));
    users.execute("s1", register("a@b.test", "A")).await?;
    for i in 1..120 {
        users.execute("s1", rename(&format!("name {i}"))).await?;
    }
    let loaded = users.load("s1").await?;
    ensure!(loaded.version == 120);
    ensure!(
        loaded.snapshot_version == Some(100),
        "{:?}",
        loaded.snapshot_version
    );
    ensure!(
        loaded.events_applied == 20,
        "read {} events",
        loaded.events_applied
    );
    ensure!(loaded.state.name == "name 119");
    // On demand.
    ensure!(users.snapshot("s1").await? == 120);
    let loaded = users.load("s1").await?;
    ensure!(loaded.events_applied == 0 && loaded.state.name == "name 119");
    // A changed state shape ignores the old snapshot and replays everything.
    let v2 = Repository::<UserV2>::new(store).load("s1").await?;
    ensure!(v2.snapshot_version.is_none() && v2.events_applied == 120);
    ensure!(v2.state.0.name == "name 119");
    Ok(())
}

#[tokio::test]
async fn snapshots_on_memory() -> anyhow::Result<()> {
    snapshot_reads_only_later_events(Arc::new(MemoryEventStore::new())).await
}

#[tokio::test]
async fn snapshots_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let transport = busway::sqlite::SqliteTransport::open(dir.path().join("es.db"))?;
    let store = busway::sqlite::SqliteEventStore::open(transport).await?;
    snapshot_reads_only_later_events(Arc::new(store)).await
}

#[tokio::test]
async fn old_events_are_upcast_on_read() -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    // Schema 1 of `user.registered` had `full_name` and no email.
    store
        .append(
            "user-old",
            ExpectedVersion::NoStream,
            vec![NewEvent::json(
                "user.registered",
                &json!({"full_name": "Old Timer"}),
            )?],
        )
        .await?;
    let upcasters = Upcasters::new().register("user.registered", 1, |mut data| {
        let name = data["full_name"].take();
        if name.is_null() {
            return Err("no full_name".into());
        }
        Ok(json!({"name": name, "email": "unknown@example.com"}))
    });
    let users = Repository::<User>::new(store.clone()).with_upcasters(upcasters);
    let loaded = users.load("old").await?;
    ensure!(loaded.state.name == "Old Timer" && loaded.state.registered);
    // New events are written at the current schema version.
    users.execute("new", register("n@b.test", "New")).await?;
    let stored = store.read_stream("user-new", StreamRead::all()).await?;
    ensure!(stored[0].schema_version == 2);
    // Without the upcaster the old event does not decode, and says where it is.
    let err = Repository::<User>::new(store)
        .load("old")
        .await
        .expect_err("no upcaster");
    let message = err.to_string();
    ensure!(
        message.contains("user-old") && message.contains("position 1"),
        "{message}"
    );
    Ok(())
}

/// Collects user names; counts applies.
#[derive(Default)]
struct Names {
    names: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Projection for Names {
    type Event = UserEvent;
    fn name(&self) -> &str {
        "names"
    }
    fn handles(&self, event_type: &str) -> bool {
        event_type.starts_with("user.")
    }
    async fn apply(&self, events: Vec<Envelope<UserEvent>>, _: u64) -> Result<(), String> {
        let mut names = self.names.lock().unwrap();
        for e in events {
            if let UserEvent::Registered { name, .. } = e.event {
                names.push(name);
            }
        }
        Ok(())
    }
    async fn reset(&self) -> Result<(), String> {
        self.names.lock().unwrap().clear();
        Ok(())
    }
}

#[tokio::test]
async fn an_undecodable_event_stops_the_projection_or_is_parked() -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let users = Repository::<User>::new(store.clone());
    users.execute("u1", register("a@b.test", "Ann")).await?;
    store
        .append(
            "user-bad",
            ExpectedVersion::Any,
            vec![NewEvent::new("user.registered", "{not json")],
        )
        .await?;
    store
        .append(
            "user-odd",
            ExpectedVersion::Any,
            vec![NewEvent::new("user.teleported", "{}")],
        )
        .await?;
    store
        .append(
            "order-1",
            ExpectedVersion::Any,
            vec![NewEvent::new("order.created", "{}")],
        )
        .await?;
    users.execute("u2", register("b@b.test", "Bob")).await?;

    let names = Names::default();
    let err = ProjectionRunner::new(store.clone())
        .catch_up(&names)
        .await
        .expect_err("must stop");
    let message = err.to_string();
    ensure!(
        matches!(&err, ProjectionError::Undecodable { source, .. } if source.stream == "user-bad" && source.position == 2),
        "{message}"
    );
    ensure!(
        message.contains("user-bad") && message.contains("position 2"),
        "{message}"
    );
    ensure!(
        store.load_checkpoint("names").await?.is_none(),
        "no progress past the bad event"
    );

    let runner = ProjectionRunner::new(store.clone()).on_undecodable(OnUndecodable::Park);
    ensure!(runner.catch_up(&names).await? == 5);
    ensure!(*names.names.lock().unwrap() == ["Ann", "Bob"]);
    let parked = store.parked_events("names").await?;
    let where_: Vec<_> = parked
        .iter()
        .map(|p| (p.stream.as_str(), p.position))
        .collect();
    ensure!(where_ == [("user-bad", 2), ("user-odd", 3)], "{where_:?}");
    ensure!(store.load_checkpoint("names").await? == Some(5));

    // A rebuild replays from zero.
    ensure!(runner.rebuild(&names).await? == 5);
    ensure!(*names.names.lock().unwrap() == ["Ann", "Bob"]);
    Ok(())
}

#[tokio::test]
async fn a_live_projection_follows_appends_and_reports_lag() -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let users = Repository::<User>::new(store.clone());
    users.execute("u1", register("a@b.test", "Ann")).await?;
    let names = Arc::new(Names::default());
    let handle = ProjectionRunner::new(store.clone())
        .with_batch_size(2)
        .spawn(names.clone());
    ensure!(handle.wait_for(1).await);
    let done = users.execute("u2", register("b@b.test", "Bob")).await?;
    ensure!(handle.wait_for(done.position).await);
    ensure!(handle.status().lag() == 0 && handle.status().live);
    ensure!(*names.names.lock().unwrap() == ["Ann", "Bob"]);
    ensure!(handle.stop().await? == 2);
    Ok(())
}

#[tokio::test]
async fn the_outbox_relay_announces_events_on_the_bus() -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let transport = Arc::new(MemoryTransport::new());
    let bus = Bus::new(transport.clone());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    bus.register_event_handler("user.*", "welcome", move |event: Event<Value>| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send(event);
            Ok(())
        }
    })
    .await?;
    let users = Repository::<User>::new(store.clone()).announcing();
    users.execute("u1", register("a@b.test", "Ann")).await?;
    // Committed, not yet published: still in the outbox.
    ensure!(store.fetch_outbox(10).await?.len() == 1);
    let relay = OutboxRelay::new(store.clone(), transport.clone()).spawn();
    let event = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await?
        .context("announcement")?;
    ensure!(event.event_type == "user.registered" && event.aggregate_id == "u1");
    ensure!(event.version == 1 && event.data["name"] == "Ann");
    let stored = store.read_stream("user-u1", StreamRead::all()).await?;
    ensure!(event.event_id == stored[0].id.to_string());
    relay.stop().await;
    ensure!(store.fetch_outbox(10).await?.is_empty());
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_domain_end_to_end_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let app = Directory::start(&dir.path().join("busway.db")).await?;
    for i in 1..=12 {
        let id = format!("user_{i:02}");
        let done: CommandResult = app
            .commands
            .send(
                "create_user",
                &json!({"user_id": id, "command": "register", "email": format!("{id}@example.com"), "name": format!("User {i}")}),
            )
            .await?;
        ensure!(done.version == 1 && done.status == "active");
    }
    let user: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_03"}))
        .await?;
    ensure!(user.name == "User 3" && user.email == "user_03@example.com");
    // Cached:
    let again: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_03"}))
        .await?;
    ensure!(again == user && app.queries.stats().hits == 1);

    // A write through the command bus: the next read is never stale.
    app.commands
        .send::<CommandResult>(
            "update_user",
            &json!({"user_id": "user_03", "command": "update_profile", "changes": {"name": "Cleo"}}),
        )
        .await?;
    let user: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_03"}))
        .await?;
    ensure!(user.name == "Cleo", "stale read: {user:?}");
    app.commands
        .send::<CommandResult>(
            "create_order",
            &json!({"order_id": "o1", "user_id": "user_03",
                    "items": [OrderItem { sku: "book".into(), quantity: 2, price: 12.5 }]}),
        )
        .await?;
    let user: UserView = app
        .queries
        .query("get_user", &json!({"user_id": "user_03"}))
        .await?;
    ensure!(user.orders == 1, "{user:?}");

    let page: UserPage = app
        .queries
        .query("list_users", &json!({"page": 2, "page_size": 5}))
        .await?;
    ensure!(page.total == 12 && page.users.len() == 5);
    ensure!(page.users[0].user_id == "user_06");
    let last: UserPage = app
        .queries
        .query("list_users", &json!({"page": 3, "page_size": 5}))
        .await?;
    ensure!(last.users.len() == 2);

    // Refusals and bad input are errors to the sender.
    let err = app
        .commands
        .send::<CommandResult>(
            "create_user",
            &json!({"user_id": "user_03", "command": "register", "email": "x@example.com", "name": "X"}),
        )
        .await
        .expect_err("registered twice");
    ensure!(err.to_string().contains("already registered"), "{err}");
    let err = app
        .queries
        .query::<UserView>("get_user", &json!({"user_id": "nobody"}))
        .await
        .expect_err("no such user");
    ensure!(err.to_string().contains("nobody"), "{err}");

    // An event published by someone else invalidates the cache.
    let before = app.queries.stats().invalidations;
    app.bus
        .publish_event(&Event::new(
            "user.updated",
            "user_05",
            json!({"changes": {}}),
        ))
        .await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.queries.stats().invalidations == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;

    // The checkpoint was saved with the read model; a rebuild gives the same rows.
    let position = app.store.head_position().await?;
    ensure!(app.projection.wait_for(position).await);
    ensure!(app.store.load_checkpoint("users_read_model").await? == Some(position));
    let runner = ProjectionRunner::new(Arc::new(app.store.clone()));
    let rebuilt = domain::UsersReadModel::open(app.store.clone()).await?;
    let before = app.read_model.list(1, 100).await?;
    app.projection.stop().await?;
    ensure!(runner.rebuild(&rebuilt).await? == position);
    ensure!(rebuilt.list(1, 100).await? == before);
    app.bus.shutdown().await;
    Ok(())
}
