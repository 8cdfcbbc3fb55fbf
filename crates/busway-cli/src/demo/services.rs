//! The demo's services on one bus: users, notifications, workers, audit and
//! stats (orders are in [`super::orders`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use busway::es::{EventStore, ProjectionHandle, ProjectionRunner, ProjectionStatus, Repository};
use busway::saga::SagaOrchestrator;
use busway::saga_store::SagaStore;
use busway::sqlite::rusqlite::params;
use busway::sqlite::{SqliteEventStore, SqliteSagaStore, SqliteTransport, WriteError};
use busway::{Bus, Event, HandlerError, RetryPolicy, Transport};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::domain::{ListUsers, User, UserCommand, UsersReadModel};
use super::orders;

/// Deliveries of a task before it is dead-lettered: a `@flaky.test`
/// address (two failures) gets through, a `@bounce.test` one does not.
pub(crate) const EMAIL_ATTEMPTS: u32 = 3;
/// How many times a `@flaky.test` email fails before it is sent.
const FLAKY_FAILURES: u32 = 2;
/// The event subscription groups (durable queues) of the demo.
pub(crate) const NOTIFICATIONS: &str = "notification_service";
/// The audit log's group: every event.
pub(crate) const AUDIT: &str = "audit_service";
/// The dead-letter queues the stats count.
pub(crate) const DEAD_LETTER_SOURCES: [&str; 3] = [busway::TASK_QUEUE, NOTIFICATIONS, AUDIT];

/// What the services have done since this process started.
#[derive(Debug, Default)]
pub(crate) struct DemoState {
    pub(crate) users_registered: AtomicU64,
    pub(crate) emails_sent: AtomicU64,
    pub(crate) email_failures: AtomicU64,
    pub(crate) reports_generated: AtomicU64,
    pub(crate) notifications: AtomicU64,
    pub(crate) orders_created: AtomicU64,
    pub(crate) orders_completed: AtomicU64,
    pub(crate) orders_compensated: AtomicU64,
    pub(crate) orders_failed: AtomicU64,
    /// Events appended to the audit log, by type.
    pub(crate) audited: Mutex<BTreeMap<String, u64>>,
    /// Emails sent, by address.
    pub(crate) sent_to: Mutex<HashMap<String, u64>>,
    /// Reports generated, by `params.run` (the scenario's tag).
    pub(crate) reports: Mutex<HashMap<String, u64>>,
    /// Failed attempts of `@flaky.test` emails, by address and subject.
    flaky: Mutex<HashMap<(String, String), u32>>,
    /// The tasks announcing the end of order sagas.
    pub(crate) watchers: Mutex<JoinSet<()>>,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running system.
pub(crate) struct System {
    pub(crate) bus: Bus,
    pub(crate) state: Arc<DemoState>,
    pub(crate) orchestrator: SagaOrchestrator,
    projection: ProjectionHandle,
    /// The stores' database (also the bus's transport on `sqlite://`).
    store: SqliteTransport,
}

impl System {
    /// Opens the transport `url` and the stores (in `store`, or in the
    /// transport's SQLite file when `None`) and starts every service.
    pub(crate) async fn start(url: &str, store: Option<&str>) -> anyhow::Result<Self> {
        let (bus, store) = match store {
            None => {
                let transport = SqliteTransport::open_url(url)
                    .with_context(|| format!("opening {}", busway::redact_url(url)))?;
                (Bus::new(Arc::new(transport.clone())), transport)
            }
            Some(store_url) => {
                let store = SqliteTransport::open_url(store_url)
                    .with_context(|| format!("opening the store {store_url}"))?;
                let bus = Bus::connect(url)
                    .await
                    .with_context(|| format!("connecting to {}", busway::redact_url(url)))?;
                (bus, store)
            }
        };
        let state = Arc::new(DemoState::default());
        let events = SqliteEventStore::open(store.clone()).await?;
        let shared: Arc<dyn EventStore> = Arc::new(events.clone());
        let users = Repository::<User>::new(shared.clone());
        let read_model = UsersReadModel::open(events.clone()).await?;
        let projection = ProjectionRunner::new(shared)
            .with_poll_interval(Duration::from_millis(50))
            .spawn(Arc::new(read_model.clone()));
        let sagas: Arc<dyn SagaStore> = Arc::new(SqliteSagaStore::open(store.clone()).await?);

        register_audit(&bus, &store, &state).await?;
        register_user_service(&bus, users, read_model.clone(), projection.watch(), &state).await?;
        register_notifications(&bus, read_model, &state).await?;
        register_workers(&bus, &state).await?;
        let orchestrator = orders::start(&bus, sagas, &store, &state).await?;
        register_stats(&bus, &state).await?;
        Ok(Self {
            bus,
            state,
            orchestrator,
            projection,
            store,
        })
    }

