//! `busway queues`: every queue with its counts and rates.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use busway::{QueueName, QueueStats, StatsError};
use clap::Args;
use serde::Serialize;

use super::exit::{Exit, Failure};
use super::settings::{parse_duration, Conn};
use super::Connection;

/// `busway queues`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway queues
  busway queues --url amqp://guest:guest@127.0.0.1:5672/%2f --interval 5s
  busway queues --json --interval 0 | jq 'select(.dead_lettered > 0)'
  busway queues task --all

Columns: READY (deliverable now), DELAYED (waiting for a delay or retry
backoff), IN FLIGHT (delivered, not settled), CONSUMERS, DEAD (messages in
the queue's dead-letter queue).

Rates: the counts are read twice, --interval apart. DEPTH/S is the change of
ready + delayed + in flight per second: negative while the queue drains,
positive while it grows; it is not a throughput (a queue whose consumers keep
up shows 0). ACKED/S is the broker's acknowledgement rate where the backend
measures one (RabbitMQ's management API), else `-`. --interval 0 reads once
and shows no rates.

RabbitMQ: AMQP cannot list queues, so the list (and IN FLIGHT, CONSUMERS and
ACKED/S, counted over every connection) comes from the management API
(rabbitmq-plugins enable rabbitmq_management); the broker refreshes those
counts every few seconds.")]
pub(crate) struct QueuesArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only queues whose name contains this text.
    filter: Option<String>,
    /// Print one JSON object per queue (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to sample for the rates (`500ms`, `1s`, `5s`; 0: no rates).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Also list dead-letter queues as rows of their own (their counts are
    /// always in their queue's DEAD column).
    #[arg(long)]
    all: bool,
}

/// One row of the listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Row {
    queue: String,
    ready: u64,
    delayed: u64,
    in_flight: u64,
    consumers: u64,
    dead_lettered: u64,
    /// Change of ready + delayed + in flight per second over the interval.
    depth_change_per_s: Option<f64>,
    /// Acknowledgements per second as the broker measures them.
    acked_per_s: Option<f64>,
}

/// One reading of every queue.
struct Sample {
    at: Instant,
    stats: BTreeMap<QueueName, QueueStats>,
    acked_per_s: BTreeMap<QueueName, f64>,
}

async fn sample(connection: &Connection, names: &[QueueName]) -> anyhow::Result<Sample> {
    let at = Instant::now();
    let mut stats = BTreeMap::new();
    let mut acked_per_s = BTreeMap::new();
    let management = match &connection.rabbitmq {
        Some(rabbit) => Some(
            rabbit
                .management_queues()
                .await
                .map_err(|e| unreachable_management(e.into()))?,
        ),
        None => None,
    };
    for name in names {
        let mut s = match connection.transport.queue_stats(name).await {
            Ok(s) => s,
            // Deleted between listing and reading: leave it out.
            Err(StatsError::QueueNotFound(_)) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the counts of {name}")),
        };
        if let Some(queues) = &management {
            if let Some(q) = queues.iter().find(|q| &q.name == name) {
                // The broker's view counts every connection, not only this one.
                s.in_flight = q.unacknowledged;
                s.consumers = q.consumers;
                if let Some(rate) = q.ack_rate {
                    acked_per_s.insert(name.clone(), rate);
                }
            }
        }
        stats.insert(name.clone(), s);
    }
    Ok(Sample {
        at,
        stats,
        acked_per_s,
    })
}

fn unreachable_management(error: anyhow::Error) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("unreachable") || text.contains("404") {
        Failure::wrap(Exit::Unreachable, error)
    } else {
        error
    }
}

/// The queues to show: those matching `filter`; without `all`, the
/// dead-letter queues of listed queues are folded into their DEAD column.
pub(crate) fn shown(names: Vec<QueueName>, filter: Option<&str>, all: bool) -> Vec<QueueName> {
    let set: BTreeSet<QueueName> = names.iter().cloned().collect();
    names
        .into_iter()
        .filter(|n| filter.is_none_or(|f| n.as_str().contains(f)))
        .filter(|n| {
            all || !n
                .as_str()
                .strip_prefix("dead_letter_")
                .and_then(|base| QueueName::new(base).ok())
                .is_some_and(|base| set.contains(&base))
        })
        .collect()
}

fn depth(s: &QueueStats) -> u64 {
    s.ready + s.delayed + s.in_flight
}

