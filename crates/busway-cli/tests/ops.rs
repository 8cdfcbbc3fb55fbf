//! The operations commands driving the built binary: on a real SQLite file
//! (always) and on RabbitMQ (when `BUSWAY_TEST_AMQP_URL` is set).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context};
use busway::event_store::{EventStore, ExpectedVersion, NewEvent};
use busway::saga_store::{SagaRecord, SagaStatus, SagaStore, StepRecord, StepStatus};
use busway::{Bus, HandlerError, QueueName, QueueSpec};
use serde_json::Value;

/// Runs `busway` with no `BUSWAY_*` from the caller's environment, in `dir`.
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_busway"));
    command.args(args).current_dir(dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("BUSWAY_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    Ok(command.output()?)
}

/// Runs `busway` against `url`; fails unless it exits 0; returns stdout.
fn ok(dir: &Path, url: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = run_in(dir, args, &[("BUSWAY_URL", url)])?;
    ensure!(
        out.status.success(),
        "busway {args:?} exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs `busway` against `url`, expecting exit code `code`; returns stderr.
fn fails(dir: &Path, url: &str, args: &[&str], code: i32) -> anyhow::Result<String> {
    let out = run_in(dir, args, &[("BUSWAY_URL", url)])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(code),
        "busway {args:?} exited {:?}, expected {code}: {stderr}",
        out.status.code()
    );
    Ok(stderr)
}

fn json_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

fn sqlite_url(dir: &Path, file: &str) -> String {
    format!("sqlite://{}", dir.join(file).display())
}

#[test]
fn task_submit_then_queues_table_and_json() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "q.db");
    assert_eq!(
        ok(dir.path(), &url, &["queues", "--interval", "0"])?,
        "no queues\n"
    );
    for i in 0..3 {
        let id = ok(
            dir.path(),
            &url,
            &[
                "task",
                "submit",
                "send_email",
                "--json",
                &format!("{{\"n\": {i}}}"),
            ],
        )?;
        ensure!(uuid::Uuid::parse_str(id.trim()).is_ok(), "not an id: {id}");
    }
    let table = ok(dir.path(), &url, &["queues", "--interval", "0"])?;
    insta::assert_snapshot!("queues_table_three_tasks", table);

    let rows = json_lines(&ok(
        dir.path(),
        &url,
        &["queues", "--json", "--interval", "100ms", "--all"],
    )?)?;
    insta::assert_json_snapshot!("queues_json_shape", rows, {
        "[].depth_change_per_s" => "[rate]",
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_tasks_reach_a_bus_worker_in_the_reference_shape() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "t.db");
    ok(
        dir.path(),
        &url,
        &[
            "task",
            "submit",
            "resize",
            "--json",
            "{\"w\": 640}",
            "--queue",
            "images",
        ],
    )?;
    let bus = Bus::connect(&url).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let images = bus.task_queue("images")?;
    images.register_handler("resize", move |p: Value| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(p);
            Ok::<(), HandlerError>(())
        }
    });
    images.start_workers().await?;
    let params = tokio::time::timeout(std::time::Duration::from_secs(15), rx.recv())
        .await?
        .context("no task")?;
    assert_eq!(params, serde_json::json!({"w": 640}));
    bus.shutdown().await;
    Ok(())
}

