//! `busway serve`: a live dashboard, a JSON API, Prometheus metrics and
//! health checks over HTTP, for any backend.
//!
//! A sampler reads the backend every `--interval` (queues and their counts,
//! the saga board, projection lag, the health checks) into a snapshot that
//! the page receives as server-sent events. Topic throughput is counted by
//! an observer queue bound to every topic (`busway_dashboard`): it sees a
//! copy of each event published while the dashboard runs. What a backend
//! cannot tell (RPC latency lives in the calling processes) is reported as
//! not available rather than guessed.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use busway::dead_letters::{DeadLetterFilter, DeadLetters, Replay};
use busway::event_store::EventStore;
use busway::metrics::PrometheusHandle;
use busway::saga::{OrchestratorConfig, SagaOrchestrator, SagaQueryError};
use busway::saga_store::{SagaQuery, SagaStatus, SagaStore};
use busway::{Binding, Bus, ConsumeOptions, QueueName, QueueSpec, StatsError, TopicPattern};
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::ops::settings::{parse_duration, Conn, Settings};
use crate::ops::stores::Stores;
use crate::ops::Connection;

const INDEX_HTML: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");

/// The queue that counts topic throughput (bound to `#`).
pub(crate) const OBSERVER_QUEUE: &str = "busway_dashboard";
/// How much throughput history the server keeps (and the chart shows).
const HISTORY: Duration = Duration::from_secs(300);
/// Recent failed sagas shown on the board.
const RECENT_FAILURES: usize = 20;
/// The store lists sagas oldest first: this many failed and compensated ones
/// are read to find the most recent.
const FAILURE_SCAN: usize = 10_000;

/// `busway serve`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway serve --url sqlite://busway-demo.db
  BUSWAY_TOKEN=s3cret busway serve --url amqp://guest:guest@127.0.0.1:5672/%2f --store sqlite://store.db
  busway serve --listen 0.0.0.0:8080 --token s3cret

Open http://127.0.0.1:8080/ for the dashboard. The JSON API, /metrics
(Prometheus text) and /health (200 when ready, 503 otherwise) are described
in docs/guide/dashboard.md. Reading is open; replay, purge, retry and abort
need the token as `Authorization: Bearer TOKEN`. Listening on an address
other than loopback without a token is refused.")]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    conn: Conn,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The token that allows actions (replay, purge, retry, abort).
    #[arg(long, env = "BUSWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How often the backend is read.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
}

/// Why a bind is refused: a non-loopback address needs a token.
pub(crate) fn check_exposure(listen: &SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    let has_token = token.is_some_and(|t| !t.is_empty());
    if !listen.ip().is_loopback() && !has_token {
        anyhow::bail!(
            "refusing to listen on {listen} without a token: anyone who can reach it could \
             replay, purge, retry and abort. Give --token (or BUSWAY_TOKEN), or listen on \
             127.0.0.1"
        );
    }
    Ok(())
}

/// One queue on the board.
#[derive(Clone, Debug, Serialize)]
struct QueueRow {
    queue: String,
    ready: u64,
    delayed: u64,
    in_flight: u64,
    consumers: u64,
    dead_lettered: u64,
    /// Acknowledgements per second, where the backend measures them.
    acked_per_s: Option<f64>,
}

/// What the page shows, read once per interval.
#[derive(Clone, Debug, Default, Serialize)]
struct Snapshot {
    at_ms: i64,
    backend: String,
    sample_ms: u64,
    queues: Vec<QueueRow>,
    queues_error: Option<String>,
    /// Events per second per topic over the last interval.
    topics: BTreeMap<String, f64>,
    sagas: Value,
    projections: Value,
    rpc: Value,
    circuits: Value,
    health: Value,
    actions_enabled: bool,
}

/// The throughput history: one point per interval.
#[derive(Default)]
struct History {
    points: VecDeque<(i64, BTreeMap<String, f64>, u64)>,
}

struct App {
    settings: Settings,
    connection: Connection,
    bus: Bus,
    /// The stores' connection, kept open while serving.
    stores: Option<tokio::sync::Mutex<Stores>>,
    sagas: Option<Arc<dyn SagaStore>>,
    events: Option<Arc<dyn EventStore>>,
    orchestrator: Option<SagaOrchestrator>,
    token: Option<String>,
    snapshot: watch::Sender<Arc<String>>,
    latest: Mutex<Arc<Snapshot>>,
    history: Mutex<History>,
    topic_counts: Arc<Mutex<BTreeMap<String, u64>>>,
    prometheus: PrometheusHandle,
}