fn rows(first: &Sample, second: Option<&Sample>) -> Vec<Row> {
    let last = second.unwrap_or(first);
    last.stats
        .iter()
        .map(|(name, s)| {
            let depth_change_per_s = second.and_then(|second| {
                let before = first.stats.get(name)?;
                let seconds = second.at.duration_since(first.at).as_secs_f64();
                (seconds > 0.0).then(|| (depth(s) as f64 - depth(before) as f64) / seconds)
            });
            Row {
                queue: name.to_string(),
                ready: s.ready,
                delayed: s.delayed,
                in_flight: s.in_flight,
                consumers: s.consumers,
                dead_lettered: s.dead_lettered,
                depth_change_per_s,
                acked_per_s: last.acked_per_s.get(name).copied(),
            }
        })
        .collect()
}

pub(crate) async fn run(args: QueuesArgs) -> anyhow::Result<()> {
    let settings = args.conn.settings()?;
    let connection = Connection::open(&settings).await?;
    let result = async {
        let names = connection
            .transport
            .list_queues()
            .await
            .map_err(|e| unreachable_management(anyhow::Error::new(e)))
            .context("listing the queues")?;
        let names = shown(names, args.filter.as_deref(), args.all);
        let first = sample(&connection, &names).await?;
        let second = if args.interval.is_zero() {
            None
        } else {
            tokio::time::sleep(args.interval).await;
            Some(sample(&connection, &names).await?)
        };
        let rows = rows(&first, second.as_ref());
        if args.json {
            for row in &rows {
                println!("{}", serde_json::to_string(row)?);
            }
        } else {
            print!("{}", table(&rows));
        }
        anyhow::Ok(())
    }
    .await;
    connection.transport.close().await;
    result
}

fn rate(rate: Option<f64>, signed: bool) -> String {
    match rate {
        None => "-".into(),
        Some(r) if signed => format!("{r:+.1}"),
        Some(r) => format!("{r:.1}"),
    }
}

/// The table, or a line saying there is nothing.
fn table(rows: &[Row]) -> String {
    use std::fmt::Write;
    if rows.is_empty() {
        return "no queues\n".into();
    }
    let width = rows
        .iter()
        .map(|r| r.queue.chars().count())
        .max()
        .unwrap_or(0)
        .max("QUEUE".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>8}  {:>9}  {:>9}  {:>8}  {:>8}  {:>8}",
        "QUEUE", "READY", "DELAYED", "IN FLIGHT", "CONSUMERS", "DEAD", "DEPTH/S", "ACKED/S"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>8}  {:>9}  {:>9}  {:>8}  {:>8}  {:>8}",
            r.queue,
            r.ready,
            r.delayed,
            r.in_flight,
            r.consumers,
            r.dead_lettered,
            rate(r.depth_change_per_s, true),
            rate(r.acked_per_s, false),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<QueueName> {
        list.iter().filter_map(|n| QueueName::new(n).ok()).collect()
    }

    #[test]
    fn dead_letter_queues_fold_into_their_queue() {
        let all = names(&["dead_letter_jobs", "dead_letter_orphan", "jobs"]);
        let shown_names: Vec<String> = shown(all.clone(), None, false)
            .iter()
            .map(|q| q.to_string())
            .collect();
        assert_eq!(shown_names, ["dead_letter_orphan", "jobs"]);
        assert_eq!(shown(all.clone(), None, true).len(), 3);
        assert_eq!(shown(all, Some("orph"), false).len(), 1);
    }

    #[test]
    fn depth_rate_is_the_change_per_second() {
        let start = Instant::now();
        let q = names(&["jobs"]).remove(0);
        let reading = |at: Instant, ready: u64| Sample {
            at,
            stats: [(
                q.clone(),
                QueueStats {
                    ready,
                    ..QueueStats::default()
                },
            )]
            .into(),
            acked_per_s: BTreeMap::new(),
        };
        let first = reading(start, 100);
        let second = reading(start + Duration::from_secs(2), 60);
        let rows = rows(&first, Some(&second));
        assert_eq!(rows[0].ready, 60);
        assert_eq!(rows[0].depth_change_per_s, Some(-20.0));
        assert_eq!(rows[0].acked_per_s, None);
        assert_eq!(super::rows(&first, None)[0].depth_change_per_s, None);
    }
}
