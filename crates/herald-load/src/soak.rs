//! `herald-load soak`: a bounded soak of one `herald serve` with every transport at once.
//!
//! Producers publish steadily (durable `POST /v1/events`, some with an Idempotency-Key)
//! while long-lived subscribers follow them over SSE, WebSocket, durable long-poll, a webhook
//! (whose receiver fails and stalls on purpose), EWS streaming and MAPI/HTTP; short-lived
//! clients of every transport come and go; the server is taken offline and online every few
//! minutes and restarted once (SIGTERM, then again on the same port and data directory).
//! Every few seconds the server's RSS, open file descriptors and tokio tasks are sampled,
//! with the delivery latency. At the end every subscriber must hold every acknowledged
//! event of its filter, once and in order (as its transport promises), file descriptors and
//! tasks must be back where they were, and RSS must not keep growing after the warm-up.
//!
//! See `docs/soak.md`.

mod clients;
mod exchange;
mod plot;
mod track;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use clients::{API_KEY, CHURN_KINDS, PRODUCERS, Receiver, Shared, WsSub};
use plot::{Chart, Series, linear_fit};
use track::{GROUP_NAMES, Lat, Ledger, TRANSPORTS, Tracker, Verdict, g};

/// `herald-load soak`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SoakArgs {
    /// How long the load runs, in minutes (the drain and checks come after).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Where the CSV of samples, the SVG plots and summary.md are written.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Multiplies every producer's rate (1.0: about 80 events/s in all).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    /// Fail if RSS grows faster than this after the warm-up (KiB per minute; see
    /// docs/soak.md for why this value).
    #[arg(long, default_value_t = 256.0)]
    max_rss_slope_kib: f64,
    /// Growth (KiB) the fit window may hold for bounded caches still filling: the limit on
    /// the slope is the larger of `--max-rss-slope-kib` and this divided by the window's
    /// minutes, which matters only for short runs.
    #[arg(long, default_value_t = 3072.0)]
    cache_allowance_kib: f64,
    /// Fail if open file descriptors grew by more than this between two quiet points of
    /// one server process.
    #[arg(long, default_value_t = 8)]
    fd_allowance: i64,
    /// Fail if tokio tasks grew by more than this between two quiet points of one server
    /// process.
    #[arg(long, default_value_t = 16)]
    task_allowance: i64,
}

/// The EWS/MAPI users (`alice-pw`, `bob-pw`, hashed as `herald users add` does) and the
/// producers' key.
fn config_toml() -> String {
    format!(
        r#"[auth]
keys = ["{API_KEY}"]
[auth.users]
"alice@example.test" = "$argon2id$v=19$m=19456,t=2,p=1$NiCSfojN0fumSgcBcWWceQ$Zo150co3jiVydGoPKVOTDyOjC4rJU6M9i5WM+k/b3Kg"
"bob@example.test" = "$argon2id$v=19$m=19456,t=2,p=1$nSIM1b+Dcdm4Asx40UPrwA$JDKuI3+ptqBut0QM2AUVzYnSKBb9SHSf2UvWuBdoCaU"

# A soak needs a steady state: the log is capped, so that it (and redb's page cache, which
# keeps the pages it writes) stops growing after a couple of minutes, and idempotency keys
# are forgotten after two minutes (retries come within seconds).
[retention]
max_events = 6000
idempotency_ttl = "2m"

[limits]
keepalive = "5s"

[connections]
lease = "30s"

[ews]
# One EWS "minute" is 10 s: streaming connections (ConnectionTimeout 1) end and are
# reopened every 10 s, pull subscriptions left behind expire after 10 s.
minute = "10s"
heartbeat = "3s"

[mapi]
notification_wait = "10s"
pending_period = "3s"
session_idle = "15s"

[webhooks]
request_timeout = "2s"
retry_base = "250ms"
retry_cap = "3s"
"#
    )
}

/// The `herald serve` under test.
struct Server {
    bin: PathBuf,
    port: u16,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pid: Arc<AtomicU32>,
}

