//! The scripted scenario of `busway demo` and its report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use busway::dead_letters::DeadLetterFilter;
use busway::{Message, Publish, QueueName, TASK_QUEUE};
use serde::Serialize;
use serde_json::{json, Value};

use super::orders::{Item, OrderInput};
use super::services::{get, lock, Stats, System, EMAIL_ATTEMPTS};

/// How long the scenario waits for the asynchronous work to settle.
const PATIENCE: Duration = Duration::from_secs(60);
/// How long one RPC call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Latencies and outcomes of the calls to one method.
#[derive(Debug, Default, Serialize)]
pub(crate) struct RpcFigures {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) p50_ms: f64,
    pub(crate) max_ms: f64,
    #[serde(skip)]
    samples: Vec<f64>,
}

/// A malformed or impossible request and the error it got.
#[derive(Debug, Serialize)]
pub(crate) struct Rejected {
    pub(crate) call: String,
    pub(crate) params: Value,
    /// The error response; `None` if the call unexpectedly succeeded.
    pub(crate) error: Option<String>,
}

/// One order of the script.
#[derive(Debug, Serialize)]
pub(crate) struct OrderOutcome {
    pub(crate) order_id: String,
    pub(crate) user_id: String,
    pub(crate) saga_id: String,
    pub(crate) scenario: &'static str,
    pub(crate) expected: &'static str,
    pub(crate) status: String,
    pub(crate) error: Option<String>,
}

/// Orders of the script, by outcome.
#[derive(Debug, Default, Serialize)]
pub(crate) struct OrderFigures {
    pub(crate) created: u64,
    pub(crate) completed: u64,
    pub(crate) compensated: u64,
    /// Orders that ended in another status, or did not end in time.
    pub(crate) unfinished: u64,
    pub(crate) orders: Vec<OrderOutcome>,
}

/// Emails of the script: every one is sent or dead-lettered.
#[derive(Debug, Default, Serialize)]
pub(crate) struct EmailFigures {
    /// Emails the notifications should have queued (welcome + paid + shipped).
    pub(crate) expected: u64,
    pub(crate) expected_sent: u64,
    pub(crate) expected_dead_lettered: u64,
    pub(crate) sent: u64,
    pub(crate) dead_lettered: u64,
    /// Expected but neither sent nor dead-lettered.
    pub(crate) lost: u64,
    /// Failed attempts that were retried (`@flaky.test` twice per email,
    /// `@bounce.test` until the retry limit).
    pub(crate) failed_attempts: u64,
    pub(crate) max_attempts: u32,
}

/// Tasks other than emails.
#[derive(Debug, Default, Serialize)]
pub(crate) struct TaskFigures {
    pub(crate) reports_generated: u64,
    /// Malformed tasks submitted (unknown type, missing fields, bad JSON).
    pub(crate) malformed_submitted: u64,
    pub(crate) malformed_dead_lettered: u64,
    /// Dead-letter reasons of the malformed tasks.
    pub(crate) reasons: Vec<String>,
}

/// What the bus counted.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BusFigures {
    pub(crate) retried: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) malformed: u64,
    pub(crate) rpc_errors: u64,
    pub(crate) panics: u64,
}

/// The report of one `busway demo` run.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) url: String,
    pub(crate) store: String,
    /// The tag in this run's ids and addresses.
    pub(crate) run: String,
    pub(crate) elapsed_ms: u64,
    pub(crate) users_registered: u64,
    pub(crate) users_listed: u64,
    pub(crate) rpc: BTreeMap<String, RpcFigures>,
    pub(crate) rejected: Vec<Rejected>,
    pub(crate) orders: OrderFigures,
    pub(crate) emails: EmailFigures,
    pub(crate) tasks: TaskFigures,
    /// Events appended to the audit log (every event reaches `audit_service`;
    /// `user.registered`, `order.paid`, `order.shipped` also `notification_service`).
    pub(crate) events: BTreeMap<String, u64>,
    /// Notifications queued by `notification_service`.
    pub(crate) notifications: u64,
    /// `audit_service.get_audit_log` for the first completed order.
    pub(crate) audit_sample: Vec<String>,
    /// `stats_service.get_stats` at the end.
    pub(crate) stats: Stats,
    pub(crate) bus: BusFigures,
}

struct Client {
    bus: busway::Bus,
    rpc: BTreeMap<String, RpcFigures>,
}

