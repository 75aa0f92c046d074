//! `herald-load`: drives Herald and `nats-server` through the same scenarios, in the same run
//! on the same machine, and prints both with their ratio (Markdown, for `docs/benchmarks.md`).
//!
//! It starts both servers itself on free loopback ports: `herald serve` (the binary next to
//! this one, or `--herald-bin`) on a temporary data directory, and the pinned official `nats-server` that `scripts/test` installs.
//!
//! - S1: 1 publisher → 1 subscriber, 128-byte events, as fast as possible;
//! - S2: 1 publisher → 1,000 subscribers on one key, 100 events/s for 10 s;
//! - S3: 10,000 subscriptions over 1,000 connections, one key each, 1,000 events/s;
//! - S4: 10,000 idle connections (server memory per connection);
//! - S5: durable ingest, 64 producers, batches of 1 and 64.
//!
//! `herald-load soak --minutes N` is different: a bounded soak of one server with every
//! transport, churn, offline periods and a restart, checked for loss, duplicates and leaks
//! (see `soak.rs` and `docs/soak.md`).

mod progress;
mod soak;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use herald_testkit::{NatsConfig, NatsServer, free_port};
use progress::Plan;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Clone)]
#[command(about = "Drive Herald and nats-server through the same load scenarios")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Scenarios to run (s1,s2,s3,s4,s5).
    #[arg(long, default_value = "s1,s2,s3,s4,s5", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// The herald binary (default: next to this one).
    #[arg(long, global = true)]
    herald_bin: Option<PathBuf>,
    /// Scale every count and duration down (for a quick check, not for figures).
    #[arg(long)]
    quick: bool,
    /// S1 with Herald alone, to compare two Herald builds (`--herald-bin`) in one session;
    /// its figures are not the comparison with the peers.
    #[arg(long)]
    herald_only: bool,
    /// Events in S1 (longer runs, e.g. to profile the server during one).
    #[arg(long, default_value_t = 200_000)]
    s1_events: u64,
    /// Print each phase's progress on standard error as plain lines even when it is not a
    /// terminal (on a terminal a bar is drawn anyway).
    #[arg(long, global = true, env = "HERALD_PROGRESS", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    progress: bool,
}

/// Instead of the comparison scenarios.
#[derive(clap::Subcommand, Clone, Debug)]
enum Cmd {
    /// A bounded soak of one `herald serve` under every transport at once, with churn,
    /// offline periods and one restart; fails on a lost or duplicated event or a leak.
    Soak(soak::SoakArgs),
}

const PAYLOAD: usize = 128;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What subscribers saw: latencies, counts, duplicates.
struct Tally {
    latency: Mutex<Histogram<u64>>,
    received: AtomicU64,
    duplicates: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            first: Mutex::new(None),
            last: Mutex::new(None),
        })
    }

    fn record(&self, sent_at: u64) {
        let lat = now_micros().saturating_sub(sent_at).max(1);
        let _ = self.latency.lock().unwrap().record(lat.min(60_000_000));
        self.received.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.first.lock().unwrap().get_or_insert(now);
        *self.last.lock().unwrap() = Some(now);
    }

    fn rate(&self) -> f64 {
        let (f, l) = (*self.first.lock().unwrap(), *self.last.lock().unwrap());
        match (f, l) {
            (Some(f), Some(l)) if l > f => {
                self.received.load(Ordering::Relaxed) as f64 / (l - f).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    fn pct(&self, q: f64) -> f64 {
        self.latency.lock().unwrap().value_at_quantile(q) as f64 / 1000.0
    }

    fn max(&self) -> f64 {
        self.latency.lock().unwrap().max() as f64 / 1000.0
    }

    /// Events received so far, for the progress display.
    fn counter(self: &Arc<Tally>) -> impl Fn() -> u64 + Send + Sync + 'static {
        let tally = self.clone();
        move || tally.received.load(Ordering::Relaxed)
    }
}

/// A counter's value, for the progress display.
fn reading(count: &Arc<AtomicU64>) -> impl Fn() -> u64 + Send + Sync + 'static {
    let count = count.clone();
    move || count.load(Ordering::Relaxed)
}

/// One subscriber's duplicate and loss check.
struct Seen {
    seen: HashSet<u64>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            seen: HashSet::new(),
        }
    }
    fn note(&mut self, seq: u64, tally: &Tally) -> bool {
        if self.seen.insert(seq) {
            true
        } else {
            tally.duplicates.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// CPU and memory of a process, from /proc.
#[derive(Clone, Copy, Debug)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kib: u64,
    at: Instant,
}

fn sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProcSample {
        cpu_ticks: ticks,
        rss_kib: rss,
        at: Instant::now(),
    }
}