type Shared = Arc<App>;

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    check_exposure(&args.listen, args.token.as_deref())?;
    let settings = args.conn.settings()?;
    let prometheus =
        busway::metrics::install_prometheus().context("installing the Prometheus recorder")?;
    let connection = Connection::open(&settings).await?;
    let bus = Bus::new(connection.transport.clone());
    let stores = match settings.store_url() {
        Ok(url) => Some(Stores::open(&url).await?),
        Err(_) => None,
    };
    // Operator calls only touch the store; the orchestrator needs a bus but
    // sends nothing on it, and does not poll (recovery off).
    let orchestrator = match &stores {
        Some(stores) => Some(SagaOrchestrator::with_config(
            Bus::new(busway::connect("memory://").await?),
            stores.sagas.clone(),
            OrchestratorConfig::default().with_recovery(false),
        )),
        None => None,
    };
    let sagas = stores.as_ref().map(|s| s.sagas.clone());
    let events = stores.as_ref().map(|s| s.events.clone());
    let stores = stores.map(tokio::sync::Mutex::new);
    let topic_counts = Arc::new(Mutex::new(BTreeMap::new()));
    start_observer(&bus, topic_counts.clone()).await?;
    let app = Arc::new(App {
        settings,
        connection,
        bus,
        stores,
        sagas,
        events,
        orchestrator,
        token: args.token.filter(|t| !t.is_empty()),
        snapshot: watch::channel(Arc::new(String::from("{}"))).0,
        latest: Mutex::new(Arc::new(Snapshot::default())),
        history: Mutex::new(History::default()),
        topic_counts,
        prometheus,
    });
    sample_once(&app, Duration::ZERO).await;
    let sampler = tokio::spawn(sampler(app.clone(), args.interval));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    eprintln!(
        "busway serve: dashboard on http://{local}/ for {} ({})",
        busway::redact_url(&app.settings.url),
        if app.token.is_some() {
            "actions need the token"
        } else {
            "read-only: no token"
        }
    );
    axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async {
            let _ = crate::demo::wait_for_signal().await;
        })
        .await
        .context("serving HTTP")?;
    sampler.abort();
    if let Some(orchestrator) = &app.orchestrator {
        orchestrator.shutdown().await;
    }
    app.bus.shutdown().await;
    app.connection.transport.close().await;
    Ok(())
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/metrics", get(prometheus))
        .route("/api/overview", get(overview))
        .route("/api/queues", get(queues))
        .route("/api/throughput", get(throughput))
        .route("/api/events", get(events))
        .route("/api/auth", get(auth))
        .route("/api/dlq/{queue}", get(dlq_list))
        .route("/api/dlq/{queue}/replay", post(dlq_replay))
        .route("/api/dlq/{queue}/purge", post(dlq_purge))
        .route("/api/sagas", get(sagas_list))
        .route("/api/sagas/{id}", get(saga_show))
        .route("/api/sagas/{id}/retry", post(saga_retry))
        .route("/api/sagas/{id}/abort", post(saga_abort))
        .with_state(app)
}

/// Binds the observer queue to every topic and counts what arrives per topic.
async fn start_observer(
    bus: &Bus,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
) -> anyhow::Result<()> {
    let transport = bus.transport().clone();
    let queue = QueueName::new(OBSERVER_QUEUE)?;
    let spec = QueueSpec::new(queue.clone())
        .with_durable(false)
        .with_message_ttl(Duration::from_secs(60));
    transport
        .declare_queue(&spec)
        .await
        .context("declaring the dashboard's observer queue")?;
    transport
        .bind(&Binding::new(queue.clone(), TopicPattern::new("#")?))
        .await
        .context("binding the dashboard's observer queue")?;
    let mut stream = transport
        .consume(&queue, ConsumeOptions::with_prefetch(256))
        .await
        .context("consuming the dashboard's observer queue")?;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = stream.next().await {
            let topic = delivery
                .topic()
                .map(|t| t.to_string())
                .unwrap_or_else(|| delivery.message().kind.clone());
            *lock(&counts).entry(topic).or_default() += 1;
            let _ = delivery.ack().await;
        }
    });
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn sampler(app: Shared, interval: Duration) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last = Instant::now();
    loop {
        ticker.tick().await;
        let elapsed = last.elapsed();
        last = Instant::now();
        sample_once(&app, elapsed).await;
        app.prometheus.run_upkeep();
    }
}

