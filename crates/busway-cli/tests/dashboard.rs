//! `busway serve` in a real browser: headless Chromium driven over WebDriver
//! (chromedriver), against `busway serve` on a SQLite file while
//! `busway demo serve` works on the same file and this test sends it traffic.
//!
//! Needs Debian's `chromium` and `chromium-driver`. Without them the tests
//! are skipped, unless `BUSWAY_REQUIRE_BROKERS=1`, where they fail.
//!
//! `BUSWAY_DASHBOARD_SCREENSHOT=docs/dashboard.png` saves a screenshot of
//! the page during the demo. The scale test (`--ignored`) seeds 1,000 queues
//! and 10,000 sagas and prints the page's data size and render time.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use busway::dead_letters::{DeadLetterFilter, REPLAYED};
use busway::Bus;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const TOKEN: &str = "dashboard-test-token";
const PATIENCE: Duration = Duration::from_secs(60);

/// Kills a child process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Chromium and chromedriver, or `None` to skip (failing when required).
fn browser() -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    let find = |names: &[&str]| {
        names.iter().find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
    };
    let chromium = find(&["chromium", "chromium-browser"]);
    let driver = find(&["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Ok(Some((c, d))),
        _ if busway_conformance::environment::brokers_required() => bail!(
            "chromium and chromedriver are missing but BUSWAY_REQUIRE_BROKERS=1 requires the \
             dashboard browser test (apt-get install chromium chromium-driver)"
        ),
        _ => {
            eprintln!("skipped: chromium or chromedriver is not installed");
            Ok(None)
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns `busway ARGS`, returning it and its stderr lines.
fn busway(args: &[&str]) -> anyhow::Result<(Proc, mpsc::Receiver<String>)> {
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_busway"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stderr = child.0.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}

/// Waits for a stderr line containing `needle`.
fn wait_line(lines: &mpsc::Receiver<String>, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("no line with `{needle}`"))?;
        if line.contains(needle) {
            return Ok(line);
        }
    }
}

/// `busway serve` on `url`; returns it and the dashboard's base URL.
fn dashboard(url: &str, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
    let mut args = vec![
        "serve",
        "--url",
        url,
        "--listen",
        "127.0.0.1:0",
        "--token",
        TOKEN,
    ];
    args.extend_from_slice(extra);
    let (server, lines) = busway(&args)?;
    let line = wait_line(&lines, "dashboard on ")?;
    let base = line
        .split("dashboard on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("no address")?
        .trim_end_matches('/')
        .to_owned();
    Ok((server, base))
}

/// chromedriver on a free port and a headless Chromium session through it.
async fn open_browser(
    chromium: &Path,
    driver: &Path,
    profile: &Path,
) -> anyhow::Result<(Proc, Client)> {
    let port = free_port()?;
    let driver = Proc(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?,
    );
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1500",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": chromium, "args": args},
    });
    let Value::Object(capabilities) = capabilities else {
        bail!("capabilities are an object");
    };
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(capabilities);
    let client = builder
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("opening a Chromium session")?;
    Ok((driver, client))
}

/// Runs `script` in the page and returns its value.
async fn js(client: &Client, script: &str) -> anyhow::Result<Value> {
    Ok(client.execute(script, vec![]).await?)
}

/// The status of a fetch from the page (`init` is fetch's second argument).
async fn fetch_status(client: &Client, url: &str, init: Value) -> anyhow::Result<u64> {
    let value = client
        .execute_async(
            "const [url, init, done] = arguments; \
             fetch(url, init).then(r => done(r.status)).catch(e => done(String(e)));",
            vec![json!(url), init],
        )
        .await?;
    value
        .as_u64()
        .with_context(|| format!("fetch failed: {value}"))
}

/// The rendered text of the element `css` selects, read in one script so a
/// refresh that replaces the element in between cannot leave a stale handle.
async fn text(client: &Client, css: &str) -> anyhow::Result<String> {
    let value = client
        .execute(
            "const el = document.querySelector(arguments[0]); return el ? el.innerText : null;",
            vec![json!(css)],
        )
        .await?;
    match value {
        Value::String(text) => Ok(text),
        _ => bail!("no element matches {css}"),
    }
}

/// Clicks the element `css` selects, found and clicked in one script (the
/// tables are redrawn on every refresh).
async fn click(client: &Client, css: &str) -> anyhow::Result<()> {
    let clicked = client
        .execute(
            "const el = document.querySelector(arguments[0]); if (el) el.click(); return !!el;",
            vec![json!(css)],
        )
        .await?;
    ensure!(clicked == json!(true), "no element matches {css}");
    Ok(())
}

