//! `busway demo` on SQLite and RabbitMQ, and `busway demo serve` on
//! RabbitMQ driven by the reference Python client (pika).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use busway_conformance::environment::{broker_url, run_python};
use serde_json::Value;

/// The demo uses the reference queue names: one RabbitMQ run at a time.
static RABBITMQ: Mutex<()> = Mutex::new(());

fn demo(args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_busway"))
        .arg("demo")
        .args(args)
        .arg("--json")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "busway demo {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| stdout.into_owned())
}

fn n(report: &Value, path: &str) -> anyhow::Result<u64> {
    report
        .pointer(path)
        .and_then(Value::as_u64)
        .with_context(|| format!("{path} missing in {report}"))
}

/// The script's figures: 4 users, 6 orders (3 complete, 3 compensated),
/// 10 emails (7 sent, the 3 to `@bounce.test` dead-lettered), 3 malformed
/// tasks dead-lettered, 1 report.
fn check(report: &Value) -> anyhow::Result<()> {
    ensure!(n(report, "/users_registered")? == 4, "{report:#}");
    ensure!(n(report, "/users_listed")? >= 4, "{report:#}");
    let orders = report["orders"]["orders"].as_array().context("no orders")?;
    ensure!(orders.len() == 6, "{report:#}");
    for order in orders {
        let status = order["status"].as_str().unwrap_or_default();
        ensure!(
            status == "COMPLETED" || status == "COMPENSATED",
            "order did not end: {order}"
        );
        ensure!(order["status"] == order["expected"], "{order}");
    }
    ensure!(n(report, "/orders/created")? == 6, "{report:#}");
    ensure!(n(report, "/orders/completed")? == 3, "{report:#}");
    ensure!(n(report, "/orders/compensated")? == 3, "{report:#}");
    ensure!(n(report, "/orders/unfinished")? == 0, "{report:#}");

    ensure!(n(report, "/emails/expected")? == 10, "{report:#}");
    ensure!(n(report, "/emails/sent")? == 7, "{report:#}");
    ensure!(n(report, "/emails/dead_lettered")? == 3, "{report:#}");
    ensure!(n(report, "/emails/lost")? == 0, "{report:#}");
    // Flaky: 3 emails × 2 failures; bounced: 3 emails × 3 attempts.
    ensure!(n(report, "/emails/failed_attempts")? >= 15, "{report:#}");
    ensure!(n(report, "/bus/retried")? >= 12, "{report:#}");

    ensure!(n(report, "/tasks/reports_generated")? == 1, "{report:#}");
    ensure!(n(report, "/tasks/malformed_submitted")? == 3, "{report:#}");
    ensure!(
        n(report, "/tasks/malformed_dead_lettered")? == 3,
        "{report:#}"
    );
    let reasons = report["tasks"]["reasons"].to_string();
    ensure!(reasons.contains("unknown task type"), "{reasons}");
    ensure!(reasons.contains("malformed"), "{reasons}");

    let rejected = report["rejected"].as_array().context("no rejected")?;
    ensure!(rejected.len() == 6, "{report:#}");
    for r in rejected {
        ensure!(r["error"].is_string(), "accepted: {r}");
    }
    ensure!(
        report["rejected"].to_string().contains("user not found"),
        "{report:#}"
    );

    for (event, at_least) in [
        ("user.registered", 4),
        ("order.created", 5),
        ("order.paid", 3),
        ("order.shipped", 3),
        ("order.cancelled", 3),
        ("notification.email_sent", 7),
        ("report.generated", 1),
    ] {
        ensure!(
            n(report, &format!("/events/{event}"))? >= at_least,
            "{event}: {report:#}"
        );
    }
    let audit: Vec<&str> = report["audit_sample"]
        .as_array()
        .context("no audit sample")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        audit == ["order.created", "order.paid", "order.shipped"],
        "{audit:?}"
    );
    ensure!(n(report, "/stats/orders_completed")? >= 3, "{report:#}");
    ensure!(n(report, "/stats/dead_letters")? >= 6, "{report:#}");
    ensure!(n(report, "/bus/panics")? == 0, "{report:#}");
    Ok(())
}