impl Server {
    async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        let http = clients::http(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "herald exited at start ({status}); see {}",
                        self.log.display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("herald did not become ready; see {}", self.log.display());
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit: whether it was clean, and how long it took.
    async fn terminate(&mut self) -> anyhow::Result<(bool, Duration)> {
        let Some(mut child) = self.child.take() else {
            return Ok((true, Duration::ZERO));
        };
        let started = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = child.try_wait()? {
                self.pid.store(0, Ordering::Relaxed);
                return Ok((s.success(), started.elapsed()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.pid.store(0, Ordering::Relaxed);
                return Ok((false, started.elapsed()));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Resident memory (bytes) and open file descriptors of a process.
fn proc_figures(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss_kib * 1024, fds))
}

/// CPU ticks (user + system) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `herald_tokio_tasks` from `/metrics`.
async fn tokio_tasks(http: &reqwest::Client, base: &str) -> Option<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("herald_tokio_tasks ") || l.starts_with("herald_tokio_tasks{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// One sample.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    segment: u8,
    online: bool,
    rss: Option<u64>,
    fds: Option<u64>,
    tasks: Option<u64>,
    /// Server CPU over the interval, percent of one core.
    cpu: Option<f64>,
    /// This tool's CPU over the interval, percent of one core.
    tool_cpu: Option<f64>,
    published: u64,
    delivered: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    p99_by_transport: Vec<f64>,
}

/// What the sampler reads besides the process.
struct Probe {
    shared: Arc<Shared>,
    pid: Arc<AtomicU32>,
    segment: AtomicU32,
    online: AtomicBool,
    start: Instant,
    samples: Mutex<Vec<Sample>>,
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

async fn sampler(p: Arc<Probe>, every: Duration, stop: CancellationToken) {
    let http = clients::http(Duration::from_secs(3));
    let mut next = Instant::now();
    let me = std::process::id();
    let mut last_cpu: Option<(u32, u64, u64, Instant)> = None;
    loop {
        next += every;
        tokio::select! {
            () = stop.cancelled() => return,
            () = sleep_until(next) => {}
        }
        let pid = p.pid.load(Ordering::Relaxed);
        let now = Instant::now();
        let (ticks, my_ticks) = (cpu_ticks(pid), cpu_ticks(me).unwrap_or(0));
        let (cpu, tool_cpu) = match (last_cpu, ticks) {
            (Some((lp, lt, lm, at)), Some(t)) if lp == pid => {
                let secs = (now - at).as_secs_f64().max(1e-3);
                (
                    Some(t.saturating_sub(lt) as f64 / secs),
                    Some(my_ticks.saturating_sub(lm) as f64 / secs),
                )
            }
            _ => (None, None),
        };
        last_cpu = ticks.map(|t| (pid, t, my_ticks, now));
        let figures = (pid != 0).then(|| proc_figures(pid)).flatten();
        let tasks = if pid != 0 {
            tokio_tasks(&http, &p.shared.base).await
        } else {
            None
        };
        let (all, per) = p.shared.lat.take_interval();
        let s = Sample {
            t: p.start.elapsed().as_secs_f64(),
            segment: p.segment.load(Ordering::Relaxed) as u8,
            online: p.online.load(Ordering::Relaxed),
            rss: figures.map(|f| f.0),
            fds: figures.map(|f| f.1),
            tasks,
            cpu,
            tool_cpu,
            published: p.shared.published.load(Ordering::Relaxed),
            delivered: p.shared.lat.delivered.load(Ordering::Relaxed),
            p50_ms: ms(&all, 0.5),
            p99_ms: ms(&all, 0.99),
            max_ms: if all.is_empty() {
                f64::NAN
            } else {
                all.max() as f64 / 1000.0
            },
            p99_by_transport: per.iter().map(|h| ms(h, 0.99)).collect(),
        };
        p.samples.lock().unwrap().push(s);
    }
}

/// File descriptors, tasks and RSS at a quiet point (no churn client connected): the median
/// of three readings two seconds apart.
#[derive(Clone, Copy, Debug, Default)]
struct Quiet {
    fds: i64,
    tasks: i64,
    rss: i64,
}

async fn quiet(p: &Probe) -> Quiet {
    let http = clients::http(Duration::from_secs(3));
    let (mut f, mut t, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        if i > 0 {
            sleep(Duration::from_secs(2)).await;
        }
        let pid = p.pid.load(Ordering::Relaxed);
        if let Some((rss, fds)) = proc_figures(pid) {
            f.push(fds as i64);
            r.push(rss as i64);
        }
        if let Some(n) = tokio_tasks(&http, &p.shared.base).await {
            t.push(n as i64);
        }
    }
    let median = |mut v: Vec<i64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(-1)
    };
    Quiet {
        fds: median(f),
        tasks: median(t),
        rss: median(r),
    }
}

/// Sets the server's state, retrying while a transition is pending (409).
async fn set_state(base: &str, state: &str) -> anyhow::Result<()> {
    let http = clients::http(Duration::from_secs(40));
    for _ in 0..400 {
        let r = http
            .put(format!("{base}/v1/state"))
            .bearer_auth(API_KEY)
            .json(&json!({"state": state, "block": true}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status() == 409 => {}
            Ok(r) => bail!("PUT /v1/state {state}: {}", r.status()),
            Err(_) => {}
        }
        sleep(Duration::from_millis(100)).await;
    }
    bail!("PUT /v1/state {state}: still refused")
}

/// Waits until `check` holds or `limit` passes; whether it held.
async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        sleep(Duration::from_millis(250)).await;
    }
    check()
}

/// The timeline of one soak, in seconds from the start.
struct Plan {
    total: f64,
    restart_at: f64,
    settle: f64,
    flips: Vec<(f64, f64)>,
    warmup: f64,
}

impl Plan {
    fn new(minutes: f64) -> Plan {
        let total = (minutes * 60.0).max(60.0);
        let restart_at = total / 3.0;
        let settle = 20.0;
        let period = (total / 6.0).clamp(40.0, 240.0);
        let offline = (period / 6.0).clamp(8.0, 20.0);
        let mut flips = Vec::new();
        let mut at = period;
        while at + offline < total - 15.0 {
            let clear_of_restart =
                at + offline < restart_at - settle - 10.0 || at > restart_at + 2.0 * settle + 10.0;
            if clear_of_restart {
                flips.push((at, at + offline));
            }
            at += period;
        }
        let segment2 = total - restart_at;
        Plan {
            total,
            restart_at,
            settle,
            flips,
            warmup: (segment2 / 4.0).clamp(45.0, 300.0),
        }
    }
}

/// Everything the report needs.
struct Outcome {
    plan: Plan,
    elapsed: f64,
    samples: Vec<Sample>,
    quiet: [Quiet; 4],
    restart_done: f64,
    exits: Vec<(bool, Duration)>,
    verdicts: Vec<Verdict>,
    churn: track::ChurnVerdict,
    mapi: track::MapiVerdict,
    shared: Arc<Shared>,
    receiver: Arc<Receiver>,
    drained: bool,
    drain_secs: f64,
    bands: Vec<(f64, f64)>,
    webhook_id: String,
}

/// Runs the soak; `Ok(true)` if every check passed.
pub(crate) async fn run(
    args: SoakArgs,
    bin: PathBuf,
    progress: crate::progress::Mode,
) -> anyhow::Result<bool> {
    let plan = Plan::new(args.minutes);
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, config_toml())?;
    let port = herald_testkit::free_port()?;
    let pid = Arc::new(AtomicU32::new(0));
    let mut server = Server {
        bin,
        port,
        data: tmp.path().join("data"),
        config,
        log: tmp.path().join("herald.log"),
        child: None,
        pid: pid.clone(),
    };
    println!(
        "soak: {:.1} min of load on 127.0.0.1:{port}, restart at {:.0} s, offline at {:?} s; server log {}",
        plan.total / 60.0,
        plan.restart_at,
        plan.flips
            .iter()
            .map(|(a, b)| format!("{a:.0}–{b:.0}"))
            .collect::<Vec<_>>(),
        server.log.display()
    );
    server.start().await?;
    let shared = Arc::new(Shared {
        base: format!("http://127.0.0.1:{port}"),
        port,
        ledger: Ledger::default(),
        lat: Lat::new(),
        stop: CancellationToken::new(),
        stop_producers: CancellationToken::new(),
        stop_churn: CancellationToken::new(),
        churn_paused: AtomicBool::new(true),
        churn: Mutex::default(),
        churn_opened: Default::default(),
        churn_failed: AtomicU64::new(0),
        churn_first_error: Mutex::default(),
        mapi_sessions: Mutex::default(),
        rate: args.rate,
        published: AtomicU64::new(0),
    });
    let phase = crate::progress::phase(
        progress,
        "soak",
        crate::progress::Plan::For(Duration::from_secs_f64(plan.total)),
        {
            let shared = shared.clone();
            move || shared.published.load(Ordering::Relaxed)
        },
    );
    let result = drive(&args, plan, &mut server, shared.clone()).await;
    drop(phase);
    shared.stop.cancel();
    shared.stop_producers.cancel();
    shared.stop_churn.cancel();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let keep = args.out.join("herald-server.log");
            std::fs::create_dir_all(&args.out)?;
            let _ = std::fs::copy(&server.log, &keep);
            return Err(e.context(format!(
                "the soak stopped; server log in {}",
                keep.display()
            )));
        }
    };
    let passed = report(&args, &outcome)?;
    if !passed {
        let keep = args.out.join("herald-server.log");
        let _ = std::fs::copy(&server.log, &keep);
        println!("soak: server log kept in {}", keep.display());
    }
    Ok(passed)
}