/// Reads everything once; `elapsed` since the last reading turns counts into rates.
async fn sample_once(app: &Shared, elapsed: Duration) {
    let started = Instant::now();
    let (queues, queues_error) = match read_queues(&app.connection).await {
        Ok(rows) => (rows, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let counts = std::mem::take(&mut *lock(&app.topic_counts));
    let seconds = elapsed.as_secs_f64();
    let topics: BTreeMap<String, f64> = if seconds > 0.0 {
        counts
            .into_iter()
            .map(|(t, n)| (t, n as f64 / seconds))
            .collect()
    } else {
        BTreeMap::new()
    };
    let sagas = saga_board(app).await;
    let projections = projection_lag(app).await;
    let health = app.bus.health().await;
    let circuits = app.bus.circuit_breakers();
    let mut snapshot = Snapshot {
        at_ms: busway::unix_millis(std::time::SystemTime::now()),
        backend: busway::redact_url(&app.settings.url),
        sample_ms: 0,
        queues,
        queues_error,
        topics,
        sagas,
        projections,
        rpc: json!({
            "available": false,
            "reason": "RPC latency is measured by the processes that make the calls; \
                       scrape their metrics (busway_rpc_*). Not available on this backend."
        }),
        circuits: json!({
            "available": true,
            "breakers": circuits,
            "note": "circuit breakers registered with Bus::watch_circuit_breaker in this process",
        }),
        health: serde_json::to_value(&health).unwrap_or_default(),
        actions_enabled: app.token.is_some(),
    };
    snapshot.sample_ms = started.elapsed().as_millis() as u64;
    export_metrics(&snapshot, &health);
    {
        let depth: u64 = snapshot
            .queues
            .iter()
            .map(|q| q.ready + q.delayed + q.in_flight)
            .sum();
        let mut history = lock(&app.history);
        history
            .points
            .push_back((snapshot.at_ms, snapshot.topics.clone(), depth));
        let horizon = snapshot.at_ms - HISTORY.as_millis() as i64;
        while history.points.front().is_some_and(|p| p.0 < horizon) {
            history.points.pop_front();
        }
    }
    let text = serde_json::to_string(&snapshot).unwrap_or_else(|_| "{}".into());
    *lock(&app.latest) = Arc::new(snapshot);
    app.snapshot.send_replace(Arc::new(text));
}

async fn read_queues(connection: &Connection) -> anyhow::Result<Vec<QueueRow>> {
    let names = connection
        .transport
        .list_queues()
        .await
        .context("listing the queues")?;
    let names: Vec<QueueName> = crate::ops::queues::shown(names, None, false)
        .into_iter()
        .filter(|n| n.as_str() != OBSERVER_QUEUE)
        .collect();
    let mut acked = BTreeMap::new();
    let mut broker = BTreeMap::new();
    if let Some(rabbit) = &connection.rabbitmq {
        for q in rabbit.management_queues().await? {
            if let Some(rate) = q.ack_rate {
                acked.insert(q.name.to_string(), rate);
            }
            broker.insert(q.name.to_string(), (q.unacknowledged, q.consumers));
        }
    }
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let stats = match connection.transport.queue_stats(&name).await {
            Ok(s) => s,
            Err(StatsError::QueueNotFound(_)) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the counts of {name}")),
        };
        let key = name.to_string();
        let (in_flight, consumers) = broker
            .get(&key)
            .copied()
            .unwrap_or((stats.in_flight, stats.consumers));
        rows.push(QueueRow {
            acked_per_s: acked.get(&key).copied(),
            queue: key,
            ready: stats.ready,
            delayed: stats.delayed,
            in_flight,
            consumers,
            dead_lettered: stats.dead_lettered,
        });
    }
    Ok(rows)
}

async fn saga_board(app: &Shared) -> Value {
    let Some(sagas) = &app.sagas else {
        return json!({"available": false, "reason": "no saga store: give --store (sqlite:// or postgres://). Not available on this backend."});
    };
    let counts = match sagas.count_by_status().await {
        Ok(c) => c,
        Err(e) => {
            return json!({"available": false, "reason": format!("reading the saga store: {e}")})
        }
    };
    let get = |s: SagaStatus| counts.get(&s).copied().unwrap_or(0);
    let completed = get(SagaStatus::Completed);
    let compensated = get(SagaStatus::Compensated);
    let failed = get(SagaStatus::Failed);
    let finished = completed + compensated + failed;
    let mut failures = sagas
        .list(&SagaQuery::status(SagaStatus::Failed).limit(FAILURE_SCAN))
        .await
        .unwrap_or_default();
    let mut compensations = sagas
        .list(&SagaQuery::status(SagaStatus::Compensated).limit(FAILURE_SCAN))
        .await
        .unwrap_or_default();
    failures.append(&mut compensations);
    failures.sort_by_key(|s| std::cmp::Reverse(s.updated_at_ms));
    failures.truncate(RECENT_FAILURES);
    let recent: Vec<Value> = failures
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "definition": s.definition,
                "status": s.status.as_str(),
                "error": s.error,
                "updated_at_ms": s.updated_at_ms,
            })
        })
        .collect();
    json!({
        "available": true,
        "running": get(SagaStatus::Running) + get(SagaStatus::Pending) + get(SagaStatus::Compensating),
        "completed": completed,
        "compensated": compensated,
        "failed": failed,
        "completion_rate": if finished > 0 { Some(completed as f64 / finished as f64) } else { None },
        "recent_failures": recent,
    })
}