#[test]
fn publish_and_subscribe_through_a_group() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "p.db");
    // --count 0 declares and binds the group, then stops.
    ok(
        dir.path(),
        &url,
        &["subscribe", "order.*", "--group", "audit", "--count", "0"],
    )?;
    let first = ok(
        dir.path(),
        &url,
        &[
            "publish",
            "order.created",
            "--json",
            "{\"total\": 12.5}",
            "--aggregate-id",
            "o1",
        ],
    )?;
    ok(
        dir.path(),
        &url,
        &[
            "publish",
            "order.paid",
            "--json",
            "{}",
            "--header",
            "tenant=acme",
        ],
    )?;
    ok(
        dir.path(),
        &url,
        &["publish", "user.registered", "--json", "{}"],
    )?;
    let lines = json_lines(&ok(
        dir.path(),
        &url,
        &["subscribe", "order.*", "--group", "audit", "--count", "2"],
    )?)?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event_id"], first.trim());
    assert_eq!(lines[0]["event_type"], "order.created");
    assert_eq!(lines[0]["aggregate_id"], "o1");
    assert_eq!(lines[0]["data"]["total"], 12.5);
    assert_eq!(lines[1]["event_type"], "order.paid");
    // Both were acknowledged: the group is empty, the unmatched topic never reached it.
    let rows = json_lines(&ok(
        dir.path(),
        &url,
        &["queues", "audit", "--json", "--interval", "0"],
    )?)?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["ready"], 0);
    fails(
        dir.path(),
        &url,
        &["publish", "order.x", "--json", "{not json"],
        2,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_prints_replies_and_exit_codes_say_what_failed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "r.db");
    let bus = Bus::connect(&url).await?;
    bus.register_request_handler("users", "get_user", |q: Value| async move {
        match q["id"].as_str() {
            Some(id) => Ok(serde_json::json!({"id": id, "name": "Ann"})),
            None => Err(HandlerError::new("no id given")),
        }
    })
    .await?;
    bus.transport()
        .declare_queue(&QueueSpec::new(QueueName::new("rpc_silent")?))
        .await?;
    let path = dir.path().to_owned();
    let url2 = url.clone();
    let (reply, error, missing, timeout) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((
            ok(
                &path,
                &url2,
                &["request", "users", "get_user", "--json", "{\"id\": \"u1\"}"],
            )?,
            fails(
                &path,
                &url2,
                &["request", "users", "get_user", "--json", "{}"],
                3,
            )?,
            fails(&path, &url2, &["request", "nobody", "ping"], 3)?,
            fails(
                &path,
                &url2,
                &["request", "silent", "ping", "--timeout", "300ms"],
                5,
            )?,
        ))
    })
    .await??;
    let reply: Value = serde_json::from_str(&reply)?;
    assert_eq!(reply, serde_json::json!({"id": "u1", "name": "Ann"}));
    assert!(error.contains("no id given"), "{error}");
    assert!(missing.contains("nobody"), "{missing}");
    assert!(timeout.contains("did not reply"), "{timeout}");
    bus.shutdown().await;
    Ok(())
}