#[test]
fn demo_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("demo.db").display());
    let report = demo(&["--url", &url])?;
    check(&report)?;
    // Stats on a fresh file are exactly this run's.
    ensure!(n(&report, "/stats/users_registered")? == 4, "{report:#}");
    ensure!(n(&report, "/stats/emails_sent")? == 7, "{report:#}");
    ensure!(n(&report, "/stats/orders_created")? == 6, "{report:#}");
    ensure!(n(&report, "/stats/orders_compensated")? == 3, "{report:#}");
    ensure!(n(&report, "/stats/dead_letters")? == 6, "{report:#}");

    // A second run on the same file: its own figures, the file's history kept.
    let again = demo(&["--url", &url])?;
    check(&again)?;
    ensure!(n(&again, "/users_listed")? == 8, "{again:#}");
    ensure!(n(&again, "/stats/dead_letters")? == 12, "{again:#}");
    Ok(())
}

#[test]
fn demo_default_url_and_text_report() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_busway"))
        .arg("demo")
        .current_dir(dir.path())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(text.contains("OK: every order ended"), "{text}");
    ensure!(text.contains("order_service.create_order"), "{text}");
    // The default keeps nothing in the working directory.
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "files left behind"
    );
    Ok(())
}

#[test]
fn demo_on_rabbitmq() -> anyhow::Result<()> {
    let Some(url) = broker_url("BUSWAY_TEST_AMQP_URL")? else {
        return Ok(());
    };
    let _one_at_a_time = RABBITMQ.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir()?;
    let store = format!("sqlite://{}", dir.path().join("store.db").display());
    let report = demo(&["--url", &url, "--store", &store])?;
    check(&report)
}

/// The reference client against `busway demo serve`: RPC on
/// `rpc_user_service` and `rpc_order_service`, a task on `task_queue`
/// (its `notification.email_sent` watched on `event_bus`).
const PIKA: &str = r#"
import json, sys, time, uuid, pika
from datetime import datetime
url, run = sys.argv[1], sys.argv[2]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
reply_queue = f"rpc_reply_demo_{uuid.uuid4().hex[:8]}"
ch.queue_declare(queue=reply_queue, exclusive=True)

def call(service, method, params):
    correlation_id = str(uuid.uuid4())
    message = {"method": method, "params": params, "timestamp": datetime.utcnow().isoformat()}
    ch.basic_publish(exchange='', routing_key=f"rpc_{service}", body=json.dumps(message),
                     properties=pika.BasicProperties(reply_to=reply_queue,
                         correlation_id=correlation_id, content_type='application/json',
                         delivery_mode=2))
    for method_frame, props, body in ch.consume(reply_queue, auto_ack=True, inactivity_timeout=20):
        if method_frame is None:
            ch.cancel()
            raise TimeoutError(f"{service}.{method}")
        if props.correlation_id == correlation_id:
            ch.cancel()
            return json.loads(body)

out = {}
email = f"pika.{run}@example.com"
out["register"] = call("user_service", "register_user", {"email": email, "name": "Pia"})
user_id = out["register"]["data"]["user_id"]
out["user"] = call("user_service", "get_user_info", {"user_id": user_id})
out["missing_user"] = call("user_service", "get_user_info", {"user_id": f"user_nobody_{run}"})
out["missing_fields"] = call("user_service", "register_user", {"name": "NoEmail"})
out["unknown_method"] = call("user_service", "drop_table", {})
# Bad JSON: to the RPC queue (with a reply queue) and as an event; the
# services answer or dead-letter it and keep serving.
bad_reply = f"rpc_reply_bad_{uuid.uuid4().hex[:8]}"
ch.queue_declare(queue=bad_reply, exclusive=True)
ch.basic_publish(exchange='', routing_key="rpc_user_service", body="{not json",
                 properties=pika.BasicProperties(reply_to=bad_reply, correlation_id=str(uuid.uuid4())))
ch.exchange_declare(exchange='event_bus', exchange_type='topic', durable=True)
ch.basic_publish(exchange='event_bus', routing_key='user.registered', body="{not json either")
out["bad_json_reply"] = None
for method_frame, props, body in ch.consume(bad_reply, auto_ack=True, inactivity_timeout=5):
    if method_frame is not None:
        out["bad_json_reply"] = json.loads(body)
    break