async fn drive(
    args: &SoakArgs,
    plan: Plan,
    server: &mut Server,
    s: Arc<Shared>,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let at = move |secs: f64| start + Duration::from_secs_f64(secs);
    let probe = Arc::new(Probe {
        shared: s.clone(),
        pid: server.pid.clone(),
        segment: AtomicU32::new(1),
        online: AtomicBool::new(true),
        start,
        samples: Mutex::default(),
    });

    // The long-lived subscribers, each with its filter (a set of producer groups).
    let sse_all = Arc::new(Tracker::new(
        "SSE subtree soak",
        "sse",
        g(0) | g(1) | g(2) | g(3),
    ));
    let sse_hot = Arc::new(Tracker::new("SSE key soak/hot", "sse", g(3)));
    let ws_a = [
        ("m0", json!({"subtree": "soak/m0"}), g(0)),
        ("m1", json!({"subtree": "soak/m1"}), g(1)),
        ("hot", json!({"key": "soak/hot"}), g(3)),
    ];
    let ws_b = [
        ("m2", json!({"subtree": "soak/m2"}), g(2)),
        ("alice", json!({"subtree": "alice@example.test"}), g(4)),
        ("bob", json!({"subtree": "bob@example.test"}), g(5)),
    ];
    let mk_ws = |conn: &str, subs: &[(&str, serde_json::Value, u8)]| -> Vec<WsSub> {
        subs.iter()
            .map(|(id, filter, mask)| WsSub {
                id: (*id).to_owned(),
                filter: filter.clone(),
                tracker: Arc::new(Tracker::new(
                    &format!("WebSocket {conn} sub {id}"),
                    "websocket",
                    *mask,
                )),
            })
            .collect()
    };
    let ws1 = mk_ws("#1", &ws_a);
    let ws2 = mk_ws("#2", &ws_b);
    let poll_m1 = Arc::new(Tracker::new("long-poll subtree soak/m1", "long-poll", g(1)));
    let poll_alice = Arc::new(Tracker::new(
        "long-poll subtree alice@example.test",
        "long-poll",
        g(4),
    ));
    let webhook = Arc::new(Tracker::new("webhook subtree soak/m2", "webhook", g(2)));
    let ews = Arc::new(Tracker::new(
        "EWS streaming, alice, all folders",
        "ews",
        g(4),
    ));
    let mapi = Arc::new(Tracker::new("MAPI session, bob, whole store", "mapi", g(5)));

    let mut trackers: Vec<Arc<Tracker>> = vec![sse_all.clone(), sse_hot.clone()];
    trackers.extend(ws1.iter().map(|x| x.tracker.clone()));
    trackers.extend(ws2.iter().map(|x| x.tracker.clone()));
    trackers.extend([
        poll_m1.clone(),
        poll_alice.clone(),
        webhook.clone(),
        ews.clone(),
    ]);

    let receiver = Receiver::new(s.clone(), webhook.clone());
    let hook_url = clients::serve_receiver(receiver.clone(), s.stop.clone()).await?;
    let webhook_id = clients::create_subscription(
        &s,
        json!({"transport": "webhook", "url": hook_url, "subtree": "soak/m2", "after": 0}),
    )
    .await?;
    webhook.connected.store(true, Ordering::Relaxed);
    webhook.connections.fetch_add(1, Ordering::Relaxed);
    let poll_m1_id = clients::create_subscription(
        &s,
        json!({"transport": "poll", "subtree": "soak/m1", "after": 0}),
    )
    .await?;
    let poll_alice_id = clients::create_subscription(
        &s,
        json!({"transport": "poll", "subtree": "alice@example.test", "after": 0}),
    )
    .await?;

    let mut tasks = vec![
        tokio::spawn(clients::sse(
            s.clone(),
            sse_all.clone(),
            "subtree=soak".to_owned(),
        )),
        tokio::spawn(clients::sse(
            s.clone(),
            sse_hot.clone(),
            "key=soak/hot".to_owned(),
        )),
        tokio::spawn(clients::websocket(s.clone(), ws1)),
        tokio::spawn(clients::websocket(s.clone(), ws2)),
        tokio::spawn(clients::long_poll(s.clone(), poll_m1.clone(), poll_m1_id)),
        tokio::spawn(clients::long_poll(
            s.clone(),
            poll_alice.clone(),
            poll_alice_id,
        )),
        tokio::spawn(exchange::ews_streaming(s.clone(), ews.clone())),
        tokio::spawn(exchange::mapi(s.clone(), mapi.clone())),
    ];

    let all_connected = |extra: &Arc<Tracker>| {
        let trackers = trackers.clone();
        let extra = extra.clone();
        move || {
            trackers
                .iter()
                .chain([&extra])
                .all(|t| t.connected.load(Ordering::Relaxed))
        }
    };
    if !wait_for(Duration::from_secs(30), all_connected(&mapi)).await {
        let missing: Vec<String> = trackers
            .iter()
            .chain([&mapi])
            .filter(|t| !t.connected.load(Ordering::Relaxed))
            .map(|t| t.name.clone())
            .collect();
        bail!("subscribers did not connect: {missing:?}");
    }
    if !wait_for(Duration::from_secs(30), || {
        receiver.verifications.load(Ordering::Relaxed) > 0
    })
    .await
    {
        bail!("the webhook endpoint was never verified");
    }

    // Load, and the sampler.
    let mut producers = Vec::new();
    for spec in PRODUCERS {
        producers.push(tokio::spawn(clients::producer(s.clone(), spec)));
    }
    let stop_sampler = CancellationToken::new();
    let sampler_task = tokio::spawn(sampler(
        probe.clone(),
        Duration::from_secs_f64(args.sample_every),
        stop_sampler.clone(),
    ));
    println!("soak: subscribers connected, producers running");

    // Q0: before any churn.
    sleep_until(at(plan.settle)).await;
    let q0 = quiet(&probe).await;
    s.churn_paused.store(false, Ordering::Relaxed);
    for _ in 0..2 {
        tasks.push(tokio::spawn(clients::churn_sse(s.clone())));
        tasks.push(tokio::spawn(clients::churn_ws(s.clone())));
    }
    tasks.push(tokio::spawn(clients::churn_poll(s.clone())));
    tasks.push(tokio::spawn(exchange::churn_ews(s.clone())));
    tasks.push(tokio::spawn(exchange::churn_mapi(s.clone())));

    // Offline and online every few minutes.
    let bands = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let flipper = {
        let (flips, base, probe, bands, stop) = (
            plan.flips.clone(),
            s.base.clone(),
            probe.clone(),
            bands.clone(),
            s.stop_churn.clone(),
        );
        tokio::spawn(async move {
            for (a, b) in flips {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = sleep_until(at(a)) => {}
                }
                if let Err(e) = set_state(&base, "offline").await {
                    eprintln!("soak: {e:#}");
                    continue;
                }
                let t0 = probe.start.elapsed().as_secs_f64();
                probe.online.store(false, Ordering::Relaxed);
                sleep_until(at(b)).await;
                let r = set_state(&base, "online").await;
                probe.online.store(true, Ordering::Relaxed);
                bands
                    .lock()
                    .unwrap()
                    .push((t0, probe.start.elapsed().as_secs_f64()));
                if let Err(e) = r {
                    eprintln!("soak: {e:#}");
                }
            }
        })
    };

    // Q1, then the restart, then Q2.
    sleep_until(at(plan.restart_at - plan.settle)).await;
    s.churn_paused.store(true, Ordering::Relaxed);
    sleep_until(at(plan.restart_at)).await;
    let q1 = quiet(&probe).await;
    println!(
        "soak: {:.0} s: restarting (SIGTERM) after {} events",
        start.elapsed().as_secs_f64(),
        s.ledger.acked_total()
    );
    let mut exits = Vec::new();
    exits.push(server.terminate().await?);
    probe.segment.store(2, Ordering::Relaxed);
    server.start().await?;
    let reconnected = wait_for(Duration::from_secs(60), all_connected(&mapi)).await;
    let restart_done = start.elapsed().as_secs_f64();
    println!(
        "soak: {restart_done:.0} s: restarted (stopped in {:.1} s, clean: {}), subscribers back: {reconnected}",
        exits[0].1.as_secs_f64(),
        exits[0].0
    );
    sleep(Duration::from_secs_f64(plan.settle)).await;
    let q2 = quiet(&probe).await;
    s.churn_paused.store(false, Ordering::Relaxed);

    // Until the end of the load; then Q3 with the producers still running.
    let mut next_report = Instant::now() + Duration::from_secs(60);
    while start.elapsed().as_secs_f64() < plan.total {
        sleep(Duration::from_secs(1)).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            println!(
                "soak: {:.0} s: {} events acknowledged, {} deliveries",
                start.elapsed().as_secs_f64(),
                s.ledger.acked_total(),
                s.lat.delivered.load(Ordering::Relaxed)
            );
        }
    }
    s.churn_paused.store(true, Ordering::Relaxed);
    s.stop_churn.cancel();
    let _ = flipper.await;
    probe.online.store(true, Ordering::Relaxed);
    set_state(&s.base, "online").await?;
    sleep(Duration::from_secs_f64(plan.settle)).await;
    let q3 = quiet(&probe).await;

    // Drain: no more events; every subscriber must catch up.
    s.stop_producers.cancel();
    for p in producers {
        let _ = p.await;
    }
    let drain_start = Instant::now();
    let ledger = &s.ledger;
    let final_session_done = || {
        let sessions = s.mapi_sessions.lock().unwrap();
        let Some(last) = sessions.last() else {
            return false;
        };
        let events = ledger.mapi_events();
        let want = events
            .values()
            .filter(|e| e.sent_us > last.registered_us && e.watermark.is_some())
            .count();
        let got: std::collections::HashSet<u64> = last.mids.iter().copied().collect();
        got.len() >= want
    };
    let drained = wait_for(Duration::from_secs(120), || {
        trackers.iter().all(|t| t.caught_up(ledger)) && final_session_done()
    })
    .await;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    // Let the last samples show the idle server.
    sleep(Duration::from_secs_f64(args.sample_every * 2.0)).await;
    stop_sampler.cancel();
    let _ = sampler_task.await;

    // Stop the clients, then the server (a clean exit is checked too).
    s.stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    exits.push(server.terminate().await?);

    let mut verdicts: Vec<Verdict> = trackers.iter().map(|t| t.verdict(ledger)).collect();
    verdicts.push(mapi.verdict(ledger));
    let churn = track::check_churn(&s.churn.lock().unwrap(), ledger);
    let mapi_v = track::check_mapi(&s.mapi_sessions.lock().unwrap(), ledger);
    let samples = probe.samples.lock().unwrap().clone();
    let bands = bands.lock().unwrap().clone();
    Ok(Outcome {
        elapsed: start.elapsed().as_secs_f64(),
        plan,
        samples,
        quiet: [q0, q1, q2, q3],
        restart_done,
        exits,
        verdicts,
        churn,
        mapi: mapi_v,
        shared: s.clone(),
        receiver,
        drained,
        drain_secs,
        bands,
        webhook_id,
    })
}