impl Client {
    async fn call(
        &mut self,
        service: &str,
        method: &str,
        params: &Value,
    ) -> Result<Value, busway::RpcError> {
        let start = Instant::now();
        let result = self
            .bus
            .request::<Value>(service, method, params)
            .timeout(RPC_TIMEOUT)
            .await;
        let figures = self.rpc.entry(format!("{service}.{method}")).or_default();
        figures.calls += 1;
        figures.errors += u64::from(result.is_err());
        figures.samples.push(start.elapsed().as_secs_f64() * 1000.0);
        result
    }

    async fn rejected(&mut self, service: &str, method: &str, params: Value) -> Rejected {
        let error = self.call(service, method, &params).await.err();
        Rejected {
            call: format!("{service}.{method}"),
            params,
            error: error.map(|e| e.to_string()),
        }
    }
}

/// Who orders, the order id, its items and amount, what it shows, and the
/// status it should end in.
type ScriptedOrder<'a> = (
    &'a Person,
    String,
    Vec<Item>,
    f64,
    &'static str,
    &'static str,
);

struct Person {
    name: &'static str,
    email: String,
    user_id: String,
}

/// Starts the services on `url`, runs the script, stops, and reports.
pub(crate) async fn run(url: &str, store: Option<&str>) -> anyhow::Result<Report> {
    let started = Instant::now();
    let system = System::start(url, store).await?;
    let result = script(&system, url, store, started).await;
    let stopped = system.stop().await;
    let report = result?;
    stopped?;
    Ok(report)
}