ch.cancel()
out["users"] = call("user_service", "list_users", {"page": 1, "page_size": 10})
orders = {f"order_{run}_ok": 5, f"order_{run}_big": 500}
out["create"], out["final"] = {}, {}
for order_id, quantity in orders.items():
    out["create"][order_id] = call("order_service", "create_order", {
        "order_id": order_id, "user_id": user_id,
        "items": [{"id": "item1", "quantity": quantity}], "amount": 299.99})
for order_id in orders:
    deadline = time.time() + 30
    while True:
        got = call("order_service", "get_order", {"order_id": order_id})
        if got.get("data", {}).get("status") in ("COMPLETED", "COMPENSATED") or time.time() > deadline:
            out["final"][order_id] = got
            break
        time.sleep(0.1)

# A send_email task, exactly as TaskQueue.submit_task sends it; its
# notification.email_sent event is watched on the event bus.
ch.exchange_declare(exchange='event_bus', exchange_type='topic', durable=True)
watch = ch.queue_declare(queue='', exclusive=True).method.queue
ch.queue_bind(exchange='event_bus', queue=watch, routing_key='notification.email_sent')
ch.queue_declare(queue='task_queue', durable=True, arguments={
    'x-message-ttl': 86400000,
    'x-dead-letter-exchange': 'dead_letter_exchange',
    'x-dead-letter-routing-key': 'dead_letter_task_queue'})
ch.confirm_delivery()
task_email = f"task.{run}@example.com"
task = {"type": "send_email", "params": {"email": task_email, "subject": "from pika", "content": "hi"},
        "timestamp": datetime.utcnow().isoformat(), "priority": 0}
ch.basic_publish(exchange='', routing_key='task_queue', body=json.dumps(task),
                 properties=pika.BasicProperties(priority=0, delivery_mode=2))
out["email_sent"] = None
for method_frame, props, body in ch.consume(watch, auto_ack=True, inactivity_timeout=30):
    if method_frame is None:
        break
    event = json.loads(body)
    if event["data"].get("email") == task_email:
        out["email_sent"] = event
        break
ch.cancel()
out["stats"] = call("stats_service", "get_stats", {})
out["audit"] = call("audit_service", "get_audit_log", {"aggregate_id": f"order_{run}_ok"})
print(json.dumps(out))
conn.close()
"#;

/// Kills the server if the test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `busway demo serve ARGS` and waits until it serves.
fn serve(args: &[&str]) -> anyhow::Result<(Server, mpsc::Receiver<String>)> {
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(["demo", "serve"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let stderr = server.0.stderr.take().context("no stderr")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the server did not start")?;
        if line.contains("serving on") {
            return Ok((server, lines));
        }
    }
}

/// Sends SIGINT; the server must finish its work and exit 0.
fn interrupt(mut server: Server, lines: &mpsc::Receiver<String>) -> anyhow::Result<()> {
    let pid = server.0.id().to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status()?;
    ensure!(killed.success(), "kill -INT {pid} failed");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the server did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader thread ends with the process's stderr.
    let mut said = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        said.push(line);
    }
    ensure!(status.success(), "exit {status}: {said:?}");
    ensure!(said.iter().any(|l| l.contains("stopped")), "{said:?}");
    Ok(())
}