/// Polls `check` until it holds.
async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Orders and emails (some to an address that always bounces) until `stop`.
fn traffic(
    bus: Bus,
    stop: tokio::sync::watch::Receiver<bool>,
    bounces: bool,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::spawn(async move {
        let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let mut sent = 0u64;
        while !*stop.borrow() {
            let amount = if sent % 5 == 4 { 20_000.0 } else { 10.0 };
            let _: Value = bus
                .request(
                    "order_service",
                    "create_order",
                    &json!({"order_id": format!("order_{run}_{sent}"), "user_id": "user_1",
                            "items": [{"id": "item1", "quantity": 1}], "amount": amount}),
                )
                .await?;
            let email = if bounces && sent % 4 == 0 {
                format!("u{sent}@bounce.test")
            } else {
                format!("u{sent}@example.com")
            };
            bus.submit_task(
                "send_email",
                &json!({"email": email, "subject": "hello", "content": "hi"}),
            )
            .await?;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(sent)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_browser_during_the_demo() -> anyhow::Result<()> {
    let Some((chromium, driver)) = browser()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("demo.db").display());
    let (_demo, demo_lines) = busway(&["demo", "serve", "--url", &url])?;
    wait_line(&demo_lines, "serving on")?;
    let (_server, base) = dashboard(&url, &["--interval", "500ms"])?;
    let client_bus = Bus::connect(&url).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let generator = traffic(client_bus.clone(), stop_rx, true);

    let (_driver, client) = open_browser(&chromium, &driver, &dir.path().join("profile")).await?;
    let result = async {
        client.goto(&format!("{base}/")).await?;
        // The page loads and shows the demo's queues.
        client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css("#queues tr[data-name='task_queue']"))
            .await?;
        for queue in ["rpc_order_service", "rpc_user_service", "task_queue"] {
            let rows = client
                .find_all(Locator::Css(&format!("#queues tr[data-name='{queue}']")))
                .await?;
            ensure!(rows.len() == 1, "queue {queue} is not on the page");
        }
        // The numbers move while traffic flows.
        let first = text(&client, "#sagas-completed b").await?;
        eventually("the completed sagas to change on the page", || async {
            Ok(text(&client, "#sagas-completed b").await? != first)
        })
        .await?;
        eventually("topic throughput on the chart", || async {
            let legend = text(&client, "#legend").await?;
            Ok(legend.contains("order.") || legend.contains("notification."))
        })
        .await?;
        eventually("dead letters in task_queue", || async {
            let n = text(
                &client,
                "#queues tr[data-name='task_queue'] td:nth-child(6)",
            )
            .await?;
            Ok(n.trim().parse::<u64>().unwrap_or(0) > 0)
        })
        .await?;
        if let Ok(path) = std::env::var("BUSWAY_DASHBOARD_SCREENSHOT") {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let png = client.screenshot().await?;
            std::fs::write(&path, png).with_context(|| format!("writing {path}"))?;
        }
        stop_tx.send_replace(true);

        // Actions without the token (or with a wrong one) are refused.
        let replay_url = format!("{base}/api/dlq/task_queue/replay");
        let refused = fetch_status(&client, &replay_url, json!({"method": "POST"})).await?;
        ensure!(refused == 401, "replay without a token answered {refused}");
        let wrong = fetch_status(
            &client,
            &replay_url,
            json!({"method": "POST", "headers": {"Authorization": "Bearer nope"}}),
        )
        .await?;
        ensure!(wrong == 401, "replay with a wrong token answered {wrong}");

        // Quiet: every bounce has landed in the dead-letter queue.
        let dead = client_bus.dead_letters("task_queue")?;
        let settled = std::cell::Cell::new((u64::MAX, Instant::now()));
        eventually("the dead letters to settle", || async {
            let stats = client_bus
                .transport()
                .queue_stats(&busway::QueueName::new("task_queue")?)
                .await?;
            let n = dead.count().await?;
            if stats.ready + stats.delayed + stats.in_flight > 0 || n != settled.get().0 {
                settled.set((n, Instant::now()));
                return Ok(false);
            }
            Ok(settled.get().1.elapsed() > Duration::from_secs(2))
        })
        .await?;
        let before = dead.count().await?;
        ensure!(before > 0);

        // Replay from the page: enter the token, open task_queue's dead letters, replay.
        client
            .find(Locator::Id("token-button"))
            .await?
            .click()
            .await?;
        client.send_alert_text(TOKEN).await?;
        client.accept_alert().await?;
        eventually("the page to take the token", || async {
            Ok(text(&client, "#auth-state").await? == "token set")
        })
        .await?;
        click(&client, "#queues a[data-queue='task_queue']").await?;
        eventually("the dead letters to be listed", || async {
            Ok(client
                .find_all(Locator::Css("#dlq-letters tbody td:first-child code"))
                .await?
                .len() as u64
                == before.min(100))
        })
        .await?;
        client
            .find(Locator::Id("dlq-replay"))
            .await?
            .click()
            .await?;
        eventually("the replay to report", || async {
            Ok(text(&client, "#dlq-result").await?.contains("replayed"))
        })
        .await?;
        let result = text(&client, "#dlq-result").await?;
        ensure!(
            result.starts_with(&format!("{before} replayed")),
            "{result} (expected {before} replayed)"
        );
        // The replayed messages went back through task_queue: they bounce
        // again (the address still bounces) and return marked as replayed.
        eventually("the replayed messages to come back marked", || async {
            let letters = dead.list(&DeadLetterFilter::default()).await?;
            Ok(letters.len() as u64 == before
                && letters
                    .iter()
                    .all(|l| l.message.headers.get(REPLAYED).is_some()))
        })
        .await?;

        // Read-only endpoints answer; health is ready.
        let health = fetch_status(&client, &format!("{base}/health"), json!({})).await?;
        ensure!(health == 200, "/health answered {health}");
        let metrics = client
            .execute_async(
                "const done = arguments[0]; fetch('/metrics').then(r => r.text()).then(done);",
                vec![],
            )
            .await?;
        let metrics = metrics.as_str().unwrap_or_default();
        ensure!(
            metrics.contains("busway_queue_ready{queue=\"task_queue\"}"),
            "{metrics}"
        );
        anyhow::Ok(())
    }
    .await;
    stop_tx.send_replace(true);
    let _ = client.close().await;
    let sent = generator.await??;
    client_bus.shutdown().await;
    result?;
    ensure!(sent > 0);
    Ok(())
}

/// Listening beyond loopback without a token is refused before anything starts.
#[test]
fn serve_refuses_a_public_address_without_a_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bus.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(["serve", "--url", &url, "--listen", "0.0.0.0:0"])
        .env_remove("BUSWAY_TOKEN")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "it started: {stderr}");
    ensure!(stderr.contains("refusing to listen"), "{stderr}");
    Ok(())
}