/// Percent of one core used between two samples.
fn cpu_percent(a: ProcSample, b: ProcSample) -> f64 {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / 100.0 / secs * 100.0
}

/// A `herald serve` child on a free port and a temporary data directory.
struct HeraldProc {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HeraldProc {
    fn start(bin: &PathBuf) -> anyhow::Result<HeraldProc> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .env("HERALD_LOG", "warn")
            .env("HERALD_LIMITS__MAX_BATCH_EVENTS", "4096")
            .env("HERALD_LIMITS__MAX_BODY_BYTES", "8388608")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let p = HeraldProc {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("herald did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HeraldProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn herald_event(key: &str, seq: u64, ts: u64, data: &str) -> serde_json::Value {
    serde_json::to_value(event_json(key, seq, ts, data)).unwrap_or_default()
}

fn payload_b64() -> String {
    base64::engine::general_purpose::STANDARD.encode([7u8; PAYLOAD])
}

/// The number after `"name":` in `text`, without parsing the JSON around it: the tool reads
/// Herald's frames as cheaply as it reads NATS's binary payloads, so that its own CPU does not
/// weigh on one side of the comparison.
fn number_after(text: &[u8], name: &[u8]) -> Option<u64> {
    let at = text.windows(name.len()).position(|w| w == name)? + name.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
        any = true;
    }
    any.then_some(n)
}

/// An SSE subscriber: counts and times every event.
async fn herald_sse(url: String, tally: Arc<Tally>, ready: Arc<AtomicU64>) -> anyhow::Result<()> {
    let resp = reqwest::Client::new().get(url).send().await?;
    ready.fetch_add(1, Ordering::Relaxed);
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = Seen::new();
    while let Some(Ok(chunk)) = body.next().await {
        buf.extend_from_slice(&chunk);
        // Whole SSE events end with a blank line.
        let mut consumed = 0;
        while let Some(end) = buf[consumed..].windows(2).position(|w| w == b"\n\n") {
            let event = &buf[consumed..consumed + end];
            if let (Some(seq), Some(ts)) = (
                number_after(event, b"\"extended_event\":"),
                number_after(event, b"\"timestamp\":"),
            ) {
                if seen.note(seq, &tally) {
                    tally.record(ts);
                }
            }
            consumed += end + 2;
        }
        buf.drain(..consumed);
    }
    Ok(())
}

fn nats_payload(seq: u64, ts: u64) -> bytes::Bytes {
    let mut p = vec![7u8; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&ts.to_le_bytes());
    p.into()
}

fn nats_fields(p: &[u8]) -> (u64, u64) {
    let seq = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
    let ts = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
    (seq, ts)
}

async fn nats_sub(
    client: async_nats::Client,
    subject: String,
    tally: Arc<Tally>,
    ready: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut sub = client.subscribe(subject).await?;
    client.flush().await?;
    ready.fetch_add(1, Ordering::Relaxed);
    let mut seen = Seen::new();
    while let Some(m) = sub.next().await {
        let (seq, ts) = nats_fields(&m.payload);
        if seen.note(seq, &tally) {
            tally.record(ts);
        }
    }
    Ok(())
}

async fn wait_ready(ready: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last subscriptions reach the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn wait_received(tally: &Tally, expected: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    let mut stall = Instant::now();
    while Instant::now() < deadline {
        let got = tally.received.load(Ordering::Relaxed);
        if got >= expected {
            return;
        }
        if got != last {
            last = got;
            stall = Instant::now();
        } else if stall.elapsed() > Duration::from_secs(10) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scenario's result for one system.
struct Outcome {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    lost: u64,
    dup: u64,
    cpu: f64,
    /// Server CPU time between the samples per event received, in microseconds.
    cpu_us_per_delivery: f64,
    rss_mib: f64,
}

fn outcome(tally: &Tally, expected: u64, a: ProcSample, b: ProcSample) -> Outcome {
    let got = tally.received.load(Ordering::Relaxed);
    Outcome {
        rate: tally.rate(),
        p50: tally.pct(0.5),
        p99: tally.pct(0.99),
        p999: tally.pct(0.999),
        max: tally.max(),
        lost: expected.saturating_sub(got),
        dup: tally.duplicates.load(Ordering::Relaxed),
        cpu: cpu_percent(a, b),
        cpu_us_per_delivery: b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 * 10_000.0
            / got.max(1) as f64,
        rss_mib: b.rss_kib as f64 / 1024.0,
    }
}

/// A table of Herald against NATS core and JetStream, with Herald's ratio to each (higher
/// is better for Herald: rates divided, latencies inverted).
fn print_outcomes3(title: &str, how: &str, h: &Outcome, n: &Outcome, j: &Outcome) {
    println!("\n### {title}\n\n{how}\n");
    println!(
        "| metric | Herald | NATS core | JetStream (fsync) | Herald ÷ core | Herald ÷ JetStream |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |name: &str, a: f64, b: f64, c: f64, better_high: bool| {
        let ratio = |x: f64| if better_high { a / x } else { x / a };
        println!(
            "| {name} | {a:.2} | {b:.2} | {c:.2} | {:.2}× | {:.2}× |",
            ratio(b),
            ratio(c)
        );
    };
    row("deliveries/s", h.rate, n.rate, j.rate, true);
    row("latency p50 (ms)", h.p50, n.p50, j.p50, false);
    row("latency p99 (ms)", h.p99, n.p99, j.p99, false);
    row("latency p99.9 (ms)", h.p999, n.p999, j.p999, false);
    row("latency max (ms)", h.max, n.max, j.max, false);
    row(
        "server CPU per delivery (µs)",
        h.cpu_us_per_delivery,
        n.cpu_us_per_delivery,
        j.cpu_us_per_delivery,
        false,
    );
    println!("| lost events | {} | {} | {} | | |", h.lost, n.lost, j.lost);
    println!(
        "| duplicated events | {} | {} | {} | | |",
        h.dup, n.dup, j.dup
    );
    println!(
        "| server CPU (% of a core) | {:.0} | {:.0} | {:.0} | | |",
        h.cpu, n.cpu, j.cpu
    );
    println!(
        "| server RSS after (MiB) | {:.1} | {:.1} | {:.1} | | |",
        h.rss_mib, n.rss_mib, j.rss_mib
    );
}

struct Ctx {
    herald_bin: PathBuf,
    progress: progress::Mode,
    quick: bool,
    herald_only: bool,
    s1_events: u64,
}

impl Ctx {
    fn scale(&self, n: u64) -> u64 {
        if self.quick { (n / 10).max(1) } else { n }
    }
}

/// S1: one publisher, one subscriber, as fast as possible.
async fn s1(ctx: &Ctx) -> anyhow::Result<()> {
    let total = ctx.scale(ctx.s1_events);
    // Herald: one ordered producer on the WebSocket (batches of 128, up to 64 in flight, each
    // appended after the one before and acknowledged when durable); the subscriber on SSE.
    let h = HeraldProc::start(&ctx.herald_bin)?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let sub = tokio::spawn(herald_sse(
        h.url("/v1/stream?key=s1/k"),
        tally.clone(),
        ready.clone(),
    ));
    wait_ready(&ready, 1).await;
    let phase = progress::phase(
        ctx.progress,
        "S1 Herald",
        Plan::Count(total),
        tally.counter(),
    );
    let a = sample(h.pid());
    herald_ordered_publish(&h.url(""), "s1/k", total).await?;
    wait_received(&tally, total, Duration::from_secs(120)).await;
    let b = sample(h.pid());
    drop(phase);
    sub.abort();
    let herald = outcome(&tally, total, a, b);
    drop(h);
    if ctx.herald_only {
        println!(
            "S1, Herald only ({}): {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, lost {}, duplicated {}, server CPU {:.0}%",
            ctx.herald_bin.display(),
            herald.rate,
            herald.p50,
            herald.p99,
            herald.lost,
            herald.dup,
            herald.cpu
        );
        return Ok(());
    }

    // nats-server: core publish as fast as the client goes.
    let n = NatsServer::start(&NatsConfig::default())?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let client = async_nats::connect(n.url()).await?;
    let sub = tokio::spawn(nats_sub(
        client,
        "s1.k".into(),
        tally.clone(),
        ready.clone(),
    ));
    wait_ready(&ready, 1).await;
    let phase = progress::phase(
        ctx.progress,
        "S1 NATS core",
        Plan::Count(total),
        tally.counter(),
    );
    let a = sample(n.pid());
    let publisher = async_nats::connect(n.url()).await?;
    for seq in 0..total {
        publisher
            .publish("s1.k", nats_payload(seq, now_micros()))
            .await?;
    }
    publisher.flush().await?;
    wait_received(&tally, total, Duration::from_secs(60)).await;
    let b = sample(n.pid());
    drop(phase);
    sub.abort();
    let nats = outcome(&tally, total, a, b);
    drop(n);

    // JetStream, the like-for-like durable peer: `sync_interval: always` (fsync before every
    // acknowledgement), one publisher with up to 256 acknowledgements in flight, an ordered
    // consumer reading the stream as it grows.
    let js = s1_jetstream(total, ctx.progress).await?;
    print_outcomes3(
        "S1: 1 publisher → 1 subscriber, 128-byte events, as fast as possible",
        &format!(
            "{total} events. Herald: one ordered producer, WebSocket `publish` frames of 128 events with up to 64 in flight, each appended in order and acknowledged only when durable (fsync); subscriber on SSE. nats-server core: publish (fire and forget, nothing stored). JetStream ({}, `sync_interval: always`): one publisher with up to 256 acknowledgements in flight, an ordered consumer.",
            js.1
        ),
        &herald,
        &nats,
        &js.0,
    );
    Ok(())
}

/// One ordered producer (`herald-client`'s publisher): `total` events on `key` in batches of
/// 128, up to 64 unanswered; fails on any refused batch.
async fn herald_ordered_publish(base: &str, key: &str, total: u64) -> anyhow::Result<()> {
    const BATCH: u64 = 128;
    let client = herald_client::Client::builder()
        .server(base)
        .window(64)
        .build()?;
    let publisher = client.publisher();
    let data = payload_b64();
    let mut answers = Vec::new();
    for b in 0..total.div_ceil(BATCH) {
        let (start, end) = (b * BATCH, ((b + 1) * BATCH).min(total));
        let ts = now_micros();
        let events = (start..end)
            .map(|s| event_json(key, s, ts, &data))
            .collect();
        answers.push(publisher.send(events).await?);
    }
    for a in answers {
        a.await?;
    }
    Ok(())
}

/// Event number `seq`: an extended event carrying the number, its time and the payload.
fn event_json(key: &str, seq: u64, ts: u64, data: &str) -> herald_client::EventJson {
    herald_client::EventJson {
        key: key.to_owned(),
        kind: "extended".into(),
        extended_event: Some(seq as u32),
        timestamp: Some(ts),
        data: Some(data.to_owned()),
        ..Default::default()
    }
}

/// A JetStream server with `sync_interval: always` (fsync before every acknowledgement, the
/// like-for-like durable peer) and one file-backed stream over `subjects`.
async fn js_start(
    name: &str,
    subjects: &str,
) -> anyhow::Result<(
    NatsServer,
    async_nats::jetstream::Context,
    async_nats::jetstream::stream::Stream,
)> {
    use async_nats::jetstream;
    let n = NatsServer::start(&NatsConfig {
        jetstream: true,
        jetstream_extra: vec!["sync_interval: always".into()],
    })?;
    let client = async_nats::connect(n.url()).await?;
    let js = jetstream::new(client);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            storage: jetstream::stream::StorageType::File,
            // nats-server 2.15 limits a stream to 1,000 consumers unless it sets its own.
            max_consumers: 100_000,
            ..Default::default()
        })
        .await?;
    Ok((n, js, stream))
}

/// A JetStream subscriber: an ordered consumer on its own connection's view of `stream`,
/// filtered to `subject`, from the next message on; counted ready once created.
async fn js_sub(
    stream: async_nats::jetstream::stream::Stream,
    subject: String,
    tally: Arc<Tally>,
    ready: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let r = js_sub_inner(stream, subject, tally, ready).await;
    if let Err(e) = &r {
        eprintln!("a JetStream subscriber failed: {e:#}");
    }
    r
}

async fn js_sub_inner(
    stream: async_nats::jetstream::stream::Stream,
    subject: String,
    tally: Arc<Tally>,
    ready: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    use async_nats::jetstream;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            filter_subject: subject,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    ready.fetch_add(1, Ordering::Relaxed);
    let mut seen = Seen::new();
    while let Some(Ok(m)) = messages.next().await {
        let (seq, ts) = nats_fields(&m.payload);
        if seen.note(seq, &tally) {
            tally.record(ts);
        }
    }
    Ok(())
}

/// Waits until `count` reaches `n`; fails after 30 s (a subscriber that failed says why on
/// standard error).
async fn wait_count(count: &AtomicU64, n: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Relaxed) < n {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {n} subscribers became ready",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Publishes `total` messages at `rate` per second to JetStream, each acknowledged (durable)
/// before the next, as Herald's paced producer waits for each durable acknowledgement.
async fn js_paced(
    js: &async_nats::jetstream::Context,
    total: u64,
    rate: u64,
    subject_of: impl Fn(u64) -> String,
) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        tokio::time::sleep_until(start + Duration::from_micros(seq * 1_000_000 / rate)).await;
        js.publish(subject_of(seq), nats_payload(seq, now_micros()))
            .await?
            .await?;
    }
    Ok(())
}

/// The stream of a JetStream server as seen from a new connection of its own.
async fn js_stream_on_new_connection(
    n: &NatsServer,
    name: &str,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let client = async_nats::connect(n.url()).await?;
    Ok(async_nats::jetstream::new(client).get_stream(name).await?)
}

/// S1 against JetStream with `sync_interval: always`: the outcome and the server's version.
async fn s1_jetstream(total: u64, mode: progress::Mode) -> anyhow::Result<(Outcome, String)> {
    use async_nats::jetstream;
    let n = NatsServer::start(&NatsConfig {
        jetstream: true,
        jetstream_extra: vec!["sync_interval: always".into()],
    })?;
    let version = n.version().to_owned();
    let client = async_nats::connect(n.url()).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "S1".into(),
            subjects: vec!["s1.>".into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let tally = Tally::new();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let sub = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut seen = Seen::new();
            while let Some(Ok(m)) = messages.next().await {
                let (seq, ts) = nats_fields(&m.payload);
                if seen.note(seq, &tally) {
                    tally.record(ts);
                }
            }
        })
    };
    let phase = progress::phase(mode, "S1 JetStream", Plan::Count(total), tally.counter());
    let a = sample(n.pid());
    let mut acks = futures_util::stream::FuturesOrdered::new();
    for seq in 0..total {
        if acks.len() >= 256 {
            if let Some(ack) = acks.next().await {
                let _: async_nats::jetstream::publish::PublishAck = ack?;
            }
        }
        let ack = js.publish("s1.k", nats_payload(seq, now_micros())).await?;
        acks.push_back(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    wait_received(&tally, total, Duration::from_secs(120)).await;
    let b = sample(n.pid());
    drop(phase);
    sub.abort();
    Ok((outcome(&tally, total, a, b), version))
}

/// A Herald base URL for publishers in tasks.
struct HeraldProcUrl(String);

impl HeraldProcUrl {
    /// Posts an already serialized `{"events": [...]}` body.
    async fn post_raw(&self, http: &reqwest::Client, body: bytes::Bytes) -> anyhow::Result<()> {
        let r = http
            .post(format!("{}/v1/events", self.0))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("publish failed: {}", r.status());
        }
        Ok(())
    }
}

/// Publishes `total` events at `rate` per second, each as its own batch on one ordered
/// producer connection (`herald-client`), on keys chosen by `key_of(seq)`.
async fn herald_paced(
    h: &HeraldProc,
    total: u64,
    rate: u64,
    key_of: impl Fn(u64) -> String,
) -> anyhow::Result<()> {
    // One ordered producer connection, one event per batch, each sent on time without
    // waiting for the answers before it (they are checked at the end).
    let client = herald_client::Client::new(&h.url(""))?;
    let publisher = client.publisher();
    let data = payload_b64();
    let start = tokio::time::Instant::now();
    let mut answers = Vec::new();
    for seq in 0..total {
        tokio::time::sleep_until(start + Duration::from_micros(seq * 1_000_000 / rate)).await;
        let ev = event_json(&key_of(seq), seq, now_micros(), &data);
        answers.push(publisher.send(vec![ev]).await?);
    }
    for a in answers {
        a.await?;
    }
    Ok(())
}

async fn nats_paced(
    url: &str,
    total: u64,
    rate: u64,
    subject_of: impl Fn(u64) -> String,
) -> anyhow::Result<()> {
    let publisher = async_nats::connect(url).await?;
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        tokio::time::sleep_until(start + Duration::from_micros(seq * 1_000_000 / rate)).await;
        publisher
            .publish(subject_of(seq), nats_payload(seq, now_micros()))
            .await?;
        publisher.flush().await?;
    }
    Ok(())
}

