//! SIGKILL event-store processes over and over on SQLite (`synchronous=FULL`):
//!
//! - mid-append: after every kill, every append the child confirmed is
//!   stored, whole (every event of a batch or none of a batch at all), in
//!   order, with contiguous versions, and the global positions increase;
//! - mid-projection: a projection whose checkpoint is saved in its read
//!   model's transaction is killed while it works; in the end its read model
//!   equals a fold of the whole log from scratch (each event applied once).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway::es::{EventStore, ExpectedVersion, NewEvent, ProjectionRunner, StreamRead};
use busway::sqlite::{SqliteEventStore, SqliteTransport};
use busway::Transport;
use busway_faults::{amount, Balances, ES_STREAMS};
use rand::Rng;

const CHILD: &str = env!("CARGO_BIN_EXE_busway-es-crash-child");

/// Kills per test: 15 by default, more with `BUSWAY_ES_CRASH_CYCLES`.
fn cycles() -> usize {
    std::env::var("BUSWAY_ES_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
        .max(1)
}

/// An append the child reported as committed.
#[derive(Clone, Debug)]
struct Confirmed {
    stream: String,
    first: u64,
    count: u64,
    position: u64,
    batch: String,
}

fn spawn_child(
    args: &[&str],
    confirmed: &Arc<Mutex<Vec<Confirmed>>>,
) -> anyhow::Result<(Child, JoinHandle<anyhow::Result<()>>)> {
    let mut child = Command::new(CHILD)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the event-store crash child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let confirmed = confirmed.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let parts: Vec<&str> = line.split(' ').collect();
            let ["A", stream, first, count, position, batch] = parts.as_slice() else {
                bail!("malformed child line `{line}`");
            };
            let append = Confirmed {
                stream: (*stream).to_owned(),
                first: first.parse()?,
                count: count.parse()?,
                position: position.parse()?,
                batch: (*batch).to_owned(),
            };
            confirmed
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .push(append);
        }
        Ok(())
    });
    Ok((child, reader))
}

fn kill(child: &mut Child, reader: JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    child.kill()?; // SIGKILL
    child.wait()?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
}

async fn open(url: &str) -> anyhow::Result<(SqliteTransport, SqliteEventStore)> {
    let (path, config) = busway::sqlite::SqliteConfig::from_url(url)?;
    let transport = SqliteTransport::open_with(path, config)?;
    let store = SqliteEventStore::open(transport.clone()).await?;
    Ok((transport, store))
}

fn meta_str(event: &busway::es::StoredEvent, key: &str) -> anyhow::Result<String> {
    event.metadata[key]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("event {}@{} has no {key}", event.stream, event.version))
}

fn meta_u64(event: &busway::es::StoredEvent, key: &str) -> anyhow::Result<u64> {
    event.metadata[key]
        .as_u64()
        .with_context(|| format!("event {}@{} has no {key}", event.stream, event.version))
}

/// Checks the whole store after a kill.
async fn check_appends(
    store: &SqliteEventStore,
    confirmed: &[Confirmed],
    cycle: usize,
) -> anyhow::Result<u64> {
    // The global log: strictly increasing positions.
    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        log.extend(page);
    }
    ensure!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "cycle {cycle}: global positions do not strictly increase"
    );
    // Streams: contiguous versions from 1, positions increasing with them,
    // payloads in order, every batch whole.
    let mut by_position = HashMap::new();
    for event in &log {
        by_position.insert(event.position, event);
    }
    for s in 0..ES_STREAMS {
        let stream = format!("es-{s}");
        let events = store.read_stream(&stream, StreamRead::all()).await?;
        let mut i = 0;
        while i < events.len() {
            let event = &events[i];
            ensure!(
                event.version == i as u64 + 1,
                "cycle {cycle}: {stream} has version {} at index {i}",
                event.version
            );
            ensure!(
                event.data_json()?["version"] == event.version,
                "cycle {cycle}: {stream}@{} carries another version's payload",
                event.version
            );
            ensure!(
                by_position.get(&event.position).map(|e| e.id) == Some(event.id),
                "cycle {cycle}: {stream}@{} is not in the global log at its position",
                event.version
            );
            // The batch starting here must be complete and in order.
            let batch = meta_str(event, "batch")?;
            let size = meta_u64(event, "size")?;
            ensure!(
                meta_u64(event, "index")? == 0,
                "cycle {cycle}: {stream}@{} starts in the middle of batch {batch}",
                event.version
            );
            let end = i + size as usize;
            ensure!(
                end <= events.len(),
                "cycle {cycle}: batch {batch} of {stream} is cut short ({} of {size} events)",
                events.len() - i
            );
            for (k, member) in events[i..end].iter().enumerate() {
                ensure!(
                    meta_str(member, "batch")? == batch && meta_u64(member, "index")? == k as u64,
                    "cycle {cycle}: batch {batch} of {stream} is interleaved at {}",
                    member.version
                );
            }
            ensure!(
                events[i..end]
                    .windows(2)
                    .all(|w| w[0].position < w[1].position),
                "cycle {cycle}: positions of batch {batch} out of order"
            );
            i = end;
        }
        if let Some(w) = events.windows(2).find(|w| w[0].position >= w[1].position) {
            bail!(
                "cycle {cycle}: {stream}@{} has a position not above @{}",
                w[1].version,
                w[0].version
            );
        }
    }
    // Every confirmed append is there, whole, where it was reported.
    for append in confirmed {
        let events = store
            .read_stream(
                &append.stream,
                StreamRead::forwards_from(append.first).limit(append.count as usize),
            )
            .await?;
        ensure!(
            events.len() as u64 == append.count,
            "cycle {cycle}: confirmed append {append:?} is missing ({} events found)",
            events.len()
        );
        for (k, event) in events.iter().enumerate() {
            ensure!(
                meta_str(event, "batch")? == append.batch && meta_u64(event, "index")? == k as u64,
                "cycle {cycle}: confirmed append {append:?} was replaced at {}",
                event.version
            );
        }
        ensure!(
            events.last().map(|e| e.position) == Some(append.position),
            "cycle {cycle}: confirmed append {append:?} is at another position"
        );
    }
    Ok(log.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_appenders_leave_whole_ordered_streams() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?synchronous=full",
        dir.path().join("es.db").display()
    );
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let mut rng = rand::rng();
    for cycle in 0..cycles() {
        let (mut child, reader) = spawn_child(&["append", &url], &confirmed)?;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..700)));
        kill(&mut child, reader)?;

        let (transport, store) = open(&url).await?;
        let all = confirmed
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let stored = check_appends(&store, &all, cycle).await?;
        transport.close().await;
        println!(
            "cycle {cycle}: {} appends confirmed, {stored} events stored",
            all.len()
        );
    }
    let total = confirmed
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .len();
    ensure!(
        total > 100,
        "the child confirmed too few appends ({total}) to test anything"
    );
    Ok(())
}