async fn projection_lag(app: &Shared) -> Value {
    let (Some(stores), Some(events)) = (&app.stores, &app.events) else {
        return json!({"available": false, "reason": "no event store: give --store. Not available on this backend."});
    };
    let result = async {
        let names = stores.lock().await.projection_names().await?;
        let head = events.head_position().await?;
        let mut rows = Vec::new();
        for name in names {
            let checkpoint = events.load_checkpoint(&name).await?;
            rows.push(json!({
                "projection": name,
                "checkpoint": checkpoint,
                "head": head,
                "lag": head.saturating_sub(checkpoint.unwrap_or(0)),
            }));
        }
        anyhow::Ok(json!({"available": true, "head": head, "projections": rows}))
    }
    .await;
    result.unwrap_or_else(|e| json!({"available": false, "reason": format!("{e:#}")}))
}

fn export_metrics(snapshot: &Snapshot, health: &busway::health::Health) {
    for q in &snapshot.queues {
        let queue = q.queue.clone();
        metrics::gauge!("busway_queue_ready", "queue" => queue.clone()).set(q.ready as f64);
        metrics::gauge!("busway_queue_delayed", "queue" => queue.clone()).set(q.delayed as f64);
        metrics::gauge!("busway_queue_in_flight", "queue" => queue.clone()).set(q.in_flight as f64);
        metrics::gauge!("busway_queue_consumers", "queue" => queue.clone()).set(q.consumers as f64);
        metrics::gauge!("busway_queue_dead_lettered", "queue" => queue).set(q.dead_lettered as f64);
    }
    for (topic, rate) in &snapshot.topics {
        metrics::gauge!("busway_topic_events_per_second", "topic" => topic.clone()).set(*rate);
    }
    for status in ["running", "completed", "compensated", "failed"] {
        if let Some(n) = snapshot.sagas.get(status).and_then(Value::as_u64) {
            metrics::gauge!("busway_sagas", "status" => status).set(n as f64);
        }
    }
    metrics::gauge!("busway_ready").set(if health.ready { 1.0 } else { 0.0 });
}

// ---------------------------------------------------------------- handlers

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DASHBOARD_JS,
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        DASHBOARD_CSS,
    )
}

async fn health(State(app): State<Shared>) -> Response {
    let health = app.bus.health().await;
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health)).into_response()
}

async fn live(State(app): State<Shared>) -> Response {
    let health = app.bus.health().await;
    let status = if health.live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"live": health.live}))).into_response()
}

async fn prometheus(State(app): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
}

async fn overview(State(app): State<Shared>) -> impl IntoResponse {
    let text = app.snapshot.borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        (*text).clone(),
    )
}

async fn queues(State(app): State<Shared>) -> Json<Value> {
    let latest = lock(&app.latest).clone();
    Json(json!({"queues": latest.queues, "error": latest.queues_error}))
}

async fn throughput(State(app): State<Shared>) -> Json<Value> {
    let history = lock(&app.history);
    let points: Vec<Value> = history
        .points
        .iter()
        .map(|(at, topics, depth)| json!({"at_ms": at, "topics": topics, "depth": depth}))
        .collect();
    Json(json!({"points": points}))
}