/// How long `total` events at `rate` per second take.
fn paced(total: u64, rate: u64) -> Duration {
    Duration::from_millis(total * 1000 / rate.max(1))
}

/// S2: 1 publisher → 1,000 subscribers on one key, 100 events/s for 10 s.
async fn s2(ctx: &Ctx) -> anyhow::Result<()> {
    let subs = ctx.scale(1000);
    let total = ctx.scale(1000);
    let h = HeraldProc::start(&ctx.herald_bin)?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..subs {
        tasks.push(tokio::spawn(herald_sse(
            h.url("/v1/stream?key=s2/k"),
            tally.clone(),
            ready.clone(),
        )));
    }
    wait_ready(&ready, subs).await;
    let phase = progress::phase(
        ctx.progress,
        "S2 Herald",
        Plan::For(paced(total, 100)),
        tally.counter(),
    );
    let a = sample(h.pid());
    herald_paced(&h, total, 100, |_| "s2/k".into()).await?;
    wait_received(&tally, total * subs, Duration::from_secs(60)).await;
    let b = sample(h.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let herald = outcome(&tally, total * subs, a, b);
    drop(h);

    let n = NatsServer::start(&NatsConfig::default())?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let c = async_nats::connect(n.url()).await?;
        tasks.push(tokio::spawn(nats_sub(
            c,
            "s2.k".into(),
            tally.clone(),
            ready.clone(),
        )));
    }
    wait_ready(&ready, subs).await;
    let phase = progress::phase(
        ctx.progress,
        "S2 NATS core",
        Plan::For(paced(total, 100)),
        tally.counter(),
    );
    let a = sample(n.pid());
    nats_paced(&n.url(), total, 100, |_| "s2.k".into()).await?;
    wait_received(&tally, total * subs, Duration::from_secs(60)).await;
    let b = sample(n.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let nats = outcome(&tally, total * subs, a, b);
    drop(n);

    // JetStream: one ordered consumer per subscriber, each on its own connection.
    let (n, js, _) = js_start("S2", "s2.>").await?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let stream = js_stream_on_new_connection(&n, "S2").await?;
        tasks.push(tokio::spawn(js_sub(
            stream,
            "s2.k".into(),
            tally.clone(),
            ready.clone(),
        )));
    }
    wait_ready(&ready, subs).await;
    let phase = progress::phase(
        ctx.progress,
        "S2 JetStream",
        Plan::For(paced(total, 100)),
        tally.counter(),
    );
    let a = sample(n.pid());
    js_paced(&js, total, 100, |_| "s2.k".into()).await?;
    wait_received(&tally, total * subs, Duration::from_secs(60)).await;
    let b = sample(n.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let jet = outcome(&tally, total * subs, a, b);
    print_outcomes3(
        "S2: 1 publisher → 1,000 subscribers on one key, 100 events/s for 10 s",
        &format!(
            "{subs} subscribers, each on its own connection (Herald: SSE; JetStream ({}, `sync_interval: always`): an ordered consumer each), {total} events at 100/s; latency from publish to receipt. Herald and JetStream acknowledge each publish only when durable (Herald: one ordered producer connection, one event per batch, not waiting for an answer before the next).",
            n.version()
        ),
        &herald,
        &nats,
        &jet,
    );
    Ok(())
}

/// S3: 10,000 subscriptions over 1,000 connections, one key each, 1,000 events/s.
async fn s3(ctx: &Ctx) -> anyhow::Result<()> {
    let conns = ctx.scale(1000);
    let per_conn = 10u64;
    let keys = conns * per_conn;
    let total = ctx.scale(10_000);
    let h = HeraldProc::start(&ctx.herald_bin)?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (url, tally, ready) = (
            format!("ws://127.0.0.1:{}/v1/ws", h.port),
            tally.clone(),
            ready.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
            for k in 0..per_conn {
                let key = c * per_conn + k;
                ws.send(Message::text(serde_json::json!({"op": "subscribe", "id": key.to_string(), "key": format!("s3/k{key}")}).to_string())).await?;
            }
            let mut subscribed = 0;
            let mut seen = Seen::new();
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let t = t.as_bytes();
                if t.starts_with(b"{\"type\":\"event\"") {
                    if let (Some(seq), Some(ts)) = (
                        number_after(t, b"\"extended_event\":"),
                        number_after(t, b"\"timestamp\":"),
                    ) {
                        if seen.note(seq, &tally) {
                            tally.record(ts);
                        }
                    }
                } else if t.starts_with(b"{\"type\":\"subscribed\"") {
                    subscribed += 1;
                    if subscribed == per_conn {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    wait_ready(&ready, conns).await;
    let phase = progress::phase(
        ctx.progress,
        "S3 Herald",
        Plan::For(paced(total, 1000)),
        tally.counter(),
    );
    let a = sample(h.pid());
    herald_paced(&h, total, 1000, |seq| format!("s3/k{}", seq % keys)).await?;
    wait_received(&tally, total, Duration::from_secs(60)).await;
    let b = sample(h.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let herald = outcome(&tally, total, a, b);
    drop(h);

    let n = NatsServer::start(&NatsConfig::default())?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = async_nats::connect(n.url()).await?;
        for k in 0..per_conn {
            let key = c * per_conn + k;
            tasks.push(tokio::spawn(nats_sub(
                client.clone(),
                format!("s3.k{key}"),
                tally.clone(),
                ready.clone(),
            )));
        }
    }
    wait_ready(&ready, keys).await;
    let phase = progress::phase(
        ctx.progress,
        "S3 NATS core",
        Plan::For(paced(total, 1000)),
        tally.counter(),
    );
    let a = sample(n.pid());
    nats_paced(&n.url(), total, 1000, |seq| format!("s3.k{}", seq % keys)).await?;
    wait_received(&tally, total, Duration::from_secs(60)).await;
    let b = sample(n.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let nats = outcome(&tally, total, a, b);
    drop(n);

    // JetStream: an ordered consumer per key (filtered), ten per connection.
    let (n, js, _) = js_start("S3", "s3.>").await?;
    let tally = Tally::new();
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let stream = js_stream_on_new_connection(&n, "S3").await?;
        for k in 0..per_conn {
            let key = c * per_conn + k;
            tasks.push(tokio::spawn(js_sub(
                stream.clone(),
                format!("s3.k{key}"),
                tally.clone(),
                ready.clone(),
            )));
        }
        // Consumers are created a connection at a time, so the server is not asked for
        // ten thousand at once.
        wait_count(&ready, (c + 1) * per_conn).await?;
    }
    wait_ready(&ready, keys).await;
    let phase = progress::phase(
        ctx.progress,
        "S3 JetStream",
        Plan::For(paced(total, 1000)),
        tally.counter(),
    );
    let a = sample(n.pid());
    js_paced(&js, total, 1000, |seq| format!("s3.k{}", seq % keys)).await?;
    wait_received(&tally, total, Duration::from_secs(60)).await;
    let b = sample(n.pid());
    drop(phase);
    tasks.iter().for_each(|t| t.abort());
    let jet = outcome(&tally, total, a, b);
    print_outcomes3(
        "S3: 10,000 subscriptions over 1,000 connections, each on its own key, 1,000 events/s",
        &format!(
            "{conns} connections × {per_conn} subscriptions (Herald: WebSocket, one subscribe frame per key; JetStream ({}, `sync_interval: always`): an ordered consumer per key); {total} events at 1,000/s, each to one key in turn (Herald: one ordered producer connection, one event per batch; JetStream: each publish acknowledged before the next).",
            n.version()
        ),
        &herald,
        &nats,
        &jet,
    );
    Ok(())
}

/// S4: 10,000 idle connections; server memory per connection.
async fn s4(ctx: &Ctx) -> anyhow::Result<()> {
    let conns = ctx.scale(10_000);
    let h = HeraldProc::start(&ctx.herald_bin)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sample(h.pid());
    let ready = Arc::new(AtomicU64::new(0));
    let phase = progress::phase(
        ctx.progress,
        "S4 Herald connections",
        Plan::Count(conns),
        reading(&ready),
    );
    let mut held = Vec::new();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    for i in 0..conns {
        let (client, url, ready) = (
            client.clone(),
            h.url(&format!("/v1/stream?key=s4/k{i}")),
            ready.clone(),
        );
        held.push(tokio::spawn(async move {
            let resp = client.get(url).send().await?;
            ready.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.bytes_stream();
            while body.next().await.is_some() {}
            anyhow::Ok(())
        }));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wait_ready(&ready, conns).await;
    drop(phase);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sample(h.pid());
    let herald_per = (after.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / conns as f64;
    let herald_up = ready.load(Ordering::Relaxed);
    held.iter().for_each(|t| t.abort());
    drop(h);

    let n = NatsServer::start(&NatsConfig::default())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sample(n.pid());
    let mut clients = Vec::new();
    let connected = Arc::new(AtomicU64::new(0));
    let phase = progress::phase(
        ctx.progress,
        "S4 NATS core connections",
        Plan::Count(conns),
        reading(&connected),
    );
    for i in 0..conns {
        let c = async_nats::connect(n.url()).await?;
        let sub = c.subscribe(format!("s4.k{i}")).await?;
        clients.push((c, sub));
        connected.fetch_add(1, Ordering::Relaxed);
    }
    for (c, _) in &clients {
        c.flush().await?;
    }
    drop(phase);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sample(n.pid());
    let nats_per = (after.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / conns as f64;
    let nats_up = clients.len();
    drop(clients);
    drop(n);

    // JetStream: each connection with an ordered consumer on its own subject.
    let (n, _js, _) = js_start("S4", "s4.>").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sample(n.pid());
    let ready = Arc::new(AtomicU64::new(0));
    let tally = Tally::new();
    let mut tasks = Vec::new();
    let phase = progress::phase(
        ctx.progress,
        "S4 JetStream connections",
        Plan::Count(conns),
        reading(&ready),
    );
    for i in 0..conns {
        let stream = js_stream_on_new_connection(&n, "S4").await?;
        tasks.push(tokio::spawn(js_sub(
            stream,
            format!("s4.k{i}"),
            tally.clone(),
            ready.clone(),
        )));
        wait_count(&ready, i + 1).await?;
    }
    drop(phase);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sample(n.pid());
    let js_per = (after.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / conns as f64;
    let js_up = ready.load(Ordering::Relaxed);
    tasks.iter().for_each(|t| t.abort());
    println!("\n### S4: {conns} idle connections, one subscription each\n");
    println!(
        "Server resident memory growth divided by connections (Herald: SSE connections; NATS core: client connections with one subscription; JetStream ({}, `sync_interval: always`): client connections with an ordered consumer each).\n",
        n.version()
    );
    println!("| metric | Herald | NATS core | JetStream | Herald ÷ core | Herald ÷ JetStream |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| connections held | {herald_up} | {nats_up} | {js_up} | | |");
    println!(
        "| RSS per connection (bytes) | {herald_per:.0} | {nats_per:.0} | {js_per:.0} | {:.2}× | {:.2}× |",
        herald_per / nats_per,
        herald_per / js_per
    );
    Ok(())
}

/// S5: durable ingest from 64 producers, batches of 1 and 64.
async fn s5(ctx: &Ctx) -> anyhow::Result<()> {
    let secs = if ctx.quick { 2 } else { 5 };
    println!("\n### S5: durable ingest, 64 concurrent producers\n");
    // The like-for-like durable peer: fsync before every acknowledgement.
    let n = NatsServer::start(&NatsConfig {
        jetstream: true,
        jetstream_extra: vec!["sync_interval: always".into()],
    })?;
    println!(
        "Acknowledged events per second over {secs} s. Herald: POST /v1/events, acknowledged after fsync. JetStream: {}, `sync_interval: always` (fsync before every acknowledgement), file storage.\n",
        n.version()
    );
    println!("| batch | Herald (durable) | JetStream (sync always) | ratio |");
    println!("|---|---:|---:|---:|");
    for batch in [1u64, 64] {
        let h = HeraldProc::start(&ctx.herald_bin)?;
        let count = Arc::new(AtomicU64::new(0));
        let phase = progress::phase(
            ctx.progress,
            format!("S5 Herald, batches of {batch}"),
            Plan::For(Duration::from_secs(secs)),
            reading(&count),
        );
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let http = reqwest::Client::new();
        let data = Arc::new(payload_b64());
        let mut tasks = Vec::new();
        for p in 0..64u64 {
            let (http, data, count, url) = (http.clone(), data.clone(), count.clone(), h.url(""));
            tasks.push(tokio::spawn(async move {
                let hp = HeraldProcUrl(url);
                // The same body each time: the tool's CPU goes to load, not to JSON.
                let events: Vec<_> = (0..batch)
                    .map(|i| herald_event(&format!("s5/p{p}"), i, now_micros(), &data))
                    .collect();
                let body = serde_json::to_vec(&serde_json::json!({ "events": events }))
                    .map(bytes::Bytes::from)
                    .expect("json");
                while Instant::now() < deadline {
                    hp.post_raw(&http, body.clone()).await.expect("publish");
                    count.fetch_add(batch, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let herald = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        drop(phase);
        drop(h);

        let client = async_nats::connect(n.url()).await?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .max_ack_inflight(1 << 17)
            .build(client);
        let stream = format!("S5B{batch}");
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.>")],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let count = Arc::new(AtomicU64::new(0));
        let phase = progress::phase(
            ctx.progress,
            format!("S5 JetStream, batches of {batch}"),
            Plan::For(Duration::from_secs(secs)),
            reading(&count),
        );
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..64u64 {
            let (js, count, subject) = (js.clone(), count.clone(), format!("{stream}.p{p}"));
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                while Instant::now() < deadline {
                    let mut acks = Vec::new();
                    for i in 0..batch {
                        acks.push(
                            js.publish(subject.clone(), nats_payload(seq + i, now_micros()))
                                .await
                                .expect("publish"),
                        );
                    }
                    for a in acks {
                        a.await.expect("ack");
                    }
                    seq += batch;
                    count.fetch_add(batch, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let jet = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        drop(phase);
        println!(
            "| {batch} | {herald:.0} | {jet:.0} | {:.2}× |",
            herald / jet
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    herald_testkit::init_tls();
    let herald_bin = match &args.herald_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("herald"),
    };
    if !herald_bin.exists() {
        bail!(
            "{} does not exist: build it (cargo build --release -p herald-server) or pass --herald-bin",
            herald_bin.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let progress = progress::Mode::choose(args.progress);
    if let Some(Cmd::Soak(soak_args)) = args.command {
        if !rt.block_on(soak::run(soak_args, herald_bin, progress))? {
            bail!("the soak failed (see the summary above)");
        }
        return Ok(());
    }
    let ctx = Ctx {
        herald_bin,
        progress,
        quick: args.quick,
        herald_only: args.herald_only,
        s1_events: args.s1_events,
    };
    println!(
        "## herald-load — Herald vs nats-server ({} CPUs, {})",
        std::thread::available_parallelism().map_or(0, usize::from),
        String::from_utf8_lossy(
            &Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%d")
                .output()?
                .stdout
        )
        .trim()
    );
    rt.block_on(async {
        for s in &args.scenarios {
            match s.as_str() {
                "s1" => s1(&ctx).await?,
                "s2" => s2(&ctx).await?,
                "s3" => s3(&ctx).await?,
                "s4" => s4(&ctx).await?,
                "s5" => s5(&ctx).await?,
                other => bail!("unknown scenario {other}"),
            }
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