async fn script(
    system: &System,
    url: &str,
    store: Option<&str>,
    started: Instant,
) -> anyhow::Result<Report> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut client = Client {
        bus: system.bus.clone(),
        rpc: BTreeMap::new(),
    };

    // Users register (RPC); each registration fans out `user.registered`.
    let mut people = Vec::new();
    for (name, email) in [
        ("Ann", format!("ann.{run}@example.com")),
        ("Bob", format!("bob.{run}@example.com")),
        ("Flo", format!("flo.{run}@flaky.test")),
        ("Bo", format!("bo.{run}@bounce.test")),
    ] {
        let reply = client
            .call(
                "user_service",
                "register_user",
                &json!({"email": email, "name": name}),
            )
            .await
            .with_context(|| format!("register_user {email}"))?;
        let user_id = reply["user_id"]
            .as_str()
            .context("register_user replied without a user_id")?
            .to_owned();
        people.push(Person {
            name,
            email,
            user_id,
        });
    }
    for person in &people {
        let user = client
            .call(
                "user_service",
                "get_user_info",
                &json!({"user_id": person.user_id}),
            )
            .await
            .with_context(|| format!("get_user_info {}", person.user_id))?;
        anyhow::ensure!(
            user["email"] == person.email.as_str() && user["name"] == person.name,
            "get_user_info {} returned {user}",
            person.user_id
        );
    }
    let page = client
        .call(
            "user_service",
            "list_users",
            &json!({"page": 1, "page_size": 100}),
        )
        .await?;
    let users_listed = page["total"].as_u64().unwrap_or_default();

    // Orders: each starts a saga; three complete, three are compensated.
    let (ann, bob, flo, bo) = (&people[0], &people[1], &people[2], &people[3]);
    let item = |id: &str, quantity: u32| Item {
        id: id.to_owned(),
        quantity,
    };
    let script: Vec<ScriptedOrder<'_>> = vec![
        (
            ann,
            format!("order_{run}_1"),
            vec![item("item1", 5)],
            299.99,
            "completes",
            "COMPLETED",
        ),
        (
            flo,
            format!("order_{run}_2"),
            vec![item("item2", 1)],
            49.5,
            "completes; flaky emails retried",
            "COMPLETED",
        ),
        (
            bo,
            format!("order_{run}_3"),
            vec![item("item3", 2)],
            120.0,
            "completes; emails bounce",
            "COMPLETED",
        ),
        (
            bob,
            format!("order_{run}_4"),
            vec![item("item1", 500)],
            299.99,
            "out of stock: order cancelled",
            "COMPENSATED",
        ),
        (
            bob,
            format!("order_{run}_5"),
            vec![item("item4", 1)],
            25_000.0,
            "over the payment limit: inventory released, order cancelled",
            "COMPENSATED",
        ),
        (
            ann,
            format!("existing_order_{run}"),
            vec![item("item1", 1)],
            10.0,
            "order exists already: nothing to undo",
            "COMPENSATED",
        ),
    ];
    let mut orders = OrderFigures::default();
    for (person, order_id, items, amount, scenario, expected) in script {
        let input = OrderInput {
            order_id: order_id.clone(),
            user_id: person.user_id.clone(),
            items,
            amount,
        };
        let reply = client
            .call(
                "order_service",
                "create_order",
                &serde_json::to_value(&input)?,
            )
            .await
            .with_context(|| format!("create_order {order_id}"))?;
        orders.created += 1;
        orders.orders.push(OrderOutcome {
            order_id,
            user_id: person.user_id.clone(),
            saga_id: reply["saga_id"].as_str().unwrap_or_default().to_owned(),
            scenario,
            expected,
            status: reply["status"].as_str().unwrap_or_default().to_owned(),
            error: None,
        });
    }

    // A report task, and malformed input: error replies and dead letters.
    system
        .bus
        .submit_task(
            "generate_report",
            &json!({"report_type": "daily_sales", "params": {"run": run}}),
        )
        .await?;
    let rejected = vec![
        client
            .rejected(
                "user_service",
                "register_user",
                json!({"email": format!("x.{run}@example.com")}),
            )
            .await,
        client
            .rejected(
                "user_service",
                "register_user",
                json!({"email": "not-an-address", "name": "X"}),
            )
            .await,
        client
            .rejected(
                "user_service",
                "delete_user",
                json!({"user_id": ann.user_id}),
            )
            .await,
        client
            .rejected(
                "user_service",
                "get_user_info",
                json!({"user_id": format!("user_nobody_{run}")}),
            )
            .await,
        client
            .rejected(
                "order_service",
                "create_order",
                json!({"order_id": format!("order_{run}_x")}),
            )
            .await,
        client
            .rejected(
                "order_service",
                "get_order",
                json!({"order_id": format!("order_{run}_missing")}),
            )
            .await,
    ];
    system
        .bus
        .submit_task("resize_image", &json!({"run": run}))
        .await?;
    system
        .bus
        .submit_task("send_email", &json!({"run": run}))
        .await?;
    let mut bad_json = Message::new(
        "send_email",
        format!("{{\"type\": \"send_email\", run {run}"),
    );
    bad_json.content_type = busway::CONTENT_TYPE_JSON.into();
    system
        .bus
        .transport()
        .publish(Publish::to_queue(QueueName::new(TASK_QUEUE)?, bad_json))
        .await?;
    let malformed_submitted = 3;

    // Wait for every saga to end.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut pending = 0;
        for order in &mut orders.orders {
            if order.status == "COMPLETED" || order.status == "COMPENSATED" {
                continue;
            }
            let reply = client
                .call(
                    "order_service",
                    "get_order",
                    &json!({"order_id": order.order_id}),
                )
                .await?;
            order.status = reply["status"].as_str().unwrap_or_default().to_owned();
            order.error = reply["error"].as_str().map(str::to_owned);
            if order.status != "COMPLETED" && order.status != "COMPENSATED" {
                pending += 1;
            }
        }
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for order in &orders.orders {
        match order.status.as_str() {
            "COMPLETED" => orders.completed += 1,
            "COMPENSATED" => orders.compensated += 1,
            _ => orders.unfinished += 1,
        }
    }

    // Emails: a welcome per user, paid + shipped per completed order.
    let mut expected: BTreeMap<&str, u64> = people.iter().map(|p| (p.email.as_str(), 1)).collect();
    for order in orders.orders.iter().filter(|o| o.status == "COMPLETED") {
        if let Some(person) = people.iter().find(|p| p.user_id == order.user_id) {
            *expected.entry(person.email.as_str()).or_default() += 2;
        }
    }
    let bounces = |email: &str| email.ends_with("@bounce.test");
    let mut emails = EmailFigures {
        expected: expected.values().sum(),
        expected_sent: expected
            .iter()
            .filter(|(e, _)| !bounces(e))
            .map(|(_, n)| n)
            .sum(),
        expected_dead_lettered: expected
            .iter()
            .filter(|(e, _)| bounces(e))
            .map(|(_, n)| n)
            .sum(),
        max_attempts: EMAIL_ATTEMPTS,
        ..EmailFigures::default()
    };
    let mut tasks = TaskFigures {
        malformed_submitted,
        ..TaskFigures::default()
    };
    let dead = system.bus.dead_letters(TASK_QUEUE)?;
    let first_completed = orders
        .orders
        .iter()
        .find(|o| o.status == "COMPLETED")
        .map(|o| o.order_id.clone());
    let mut audit_sample = Vec::new();
    loop {
        let sent_to = lock(&system.state.sent_to).clone();
        emails.sent = expected
            .keys()
            .map(|e| sent_to.get(*e).copied().unwrap_or(0))
            .sum();
        emails.dead_lettered = 0;
        tasks.malformed_dead_lettered = 0;
        tasks.reasons.clear();
        for letter in dead.list(&DeadLetterFilter::default()).await? {
            let body = String::from_utf8_lossy(&letter.message.payload).into_owned();
            if !body.contains(run.as_str()) {
                continue; // another run's
            }
            let email = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["params"]["email"].as_str().map(str::to_owned));
            match email {
                Some(email) if expected.contains_key(email.as_str()) => emails.dead_lettered += 1,
                _ => {
                    tasks.malformed_dead_lettered += 1;
                    tasks.reasons.push(letter.reason.unwrap_or_default());
                }
            }
        }
        tasks.reports_generated = lock(&system.state.reports)
            .get(run.as_str())
            .copied()
            .unwrap_or(0);
        if let Some(order_id) = &first_completed {
            let log = client
                .call(
                    "audit_service",
                    "get_audit_log",
                    &json!({"aggregate_id": order_id}),
                )
                .await?;
            audit_sample = log
                .as_array()
                .map(|entries| {
                    entries
                        .iter()
                        .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
        }
        let settled = emails.sent + emails.dead_lettered >= emails.expected
            && tasks.malformed_dead_lettered >= malformed_submitted
            && tasks.reports_generated >= 1
            && (first_completed.is_none() || audit_sample.iter().any(|t| t == "order.shipped"));
        if settled || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    emails.lost = emails
        .expected
        .saturating_sub(emails.sent + emails.dead_lettered);
    emails.failed_attempts = get(&system.state.email_failures);

    let stats: Stats = serde_json::from_value(
        client
            .call("stats_service", "get_stats", &json!({}))
            .await?,
    )?;
    for figures in client.rpc.values_mut() {
        figures.samples.sort_by(f64::total_cmp);
        let n = figures.samples.len();
        if n > 0 {
            figures.p50_ms = round(figures.samples[n / 2]);
            figures.max_ms = round(figures.samples[n - 1]);
        }
    }
    let bus = system.bus.stats();
    Ok(Report {
        url: busway::redact_url(url),
        store: store.map_or_else(|| "the transport's SQLite file".to_owned(), str::to_owned),
        run,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        users_registered: people.len() as u64,
        users_listed,
        rpc: client.rpc,
        rejected,
        orders,
        emails,
        tasks,
        events: lock(&system.state.audited).clone(),
        notifications: get(&system.state.notifications),
        audit_sample,
        stats,
        bus: BusFigures {
            retried: bus.retried,
            dead_lettered: bus.dead_lettered,
            malformed: bus.malformed,
            rpc_errors: bus.rpc_errors,
            panics: bus.panics,
        },
    })
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

impl Report {
    /// What is wrong with the run, if anything.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for order in &self.orders.orders {
            if order.status != order.expected {
                problems.push(format!(
                    "order {} ended {} (expected {})",
                    order.order_id, order.status, order.expected
                ));
            }
        }
        let e = &self.emails;
        if e.lost > 0 || e.sent != e.expected_sent || e.dead_lettered != e.expected_dead_lettered {
            problems.push(format!(
                "emails: {} sent of {}, {} dead-lettered of {}, {} lost",
                e.sent, e.expected_sent, e.dead_lettered, e.expected_dead_lettered, e.lost
            ));
        }
        if self.tasks.malformed_dead_lettered != self.tasks.malformed_submitted {
            problems.push(format!(
                "malformed tasks: {} dead-lettered of {}",
                self.tasks.malformed_dead_lettered, self.tasks.malformed_submitted
            ));
        }
        if self.tasks.reports_generated != 1 {
            problems.push(format!(
                "{} reports generated (expected 1)",
                self.tasks.reports_generated
            ));
        }
        for r in self.rejected.iter().filter(|r| r.error.is_none()) {
            problems.push(format!("{} {} was accepted", r.call, r.params));
        }
        if self.bus.panics > 0 {
            problems.push(format!("{} handler panics", self.bus.panics));
        }
        problems
    }

    /// Whether every order, email and task ended as the script expects.
    pub(crate) fn is_consistent(&self) -> bool {
        self.problems().is_empty()
    }

    /// The report as text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "busway demo on {} (stores: {}), run {}",
            self.url, self.store, self.run
        )?;
        writeln!(out)?;
        writeln!(out, "Request-response (RPC)")?;
        writeln!(
            out,
            "  {:<34} {:>6} {:>7} {:>9} {:>9}",
            "method", "calls", "errors", "p50 ms", "max ms"
        )?;
        for (name, f) in &self.rpc {
            writeln!(
                out,
                "  {:<34} {:>6} {:>7} {:>9.2} {:>9.2}",
                name, f.calls, f.errors, f.p50_ms, f.max_ms
            )?;
        }
        writeln!(
            out,
            "  {} users registered (event-sourced), {} in the read model",
            self.users_registered, self.users_listed
        )?;
        writeln!(out, "  rejected as expected:")?;
        for r in &self.rejected {
            writeln!(
                out,
                "    {:<30} {}",
                r.call,
                r.error.as_deref().unwrap_or("ACCEPTED (unexpected)")
            )?;
        }
        writeln!(out)?;
        writeln!(out, "Publish-subscribe (events, each to audit_service; user.registered, order.paid and order.shipped also to notification_service)")?;
        for (event_type, n) in &self.events {
            writeln!(out, "  {event_type:<28} {n:>5}")?;
        }
        writeln!(
            out,
            "  {} notifications queued as send_email tasks",
            self.notifications
        )?;
        writeln!(
            out,
            "  audit log of the first completed order: {}",
            self.audit_sample.join(" → ")
        )?;
        writeln!(out)?;
        let e = &self.emails;
        writeln!(
            out,
            "Work queue (task_queue, {} attempts per task)",
            e.max_attempts
        )?;
        writeln!(
            out,
            "  emails: {} expected, {} sent, {} dead-lettered (bounce.test), {} lost",
            e.expected, e.sent, e.dead_lettered, e.lost
        )?;
        writeln!(
            out,
            "  {} failed attempts retried with backoff (flaky.test fails twice, then succeeds)",
            e.failed_attempts
        )?;
        writeln!(out, "  reports generated: {}", self.tasks.reports_generated)?;
        writeln!(
            out,
            "  malformed tasks dead-lettered: {} of {}",
            self.tasks.malformed_dead_lettered, self.tasks.malformed_submitted
        )?;
        for reason in &self.tasks.reasons {
            writeln!(out, "    {reason}")?;
        }
        writeln!(out)?;
        let o = &self.orders;
        writeln!(
            out,
            "Sagas (order_saga: create_order → reserve_inventory → charge_payment)"
        )?;
        for order in &o.orders {
            writeln!(
                out,
                "  {:<26} {:<12} {}{}",
                order.order_id,
                order.status,
                order.scenario,
                order
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )?;
        }
        writeln!(
            out,
            "  {} created: {} completed, {} compensated, {} unfinished",
            o.created, o.completed, o.compensated, o.unfinished
        )?;
        writeln!(out)?;
        let s = &self.stats;
        writeln!(out, "stats_service.get_stats: {} users, {} emails sent, orders {} created / {} completed / {} compensated, {} dead letters", s.users_registered, s.emails_sent, s.orders_created, s.orders_completed, s.orders_compensated, s.dead_letters)?;
        writeln!(
            out,
            "bus: {} retried, {} dead-lettered, {} malformed, {} RPC error replies",
            self.bus.retried, self.bus.dead_lettered, self.bus.malformed, self.bus.rpc_errors
        )?;
        let problems = self.problems();
        if problems.is_empty() {
            writeln!(out, "OK: every order ended COMPLETED or COMPENSATED as scripted, every email was sent or dead-lettered, nothing lost ({} ms)", self.elapsed_ms)?;
        } else {
            for p in problems {
                writeln!(out, "PROBLEM: {p}")?;
            }
        }
        Ok(())
    }
}
