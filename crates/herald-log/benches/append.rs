//! Durable append and replay throughput of the embedded log against NATS JetStream's file
//! store with acknowledged publishes, in the same run on the same disk.
//!
//! `cargo bench -p herald-log --bench append` needs `nats-server` (Debian's package). It
//! prints Markdown tables for `docs/benchmarks.md`. `HERALD_BENCH_SECONDS` sets the time per
//! measurement (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use herald_core::{Event, Extended, Hub, Notification, Watermark};
use herald_log::{AppendOptions, Durability, EmbeddedLog, EventLog, LogOptions, Retention};
use herald_testkit::{NatsConfig, NatsServer};

const PAYLOAD: usize = 128;

fn budget() -> Duration {
    Duration::from_secs_f64(
        std::env::var("HERALD_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

fn event(i: u32) -> Notification {
    Notification::new(
        format!("alice@example.test/inbox/m{i}"),
        Event::Extended(Extended {
            event: i,
            data: bytes::Bytes::from(vec![7u8; PAYLOAD]),
        }),
    )
}

fn open_log(dir: &std::path::Path) -> EmbeddedLog {
    let options = LogOptions {
        retention: Retention::default(),
        ..Default::default()
    };
    EmbeddedLog::open(dir, options, Hub::default()).unwrap()
}

/// Appends per second (events) from `producers` tasks appending `batch`-event batches.
async fn herald_append(producers: usize, batch: usize, durability: Durability) -> f64 {
    herald_append_after(0, producers, batch, durability).await
}

/// [`herald_append`] into a log that already holds `held` events (appended unmeasured first).
async fn herald_append_after(
    held: u64,
    producers: usize,
    batch: usize,
    durability: Durability,
) -> f64 {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let log = open_log(dir.path());
    let fill: Vec<Notification> = (0..1024).map(event).collect();
    let buffered = AppendOptions {
        durability: Durability::Buffered,
        ..Default::default()
    };
    for _ in 0..held.div_ceil(1024) {
        log.append(fill.clone(), buffered.clone()).await.unwrap();
    }
    log.append(vec![event(0)], AppendOptions::default())
        .await
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + budget();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let log = log.clone();
            let count = count.clone();
            let events: Vec<Notification> =
                (0..batch).map(|i| event((p * 1000 + i) as u32)).collect();
            tokio::spawn(async move {
                let options = AppendOptions {
                    durability,
                    ..Default::default()
                };
                while Instant::now() < deadline {
                    log.append(events.clone(), options.clone()).await.unwrap();
                    count.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let l = log.clone();
    tokio::task::spawn_blocking(move || l.close().unwrap())
        .await
        .unwrap();
    rate
}

async fn fresh_stream(js: &jetstream::Context, name: &str) -> jetstream::stream::Stream {
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.>")],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Acknowledged publishes per second from `producers` tasks, each publishing `batch` messages
/// and then awaiting their acknowledgements.
async fn jetstream_append(url: &str, producers: usize, batch: usize, round: usize) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    // Room for every producer's whole batch of acknowledgements in flight (the default, 5,000,
    // would make 64 producers of 256 wait on each other forever).
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(1 << 17)
        .build(client);
    let name = format!("APPEND{round}");
    fresh_stream(&js, &name).await;
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD + 32]);
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + budget();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let js = js.clone();
            let count = count.clone();
            let payload = payload.clone();
            let subject = format!("{name}.p{p}");
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let mut acks = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        acks.push(js.publish(subject.clone(), payload.clone()).await.unwrap());
                    }
                    for a in acks {
                        a.await.unwrap();
                    }
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    rate
}

/// Events per second reading `n` events from the start of the log.
async fn herald_replay(n: usize) -> f64 {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let log = open_log(dir.path());
    let batch: Vec<Notification> = (0..256).map(event).collect();
    for _ in 0..n / 256 {
        log.append(batch.clone(), AppendOptions::default())
            .await
            .unwrap();
    }
    let l = log.clone();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut cursor = Watermark(0);
        let mut read = 0;
        loop {
            let page = l.read_blocking(cursor, 1024).unwrap();
            let Some(last) = page.last() else { break };
            cursor = last.watermark.unwrap();
            read += page.len();
        }
        assert_eq!(read, n / 256 * 256);
        let rate = read as f64 / start.elapsed().as_secs_f64();
        l.close().unwrap();
        rate
    })
    .await
    .unwrap()
}

async fn jetstream_replay(url: &str, n: usize) -> f64 {
    use futures_util::StreamExt;
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let stream = fresh_stream(&js, "REPLAY").await;
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD + 32]);
    let total = n / 256 * 256;
    for _ in 0..n / 256 {
        let mut acks = Vec::with_capacity(256);
        for _ in 0..256 {
            acks.push(js.publish("REPLAY.x", payload.clone()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let start = Instant::now();
    let mut messages = consumer.messages().await.unwrap();
    let mut read = 0;
    while read < total {
        messages.next().await.unwrap().unwrap();
        read += 1;
    }
    read as f64 / start.elapsed().as_secs_f64()
}

fn row(what: &str, herald: f64, baseline: f64) {
    println!(
        "| {what} | {:.0} | {:.0} | {:.2}× |",
        herald,
        baseline,
        herald / baseline
    );
}

fn append_row(what: &str, durable: f64, buffered: f64, baseline: f64) {
    println!(
        "| {what} | {durable:.0} | {buffered:.0} | {baseline:.0} | {:.2}× | {:.2}× |",
        durable / baseline,
        buffered / baseline
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("HERALD_BENCH_PART").as_deref() == Ok("growth") {
        growth(&rt);
        return;
    }
    let server = NatsServer::start(&NatsConfig {
        jetstream: true,
        ..Default::default()
    })
    .expect("starting nats-server");
    let url = server.url();
    println!(
        "## Acknowledged appends (events/s): Herald embedded log vs JetStream file store ({})\n",
        server.version()
    );
    println!(
        "| producers × batch | Herald durable (fsync per commit) | Herald buffered | JetStream default | durable ÷ JetStream | buffered ÷ JetStream |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut round = 0;
    for producers in [1usize, 64] {
        for batch in [1usize, 16, 256] {
            round += 1;
            let d = rt.block_on(herald_append(producers, batch, Durability::Durable));
            let b = rt.block_on(herald_append(producers, batch, Durability::Buffered));
            let j = rt.block_on(jetstream_append(&url, producers, batch, round));
            append_row(&format!("{producers} × {batch}"), d, b, j);
        }
    }
    println!("\n## Replay from the start (events/s, 200,000 events)\n");
    println!("| | Herald | JetStream | ratio |");
    println!("|---|---:|---:|---:|");
    let h = rt.block_on(herald_replay(200_000));
    let j = rt.block_on(jetstream_replay(&url, 200_000));
    row("read everything in order", h, j);
}

/// Whether an append costs more as the log grows: the same producers appending to an empty log
/// and to logs already holding millions of events, as a ratio to the empty log.
fn growth(rt: &tokio::runtime::Runtime) {
    println!("## Appends as the log grows (events/s; ratio to the empty log)\n");
    println!(
        "| held before | 1 × 256 durable | ratio | 64 × 1 durable | ratio | 1 × 256 buffered | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut base = None;
    for held in [0u64, 1_000_000, 4_000_000] {
        let a = rt.block_on(herald_append_after(held, 1, 256, Durability::Durable));
        let b = rt.block_on(herald_append_after(held, 64, 1, Durability::Durable));
        let c = rt.block_on(herald_append_after(held, 1, 256, Durability::Buffered));
        let (a0, b0, c0) = *base.get_or_insert((a, b, c));
        println!(
            "| {held} | {a:.0} | {:.2}× | {b:.0} | {:.2}× | {c:.0} | {:.2}× |",
            a / a0,
            b / b0,
            c / c0
        );
    }
}
