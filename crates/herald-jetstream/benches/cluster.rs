//! Herald's JetStream log against raw JetStream through the same `async-nats` client, on a
//! real 3-node cluster (sync always) and on one server (sync always), and the embedded log
//! beside them: appends per second with the same batches, and publish-on-A → deliver-on-B
//! latency. Prints markdown tables for `docs/benchmarks.md`.
//!
//! `HERALD_BENCH_SECONDS=5 cargo bench -p herald-jetstream --bench cluster`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures_util::StreamExt;
use herald_core::{Event, EventMask, Extended, Filter, Hub, Notification, Scope};
use herald_jetstream::{JetStreamLog, JetStreamOptions};
use herald_log::{AppendOptions, EmbeddedLog, EventLog, Follower, LogOptions};
use herald_testkit::{ClusterOptions, NatsCluster, NatsConfig, NatsServer};

const PAYLOAD: usize = 128;

fn budget() -> Duration {
    Duration::from_secs_f64(
        std::env::var("HERALD_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

fn event(p: usize, i: usize) -> Notification {
    Notification::new(
        format!("alice{p}@example.test/inbox/m{i}"),
        Event::Extended(Extended {
            event: i as u32,
            data: bytes::Bytes::from(vec![7u8; PAYLOAD]),
        }),
    )
}

fn batch_of(p: usize, n: usize) -> Vec<Notification> {
    (0..n).map(|i| event(p, i)).collect()
}

async fn js_log(servers: Vec<String>, stream: &str, replicas: usize, node: &str) -> JetStreamLog {
    let options = JetStreamOptions {
        servers,
        stream: stream.to_owned(),
        replicas,
        node: node.to_owned(),
        ..Default::default()
    };
    JetStreamLog::connect(options, Hub::default())
        .await
        .expect("connect")
}

/// Events per second appended by `producers` tasks in `batch`-event batches through `append`.
async fn rate<F, Fut>(producers: usize, batch: usize, append: F) -> f64
where
    F: Fn(usize, Vec<Notification>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + budget();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (append, count) = (append.clone(), count.clone());
            let events = batch_of(p, batch);
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    append(p, events.clone()).await;
                    count.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The raw publisher: the same records Herald stores, as one JetStream atomic batch.
async fn raw_batch(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subject: &str,
    events: Vec<Notification>,
) {
    let prepared = herald_log::prepare::prepare(events, false).unwrap();
    let n = prepared.records.len();
    let id = uuid::Uuid::new_v4().simple().to_string();
    for (i, record) in prepared.records.into_iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i + 1 == n {
            h.insert("Nats-Batch-Commit", "1");
            js.publish_with_headers(subject.to_owned(), h, record.into())
                .await
                .unwrap()
                .await
                .unwrap();
        } else {
            client
                .publish_with_headers(subject.to_owned(), h, record.into())
                .await
                .unwrap();
        }
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

async fn throughput(servers: Vec<String>, replicas: usize, tag: &str, embedded: bool) {
    let herald = js_log(servers.clone(), &format!("H{tag}"), replicas, "bench-a").await;
    // The raw side gets a stream made the same way (Herald makes it), and publishes to it.
    let raw_log = js_log(servers.clone(), &format!("R{tag}"), replicas, "bench-r").await;
    let raw_subject = format!("herald.r{}.ev.x", tag.to_ascii_lowercase());
    let raw_stream = format!("R{tag}");
    drop(raw_log);
    let client = async_nats::connect(servers[0].as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let emb = EmbeddedLog::open(dir.path(), LogOptions::default(), Hub::default()).unwrap();
    if embedded {
        println!(
            "| producers × batch | Herald on JetStream | raw JetStream | Herald ÷ raw | raw + one consumer | Herald ÷ that | embedded log (fsync per commit) | embedded ÷ raw JetStream |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!(
            "| producers × batch | Herald on JetStream | raw JetStream | Herald ÷ raw | raw + one consumer | Herald ÷ that |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
    }
    for (producers, batch) in [(1, 1), (1, 100), (16, 1), (16, 10), (64, 1), (64, 64)] {
        // Herald and raw alternate, twice each (H R R H), so that neither always runs first
        // or on a warmer cluster; each figure is the mean of its two runs.
        let herald_run = || {
            let log = herald.clone();
            rate(producers, batch, move |_, b| {
                let log = log.clone();
                async move {
                    log.append(b, AppendOptions::default()).await.unwrap();
                }
            })
        };
        let raw_run = || {
            let (client, js, subject) = (client.clone(), js.clone(), raw_subject.clone());
            rate(producers, batch, move |_, b| {
                let (client, js, subject) = (client.clone(), js.clone(), subject.clone());
                async move { raw_batch(&client, &js, &subject, b).await }
            })
        };
        let h1 = herald_run().await;
        let r1 = raw_run().await;
        let r2 = raw_run().await;
        let h2 = herald_run().await;
        let (h, r) = ((h1 + h2) / 2.0, (r1 + r2) / 2.0);
        // Raw again, with one ordered consumer reading the stream as it grows: what any
        // notifier on JetStream does, and what Herald's node does to feed its hub.
        let consumed = {
            let js = js.clone();
            let stream_name = raw_stream.clone();
            let reader = tokio::spawn(async move {
                let stream = js.get_stream(&stream_name).await.unwrap();
                let last = stream.cached_info().state.last_sequence;
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                        deliver_policy:
                            async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                                start_sequence: last + 1,
                            },
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let mut messages = consumer.messages().await.unwrap();
                while let Some(m) = messages.next().await {
                    let m = m.unwrap();
                    let seq = m.info().unwrap().stream_sequence;
                    std::hint::black_box(herald_log::record::decode(
                        &m.payload,
                        herald_core::Watermark(seq),
                    ))
                    .ok();
                }
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let c = raw_run().await;
            reader.abort();
            c
        };
        if embedded {
            let e = {
                let log = emb.clone();
                rate(producers, batch, move |_, b| {
                    let log = log.clone();
                    async move {
                        log.append(b, AppendOptions::default()).await.unwrap();
                    }
                })
                .await
            };
            println!(
                "| {producers} × {batch} | {h:.0} | {r:.0} | {} | {consumed:.0} | {} | {e:.0} | {} |",
                ratio(h, r),
                ratio(h, consumed),
                ratio(e, r)
            );
        } else {
            println!(
                "| {producers} × {batch} | {h:.0} | {r:.0} | {} | {consumed:.0} | {} |",
                ratio(h, r),
                ratio(h, consumed)
            );
        }
    }
}

/// Publish on a client of server 0, delivery on a client of server 1: one event every 5 ms.
async fn latency(cluster: &NatsCluster) {
    let n = ((budget().as_secs_f64() * 200.0) as usize).max(200);
    let filter = Filter {
        scope: Scope::Subtree("alice0@example.test".into()),
        mask: EventMask::ALL,
    };
    // Herald: append on node A, a follower on node B.
    let a = js_log(vec![cluster.url(0)], "HLAT", 3, "bench-a").await;
    let b = js_log(vec![cluster.url(1)], "HLAT", 3, "bench-b").await;
    let mut follower = Follower::start(&b, filter, b.hub_last(), Default::default()).unwrap();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let producer = {
        let (sent, a) = (sent.clone(), a.clone());
        tokio::spawn(async move {
            for (i, slot) in sent.iter().enumerate() {
                slot.store(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
                a.append(vec![event(0, i)], AppendOptions::default())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut herald = Vec::with_capacity(n);
    while herald.len() < n {
        let got = follower.next().await.unwrap();
        let now = t0.elapsed().as_nanos() as u64;
        for _ in got.iter() {
            let i = herald.len();
            herald.push((now - sent[i].load(Ordering::SeqCst)) as f64 / 1e6);
        }
    }
    producer.await.unwrap();
    // Raw: publish (a batch of one) through server 0, an ordered consumer through server 1.
    let _raw = js_log(vec![cluster.url(0)], "RLAT", 3, "bench-r").await;
    let pub_client = async_nats::connect(cluster.url(0)).await.unwrap();
    let pub_js = async_nats::jetstream::new(pub_client.clone());
    let sub_js = async_nats::jetstream::new(async_nats::connect(cluster.url(1)).await.unwrap());
    let stream = sub_js.get_stream("RLAT").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let producer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for (i, slot) in sent.iter().enumerate() {
                slot.store(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
                raw_batch(&pub_client, &pub_js, "herald.rlat.ev.x", vec![event(0, i)]).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut raw = Vec::with_capacity(n);
    while raw.len() < n {
        messages.next().await.unwrap().unwrap();
        let i = raw.len();
        raw.push((t0.elapsed().as_nanos() as u64 - sent[i].load(Ordering::SeqCst)) as f64 / 1e6);
    }
    producer.await.unwrap();
    let (hp50, hp99) = (pct(&mut herald, 0.5), pct(&mut herald, 0.99));
    let (rp50, rp99) = (pct(&mut raw, 0.5), pct(&mut raw, 0.99));
    println!("| path ({n} events, one per 5 ms) | p50 (ms) | p99 (ms) |");
    println!("|---|---:|---:|");
    println!("| Herald: append on A → follower on B | {hp50:.2} | {hp99:.2} |");
    println!(
        "| raw JetStream: publish via server 0 → ordered consumer via server 1 | {rp50:.2} | {rp99:.2} |"
    );
    println!(
        "| Herald ÷ raw | {} | {} |",
        ratio(hp50, rp50),
        ratio(hp99, rp99)
    );
}

fn main() {
    // `cargo test --benches` runs this with `--bench`-less arguments: stay quick then.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `HERALD_BENCH_PART=throughput|latency|single` runs one part (default: all).
    let part = std::env::var("HERALD_BENCH_PART").unwrap_or_default();
    let run = |name: &str| part.is_empty() || part == name;
    rt.block_on(async {
        let cluster = NatsCluster::start(&ClusterOptions::default()).unwrap();
        println!(
            "\n### 3-node cluster (nats-server {}, sync_interval always, R3), {:?} per cell\n",
            cluster.version(),
            budget()
        );
        if run("throughput") {
            throughput(cluster.urls(), 3, "C", false).await;
        }
        println!();
        if run("latency") {
            latency(&cluster).await;
        }
        drop(cluster);
        if !run("single") {
            return;
        }
        let single = NatsServer::start(&NatsConfig {
            jetstream: true,
            jetstream_extra: vec!["sync_interval: always".to_owned()],
        })
        .unwrap();
        println!(
            "\n### One server (nats-server {}, sync_interval always, R1) and the embedded log\n",
            single.version()
        );
        throughput(vec![single.url()], 1, "S", true).await;
    });
}
