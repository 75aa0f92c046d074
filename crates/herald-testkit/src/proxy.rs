//! A TCP proxy a test controls: it forwards a loopback port to another until it is cut, and
//! then drops every connection it carries and refuses new ones until it is healed. Cluster
//! tests put one between every pair of `nats-server`s, and between a Herald node and its
//! `nats-server`, to make partitions without privileges or network namespaces.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A forwarding port that can be cut and healed; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    target: SocketAddr,
    cut: AtomicBool,
    /// Replies (target to client) are read and dropped, not forwarded.
    drop_replies: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every connection it carries, to shut down at a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = crate::bind_fresh()?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            drop_replies: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || accept(listener, s))?;
        Ok(Proxy { addr, shared })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection and refuses new ones (they are closed at once).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.close_all();
    }

    /// Forwards again (replies too).
    pub fn heal(&self) {
        self.shared.drop_replies.store(false, Ordering::SeqCst);
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// From now on drops what the target answers instead of forwarding it (requests still
    /// go through): work is done whose answers the client never sees. Cut afterwards, since
    /// the byte stream the client sees is no longer whole.
    pub fn drop_replies(&self) {
        self.shared.drop_replies.store(true, Ordering::SeqCst);
    }

    /// Whether it is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.close_all();
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

impl Shared {
    fn close_all(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: TcpListener, s: Arc<Shared>) {
    for conn in listener.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if s.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&s.target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let pair = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = pair else {
            continue;
        };
        {
            let mut open = s.open.lock().unwrap();
            open.retain(|x| x.peer_addr().is_ok());
            open.push(client);
            open.push(server);
        }
        std::thread::spawn(move || pipe(c1, s1, None));
        let replies = s.clone();
        std::thread::spawn(move || pipe(s2, c2, Some(&replies.drop_replies)));
    }
}

/// Copies one direction until either side closes, then closes both; drops what it reads
/// while `dropping` is set.
fn pipe(mut from: TcpStream, mut to: TcpStream, dropping: Option<&AtomicBool>) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if dropping.is_some_and(|d| d.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
