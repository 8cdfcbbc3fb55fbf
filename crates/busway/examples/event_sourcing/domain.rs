//! The reference domain: `User` and `Order` aggregates, a users read model
//! in the SQLite file next to the events, and the command and query
//! handlers (`create_user`, `update_user`, `create_order`, `get_user`,
//! `list_users`).

use std::sync::Arc;

use async_trait::async_trait;
use busway::es::{
    Aggregate, CommandBus, Envelope, Projection, QueryBus, Repository, RepositoryError,
};
use busway::sqlite::rusqlite::{self, params, OptionalExtension};
use busway::sqlite::SqliteEventStore;
use busway::{HandlerError, SetupError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------- users

/// A user, as the write side knows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub registered: bool,
    pub email: String,
    pub name: String,
    pub status: String,
}

/// What a user can be asked to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum UserCommand {
    Register { email: String, name: String },
    UpdateProfile { changes: Map<String, Value> },
}

/// What happened to a user (the reference event types).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum UserEvent {
    #[serde(rename = "user.registered")]
    Registered { email: String, name: String },
    #[serde(rename = "user.updated")]
    Updated { changes: Map<String, Value> },
}

/// Why a user command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the user is already registered")]
    AlreadyRegistered,
    #[error("no such user")]
    NotRegistered,
    #[error("`{0}` is not an email address")]
    InvalidEmail(String),
    #[error("nothing to change")]
    NoChanges,
    #[error("`{0}` cannot be changed")]
    UnknownField(String),
}

fn check_email(email: &str) -> Result<(), UserError> {
    match email.split_once('@') {
        Some((user, domain)) if !user.is_empty() && domain.contains('.') => Ok(()),
        _ => Err(UserError::InvalidEmail(email.to_owned())),
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn handle(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register { email, name } => {
                if self.registered {
                    return Err(UserError::AlreadyRegistered);
                }
                check_email(&email)?;
                Ok(vec![UserEvent::Registered { email, name }])
            }
            UserCommand::UpdateProfile { changes } => {
                if !self.registered {
                    return Err(UserError::NotRegistered);
                }
                if changes.is_empty() {
                    return Err(UserError::NoChanges);
                }
                for (field, value) in &changes {
                    match field.as_str() {
                        "name" => {}
                        "email" => check_email(value.as_str().unwrap_or_default())?,
                        other => return Err(UserError::UnknownField(other.to_owned())),
                    }
                }
                Ok(vec![UserEvent::Updated { changes }])
            }
        }
    }

    fn apply(&mut self, event: &UserEvent) {
        match event {
            UserEvent::Registered { email, name } => {
                self.registered = true;
                self.email.clone_from(email);
                self.name.clone_from(name);
                self.status = "active".into();
            }
            UserEvent::Updated { changes } => {
                for (field, value) in changes {
                    let value = value.as_str().unwrap_or_default().to_owned();
                    match field.as_str() {
                        "name" => self.name = value,
                        "email" => self.email = value,
                        _ => {}
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- orders

/// An order line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    pub sku: String,
    pub quantity: u32,
    pub price: f64,
}

/// An order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub user_id: String,
    pub items: Vec<OrderItem>,
    pub total: f64,
    pub status: String,
}

/// What an order can be asked to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OrderCommand {
    Create {
        user_id: String,
        items: Vec<OrderItem>,
    },
    Cancel {
        reason: String,
    },
}

/// What happened to an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    #[serde(rename = "order.created")]
    Created {
        user_id: String,
        items: Vec<OrderItem>,
        total: f64,
        status: String,
    },
    #[serde(rename = "order.cancelled")]
    Cancelled { reason: String },
}

/// Why an order command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the order already exists")]
    AlreadyCreated,
    #[error("an order needs at least one item")]
    NoItems,
    #[error("no such order")]
    NotCreated,
    #[error("the order is already cancelled")]
    AlreadyCancelled,
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Create { user_id, items } => {
                if !self.status.is_empty() {
                    return Err(OrderError::AlreadyCreated);
                }
                if items.is_empty() {
                    return Err(OrderError::NoItems);
                }
                let total = items.iter().map(|i| i.price * f64::from(i.quantity)).sum();
                Ok(vec![OrderEvent::Created {
                    user_id,
                    items,
                    total,
                    status: "created".into(),
                }])
            }
            OrderCommand::Cancel { reason } => match self.status.as_str() {
                "" => Err(OrderError::NotCreated),
                "cancelled" => Err(OrderError::AlreadyCancelled),
                _ => Ok(vec![OrderEvent::Cancelled { reason }]),
            },
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Created {
                user_id,
                items,
                total,
                status,
            } => {
                self.user_id.clone_from(user_id);
                self.items.clone_from(items);
                self.total = *total;
                self.status.clone_from(status);
            }
            OrderEvent::Cancelled { .. } => self.status = "cancelled".into(),
        }
    }
}

// ---------------------------------------------------------------- read model