fn failed_saga(id: &str) -> SagaRecord {
    let mut step = StepRecord::new("charge");
    step.status = StepStatus::Failed;
    step.attempts = 1;
    step.compensation_attempts = 3;
    step.error = Some("refund service down".into());
    SagaRecord {
        id: id.into(),
        definition: "payment".into(),
        status: SagaStatus::Failed,
        version: 4,
        input: serde_json::json!({"amount": 30}),
        steps: vec![step],
        error: Some("compensation failed".into()),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_500,
        due_at_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_list_show_retry_abort() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "s.db");
    {
        let (path, config) = busway::sqlite::SqliteConfig::from_url(&url)?;
        let transport = busway::sqlite::SqliteTransport::open_with(path, config)?;
        let store = busway::sqlite::SqliteSagaStore::open(transport.clone()).await?;
        store.create(&failed_saga("pay-1"), &[]).await?;
        store.create(&failed_saga("pay-2"), &[]).await?;
        busway::Transport::close(&transport).await;
    }
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let dir = path.as_path();
        let listed = json_lines(&ok(
            dir,
            &url,
            &["sagas", "list", "--status", "failed", "--json"],
        )?)?;
        let ids: Vec<&str> = listed.iter().filter_map(|s| s["id"].as_str()).collect();
        assert_eq!(ids, ["pay-1", "pay-2"]);
        let table = ok(dir, &url, &["sagas", "list"])?;
        assert!(
            table.contains("pay-1") && table.contains("compensation failed"),
            "{table}"
        );
        let shown: Value =
            serde_json::from_str(&ok(dir, &url, &["sagas", "show", "pay-1", "--json"])?)?;
        assert_eq!(shown["saga"]["steps"][0]["step_id"], "charge");
        fails(dir, &url, &["sagas", "show", "nope"], 3)?;

        ok(dir, &url, &["sagas", "retry", "pay-1"])?;
        let shown: Value =
            serde_json::from_str(&ok(dir, &url, &["sagas", "show", "pay-1", "--json"])?)?;
        assert_eq!(shown["saga"]["status"], "compensating");
        assert_eq!(shown["saga"]["steps"][0]["status"], "compensating");
        assert_eq!(shown["saga"]["version"], 5);
        let history = shown["history"].as_array().context("history")?;
        assert!(
            history.iter().any(|e| e["kind"] == "retried"),
            "{history:?}"
        );
        // Only failed sagas can be retried or aborted.
        let refused = fails(dir, &url, &["sagas", "abort", "pay-1"], 1)?;
        assert!(refused.contains("only a failed saga"), "{refused}");

        ok(
            dir,
            &url,
            &["sagas", "abort", "pay-2", "--reason", "refunded by hand"],
        )?;
        let shown: Value =
            serde_json::from_str(&ok(dir, &url, &["sagas", "show", "pay-2", "--json"])?)?;
        let error = shown["saga"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("refunded by hand"), "{error}");
        Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_tail_and_projection_status() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = sqlite_url(dir.path(), "e.db");
    {
        let (path, config) = busway::sqlite::SqliteConfig::from_url(&url)?;
        let transport = busway::sqlite::SqliteTransport::open_with(path, config)?;
        let store = busway::sqlite::SqliteEventStore::open(transport.clone()).await?;
        let events = (1..=3)
            .map(|n| NewEvent::json("order.item_added", &serde_json::json!({"n": n})))
            .collect::<Result<Vec<_>, _>>()?;
        store
            .append("order-1", ExpectedVersion::NoStream, events)
            .await?;
        store
            .append(
                "order-2",
                ExpectedVersion::NoStream,
                vec![NewEvent::json("order.created", &serde_json::json!({}))?],
            )
            .await?;
        store.save_checkpoint("totals", 1).await?;
        busway::Transport::close(&transport).await;
    }
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let dir = path.as_path();
        let read = json_lines(&ok(
            dir,
            &url,
            &["events", "read", "order-1", "--from", "2", "--json"],
        )?)?;
        let versions: Vec<u64> = read.iter().filter_map(|e| e["version"].as_u64()).collect();
        assert_eq!(versions, [2, 3]);
        assert_eq!(read[0]["data"]["n"], 2);
        let table = ok(dir, &url, &["events", "read", "order-1"])?;
        assert!(table.contains("3 event(s) in order-1"), "{table}");
        fails(dir, &url, &["events", "read", "order-404"], 3)?;

        let all = json_lines(&ok(
            dir,
            &url,
            &["events", "tail", "--all", "--from-start", "--count", "4"],
        )?)?;
        let positions: Vec<u64> = all.iter().filter_map(|e| e["position"].as_u64()).collect();
        assert_eq!(positions, [1, 2, 3, 4]);
        assert_eq!(all[3]["stream"], "order-2");

        let status = json_lines(&ok(dir, &url, &["projections", "status", "--json"])?)?;
        assert_eq!(
            status,
            [serde_json::json!({"projection": "totals", "checkpoint": 1, "head": 4, "lag": 3})]
        );
        ok(dir, &url, &["projections", "rebuild", "totals"])?;
        let status = json_lines(&ok(
            dir,
            &url,
            &["projections", "status", "totals", "--json"],
        )?)?;
        assert_eq!(status[0]["checkpoint"], 0);
        assert_eq!(status[0]["lag"], 4);
        Ok(())
    })
    .await??;
    Ok(())
}

