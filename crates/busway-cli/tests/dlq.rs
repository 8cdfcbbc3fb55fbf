//! `busway dlq` against a real SQLite file with real dead letters.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::dead_letters::DeadLetterFilter;
use busway::{Bus, HandlerError, QueueName, QueueSpec, RetryPolicy};

fn busway(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(args)
        .env("BUSWAY_URL", url)
        .output()?;
    ensure!(
        out.status.success(),
        "busway {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Three bounced emails and one failed report, dead-lettered by real workers.
async fn dead_letters_in(url: &str) -> anyhow::Result<()> {
    let bus = Bus::connect(url).await?;
    let tasks = bus.task_queue("jobs")?;
    tasks.register_handler("send_email", |p: serde_json::Value| async move {
        Err::<(), _>(HandlerError::permanent(format!(
            "bounced: {}",
            p["email"].as_str().unwrap_or_default()
        )))
    });
    tasks.register_handler("generate_report", |_p: serde_json::Value| async {
        Err::<(), _>(HandlerError::permanent("report engine down"))
    });
    tasks
        .start_workers()
        .retry(RetryPolicy::default().with_max_attempts(1))
        .await?;
    for i in 0..3 {
        tasks
            .submit(
                "send_email",
                &serde_json::json!({"email": format!("u{i}@bounce.test")}),
            )
            .await?;
    }
    tasks
        .submit(
            "generate_report",
            &serde_json::json!({"report_type": "daily"}),
        )
        .await?;
    let dead = bus.dead_letters("jobs")?;
    for _ in 0..1000 {
        if dead.count().await? == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(dead.count().await? == 4, "the dead letters did not arrive");
    bus.shutdown().await;
    bus.transport().close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_replay_and_purge_from_the_command_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("busway.db").display());
    dead_letters_in(&url).await?;

    let table = busway(&url, &["dlq", "list", "jobs"])?;
    ensure!(
        table.contains("4 dead letter(s) in dead_letter_jobs"),
        "{table}"
    );
    ensure!(table.contains("bounced: u1@bounce.test"), "{table}");

    let lines = busway(
        &url,
        &["dlq", "list", "jobs", "--kind", "send_email", "--json"],
    )?;
    let listed: Vec<serde_json::Value> = lines
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(listed.len() == 3, "{lines}");
    let id = listed[0]["id"].as_str().context("no id")?.to_owned();
    ensure!(listed[0]["original_queue"] == "jobs", "{lines}");

    let shown = busway(&url, &["dlq", "show", "jobs", &id, "--json"])?;
    let shown: serde_json::Value = serde_json::from_str(&shown)?;
    ensure!(
        shown["payload"]["params"]["email"]
            .as_str()
            .is_some_and(|e| e.ends_with("@bounce.test")),
        "{shown}"
    );

    let dry = busway(
        &url,
        &[
            "dlq",
            "purge",
            "jobs",
            "--reason",
            "engine down",
            "--dry-run",
        ],
    )?;
    ensure!(
        dry.contains("1 dead letter(s) would be purged, 3 left"),
        "{dry}"
    );
    let purged = busway(&url, &["dlq", "purge", "jobs", "--reason", "engine down"])?;
    ensure!(
        purged.contains("1 dead letter(s) purged, 3 left"),
        "{purged}"
    );

    let replayed = busway(
        &url,
        &["dlq", "replay", "jobs", "--limit", "2", "--to", "parking"],
    )?;
    ensure!(
        replayed.contains("2 dead letter(s) replayed, 1 left"),
        "{replayed}"
    );

    // What the command line did is what the library sees.
    let transport = busway::connect(&url).await?;
    let parking = QueueName::new("parking")?;
    transport
        .declare_queue(&QueueSpec::new(parking.clone()))
        .await?;
    ensure!(transport.queue_stats(&parking).await?.ready == 2);
    let bus = Bus::new(transport.clone());
    let left = bus
        .dead_letters("jobs")?
        .list(&DeadLetterFilter::default())
        .await?;
    ensure!(
        left.len() == 1 && left[0].message.kind == "send_email",
        "{left:?}"
    );
    transport.close().await;

    let missing = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(["dlq", "show", "jobs", "no-such-id", "--url", &url])
        .output()?;
    ensure!(!missing.status.success());
    ensure!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter with id no-such-id"));
    Ok(())
}