/// A row of the users read model: what `get_user` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub status: String,
    pub orders: u64,
}

/// A page of `list_users`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserPage {
    pub users: Vec<UserView>,
    pub page: u64,
    pub page_size: u64,
    pub total: u64,
}

/// The users read model: table `users_read_model` in the SQLite file of
/// the events, updated with the projection's checkpoint in one transaction.
#[derive(Clone, Debug)]
pub struct UsersReadModel {
    store: SqliteEventStore,
}

/// The events the users read model reads (users and orders).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum DirectoryEvent {
    User(UserEvent),
    Order(OrderEvent),
}

const READ_MODEL_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users_read_model (
    user_id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, orders INTEGER NOT NULL DEFAULT 0)";

impl UsersReadModel {
    /// The read model in `store`'s database.
    pub async fn open(store: SqliteEventStore) -> Result<Self, busway::es::ReadError> {
        store
            .read(|conn| conn.execute_batch(READ_MODEL_SCHEMA))
            .await?;
        Ok(Self { store })
    }

    /// One user.
    pub async fn get(&self, user_id: &str) -> Result<Option<UserView>, busway::es::ReadError> {
        let user_id = user_id.to_owned();
        self.store
            .read(move |conn| {
                conn.query_row(
                    "SELECT user_id, email, name, status, orders FROM users_read_model WHERE user_id = ?1",
                    [&user_id],
                    view_from_row,
                )
                .optional()
            })
            .await
    }

    /// A page of users by id, pages numbered from 1.
    pub async fn list(&self, page: u64, page_size: u64) -> Result<UserPage, busway::es::ReadError> {
        let page = page.max(1);
        let page_size = page_size.clamp(1, 100);
        self.store
            .read(move |conn| {
                let total: i64 =
                    conn.query_row("SELECT count(*) FROM users_read_model", [], |r| r.get(0))?;
                let offset = (page - 1) * page_size;
                let users = conn
                    .prepare_cached(
                        "SELECT user_id, email, name, status, orders FROM users_read_model \
                         ORDER BY user_id LIMIT ?1 OFFSET ?2",
                    )?
                    .query_map(params![page_size as i64, offset as i64], view_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(UserPage {
                    users,
                    page,
                    page_size,
                    total: total as u64,
                })
            })
            .await
    }
}

fn view_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UserView> {
    Ok(UserView {
        user_id: row.get(0)?,
        email: row.get(1)?,
        name: row.get(2)?,
        status: row.get(3)?,
        orders: row.get::<_, i64>(4)? as u64,
    })
}

#[async_trait]
impl Projection for UsersReadModel {
    type Event = DirectoryEvent;

    fn name(&self) -> &str {
        "users_read_model"
    }

    fn handles(&self, event_type: &str) -> bool {
        event_type.starts_with("user.") || event_type == "order.created"
    }

    fn saves_checkpoint(&self) -> bool {
        true
    }

