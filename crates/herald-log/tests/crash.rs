//! Crash consistency with a real process: a child appends under load from several threads and
//! prints every acknowledgement; the parent kills it with SIGKILL at a random moment, reopens
//! the log, and checks that every acknowledged event is there, in place, exactly once, that
//! watermarks are contiguous and never reused, and that a resumed subscriber sees each event
//! once. Repeated `HERALD_CRASH_ROUNDS` times (default 20).
//!
//! The child is this same test binary, re-run with `HERALD_CRASH_CHILD` set: `crash_child`
//! does nothing in a normal run.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_core::*;
use herald_log::*;

const CHILD_ENV: &str = "HERALD_CRASH_CHILD";
const THREADS: u32 = 6;

fn options() -> LogOptions {
    LogOptions {
        retention: Retention::default(),
        ..Default::default()
    }
}

/// The identity of one event: (round, thread, batch sequence, index in batch).
fn payload(round: u32, tid: u32, seq: u32, j: u32) -> bytes::Bytes {
    let mut b = Vec::with_capacity(16);
    for v in [round, tid, seq, j] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.into()
}

fn identity(n: &Notification) -> [u32; 4] {
    let Event::Extended(e) = &n.event else {
        panic!("unexpected event {n:?}")
    };
    let mut out = [0u32; 4];
    for (i, c) in e.data.chunks(4).enumerate() {
        out[i] = u32::from_le_bytes(c.try_into().unwrap());
    }
    out
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u32 = std::env::var("HERALD_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let log = EmbeddedLog::open(std::path::Path::new(&dir), options(), Hub::default()).unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|tid| {
            let log = log.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for seq in 0.. {
                    let size = 1 + (seq * 7 + tid) % 8;
                    let batch: Vec<Notification> = (0..size)
                        .map(|j| {
                            Notification::new(
                                format!("crash/t{tid}"),
                                Event::Extended(Extended {
                                    event: tid,
                                    data: payload(round, tid, seq, j),
                                }),
                            )
                        })
                        .collect();
                    let a = log
                        .append_blocking(batch, AppendOptions::default())
                        .unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ACK {} {} {round} {tid} {seq}", a.first.0, a.count).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

struct Ack {
    first: u64,
    count: u32,
    id: [u32; 3],
}

fn run_child(dir: &std::path::Path, round: u32, run_for: Duration) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir)
        .env("HERALD_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() == Some(&"ACK") {
                acks.push(Ack {
                    first: f[1].parse().unwrap(),
                    count: f[2].parse().unwrap(),
                    id: [
                        f[3].parse().unwrap(),
                        f[4].parse().unwrap(),
                        f[5].parse().unwrap(),
                    ],
                });
            }
        }
        acks
    });
    std::thread::sleep(run_for);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let rounds: u32 = std::env::var("HERALD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut last_seen = 0u64;
    let mut total_acked = 0usize;
    let started = Instant::now();
    for round in 0..rounds {
        // xorshift: a different kill moment each round, 30–400 ms into the run.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_for = Duration::from_millis(30 + rng % 370);
        let acks = run_child(dir.path(), round, run_for);
        total_acked += acks.len();

        let log = EmbeddedLog::open(dir.path(), options(), Hub::default())
            .unwrap_or_else(|e| panic!("round {round}: the log did not reopen: {e}"));
        let bounds = log.bounds().unwrap();
        let all = log.read_blocking(Watermark(0), usize::MAX).unwrap();
        // Contiguous watermarks 1..=last: nothing lost in the middle, nothing twice.
        assert_eq!(
            all.len() as u64,
            bounds.last.0,
            "round {round}: holes in the log"
        );
        for (i, n) in all.iter().enumerate() {
            assert_eq!(n.watermark, Some(Watermark(i as u64 + 1)));
        }
        let mut ids = HashSet::new();
        for n in &all {
            assert!(
                ids.insert(identity(n)),
                "round {round}: event {:?} stored twice",
                identity(n)
            );
        }
        // Every acknowledged batch is there, at its watermarks, in order.
        for a in &acks {
            assert!(
                a.first > last_seen,
                "round {round}: watermark {} reused (the log had reached {last_seen})",
                a.first
            );
            for j in 0..a.count {
                let n = &all[(a.first - 1 + u64::from(j)) as usize];
                assert_eq!(
                    identity(n),
                    [a.id[0], a.id[1], a.id[2], j],
                    "round {round}: acknowledged event missing or misplaced"
                );
            }
        }
        // A subscriber resuming from the middle sees each later event exactly once.
        let from = Watermark(bounds.last.0 / 2);
        let mut follower = Follower::start(
            &log,
            Filter {
                scope: Scope::Subtree("crash".into()),
                mask: EventMask::ALL,
            },
            from,
            FollowOptions::default(),
        )
        .unwrap();
        let mut got: HashMap<u64, ()> = HashMap::new();
        while follower.cursor() < bounds.last {
            let batch = tokio::time::timeout(Duration::from_secs(10), follower.next())
                .await
                .expect("resume stalled")
                .unwrap();
            for n in batch.iter() {
                assert!(
                    got.insert(n.watermark.unwrap().0, ()).is_none(),
                    "duplicate on resume"
                );
            }
        }
        assert_eq!(got.len() as u64, bounds.last.0 - from.0);
        last_seen = bounds.last.0;
        let l = log.clone();
        tokio::task::spawn_blocking(move || l.close().unwrap())
            .await
            .unwrap();
    }
    assert!(total_acked > 0, "the child never acknowledged anything");
    eprintln!(
        "{rounds} SIGKILL rounds, {total_acked} acknowledged appends, {last_seen} events, {:?}",
        started.elapsed()
    );
}