/// Events appended before each projection cycle.
const DEPOSITS_PER_CYCLE: usize = 3_000;

/// Appends `n` deposits spread over 40 streams.
async fn deposit(store: &SqliteEventStore, n: usize, seed: usize) -> anyhow::Result<()> {
    let mut left = n;
    let mut k = seed;
    while left > 0 {
        let count = left.min(1 + k % 20);
        let events = (0..count)
            .map(|i| {
                NewEvent::json(
                    "crash.deposited",
                    &serde_json::json!({"amount": (k + i) % 97}),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        store
            .append(&format!("acct-{}", k % 40), ExpectedVersion::Any, events)
            .await?;
        left -= count;
        k += 1;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_projection_applies_every_event_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?synchronous=full",
        dir.path().join("projection.db").display()
    );
    let mut rng = rand::rng();
    let mut seed = 0;
    let mut interrupted = 0;
    for cycle in 0..cycles() {
        // More events for the projection to work through in each cycle.
        {
            let (transport, store) = open(&url).await?;
            deposit(&store, DEPOSITS_PER_CYCLE, seed).await?;
            seed += 1_000;
            transport.close().await;
        }
        // Kill it after a random number of committed batches, while it
        // works on the next ones (batches of 25: 120 per cycle's deposits).
        let mut child = Command::new(CHILD)
            .args(["project", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the projection child")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let batches = rng.random_range(1..100);
        let mut lines = BufReader::new(stdout).lines();
        for _ in 0..batches {
            match lines.next() {
                Some(line) => ensure!(line?.starts_with("B "), "unexpected child output"),
                None => bail!("cycle {cycle}: the projection child ended by itself"),
            }
        }
        // Anywhere in the next batches: before, during or after a commit.
        std::thread::sleep(Duration::from_micros(rng.random_range(0..30_000)));
        child.kill()?; // SIGKILL
        child.wait()?;

        let (transport, store) = open(&url).await?;
        let checkpoint = store.load_checkpoint(Balances::NAME).await?.unwrap_or(0);
        let head = store.head_position().await?;
        if checkpoint < head {
            interrupted += 1;
        }
        transport.close().await;
        println!(
            "cycle {cycle}: killed after {batches} batches, checkpoint {checkpoint} of {head}"
        );
    }
    ensure!(
        interrupted > 0,
        "no kill hit the projection before it caught up; nothing was tested"
    );

    // A last run to the end, in this process.
    let (transport, store) = open(&url).await?;
    let balances = Balances::new(store.clone());
    balances.create_table().await?;
    let reached = ProjectionRunner::new(Arc::new(store.clone()))
        .with_batch_size(25)
        .catch_up(&balances)
        .await?;
    ensure!(reached == store.head_position().await?);

    // The fold from scratch.
    let mut expected: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in page {
            let entry = expected.entry(event.stream.clone()).or_default();
            entry.0 += amount(&event.data_json()?);
            entry.1 += 1;
            entry.2 = i64::try_from(event.version)?;
        }
    }
    let expected: Vec<(String, i64, i64, i64)> = expected
        .into_iter()
        .map(|(stream, (total, events, last))| (stream, total, events, last))
        .collect();
    let actual = balances.rows().await?;
    ensure!(
        actual == expected,
        "the read model differs from the fold:\nread model {actual:?}\nfold {expected:?}"
    );
    transport.close().await;
    Ok(())
}