    async fn apply(
        &self,
        events: Vec<Envelope<DirectoryEvent>>,
        checkpoint: u64,
    ) -> Result<(), String> {
        self.store
            .apply_projection(self.name(), checkpoint, move |conn| {
                for envelope in &events {
                    let id = envelope.aggregate_id();
                    match &envelope.event {
                        DirectoryEvent::User(UserEvent::Registered { email, name }) => {
                            conn.prepare_cached(
                                "INSERT OR REPLACE INTO users_read_model (user_id, email, name, status) \
                                 VALUES (?1, ?2, ?3, 'active')",
                            )?
                            .execute(params![id, email, name])?;
                        }
                        DirectoryEvent::User(UserEvent::Updated { changes }) => {
                            for (field, value) in changes {
                                let sql = match field.as_str() {
                                    "name" => "UPDATE users_read_model SET name = ?2 WHERE user_id = ?1",
                                    "email" => "UPDATE users_read_model SET email = ?2 WHERE user_id = ?1",
                                    _ => continue,
                                };
                                conn.prepare_cached(sql)?
                                    .execute(params![id, value.as_str().unwrap_or_default()])?;
                            }
                        }
                        DirectoryEvent::Order(OrderEvent::Created { user_id, .. }) => {
                            conn.prepare_cached(
                                "UPDATE users_read_model SET orders = orders + 1 WHERE user_id = ?1",
                            )?
                            .execute([user_id])?;
                        }
                        DirectoryEvent::Order(OrderEvent::Cancelled { .. }) => {}
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn reset(&self) -> Result<(), String> {
        self.store
            .apply_projection(self.name(), 0, |conn| {
                conn.execute("DELETE FROM users_read_model", []).map(|_| ())
            })
            .await
            .map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------- services

/// `create_user` / `update_user` params.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserCommandParams {
    pub user_id: String,
    #[serde(flatten)]
    pub command: UserCommand,
}

/// `create_order` params.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateOrderParams {
    pub order_id: String,
    pub user_id: String,
    pub items: Vec<OrderItem>,
}

/// What a command returns: the aggregate, its new version, and the
/// position of its last event (for read-your-writes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: String,
    pub version: u64,
    pub position: u64,
    pub status: String,
}

/// `get_user` params.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetUser {
    pub user_id: String,
}

/// `list_users` params.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListUsers {
    #[serde(default = "first_page")]
    pub page: u64,
    #[serde(default = "default_page_size")]
    pub page_size: u64,
}

fn first_page() -> u64 {
    1
}
fn default_page_size() -> u64 {
    10
}

fn refused<E: std::error::Error + 'static>(e: RepositoryError<E>) -> HandlerError {
    if e.is_retryable() {
        HandlerError::new(e.to_string())
    } else {
        HandlerError::permanent(e.to_string())
    }
}

/// Registers the command handlers (on `commands`) and the query handlers
/// (on `queries`) of the domain.
pub async fn register_services(
    commands: &CommandBus,
    queries: &QueryBus,
    users: Repository<User>,
    orders: Repository<Order>,
    read_model: UsersReadModel,
) -> Result<(), SetupError> {
    let repo = users.clone();
    commands
        .register("create_user", move |p: UserCommandParams| {
            let repo = repo.clone();
            async move {
                let done = repo
                    .execute_retrying(&p.user_id, p.command, 3)
                    .await
                    .map_err(refused)?;
                Ok(CommandResult {
                    id: p.user_id,
                    version: done.version,
                    position: done.position,
                    status: done.state.status,
                })
            }
        })
        .await?;
    let repo = users;
    commands
        .register("update_user", move |p: UserCommandParams| {
            let repo = repo.clone();
            async move {
                let done = repo
                    .execute_retrying(&p.user_id, p.command, 3)
                    .await
                    .map_err(refused)?;
                Ok(CommandResult {
                    id: p.user_id,
                    version: done.version,
                    position: done.position,
                    status: done.state.status,
                })
            }
        })
        .await?;
    commands
        .register("create_order", move |p: CreateOrderParams| {
            let repo = orders.clone();
            async move {
                let command = OrderCommand::Create {
                    user_id: p.user_id,
                    items: p.items,
                };
                let done = repo.execute(&p.order_id, command).await.map_err(refused)?;
                Ok(CommandResult {
                    id: p.order_id,
                    version: done.version,
                    position: done.position,
                    status: done.state.status,
                })
            }
        })
        .await?;
    let model = read_model.clone();
    queries
        .register("get_user", move |q: GetUser| {
            let model = model.clone();
            async move {
                match model.get(&q.user_id).await.map_err(HandlerError::from)? {
                    Some(user) => Ok(user),
                    None => Err(HandlerError::permanent(format!("no user `{}`", q.user_id))),
                }
            }
        })
        .await?;
    queries
        .register("list_users", move |q: ListUsers| {
            let model = read_model.clone();
            async move { Ok(model.list(q.page, q.page_size).await?) }
        })
        .await?;
    Ok(())
}

/// Everything wired on one SQLite database: repositories announcing their
/// events, the read model's projection running, the buses linked.
pub struct Directory {
    pub bus: busway::Bus,
    pub store: SqliteEventStore,
    pub users: Repository<User>,
    pub orders: Repository<Order>,
    pub read_model: UsersReadModel,
    pub commands: CommandBus,
    pub queries: QueryBus,
    pub projection: busway::es::ProjectionHandle,
}

impl Directory {
    /// Starts the domain on the SQLite database at `path`.
    pub async fn start(path: &std::path::Path) -> anyhow::Result<Self> {
        let transport = busway::sqlite::SqliteTransport::open(path)?;
        let store = SqliteEventStore::open(transport.clone()).await?;
        let bus = busway::Bus::new(Arc::new(transport));
        let shared: Arc<dyn busway::es::EventStore> = Arc::new(store.clone());
        let users = Repository::<User>::new(shared.clone())
            .with_snapshots(busway::es::SnapshotPolicy::Every(50))
            .announcing();
        let orders = Repository::<Order>::new(shared.clone()).announcing();
        let read_model = UsersReadModel::open(store.clone()).await?;
        let projection =
            busway::es::ProjectionRunner::new(shared).spawn(Arc::new(read_model.clone()));
        let queries = QueryBus::new(&bus);
        queries.follow(&projection);
        queries
            .invalidate_on("user.*", &["get_user", "list_users"])
            .await?;
        let commands = CommandBus::new(&bus).invalidates(&queries);
        register_services(
            &commands,
            &queries,
            users.clone(),
            orders.clone(),
            read_model.clone(),
        )
        .await?;
        Ok(Self {
            bus,
            store,
            users,
            orders,
            read_model,
            commands,
            queries,
            projection,
        })
    }

    /// Stops the projection and the bus.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.projection.stop().await?;
        self.bus.shutdown().await;
        busway::Transport::close(self.store.transport()).await;
        Ok(())
    }
}