    /// Stops the services: sagas stop after their current step (they resume
    /// at the next start), handlers that are running finish, deliveries not
    /// started stay in their queues; then the stores close.
    pub(crate) async fn stop(self) -> anyhow::Result<String> {
        self.orchestrator.shutdown().await;
        // Announcements being published finish; the others are made at the next start.
        let mut watchers = std::mem::take(&mut *lock(&self.state.watchers));
        while watchers.join_next().await.is_some() {}
        self.bus.shutdown().await;
        let stats = self.bus.stats();
        let position = self.projection.stop().await?;
        self.store.close().await;
        Ok(format!(
            "read model at position {position}; {} retried, {} dead-lettered, {} malformed",
            stats.retried, stats.dead_lettered, stats.malformed
        ))
    }
}

// ---------------------------------------------------------------- users

#[derive(Deserialize)]
struct RegisterUser {
    email: String,
    name: String,
}

#[derive(Deserialize)]
struct GetUserInfo {
    user_id: String,
}

async fn register_user_service(
    bus: &Bus,
    users: Repository<User>,
    read_model: UsersReadModel,
    progress: watch::Receiver<ProjectionStatus>,
    state: &Arc<DemoState>,
) -> anyhow::Result<()> {
    let (b, s) = (bus.clone(), state.clone());
    bus.register_request_handler("user_service", "register_user", move |p: RegisterUser| {
        let (bus, state, users, mut progress) =
            (b.clone(), s.clone(), users.clone(), progress.clone());
        async move {
            let user_id = format!("user_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let command = UserCommand::Register {
                email: p.email.clone(),
                name: p.name.clone(),
            };
            let done = users.execute(&user_id, command).await.map_err(|e| {
                if e.is_retryable() {
                    HandlerError::new(e.to_string())
                } else {
                    HandlerError::permanent(e.to_string())
                }
            })?;
            let event = Event::new(
                "user.registered",
                user_id.clone(),
                json!({"user_id": user_id, "email": p.email, "name": p.name}),
            )
            .with_version(done.version);
            bus.publish_event(&event).await?;
            bump(&state.users_registered);
            // Read your writes: reply once the read model has the user.
            let caught_up = progress.wait_for(|s| s.position >= done.position);
            let _ = tokio::time::timeout(Duration::from_secs(5), caught_up).await;
            Ok(json!({ "user_id": user_id }))
        }
    })
    .await?;
    let model = read_model.clone();
    bus.register_request_handler("user_service", "get_user_info", move |q: GetUserInfo| {
        let model = model.clone();
        async move {
            match model.get(&q.user_id).await? {
                Some(user) => Ok(user),
                None => Err(HandlerError::permanent("user not found")),
            }
        }
    })
    .await?;
    bus.register_request_handler("user_service", "list_users", move |q: ListUsers| {
        let model = read_model.clone();
        async move { Ok(model.list(q.page, q.page_size).await?) }
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- notifications

#[derive(Deserialize)]
struct Registered {
    email: String,
    name: String,
}

#[derive(Deserialize)]
struct OrderNotice {
    order_id: String,
    user_id: String,
}

async fn register_notifications(
    bus: &Bus,
    read_model: UsersReadModel,
    state: &Arc<DemoState>,
) -> anyhow::Result<()> {
    let (b, s) = (bus.clone(), state.clone());
    bus.register_event_handler("user.registered", NOTIFICATIONS, move |e: Event<Registered>| {
        let (bus, state) = (b.clone(), s.clone());
        async move {
            bus.submit_task(
                "send_email",
                &json!({
                    "email": e.data.email,
                    "subject": "Welcome to the busway shop",
                    "content": format!("Hello {}, your account {} is ready.", e.data.name, e.aggregate_id),
                }),
            )
            .await?;
            bump(&state.notifications);
            Ok(())
        }
    })
    .await?;
    for (topic, what) in [("order.paid", "paid"), ("order.shipped", "shipped")] {
        let (b, s, model) = (bus.clone(), state.clone(), read_model.clone());
        bus.register_event_handler(topic, NOTIFICATIONS, move |e: Event<OrderNotice>| {
            let (bus, state, model) = (b.clone(), s.clone(), model.clone());
            async move {
                let Some(user) = model.get(&e.data.user_id).await? else {
                    return Err(HandlerError::permanent(format!(
                        "order {} of unknown user {}: nobody to notify",
                        e.data.order_id, e.data.user_id
                    )));
                };
                bus.submit_task(
                    "send_email",
                    &json!({
                        "email": user.email,
                        "subject": format!("Order {} {what}", e.data.order_id),
                        "content": format!("Hello {}, your order {} is {what}.", user.name, e.data.order_id),
                    }),
                )
                .await?;
                bump(&state.notifications);
                Ok(())
            }
        })
        .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- workers

#[derive(Deserialize)]
struct SendEmail {
    email: String,
    subject: String,
    #[allow(dead_code)]
    content: String,
}

#[derive(Deserialize)]
struct GenerateReport {
    report_type: String,
    #[serde(default)]
    params: Value,
}

async fn register_workers(bus: &Bus, state: &Arc<DemoState>) -> anyhow::Result<()> {
    let (b, s) = (bus.clone(), state.clone());
    bus.register_task_handler("send_email", move |task: SendEmail| {
        let (bus, state) = (b.clone(), s.clone());
        async move {
            let domain = task.email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if domain == "bounce.test" {
                bump(&state.email_failures);
                return Err(HandlerError::new(format!(
                    "{}: mailbox unavailable (bounce.test always bounces)",
                    task.email
                )));
            }
            if domain == "flaky.test" {
                let mut flaky = lock(&state.flaky);
                let failures = flaky
                    .entry((task.email.clone(), task.subject.clone()))
                    .or_insert(0);
                if *failures < FLAKY_FAILURES {
                    *failures += 1;
                    bump(&state.email_failures);
                    return Err(HandlerError::new(format!(
                        "{}: mail server busy (failure {} of {FLAKY_FAILURES})",
                        task.email, failures
                    )));
                }
            }
            let event = Event::new(
                "notification.email_sent",
                task.email.clone(),
                json!({"email": task.email, "subject": task.subject}),
            );
            bus.publish_event(&event).await?;
            bump(&state.emails_sent);
            *lock(&state.sent_to).entry(task.email).or_insert(0) += 1;
            Ok(())
        }
    });
    let (b, s) = (bus.clone(), state.clone());
    bus.register_task_handler("generate_report", move |task: GenerateReport| {
        let (bus, state) = (b.clone(), s.clone());
        async move {
            let report_id = format!("report_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let event = Event::new(
                "report.generated",
                report_id.clone(),
                json!({"report_id": report_id, "report_type": task.report_type, "params": task.params}),
            );
            bus.publish_event(&event).await?;
            bump(&state.reports_generated);
            let run = task.params["run"].as_str().unwrap_or_default().to_owned();
            *lock(&state.reports).entry(run).or_insert(0) += 1;
            Ok(())
        }
    });
    bus.start_task_workers()
        .workers(2)
        .concurrency(4)
        .retry(
            RetryPolicy::default()
                .with_max_attempts(EMAIL_ATTEMPTS)
                .with_backoff(Duration::from_millis(100), Duration::from_millis(400)),
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- audit

const AUDIT_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS demo_audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    data TEXT NOT NULL,
    timestamp TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS demo_audit_log_by_aggregate ON demo_audit_log (aggregate_id, seq);";

/// An entry of the audit log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AuditEntry {
    pub(crate) seq: i64,
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) data: Value,
    pub(crate) timestamp: String,
}

#[derive(Deserialize)]
struct GetAuditLog {
    aggregate_id: String,
}

async fn register_audit(
    bus: &Bus,
    store: &SqliteTransport,
    state: &Arc<DemoState>,
) -> anyhow::Result<()> {
    store
        .write(|tx| {
            tx.connection().execute_batch(AUDIT_SCHEMA)?;
            Ok::<_, WriteError>(())
        })
        .await?;
    let (db, s) = (store.clone(), state.clone());
    // The audit log is a projection of the event bus: appended once per
    // event id, so a redelivered event is not logged twice.
    bus.register_event_handler("#", AUDIT, move |e: Event| {
        let (db, state) = (db.clone(), s.clone());
        async move {
            let event_type = e.event_type.clone();
            let inserted = db
                .write(move |tx| {
                    let n = tx
                        .connection()
                        .prepare_cached(
                            "INSERT OR IGNORE INTO demo_audit_log \
                             (event_id, event_type, aggregate_id, data, timestamp) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            e.event_id,
                            e.event_type,
                            e.aggregate_id,
                            e.data.to_string(),
                            e.timestamp
                        ])?;
                    Ok::<_, WriteError>(n > 0)
                })
                .await?;
            if inserted {
                *lock(&state.audited).entry(event_type).or_insert(0) += 1;
            }
            Ok(())
        }
    })
    .concurrency(4)
    .await?;
    let db = store.clone();
    bus.register_request_handler("audit_service", "get_audit_log", move |q: GetAuditLog| {
        let db = db.clone();
        async move {
            let entries = db
                .read(move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "SELECT seq, event_id, event_type, aggregate_id, data, timestamp \
                         FROM demo_audit_log WHERE aggregate_id = ?1 ORDER BY seq",
                    )?;
                    let rows = stmt.query_map([&q.aggregate_id], |r| {
                        let data: String = r.get(4)?;
                        Ok(AuditEntry {
                            seq: r.get(0)?,
                            event_id: r.get(1)?,
                            event_type: r.get(2)?,
                            aggregate_id: r.get(3)?,
                            data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
                            timestamp: r.get(5)?,
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await?;
            Ok(entries)
        }
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- stats

/// What `stats_service.get_stats` returns.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Stats {
    pub(crate) users_registered: u64,
    pub(crate) emails_sent: u64,
    pub(crate) email_failures: u64,
    pub(crate) reports_generated: u64,
    pub(crate) orders_created: u64,
    pub(crate) orders_completed: u64,
    pub(crate) orders_compensated: u64,
    pub(crate) orders_failed: u64,
    /// Messages now in the dead-letter queues of `task_queue` and the event groups.
    pub(crate) dead_letters: u64,
    /// Events appended to the audit log, by type.
    pub(crate) events_audited: BTreeMap<String, u64>,
}

async fn register_stats(bus: &Bus, state: &Arc<DemoState>) -> anyhow::Result<()> {
    let (b, s) = (bus.clone(), state.clone());
    bus.register_request_handler("stats_service", "get_stats", move |_q: Value| {
        let (bus, state) = (b.clone(), s.clone());
        async move {
            let mut dead_letters = 0;
            for queue in DEAD_LETTER_SOURCES {
                dead_letters += bus.dead_letters(queue)?.count().await?;
            }
            Ok(Stats {
                users_registered: get(&state.users_registered),
                emails_sent: get(&state.emails_sent),
                email_failures: get(&state.email_failures),
                reports_generated: get(&state.reports_generated),
                orders_created: get(&state.orders_created),
                orders_completed: get(&state.orders_completed),
                orders_compensated: get(&state.orders_compensated),
                orders_failed: get(&state.orders_failed),
                dead_letters,
                events_audited: lock(&state.audited).clone(),
            })
        }
    })
    .await?;
    Ok(())
}
