//! `busway dlq`: list, show, replay and purge dead letters on any backend.

use std::time::Duration;

use busway::dead_letters::{DeadLetter, DeadLetterFilter, DeadLetters, PassReport, Replay};
use busway::QueueName;
use clap::{Args, Subcommand};

use crate::ops::exit::{Exit, Failure};
use crate::ops::settings::Conn;

/// Replays move this many dead letters per pass, so progress can be shown.
const REPLAY_CHUNK: usize = 100;

#[derive(Args)]
#[command(after_help = "Examples:
  busway dlq list task_queue
  busway dlq list task_queue --reason bounce --older-than 1h --json
  busway dlq show task_queue 0190f5c2-7d4e-7b61-a3f0-5a2b9e0c1d23
  busway dlq replay task_queue --kind send_email --dry-run
  busway dlq replay task_queue --to task_queue_retry
  busway dlq purge task_queue --older-than 7d

A long replay shows a progress bar on a terminal (not with --json or when
stdout is redirected). A dead letter missing for `show` exits 3.")]
pub(crate) struct DlqArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the dead letters of a queue (they stay where they are).
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full, by message id.
    Show {
        /// The queue (or its dead-letter queue, `dead_letter_…`).
        queue: String,
        /// The message id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their queue (or `--to` another one).
    Replay {
        #[command(flatten)]
        target: Target,
        /// Send them to this queue instead of the one they came from.
        #[arg(long)]
        to: Option<String>,
        /// Count what would move; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        target: Target,
        /// Count what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The queue and which of its dead letters.
#[derive(Args)]
struct Target {
    /// The queue (or its dead-letter queue, `dead_letter_…`).
    queue: String,
    /// Only those whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only those of this message type.
    #[arg(long)]
    kind: Option<String>,
    /// Only those dead-lettered at least this long ago (`30s`, `15m`, `2h`, `7d`).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<Duration>,
    /// Only those dead-lettered at most this long ago.
    #[arg(long, value_parser = parse_age)]
    newer_than: Option<Duration>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
}

impl Target {
    fn filter(&self) -> DeadLetterFilter {
        let mut filter = DeadLetterFilter::default();
        filter.reason = self.reason.clone();
        filter.kind = self.kind.clone();
        filter.older_than = self.older_than;
        filter.newer_than = self.newer_than;
        filter.limit = self.limit;
        filter
    }
}

/// `90s`, `15m`, `2h`, `7d`, or plain seconds.
fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not an age like 30s, 15m, 2h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit `{other}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

pub(crate) async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let settings = args.conn.settings()?;
    let transport = crate::ops::Connection::open(&settings).await?.transport;
    let result = match args.command {
        DlqCommand::List { target, json } => {
            let dead = DeadLetters::new(transport.clone(), &target.queue)?;
            let letters = dead.list(&target.filter()).await?;
            if json {
                for letter in &letters {
                    println!("{}", serde_json::to_string(&to_json(letter, false))?);
                }
            } else {
                print_table(&dead, &letters);
            }
            Ok(())
        }
        DlqCommand::Show { queue, id, json } => {
            let dead = DeadLetters::new(transport.clone(), &queue)?;
            let letters = dead.list(&DeadLetterFilter::default()).await?;
            let Some(letter) = letters.iter().find(|l| l.message.id.to_string() == id) else {
                return Err(Failure::msg(
                    Exit::NotFound,
                    format!("no dead letter with id {id} in {}", dead.queue()),
                ));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(letter, true))?);
            } else {
                print_letter(letter);
            }
            Ok(())
        }
        DlqCommand::Replay {
            target,
            to,
            dry_run,
            json,
        } => {
            let dead = DeadLetters::new(transport.clone(), &target.queue)?;
            let mut replay = Replay::default().dry_run(dry_run);
            if let Some(to) = to {
                replay = replay.to(QueueName::new(to)?);
            }
            let report = if dry_run {
                dead.replay(&target.filter(), &replay).await?
            } else {
                replay_in_chunks(&dead, &target.filter(), &replay, json).await?
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "queue": dead.queue().to_string(),
                        "replayed": report.moved,
                        "left": report.kept,
                        "dry_run": dry_run,
                    })
                );
            } else {
                print_report("replayed", &dead, report, dry_run);
            }
            Ok(())
        }
        DlqCommand::Purge { target, dry_run } => {
            let dead = DeadLetters::new(transport.clone(), &target.queue)?;
            let report = dead.purge(&target.filter(), dry_run).await?;
            print_report("purged", &dead, report, dry_run);
            Ok(())
        }
    };
    transport.close().await;
    result
}

/// Replays what `filter` matches in passes of [`REPLAY_CHUNK`], with a
/// progress bar on a terminal. The number to move is fixed up front, so
/// letters that fail again and come back during the replay are not replayed twice.
async fn replay_in_chunks(
    dead: &DeadLetters,
    filter: &DeadLetterFilter,
    replay: &Replay,
    json: bool,
) -> anyhow::Result<PassReport> {
    use std::io::IsTerminal;
    let total = dead.list(filter).await?.len();
    let bar = if json || !std::io::stdout().is_terminal() || total <= REPLAY_CHUNK {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "replaying {bar:40} {pos}/{len} dead letters ({per_sec}, eta {eta})",
        ) {
            bar.set_style(style);
        }
        bar
    };
    let mut moved = 0u64;
    while moved < total as u64 {
        let mut chunk = filter.clone();
        let left = usize::try_from(total as u64 - moved).unwrap_or(usize::MAX);
        chunk.limit = Some(left.min(REPLAY_CHUNK));
        let pass = dead.replay(&chunk, replay).await?;
        if pass.moved == 0 {
            break;
        }
        moved += pass.moved;
        bar.set_position(moved);
    }
    bar.finish_and_clear();
    let mut report = PassReport::default();
    report.moved = moved;
    report.kept = dead.count().await?;
    Ok(report)
}

pub(crate) fn to_json(letter: &DeadLetter, with_payload: bool) -> serde_json::Value {
    let m = &letter.message;
    let mut value = serde_json::json!({
        "id": m.id.to_string(),
        "kind": m.kind,
        "reason": letter.reason,
        "original_queue": letter.original_queue,
        "original_topic": letter.original_topic,
        "attempts": letter.attempts,
        "dead_lettered_at": letter.dead_lettered_at,
        "age_s": letter.age().as_secs(),
        "correlation_id": m.correlation_id,
        "payload_bytes": m.payload.len(),
    });
    if with_payload {
        let payload = match serde_json::from_slice::<serde_json::Value>(&m.payload) {
            Ok(json) => json,
            Err(_) => serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned()),
        };
        value["payload"] = payload;
        value["headers"] =
            serde_json::to_value(m.headers.iter().collect::<Vec<_>>()).unwrap_or_default();
        value["content_type"] = serde_json::Value::String(m.content_type.clone());
    }
    value
}

fn print_table(dead: &DeadLetters, letters: &[DeadLetter]) {
    if letters.is_empty() {
        println!("{}: no dead letters", dead.queue());
        return;
    }
    println!(
        "{:<36}  {:<20}  {:>8}  {:>8}  REASON",
        "ID", "TYPE", "ATTEMPTS", "AGE"
    );
    for letter in letters {
        println!(
            "{:<36}  {:<20}  {:>8}  {:>8}  {}",
            letter.message.id,
            truncate(&letter.message.kind, 20),
            letter.attempts.map_or("-".into(), |a| a.to_string()),
            human_age(letter.age()),
            letter.reason.as_deref().unwrap_or("-"),
        );
    }
    println!("{} dead letter(s) in {}", letters.len(), dead.queue());
}

fn print_letter(letter: &DeadLetter) {
    let m = &letter.message;
    println!("id:             {}", m.id);
    println!("type:           {}", m.kind);
    println!(
        "reason:         {}",
        letter.reason.as_deref().unwrap_or("-")
    );
    println!(
        "original queue: {}",
        letter.original_queue.as_deref().unwrap_or("-")
    );
    println!(
        "original topic: {}",
        letter.original_topic.as_deref().unwrap_or("-")
    );
    println!(
        "attempts:       {}",
        letter.attempts.map_or("-".into(), |a| a.to_string())
    );
    println!("age:            {}", human_age(letter.age()));
    println!("content type:   {}", m.content_type);
    for (name, value) in m.headers.iter() {
        println!("header:         {name}: {value}");
    }
    println!("payload:        {}", String::from_utf8_lossy(&m.payload));
}

fn print_report(verb: &str, dead: &DeadLetters, report: PassReport, dry_run: bool) {
    let would = if dry_run { "would be " } else { "" };
    println!(
        "{} dead letter(s) {would}{verb}, {} left in {}",
        report.moved,
        report.kept,
        dead.queue()
    );
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn human_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_units() {
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_age("7w").is_err());
        assert!(parse_age("soon").is_err());
    }
}