/// 1,000 queues and 10,000 sagas: prints the page's data size and render
/// time (no timing assertions). `cargo test -p busway-cli --test dashboard -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: seeds 1,000 queues and 10,000 sagas"]
async fn dashboard_with_1000_queues_and_10000_sagas() -> anyhow::Result<()> {
    use busway::saga_store::{
        SagaEvent, SagaEventKind, SagaRecord, SagaStatus, SagaStore, StepRecord,
    };
    let Some((chromium, driver)) = browser()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("scale.db");
    let url = format!("sqlite://{}", path.display());
    let transport = busway::sqlite::SqliteTransport::open(&path)?;
    for i in 0..1000 {
        let name = busway::QueueName::new(format!("queue_{i:04}"))?;
        busway::Transport::declare_queue(&transport, &busway::QueueSpec::new(name)).await?;
    }
    let store = busway::sqlite::SqliteSagaStore::open(transport.clone()).await?;
    let now = busway::unix_millis(std::time::SystemTime::now());
    let statuses = [
        SagaStatus::Completed,
        SagaStatus::Completed,
        SagaStatus::Completed,
        SagaStatus::Running,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ];
    for i in 0..10_000usize {
        let status = statuses[i % statuses.len()];
        let saga = SagaRecord {
            id: format!("saga-{i:05}"),
            definition: "order_saga".into(),
            status,
            version: 1,
            input: json!({"order": i}),
            steps: vec![StepRecord::new("create_order"), StepRecord::new("charge")],
            error: matches!(status, SagaStatus::Failed | SagaStatus::Compensated)
                .then(|| format!("payment declined for order {i}")),
            created_at_ms: now - 10_000 + i as i64,
            updated_at_ms: now - 10_000 + i as i64,
            due_at_ms: None,
        };
        store
            .create(&saga, &[SagaEvent::new(now, SagaEventKind::Created)])
            .await?;
    }
    busway::Transport::close(&transport).await;

    let (_server, base) = dashboard(&url, &["--interval", "2s"])?;
    let overview = js_free_fetch(&base).await?;
    let (_driver, client) = open_browser(&chromium, &driver, &dir.path().join("profile")).await?;
    let started = Instant::now();
    client.goto(&format!("{base}/")).await?;
    client
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#queues tr[data-name='queue_0999']"))
        .await?;
    let first_render = started.elapsed();
    let timing = js(
        &client,
        "const nav = performance.getEntriesByType('navigation')[0]; \
         return {render_ms: window.buswayLastRenderMs, renders: window.buswayRenders, \
                 dom_content_loaded_ms: nav.domContentLoadedEventEnd, rows: document.querySelectorAll('#queues tbody tr').length, \
                 now_ms: performance.now()};",
    )
    .await?;
    // A few more snapshots, to see the steady-state render time.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let steady = js(
        &client,
        "return {render_ms: window.buswayLastRenderMs, renders: window.buswayRenders};",
    )
    .await?;
    let _ = client.close().await;
    ensure!(timing["rows"] == 1000, "{timing}");
    println!(
        "dashboard scale: snapshot {} bytes ({} queues, sagas {}), read in {} ms; \
         first render {:?} after navigation start (page: {timing}); steady: {steady}",
        overview.0,
        overview.1["queues"].as_array().map_or(0, Vec::len),
        overview.1["sagas"],
        overview.1["sample_ms"],
        first_render,
    );
    Ok(())
}

/// `/api/overview` read over a bare TCP connection: its size and its JSON.
async fn js_free_fetch(base: &str) -> anyhow::Result<(usize, Value)> {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr)?;
        write!(
            stream,
            "GET /api/overview HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let value: Value = serde_json::from_str(body).context("overview JSON")?;
        Ok((body.len(), value))
    })
    .await?
}
