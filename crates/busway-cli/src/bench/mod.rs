//! `busway bench`: throughput and latency of a transport or of a messaging
//! pattern, optionally side by side with the bare storage or client library
//! doing the same work (`--baseline raw`).
//!
//! `--pattern` picks what runs; each pattern lives in a module of its own
//! and is dispatched from [`run`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::protect::PayloadProtection;
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures::future::{FutureExt, LocalBoxFuture};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

mod instrumented;
mod metered;
mod raw;
mod rpc;
mod traced;
mod transport;
mod work_queue;

/// Options of `busway bench`.
#[derive(Args, Clone, Debug)]
pub(crate) struct BenchArgs {
    /// Backend to measure (`sqlite://PATH`, `memory://`, `amqp://…`).
    #[arg(long, env = "BUSWAY_URL", default_value = busway::DEFAULT_URL)]
    url: String,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Pattern::Transport)]
    pattern: Pattern,
    /// Messages (with `--pattern rpc`: calls) to send in total.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 8: the send time rides in the payload).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Concurrent consumers.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Unsettled deliveries each consumer may hold (handlers run concurrently up to this).
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    /// Publishes each publisher keeps in flight (awaiting durability).
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// RPC calls in flight at once (`--pattern rpc`).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Middleware on every task of `--pattern work-queue`, comma-separated (`retry,dedup`).
    #[arg(long, value_enum, value_delimiter = ',')]
    layers: Vec<work_queue::BenchLayer>,
    /// Publish everything first, then consume: measures a deep queue (and its memory).
    #[arg(long)]
    sequential: bool,
    /// Also run the bare storage doing the same work, and print the ratio.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Encrypt payloads (`aes-256-gcm` when no value is given, or
    /// `chacha20-poly1305`) or sign them (`hmac-sha256`): `--pattern
    /// transport` then runs the protected and the plain transport side by
    /// side and prints the ratio.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "aes-256-gcm")]
    encrypt: Option<BenchAlgorithm>,
    /// Compress payloads (`zstd`, `lz4`) before any encryption, beside the
    /// plain run like `--encrypt`. The bench payload is highly compressible.
    #[arg(long, value_enum)]
    compress: Option<BenchCompression>,
    /// Run `--pattern rpc` or `work-queue` twice: with no tracing
    /// subscriber, then with one recording every span (OpenTelemetry when
    /// built with the `otel` feature), and print the ratio.
    #[arg(long)]
    tracing: bool,
    /// Run `--pattern rpc` or `work-queue` twice: with no metrics
    /// recorder, then with the Prometheus recorder recording every metric
    /// (scraped once a second), and print the ratio.
    #[arg(long, conflicts_with = "tracing")]
    metrics: bool,
    /// Comparisons (`--baseline`, `--encrypt`, `--compress`, `--pattern
    /// work-queue`) run this many rounds of two slices each, alternating
    /// which side goes first (A B, B A, ...), after an untimed warm-up: a
    /// store that warms up (file growth, caches) then favours neither side.
    /// Each slice has `--messages / N` messages (with `--sequential`, a
    /// queue that deep: `--rounds 1` for the full depth).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// What `busway bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Pattern {
    /// Publishers and consumers on the bare transport.
    Transport,
    /// Request-response calls through the `Bus` RPC (`--in-flight` at once).
    Rpc,
    /// Tasks through the `Bus` work queue (with `--layers`), beside the bare transport.
    WorkQueue,
}

/// `--encrypt`: how payloads are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchAlgorithm {
    /// AES-256-GCM.
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305,
    /// HMAC-SHA256 signature (no secrecy).
    #[value(name = "hmac-sha256")]
    HmacSha256,
}

/// `--compress`: how payloads are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchCompression {
    /// Zstandard, level 3.
    Zstd,
    /// LZ4.
    Lz4,
}