#[test]
fn settings_precedence_flag_env_file_default() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (file_db, env_db, flag_db) = (
        sqlite_url(d, "file.db"),
        sqlite_url(d, "env.db"),
        sqlite_url(d, "flag.db"),
    );
    ok(
        d,
        &file_db,
        &["task", "submit", "t", "--queue", "from_file"],
    )?;
    ok(d, &env_db, &["task", "submit", "t", "--queue", "from_env"])?;
    ok(
        d,
        &flag_db,
        &["task", "submit", "t", "--queue", "from_flag"],
    )?;
    std::fs::write(d.join("busway.toml"), format!("url = \"{file_db}\"\n"))?;
    let names = |out: Output| -> anyhow::Result<Vec<String>> {
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(json_lines(&String::from_utf8(out.stdout)?)?
            .iter()
            .filter_map(|r| r["queue"].as_str().map(str::to_owned))
            .collect())
    };
    let args = ["queues", "--json", "--interval", "0"];
    assert_eq!(names(run_in(d, &args, &[])?)?, ["from_file"]);
    assert_eq!(
        names(run_in(d, &args, &[("BUSWAY_URL", &env_db)])?)?,
        ["from_env"]
    );
    let mut with_flag = args.to_vec();
    with_flag.extend(["--url", &flag_db]);
    assert_eq!(
        names(run_in(d, &with_flag, &[("BUSWAY_URL", &env_db)])?)?,
        ["from_flag"]
    );
    // --config names another file.
    std::fs::write(d.join("other.toml"), format!("url = \"{env_db}\"\n"))?;
    let mut with_config = args.to_vec();
    with_config.extend(["--config", "other.toml"]);
    assert_eq!(names(run_in(d, &with_config, &[])?)?, ["from_env"]);
    // A bad settings file is a usage error.
    std::fs::write(d.join("busway.toml"), "adress = \"memory://\"\n")?;
    let out = run_in(d, &args, &[])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("adress"));
    Ok(())
}

#[test]
fn usage_errors_exit_2_and_unreachable_backends_exit_4() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    fails(d, "memory://", &["queues", "--interval", "soon"], 2)?;
    fails(d, "memory://", &["sagas", "list"], 2)?;
    let stderr = fails(d, "postgres://nobody@127.0.0.1:1/none", &["queues"], 4)?;
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    Ok(())
}

#[test]
fn completions_and_help() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(d, "memory://", &["completions", shell])?;
        assert!(
            script.contains("queues") && script.contains("sagas"),
            "{shell}"
        );
    }
    // Help is read with no BUSWAY_* set, so it shows no environment values.
    let help = |args: &[&str]| -> anyhow::Result<String> {
        let out = run_in(d, args, &[])?;
        ensure!(out.status.success(), "{args:?}");
        Ok(String::from_utf8(out.stdout)?)
    };
    insta::assert_snapshot!("help_queues", help(&["queues", "--help"])?);
    insta::assert_snapshot!("help_sagas", help(&["sagas", "--help"])?);
    let top = help(&["--help"])?;
    assert!(
        top.contains("Exit codes:") && top.contains("busway.toml"),
        "{top}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queues_through_the_management_api() -> anyhow::Result<()> {
    let Some(url) = busway_conformance::environment::broker_url("BUSWAY_TEST_AMQP_URL")? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_owned();
    let queue = format!(
        "cli_ops_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let (rows, unreachable) = tokio::task::spawn_blocking({
        let url = url.clone();
        let queue = queue.clone();
        move || -> anyhow::Result<(Vec<Value>, String)> {
            ok(
                &d,
                &url,
                &["task", "submit", "ping", "--queue", &queue, "--json", "{}"],
            )?;
            ok(
                &d,
                &url,
                &["task", "submit", "ping", "--queue", &queue, "--json", "{}"],
            )?;
            let rows = json_lines(&ok(
                &d,
                &url,
                &["queues", &queue, "--json", "--interval", "0", "--all"],
            )?)?;
            let unreachable = fails(
                &d,
                &url,
                &[
                    "queues",
                    "--management-url",
                    "http://127.0.0.1:1",
                    "--interval",
                    "0",
                ],
                4,
            )?;
            Ok((rows, unreachable))
        }
    })
    .await??;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["queue"].as_str()).collect();
    assert_eq!(names, [queue.clone(), format!("dead_letter_{queue}")]);
    assert_eq!(rows[0]["ready"], 2);
    assert!(
        unreachable.contains("rabbitmq-plugins enable rabbitmq_management"),
        "{unreachable}"
    );
    // The random 12-hex-digit suffix lets .ci/clean-broker.py remove the queues.
    Ok(())
}
