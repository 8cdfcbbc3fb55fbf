//! SIGKILL a publishing and a consuming process over and over; after every
//! kill, reopen the database and count: every confirmed message is present
//! exactly once or was acknowledged, and every acknowledged one is gone.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway::QueueName;
use rand::Rng;

const CHILD: &str = env!("CARGO_BIN_EXE_busway-crash-child");

/// Cycles to run: at least 20 (CI), more with `BUSWAY_CRASH_CYCLES`.
fn cycles() -> usize {
    std::env::var("BUSWAY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(20)
}

#[derive(Default)]
struct Confirmed {
    published: HashSet<u64>,
    acked: HashSet<u64>,
    /// Delivered to the current cycle's consumer (acknowledged or not).
    delivered: HashSet<u64>,
}

/// Spawns a child and a thread recording what it confirms.
fn spawn(
    args: &[&str],
    confirmed: &Arc<Mutex<Confirmed>>,
) -> anyhow::Result<(Child, JoinHandle<anyhow::Result<()>>)> {
    let mut child = Command::new(CHILD)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the crash child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let confirmed = confirmed.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let (kind, id) = line.split_once(' ').context("malformed child line")?;
            let id: u64 = id.parse()?;
            let mut c = confirmed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            match kind {
                "P" => {
                    c.published.insert(id);
                }
                "D" => {
                    c.delivered.insert(id);
                }
                // An ack printed twice would mean one message was acknowledged twice.
                "A" => ensure!(c.acked.insert(id), "id {id} acknowledged twice"),
                _ => bail!("unknown line {line}"),
            }
        }
        Ok(())
    });
    Ok((child, reader))
}

/// The ids stored in the queue, read straight from the database file.
fn remaining(db: &std::path::Path, queue: &str) -> anyhow::Result<HashMap<u64, usize>> {
    let conn = rusqlite::Connection::open(db)?;
    let mut stmt = conn.prepare("SELECT payload FROM busway_messages WHERE queue = ?1")?;
    let mut counts = HashMap::new();
    for payload in stmt.query_map([queue], |r| r.get::<_, Vec<u8>>(0))? {
        let id: u64 = String::from_utf8(payload?)?.parse()?;
        *counts.entry(id).or_insert(0) += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_publishers_and_consumers_lose_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("crash.db");
    let url = format!("sqlite://{}?lease_ms=300", db.display());
    let queue = "crash_queue";
    let confirmed = Arc::new(Mutex::new(Confirmed::default()));
    let mut rng = rand::rng();
    let cycles = cycles();

    for cycle in 0..cycles {
        let first_id = (cycle as u64) * 10_000_000;
        let first = first_id.to_string();
        let (mut publisher, pub_reader) = spawn(&["publish", &url, queue, &first], &confirmed)?;
        // The consumer runs in most cycles, so some cycles leave a backlog.
        let consumer = if cycle % 4 != 3 {
            Some(spawn(&["consume", &url, queue], &confirmed)?)
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(150..600)));
        publisher.kill()?; // SIGKILL
        publisher.wait()?;
        pub_reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        if let Some((mut child, reader)) = consumer {
            // Kill the consumer a little later, at a different point of its work.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
            child.kill()?;
            child.wait()?;
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }

        // Reopen with busway (runs recovery and migrations), then count.
        let transport = busway::connect(&url).await?;
        let stats = transport.queue_stats(&QueueName::new(queue)?).await?;
        transport.close().await;
        drop(transport);

        let stored = remaining(&db, queue)?;
        let mut c = confirmed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let stored_total: usize = stored.values().sum();
        ensure!(
            stats.ready + stats.delayed + stats.in_flight == stored_total as u64,
            "cycle {cycle}: stats {stats:?} disagree with {stored_total} stored rows"
        );
        for (id, n) in &stored {
            ensure!(*n == 1, "cycle {cycle}: message {id} stored {n} times");
            ensure!(
                !c.acked.contains(id),
                "cycle {cycle}: acknowledged message {id} is back"
            );
        }
        // A message the consumer received and acknowledged, but was killed
        // before reporting, is legitimately gone; only those may be missing.
        let mut acked_unreported = Vec::new();
        for id in &c.published {
            if stored.contains_key(id) || c.acked.contains(id) {
                continue;
            }
            ensure!(
                c.delivered.contains(id),
                "cycle {cycle}: confirmed message {id} was lost (never delivered, not stored)"
            );
            acked_unreported.push(*id);
        }
        ensure!(
            acked_unreported.len() <= 64,
            "cycle {cycle}: {} delivered messages vanished, more than the consumer had in flight",
            acked_unreported.len()
        );
        c.acked.extend(acked_unreported);
        c.delivered.clear();
        println!(
            "cycle {cycle}: {} confirmed, {} acknowledged, {} stored",
            c.published.len(),
            c.acked.len(),
            stored_total
        );
    }
    let c = confirmed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(
        c.published.len() > 100,
        "the publisher confirmed too little to test anything"
    );
    ensure!(!c.acked.is_empty(), "the consumer acknowledged nothing");
    Ok(())
}