impl BenchArgs {
    /// The protection `--encrypt` and `--compress` ask for, with its name.
    fn protection(&self) -> Option<(String, Arc<PayloadProtection>)> {
        use busway::protect::{Algorithm, ContentEncoding, Keyring, SecretKey};
        if self.encrypt.is_none() && self.compress.is_none() {
            return None;
        }
        let mut name = String::from("busway");
        let mut protection = match self.encrypt {
            Some(algorithm) => {
                let algorithm = match algorithm {
                    BenchAlgorithm::Aes256Gcm => Algorithm::Aes256Gcm,
                    BenchAlgorithm::ChaCha20Poly1305 => Algorithm::ChaCha20Poly1305,
                    BenchAlgorithm::HmacSha256 => Algorithm::HmacSha256,
                };
                name.push('+');
                name.push_str(algorithm.as_str());
                let keyring = Keyring::new().with_key("bench", SecretKey::generate());
                PayloadProtection::new(keyring, algorithm)
            }
            None => PayloadProtection::none(),
        };
        if let Some(compression) = self.compress {
            let encoding = match compression {
                BenchCompression::Zstd => ContentEncoding::Zstd,
                BenchCompression::Lz4 => ContentEncoding::Lz4,
            };
            name.push('+');
            name.push_str(encoding.as_str());
            protection = protection.compress(encoding);
        }
        Some((name, Arc::new(protection)))
    }
}

/// What to compare against.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Baseline {
    /// The backend's own client library doing the same work without busway.
    Raw,
}

/// The figures of one run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// What ran: `busway` or a baseline's name.
    system: String,
    url: String,
    messages: u64,
    size: usize,
    publishers: usize,
    consumers: usize,
    prefetch: u16,
    window: usize,
    sequential: bool,
    /// Messages per second published (until the last publish was durable).
    publish_rate: f64,
    /// Messages per second consumed and acknowledged.
    consume_rate: f64,
    /// Messages per second from the first publish to the last acknowledgement.
    e2e_rate: f64,
    e2e_p50_us: u64,
    e2e_p99_us: u64,
    e2e_max_us: u64,
    peak_rss_bytes: u64,
    elapsed_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<Box<Report>>,
    /// `e2e_rate / baseline.e2e_rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

/// Timings a run collects; turned into a [`Report`].
pub(crate) struct Measured {
    publish_elapsed: Duration,
    consume_elapsed: Duration,
    total_elapsed: Duration,
    latencies_us: Histogram<u64>,
}

impl Measured {
    /// Two slices of one system as one run: their times added, their
    /// latencies together.
    fn merge(mut self, other: Measured) -> anyhow::Result<Measured> {
        self.publish_elapsed += other.publish_elapsed;
        self.consume_elapsed += other.consume_elapsed;
        self.total_elapsed += other.total_elapsed;
        self.latencies_us
            .add(&other.latencies_us)
            .context("merging latency histograms")?;
        Ok(self)
    }

    /// Stops the clock of a run that started at `start`. `consume_start` is
    /// when consuming began in a `--sequential` run (`None`: consumers ran
    /// alongside the publishers, so consuming took the whole run).
    pub(crate) fn stop(
        start: Instant,
        publish_elapsed: Duration,
        consume_start: Option<Instant>,
        latencies_us: Histogram<u64>,
    ) -> Self {
        let total_elapsed = start.elapsed();
        Self {
            publish_elapsed,
            consume_elapsed: consume_start.map_or(total_elapsed, |c| c.elapsed()),
            total_elapsed,
            latencies_us,
        }
    }
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if (args.encrypt.is_some() || args.compress.is_some()) && args.pattern != Pattern::Transport {
        bail!("--encrypt and --compress apply to --pattern transport");
    }
    if args.tracing {
        let with = instrumented::Instrumentation {
            flag: "--tracing",
            transport_has_none: "the bare transport opens no spans",
            install: traced::install,
        };
        return instrumented::run(&args, with).await;
    }
    if args.metrics {
        let with = instrumented::Instrumentation {
            flag: "--metrics",
            transport_has_none: "the bare transport records no metrics",
            install: metered::install,
        };
        return instrumented::run(&args, with).await;
    }
    match args.pattern {
        Pattern::Transport => run_transport(&args).await,
        Pattern::Rpc => rpc::run(&args).await,
        Pattern::WorkQueue => work_queue::run(&args).await,
    }
}