/// The figures of one run, and whether it passed.
fn report(args: &SoakArgs, o: &Outcome) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&args.out)?;
    let s = &o.shared;
    let ledger = &s.ledger;
    let mut failures: Vec<String> = Vec::new();

    // RSS slope: the second server process, after its warm-up, until the load ended.
    let fit_from = o.restart_done + o.plan.warmup;
    let rss_points: Vec<(f64, f64)> = o
        .samples
        .iter()
        .filter(|x| x.segment == 2 && x.t >= fit_from && x.t <= o.plan.total)
        .filter_map(|x| x.rss.map(|r| (x.t / 60.0, r as f64)))
        .collect();
    let fit = linear_fit(&rss_points);
    let slope_kib = fit.map_or(f64::NAN, |(a, _)| a / 1024.0);
    // For information: the first process, after the same warm-up.
    let seg1: Vec<(f64, f64)> = o
        .samples
        .iter()
        .filter(|x| x.segment == 1 && x.t >= o.plan.warmup.min(o.plan.restart_at / 2.0))
        .filter(|x| x.t <= o.plan.restart_at - o.plan.settle)
        .filter_map(|x| x.rss.map(|r| (x.t / 60.0, r as f64)))
        .collect();
    let slope1_kib = linear_fit(&seg1).map_or(f64::NAN, |(a, _)| a / 1024.0);
    let window_min = (o.plan.total - fit_from).max(1.0) / 60.0;
    let slope_limit = args
        .max_rss_slope_kib
        .max(args.cache_allowance_kib / window_min);
    if rss_points.len() < 4 {
        failures.push("too few RSS samples after the warm-up to fit a slope".to_owned());
    } else if slope_kib > slope_limit {
        failures.push(format!(
            "RSS grows {slope_kib:.0} KiB/min after the warm-up (limit {slope_limit:.0})"
        ));
    }
    let [q0, q1, q2, q3] = o.quiet;
    for (name, a, b) in [("first process", q0, q1), ("second process", q2, q3)] {
        if b.fds - a.fds > args.fd_allowance {
            failures.push(format!(
                "{name}: open files grew from {} to {} (allowance {})",
                a.fds, b.fds, args.fd_allowance
            ));
        }
        if b.tasks - a.tasks > args.task_allowance {
            failures.push(format!(
                "{name}: tokio tasks grew from {} to {} (allowance {})",
                a.tasks, b.tasks, args.task_allowance
            ));
        }
        if a.fds < 0 || a.tasks < 0 || b.fds < 0 || b.tasks < 0 {
            failures.push(format!("{name}: a quiet sample could not be read"));
        }
    }
    for v in &o.verdicts {
        // MAPI's promise is per session: checked below from the sessions' records.
        let broken = if v.transport == "mapi" {
            !v.errors.is_empty()
        } else {
            !v.ok()
        };
        if broken {
            failures.push(format!(
                "{}: lost {} (first {:?}), duplicated {}, out of order {}, outside its filter {}, errors {:?}",
                v.name, v.lost, v.first_lost, v.duplicates, v.reordered, v.foreign, v.errors
            ));
        }
    }
    let c = &o.churn;
    if c.gaps + c.duplicates + c.reordered > 0 {
        failures.push(format!(
            "churn streams: {} missing within what they received, {} duplicated, {} out of order ({})",
            c.gaps,
            c.duplicates,
            c.reordered,
            c.example.clone().unwrap_or_default()
        ));
    }
    if !o.mapi.ok() {
        failures.push(format!(
            "MAPI sessions: lost {}, duplicated {}, out of order {}, unknown ids {} ({})",
            o.mapi.lost,
            o.mapi.duplicates,
            o.mapi.reordered,
            o.mapi.unknown,
            o.mapi.example.clone().unwrap_or_default()
        ));
    }
    let mismatch = ledger.replay_mismatch.load(Ordering::Relaxed);
    if mismatch > 0 {
        failures.push(format!(
            "{mismatch} idempotent replays answered other watermarks"
        ));
    }
    for (i, (clean, took)) in o.exits.iter().enumerate() {
        if !clean {
            failures.push(format!(
                "SIGTERM #{}: the server did not exit cleanly ({:.1} s)",
                i + 1,
                took.as_secs_f64()
            ));
        }
    }
    if !o.drained {
        failures.push("subscribers did not catch up within 120 s after the load".to_owned());
    }
    if ledger.acked_total() == 0 {
        failures.push("nothing was published".to_owned());
    }

    write_csv(&args.out.join("samples.csv"), &o.samples)?;
    write_plots(&args.out, o, fit, fit_from)?;

    // The summary, in Markdown.
    let mut m = String::new();
    let acked = ledger.acked();
    let unacked = ledger.unacked_counts();
    let _ = writeln!(
        m,
        "## Soak: {:.1} min of load, {:.1} min in all\n",
        o.plan.total / 60.0,
        o.elapsed / 60.0
    );
    let _ = writeln!(
        m,
        "Machine: {} CPUs (client and server share them), {}. Result: **{}**.\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        String::from_utf8_lossy(
            &Command::new("uname")
                .arg("-sr")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim(),
        if failures.is_empty() {
            "passed"
        } else {
            "FAILED"
        }
    );
    let _ = writeln!(m, "| figure | value |\n|---|---:|");
    let total_acked = ledger.acked_total();
    let _ = writeln!(
        m,
        "| events acknowledged | {total_acked} ({:.0}/s) |",
        total_acked as f64 / o.plan.total
    );
    let _ = writeln!(
        m,
        "| events unacknowledged (request failed, not retried; not expected anywhere) | {} |",
        unacked.iter().sum::<u64>()
    );
    let _ = writeln!(
        m,
        "| idempotent retries / answered as replays | {} / {} |",
        ledger.retries.load(Ordering::Relaxed),
        ledger.replayed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        m,
        "| deliveries (first receipts, all subscribers) | {} |",
        s.lat.delivered.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        m,
        "| churn connections (sse, ws, long-poll, ews pull, mapi) | {} |",
        CHURN_KINDS
            .iter()
            .zip(&s.churn_opened)
            .map(|(k, n)| format!("{k} {}", n.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        m,
        "| churn connections that failed | {}{} |",
        s.churn_failed.load(Ordering::Relaxed),
        s.churn_first_error
            .lock()
            .unwrap()
            .as_deref()
            .map(|e| format!(" (first: {})", e.replace('|', "/")))
            .unwrap_or_default()
    );
    let _ = writeln!(
        m,
        "| churn streams checked / events in them / gaps, duplicates, reordered | {} / {} / {}, {}, {} |",
        c.streams, c.events, c.gaps, c.duplicates, c.reordered
    );
    let _ = writeln!(
        m,
        "| offline periods | {} ({}) |",
        o.bands.len(),
        o.bands
            .iter()
            .map(|(a, b)| format!("{:.1}–{:.1} min", a / 60.0, b / 60.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        m,
        "| restart | at {:.1} min; SIGTERM to exit {:.1} s (clean: {}); subscribers back at {:.1} min |",
        o.plan.restart_at / 60.0,
        o.exits[0].1.as_secs_f64(),
        o.exits[0].0,
        o.restart_done / 60.0
    );
    let _ = writeln!(
        m,
        "| final SIGTERM | exit in {:.1} s (clean: {}) |",
        o.exits.get(1).map_or(0.0, |e| e.1.as_secs_f64()),
        o.exits.get(1).is_some_and(|e| e.0)
    );
    let _ = writeln!(
        m,
        "| drain after the load | {:.1} s (all caught up: {}) |",
        o.drain_secs, o.drained
    );
    let _ = writeln!(
        m,
        "| RSS slope, 2nd process, {:.1}–{:.1} min (after {:.1} min warm-up) | **{slope_kib:.1} KiB/min** (limit {slope_limit:.0}; 1st process: {slope1_kib:.1} KiB/min) |",
        fit_from / 60.0,
        o.plan.total / 60.0,
        o.plan.warmup / 60.0,
    );
    let mib = |b: i64| b as f64 / 1048576.0;
    let _ = writeln!(
        m,
        "| RSS at the quiet points (MiB) | {:.1} → {:.1}; after restart {:.1} → {:.1} |",
        mib(q0.rss),
        mib(q1.rss),
        mib(q2.rss),
        mib(q3.rss)
    );
    let _ = writeln!(
        m,
        "| open fds at the quiet points | {} → {} (Δ {}); after restart {} → {} (Δ {}); allowance {} |",
        q0.fds,
        q1.fds,
        q1.fds - q0.fds,
        q2.fds,
        q3.fds,
        q3.fds - q2.fds,
        args.fd_allowance
    );
    let _ = writeln!(
        m,
        "| tokio tasks at the quiet points | {} → {} (Δ {}); after restart {} → {} (Δ {}); allowance {} |",
        q0.tasks,
        q1.tasks,
        q1.tasks - q0.tasks,
        q2.tasks,
        q3.tasks,
        q3.tasks - q2.tasks,
        args.task_allowance
    );
    let mean = |f: fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = o
            .samples
            .iter()
            .filter(|x| x.t <= o.plan.total)
            .filter_map(f)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let _ = writeln!(
        m,
        "| mean CPU under load (% of one core): server, this tool | {:.0}, {:.0} |",
        mean(|x| x.cpu),
        mean(|x| x.tool_cpu)
    );
    let peak = |f: fn(&Sample) -> Option<u64>| o.samples.iter().filter_map(f).max().unwrap_or(0);
    let _ = writeln!(
        m,
        "| peaks under load: RSS, fds, tasks | {:.1} MiB, {}, {} |",
        peak(|x| x.rss) as f64 / 1048576.0,
        peak(|x| x.fds),
        peak(|x| x.tasks)
    );

    let _ = writeln!(m, "\n### Published, per producer group\n");
    let _ = writeln!(
        m,
        "| keys | acknowledged | unacknowledged |\n|---|---:|---:|"
    );
    for (i, name) in GROUP_NAMES.iter().enumerate() {
        let _ = writeln!(m, "| `{name}` | {} | {} |", acked[i], unacked[i]);
    }

    let _ = writeln!(m, "\n### Per subscriber\n");
    let _ = writeln!(
        m,
        "| subscriber | expected | received | lost | duplicated | out of order | received, never acknowledged | connections | redelivered (dropped by the client) |"
    );
    let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for v in &o.verdicts {
        let (lost, dup, ooo) = if v.transport == "mapi" {
            (o.mapi.lost, o.mapi.duplicates, o.mapi.reordered)
        } else {
            (v.lost, v.duplicates, v.reordered)
        };
        let expected = if v.transport == "mapi" {
            format!("{} (final session)", o.mapi.expected_final)
        } else {
            v.expected.to_string()
        };
        let _ = writeln!(
            m,
            "| {} | {expected} | {} | {lost} | {dup} | {ooo} | {} | {} | {} |",
            v.name,
            if v.transport == "mapi" {
                o.mapi.received
            } else {
                v.received
            },
            if v.transport == "mapi" {
                0
            } else {
                v.unacked_received
            },
            v.connections,
            v.redelivered
        );
    }
    let _ = writeln!(
        m,
        "\nMAPI: {} sessions; {} acknowledged events fell between sessions (published while no session was registered: MAPI promises nothing for them).",
        o.mapi.sessions, o.mapi.between_sessions
    );
    let r = &o.receiver;
    let _ = writeln!(
        m,
        "Webhook `{}`: {} requests, {} answered 500/429 on purpose, {} answered slowly, {} processed then held past Herald's timeout; {} repeated webhook-ids dropped.",
        o.webhook_id,
        r.requests.load(Ordering::Relaxed),
        r.failed.load(Ordering::Relaxed),
        r.slow.load(Ordering::Relaxed),
        r.too_slow.load(Ordering::Relaxed),
        r.tracker.redelivered.load(Ordering::Relaxed)
    );

    let _ = writeln!(
        m,
        "\n### Delivery latency (publish timestamp to receipt), whole run\n"
    );
    let _ = writeln!(
        m,
        "| transport | deliveries | p50 (ms) | p99 (ms) | max (ms) |\n|---|---:|---:|---:|---:|"
    );
    for (i, h) in s.lat.totals().iter().enumerate() {
        let _ = writeln!(
            m,
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            TRANSPORTS[i],
            s.lat.per_transport[i].load(Ordering::Relaxed),
            ms(h, 0.5),
            ms(h, 0.99),
            if h.is_empty() {
                f64::NAN
            } else {
                h.max() as f64 / 1000.0
            }
        );
    }
    let _ = writeln!(
        m,
        "\nIncludes the offline periods and the restart, during which events wait by design."
    );
    if failures.is_empty() {
        let _ = writeln!(m, "\nEvery check passed.");
    } else {
        let _ = writeln!(m, "\n### Failures\n");
        for f in &failures {
            let _ = writeln!(m, "- {f}");
        }
    }
    std::fs::write(args.out.join("summary.md"), &m)?;
    println!("\n{m}");
    println!("soak: samples, plots and summary in {}", args.out.display());
    Ok(failures.is_empty())
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut out = String::from(
        "t_s,segment,online,rss_bytes,fds,tasks,server_cpu_pct,tool_cpu_pct,published,delivered,latency_p50_ms,latency_p99_ms,latency_max_ms",
    );
    for t in TRANSPORTS {
        let _ = write!(out, ",p99_{}_ms", t.replace('-', "_"));
    }
    out.push('\n');
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let f = |v: f64| {
        if v.is_finite() {
            format!("{v:.2}")
        } else {
            String::new()
        }
    };
    for x in samples {
        let _ = write!(
            out,
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{}",
            x.t,
            x.segment,
            u8::from(x.online),
            opt(x.rss),
            opt(x.fds),
            opt(x.tasks),
            f(x.cpu.unwrap_or(f64::NAN)),
            f(x.tool_cpu.unwrap_or(f64::NAN)),
            x.published,
            x.delivered,
            f(x.p50_ms),
            f(x.p99_ms),
            f(x.max_ms)
        );
        for v in &x.p99_by_transport {
            let _ = write!(out, ",{}", f(*v));
        }
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

fn write_plots(
    dir: &Path,
    o: &Outcome,
    fit: Option<(f64, f64)>,
    fit_from: f64,
) -> anyhow::Result<()> {
    // A gap in the lines while the server was down: the samples with no process.
    let series = |name: &str, color: &'static str, f: &dyn Fn(&Sample) -> f64| Series {
        name: name.to_owned(),
        color,
        points: o.samples.iter().map(|x| (x.t / 60.0, f(x))).collect(),
    };
    let opt = |v: Option<u64>| v.map_or(f64::NAN, |v| v as f64);
    let bands: Vec<(f64, f64)> = o.bands.iter().map(|(a, b)| (a / 60.0, b / 60.0)).collect();
    let markers = vec![(o.plan.restart_at / 60.0, "restart".to_owned())];
    let chart = |title: &str, y: &str, series: Vec<Series>, log_y: bool| Chart {
        title: title.to_owned(),
        x_label: "minutes since start".to_owned(),
        y_label: y.to_owned(),
        series,
        bands: bands.clone(),
        band_name: "server offline".to_owned(),
        markers: markers.clone(),
        fit: None,
        log_y,
        y_from_zero: !log_y,
    };
    let mut rss = chart(
        "Server resident memory (RSS)",
        "MiB",
        vec![series("RSS", COLORS[0], &|x| opt(x.rss) / 1048576.0)],
        false,
    );
    if let Some((a, b)) = fit {
        let (x0, x1) = (fit_from / 60.0, o.plan.total / 60.0);
        rss.fit = Some((
            (x0, (a * x0 + b) / 1048576.0),
            (x1, (a * x1 + b) / 1048576.0),
            format!("fit after warm-up: {:.1} KiB/min", a / 1024.0),
        ));
    }
    std::fs::write(dir.join("rss.svg"), rss.render())?;
    let fds = chart(
        "Server open file descriptors",
        "open fds",
        vec![series("fds", COLORS[1], &|x| opt(x.fds))],
        false,
    );
    std::fs::write(dir.join("fds.svg"), fds.render())?;
    let tasks = chart(
        "Server tokio tasks (herald_tokio_tasks)",
        "alive tasks",
        vec![series("tasks", COLORS[2], &|x| opt(x.tasks))],
        false,
    );
    std::fs::write(dir.join("tasks.svg"), tasks.render())?;
    let latency = chart(
        "Delivery latency per sampling interval, all transports",
        "ms (log scale)",
        vec![
            series("p50", COLORS[0], &|x| x.p50_ms),
            series("p99", COLORS[3], &|x| x.p99_ms),
        ],
        true,
    );
    std::fs::write(dir.join("latency.svg"), latency.render())?;
    let by_transport = chart(
        "Delivery latency p99 per transport",
        "ms (log scale)",
        TRANSPORTS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                series(t, COLORS[i], &move |x: &Sample| {
                    x.p99_by_transport.get(i).copied().unwrap_or(f64::NAN)
                })
            })
            .collect(),
        true,
    );
    std::fs::write(dir.join("latency-by-transport.svg"), by_transport.render())?;
    Ok(())
}
