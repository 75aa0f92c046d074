//! The UDP nudger, with a real socket on 127.0.0.1 as the subscriber and tokio's paused
//! clock. The receiver is a plain non-blocking socket read between clock steps: a loopback
//! datagram is in its buffer when `send_to` returns, and reading it does not depend on when
//! tokio's I/O driver runs (while the clock is paused, the runtime may move the clock on in
//! the same turn that reports a socket readable).

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use herald_delivery::NudgeTarget;
use herald_testkit::memlog::MemoryLog;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use common::{delivery, set_online};

const REPEAT: Duration = Duration::from_secs(10);
/// How late a datagram may be: the first send waits for the socket's first I/O turn.
const SLACK: Duration = Duration::from_millis(5);
const CONTEXT: &[u8] = b"ctx-42";

/// Every datagram waiting at `socket`.
fn received(socket: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => out.push(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("receiving: {e}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_nudger_sends_the_context_at_once_then_every_repeat_while_pending_and_never_offline() {
    let d = delivery(&MemoryLog::new());
    let subscriber = UdpSocket::bind("127.0.0.1:0").unwrap();
    subscriber.set_nonblocking(true).unwrap();
    let target = NudgeTarget {
        addr: subscriber.local_addr().unwrap(),
        context: CONTEXT.to_vec(),
    };
    let (pending, pending_rx) = watch::channel(false);
    let (_target, target_rx) = watch::channel(Some(target));
    tokio::spawn(d.nudger(pending_rx, target_rx, REPEAT));

    sleep(Duration::from_secs(3600)).await;
    assert!(
        received(&subscriber).is_empty(),
        "nudged with nothing pending"
    );

    let start = Instant::now();
    pending.send_replace(true);
    sleep(SLACK).await;
    assert_eq!(received(&subscriber), [CONTEXT], "not nudged at once");
    for n in 1..=3 {
        sleep_until(start + REPEAT * n - SLACK).await;
        assert!(received(&subscriber).is_empty(), "nudged before the repeat");
        sleep_until(start + REPEAT * n + SLACK).await;
        assert_eq!(received(&subscriber), [CONTEXT], "repeat {n}");
    }

    // The subscriber fetched: no more datagrams.
    pending.send_replace(false);
    sleep(Duration::from_secs(3600)).await;
    assert!(
        received(&subscriber).is_empty(),
        "nudged with nothing pending"
    );

    // Offline: none, even with something pending; online: one at once.
    set_online(d.state(), false);
    pending.send_replace(true);
    sleep(Duration::from_secs(3600)).await;
    assert!(
        received(&subscriber).is_empty(),
        "nudged while the server was offline"
    );
    set_online(d.state(), true);
    sleep(SLACK).await;
    assert_eq!(received(&subscriber), [CONTEXT], "not nudged once online");

    // Fetched while the server was offline: nothing to nudge when it comes back.
    pending.send_replace(false);
    sleep(Duration::from_secs(3600)).await;
    assert!(received(&subscriber).is_empty());
    set_online(d.state(), false);
    pending.send_replace(true);
    sleep(Duration::from_secs(1)).await;
    pending.send_replace(false);
    set_online(d.state(), true);
    sleep(Duration::from_secs(3600)).await;
    assert!(
        received(&subscriber).is_empty(),
        "nudged for what was fetched while offline"
    );
}