/// Prints a report as JSON or as the pattern's table.
fn emit<R: Serialize>(json: bool, report: &R, table: impl FnOnce(&R)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        table(report);
    }
    Ok(())
}

async fn run_transport(args: &BenchArgs) -> anyhow::Result<()> {
    if args.size < 8 {
        bail!("--size must be at least 8 bytes (the send time rides in the payload)");
    }
    if args.publishers == 0 || args.consumers == 0 || args.prefetch == 0 || args.window == 0 {
        bail!("--publishers, --consumers, --prefetch and --window must be at least 1");
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let redacted = busway::redact_url(&args.url);

    if let Some((name, protection)) = args.protection() {
        if args.baseline.is_some() {
            bail!(
                "--encrypt and --compress compare with the plain transport; leave out --baseline"
            );
        }
        let protected = |sliced: BenchArgs| {
            let protection = protection.clone();
            async move { transport::run(&sliced, Some(protection)).await }.boxed_local()
        };
        let plain =
            |sliced: BenchArgs| async move { transport::run(&sliced, None).await }.boxed_local();
        let ((protected, protected_rss), (plain, plain_rss)) =
            side_by_side(args, &protected, &plain)
                .await
                .with_context(|| format!("protected benchmark of {redacted} failed"))?;
        let mut report = args.report(&name, &redacted, protected, protected_rss);
        let plain = args.report("busway", &redacted, plain, plain_rss);
        report.ratio = Some(report.e2e_rate / plain.e2e_rate);
        report.baseline = Some(Box::new(plain));
        return emit(args.json, &report, print_table);
    }

    if let Some(Baseline::Raw) = args.baseline {
        let name = std::sync::OnceLock::new();
        let busway =
            |sliced: BenchArgs| async move { transport::run(&sliced, None).await }.boxed_local();
        let raw = |sliced: BenchArgs| {
            let name = &name;
            async move {
                let (system, measured) = raw::run(&sliced).await?;
                let _ = name.set(system);
                Ok(measured)
            }
            .boxed_local()
        };
        let ((measured, rss), (raw, raw_rss)) = side_by_side(args, &busway, &raw)
            .await
            .with_context(|| format!("benchmark of {redacted} beside its raw baseline failed"))?;
        let mut report = args.report("busway", &redacted, measured, rss);
        let baseline = args.report(
            name.get().copied().unwrap_or("raw"),
            &redacted,
            raw,
            raw_rss,
        );
        report.ratio = Some(report.e2e_rate / baseline.e2e_rate);
        report.baseline = Some(Box::new(baseline));
        return emit(args.json, &report, print_table);
    }
    reset_peak_rss();
    let measured = transport::run(args, None)
        .await
        .with_context(|| format!("benchmark of {redacted} failed"))?;
    let report = args.report("busway", &redacted, measured, peak_rss_bytes());
    emit(args.json, &report, print_table)
}

/// One side of a comparison: runs the work of the `BenchArgs` it is given.
pub(crate) type Side<'a> = &'a dyn Fn(BenchArgs) -> LocalBoxFuture<'a, anyhow::Result<Measured>>;

/// Measures `a` and `b` in the same process on the same backend, fairly:
/// an untimed [warm-up](BenchArgs::warm_up) of `b`, then `--rounds` rounds
/// of one slice of each side (`--messages` split across the rounds), `a`
/// going first in the first round, `b` in the second, and so on. Returns
/// each side's slices merged, with the highest peak RSS a slice of it reached.
pub(crate) async fn side_by_side<'a>(
    args: &BenchArgs,
    a: Side<'a>,
    b: Side<'a>,
) -> anyhow::Result<((Measured, u64), (Measured, u64))> {
    let rounds = args.rounds.min(args.messages).max(1);
    let slice = |round: u64| {
        let mut sliced = args.clone();
        sliced.messages = args.messages / rounds + u64::from(round < args.messages % rounds);
        sliced
    };
    b(args.warm_up()).await.context("warm-up")?;
    let mut sides: [Option<(Measured, u64)>; 2] = [None, None];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            reset_peak_rss();
            let run = if side == 0 { a } else { b };
            let measured = run(slice(round)).await?;
            let peak = peak_rss_bytes();
            sides[side] = Some(match sides[side].take() {
                None => (measured, peak),
                Some((so_far, top)) => (so_far.merge(measured)?, top.max(peak)),
            });
        }
    }
    let [Some(a), Some(b)] = sides else {
        bail!("no round ran");
    };
    Ok((a, b))
}