/// Work started right before a SIGINT is all done: tasks run and order
/// sagas end and are announced, by the stopping server (its running
/// handlers finish) or by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serve_stops_on_sigint_without_losing_work() -> anyhow::Result<()> {
    const TASKS: usize = 200;
    const ORDERS: usize = 20;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("serve.db").display());
    let client = busway::Bus::connect(&url).await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    for topic in ["notification.email_sent", "order.shipped"] {
        let seen_tx = seen_tx.clone();
        client
            .register_event_handler(topic, "demo_test_watch", move |e: busway::Event| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send((e.event_type, e.aggregate_id));
                    Ok(())
                }
            })
            .await?;
    }
    let (server, lines) = tokio::task::block_in_place(|| serve(&["--url", &url]))?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    for i in 0..ORDERS {
        let _: Value = client
            .request(
                "order_service",
                "create_order",
                &serde_json::json!({"order_id": format!("order_{run}_{i}"), "user_id": "user_x",
                                    "items": [{"id": "item1", "quantity": 1}], "amount": 10.0}),
            )
            .await?;
    }
    for i in 0..TASKS {
        client
            .submit_task(
                "send_email",
                &serde_json::json!({"email": format!("u{i}@example.com"), "subject": "s", "content": "c"}),
            )
            .await?;
    }
    tokio::task::block_in_place(|| interrupt(server, &lines))?;
    let (server, lines) = tokio::task::block_in_place(|| serve(&["--url", &url]))?;
    let mut emails = std::collections::HashSet::new();
    let mut shipped = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while emails.len() < TASKS || shipped.len() < ORDERS {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some((kind, id))) if kind == "order.shipped" => {
                shipped.insert(id);
            }
            Ok(Some((_, id))) => {
                emails.insert(id);
            }
            _ => break,
        }
    }
    for i in 0..ORDERS {
        let order: Value = client
            .request(
                "order_service",
                "get_order",
                &serde_json::json!({"order_id": format!("order_{run}_{i}")}),
            )
            .await?;
        ensure!(order["status"] == "COMPLETED", "{order}");
    }
    tokio::task::block_in_place(|| interrupt(server, &lines))?;
    client.shutdown().await;
    ensure!(
        emails.len() == TASKS,
        "{} of {TASKS} emails sent",
        emails.len()
    );
    ensure!(
        shipped.len() == ORDERS,
        "{} of {ORDERS} orders announced shipped",
        shipped.len()
    );
    Ok(())
}

#[test]
fn demo_serve_on_rabbitmq_with_the_reference_client() -> anyhow::Result<()> {
    let Some(url) = broker_url("BUSWAY_TEST_AMQP_URL")? else {
        return Ok(());
    };
    let _one_at_a_time = RABBITMQ.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir()?;
    let store = format!("sqlite://{}", dir.path().join("store.db").display());
    let (server, lines) = serve(&["--url", &url, "--store", &store])?;

    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let Some(out) = run_python(PIKA, &[&url, &run])? else {
        return Ok(());
    };
    let out: Value = serde_json::from_str(&out).context(out.clone())?;
    ensure!(out["register"]["status"] == "success", "{out:#}");
    let user_id = out["register"]["data"]["user_id"]
        .as_str()
        .context("no user_id")?;
    ensure!(out["user"]["status"] == "success", "{out:#}");
    ensure!(out["user"]["data"]["user_id"] == user_id, "{out:#}");
    ensure!(
        out["user"]["data"]["email"] == format!("pika.{run}@example.com").as_str(),
        "{out:#}"
    );
    ensure!(out["missing_user"]["status"] == "error", "{out:#}");
    ensure!(
        out["missing_user"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("user not found")),
        "{out:#}"
    );
    ensure!(out["missing_fields"]["status"] == "error", "{out:#}");
    ensure!(out["unknown_method"]["status"] == "error", "{out:#}");
    ensure!(out["users"]["data"]["total"].as_u64() >= Some(1), "{out:#}");
    // Bad JSON on the RPC queue: an error reply, and the service keeps serving.
    ensure!(out["bad_json_reply"]["status"] == "error", "{out:#}");
    ensure!(
        out["bad_json_reply"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("malformed")),
        "{out:#}"
    );
    for (order, status) in [("ok", "COMPLETED"), ("big", "COMPENSATED")] {
        let id = format!("order_{run}_{order}");
        let created = &out["create"][&id];
        ensure!(created["status"] == "success", "{out:#}");
        ensure!(
            created["data"]["saga_id"]
                .as_str()
                .is_some_and(|s| s.contains(&id)),
            "{out:#}"
        );
        ensure!(
            out["final"][&id]["data"]["status"] == status,
            "{id}: {out:#}"
        );
    }
    ensure!(
        out["email_sent"]["data"]["subject"] == "from pika",
        "the task's email was not sent: {out:#}"
    );
    ensure!(out["stats"]["data"]["users_registered"] == 1, "{out:#}");
    ensure!(out["stats"]["data"]["orders_completed"] == 1, "{out:#}");
    ensure!(out["stats"]["data"]["orders_compensated"] == 1, "{out:#}");
    let audit: Vec<&str> = out["audit"]["data"]
        .as_array()
        .context("no audit log")?
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .collect();
    ensure!(
        audit.starts_with(&["order.created", "order.paid"]),
        "{audit:?}"
    );

    // Ctrl-C: the server finishes its work and exits 0.
    interrupt(server, &lines)
}