async fn events(
    State(app): State<Shared>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let receiver = app.snapshot.subscribe();
    let stream = futures::stream::unfold((receiver, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let text = rx.borrow_and_update().clone();
        let event = SseEvent::default().event("snapshot").data(text.as_str());
        Some((Ok::<_, Infallible>(event), (rx, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// An action's error: status and message, as JSON.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let status = match e.downcast_ref::<SagaQueryError>() {
            Some(SagaQueryError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(SagaQueryError::NotFailed { .. }) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, format!("{e:#}"))
    }
}

/// Actions need `Authorization: Bearer TOKEN`, and a token configured at all.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.token else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "read-only: busway serve was started without --token".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token (Authorization: Bearer TOKEN)".into(),
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(app): State<Shared>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    authorize(&app, &headers).map(|()| StatusCode::NO_CONTENT)
}

/// Which dead letters: the same filters as `busway dlq`.
#[derive(Debug, Default, Deserialize)]
struct DlqParams {
    reason: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
}

impl DlqParams {
    fn filter(&self, default_limit: Option<usize>) -> DeadLetterFilter {
        let mut filter = DeadLetterFilter::default();
        filter.reason = self.reason.clone();
        filter.kind = self.kind.clone();
        filter.limit = self.limit.or(default_limit);
        filter
    }
}

fn dead_letters(app: &App, queue: &str) -> Result<DeadLetters, ApiError> {
    DeadLetters::new(app.connection.transport.clone(), queue)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn dlq_list(
    State(app): State<Shared>,
    Path(queue): Path<String>,
    Query(params): Query<DlqParams>,
) -> Result<Json<Value>, ApiError> {
    let dead = dead_letters(&app, &queue)?;
    let letters = dead
        .list(&params.filter(Some(100)))
        .await
        .map_err(anyhow::Error::new)?;
    let count = dead.count().await.map_err(anyhow::Error::new)?;
    let rows: Vec<Value> = letters
        .iter()
        .map(|l| crate::dlq::to_json(l, true))
        .collect();
    Ok(Json(json!({
        "queue": queue,
        "dead_letter_queue": dead.queue().to_string(),
        "count": count,
        "letters": rows,
    })))
}

async fn dlq_replay(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Query(params): Query<DlqParams>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let dead = dead_letters(&app, &queue)?;
    let report = dead
        .replay(&params.filter(None), &Replay::default())
        .await
        .map_err(anyhow::Error::new)?;
    Ok(Json(
        json!({"queue": queue, "replayed": report.moved, "left": report.kept}),
    ))
}

async fn dlq_purge(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Query(params): Query<DlqParams>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let dead = dead_letters(&app, &queue)?;
    let report = dead
        .purge(&params.filter(None), false)
        .await
        .map_err(anyhow::Error::new)?;
    Ok(Json(
        json!({"queue": queue, "purged": report.moved, "left": report.kept}),
    ))
}

#[derive(Debug, Deserialize)]
struct SagaParams {
    status: Option<SagaStatus>,
    #[serde(default)]
    active: bool,
    limit: Option<usize>,
}

fn orchestrator(app: &App) -> Result<&SagaOrchestrator, ApiError> {
    app.orchestrator.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no saga store: start busway serve with --store".into(),
        )
    })
}

async fn sagas_list(
    State(app): State<Shared>,
    Query(params): Query<SagaParams>,
) -> Result<Json<Value>, ApiError> {
    let orchestrator = orchestrator(&app)?;
    let mut query = SagaQuery::default().limit(params.limit.unwrap_or(100).min(1000));
    query.status = params.status;
    query.active_only = params.active;
    let sagas = orchestrator
        .list(&query)
        .await
        .map_err(anyhow::Error::new)?;
    let rows: Vec<Value> = sagas.iter().map(crate::ops::sagas::summary).collect();
    Ok(Json(json!({"sagas": rows})))
}

async fn saga_show(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let details = orchestrator(&app)?
        .show(&id)
        .await
        .map_err(anyhow::Error::new)?;
    Ok(Json(
        json!({"saga": details.saga, "history": details.history}),
    ))
}

async fn saga_retry(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let sagas = app.sagas.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no saga store: start busway serve with --store".into(),
        )
    })?;
    crate::ops::sagas::retry(&**sagas, &id, "from the dashboard").await?;
    Ok(Json(json!({"id": id, "status": "compensating"})))
}

#[derive(Debug, Default, Deserialize)]
struct AbortBody {
    reason: Option<String>,
}

async fn saga_abort(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let body: AbortBody = if body.is_empty() {
        AbortBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the body: {e}")))?
    };
    let reason = body
        .reason
        .unwrap_or_else(|| "aborted from the dashboard".into());
    orchestrator(&app)?
        .abort(&id, &reason)
        .await
        .map_err(anyhow::Error::new)?;
    Ok(Json(
        json!({"id": id, "status": "failed", "reason": reason}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_needs_a_token_off_loopback() {
        let public: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        let loopback: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        assert!(check_exposure(&public, None).is_err());
        assert!(check_exposure(&public, Some("")).is_err());
        assert!(check_exposure(&public, Some("s3cret")).is_ok());
        assert!(check_exposure(&loopback, None).is_ok());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