impl BenchArgs {
    /// An untimed run before the measured ones (an eighth of the
    /// messages, no progress bar): files grown, caches and connections warm.
    fn warm_up(&self) -> BenchArgs {
        let mut warm_up = self.clone();
        warm_up.messages = (self.messages / 8).max(1);
        warm_up.json = true;
        warm_up
    }

    fn report(&self, system: &str, url: &str, m: Measured, peak_rss_bytes: u64) -> Report {
        let n = self.messages as f64;
        let rate = |d: Duration| n / d.as_secs_f64().max(1e-9);
        Report {
            system: system.into(),
            url: url.into(),
            messages: self.messages,
            size: self.size,
            publishers: self.publishers,
            consumers: self.consumers,
            prefetch: self.prefetch,
            window: self.window,
            sequential: self.sequential,
            publish_rate: rate(m.publish_elapsed),
            consume_rate: rate(m.consume_elapsed),
            e2e_rate: rate(m.total_elapsed),
            e2e_p50_us: m.latencies_us.value_at_quantile(0.50),
            e2e_p99_us: m.latencies_us.value_at_quantile(0.99),
            e2e_max_us: m.latencies_us.max(),
            peak_rss_bytes,
            elapsed_secs: m.total_elapsed.as_secs_f64(),
            baseline: None,
            ratio: None,
        }
    }

    /// Messages publisher `p` sends: an even share, the remainder to the first ones.
    fn share_of(&self, p: usize) -> u64 {
        let n = self.publishers as u64;
        self.messages / n + u64::from((p as u64) < self.messages % n)
    }

    fn progress(&self) -> ProgressBar {
        if self.json || self.messages < 50_000 {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(self.messages);
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} {per_sec} eta {eta}")
        {
            bar.set_style(style);
        }
        bar
    }
}

fn print_table(r: &Report) {
    println!(
        "busway bench: {} messages of {} B, {} publisher(s) x {} in flight, {} consumer(s) x prefetch {}{} on {}",
        r.messages,
        r.size,
        r.publishers,
        r.window,
        r.consumers,
        r.prefetch,
        if r.sequential { ", publish then consume" } else { "" },
        r.url
    );
    let mut rows = vec![r];
    if let Some(b) = &r.baseline {
        rows.push(b);
    }
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "system", "publish/s", "consume/s", "e2e/s", "p50 us", "p99 us", "max us", "peak RSS"
    );
    for r in rows {
        println!(
            "{:<16} {:>12.0} {:>12.0} {:>12.0} {:>10} {:>10} {:>10} {:>8.1}MB",
            r.system,
            r.publish_rate,
            r.consume_rate,
            r.e2e_rate,
            r.e2e_p50_us,
            r.e2e_p99_us,
            r.e2e_max_us,
            r.peak_rss_bytes as f64 / 1e6
        );
    }
    if let (Some(ratio), Some(b)) = (r.ratio, &r.baseline) {
        println!("ratio ({} e2e / {} e2e): {ratio:.2}", r.system, b.system);
    }
}

/// A payload of `size` bytes carrying the nanoseconds since `start` in its first 8.
pub(crate) fn stamped_payload(start: Instant, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64_le(start.elapsed().as_nanos() as u64);
    buf.resize(size, 0x5a);
    buf.freeze()
}

/// Microseconds since the payload was stamped.
pub(crate) fn latency_us(start: Instant, payload: &[u8]) -> u64 {
    let sent = payload
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let now = start.elapsed().as_nanos() as u64;
    now.saturating_sub(sent) / 1_000
}

pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new(3)?)
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the peak RSS so a baseline run is measured on its own (Linux ≥ 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
