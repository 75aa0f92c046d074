//! Fixtures for Herald's tests and benchmarks. Nothing here ships in the `herald` binary.
//!
//! [`NatsServer`] starts a real `nats-server` (the pinned
//! official binary in `.venv/bin`) on a free loopback port with
//! its own store directory, and kills it when dropped. [`memlog::MemoryLog`] is an event log
//! held in memory, for tests that run on tokio's paused clock. [`powercut::PowerCutDisk`] is
//! a disk that loses power, for the embedded log's crash tests.

pub mod arb;
mod cluster;
pub mod memlog;
pub mod powercut;
pub mod proxy;

pub use cluster::{ClusterOptions, NatsCluster};

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs the process's TLS crypto provider (ring) for HTTP clients; safe to call often.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free TCP port on 127.0.0.1 (free when this returns; take it soon). Never the same port
/// twice in one process: the kernel may hand a just-closed port out again, and a test that
/// asks for several ports before binding any of them would otherwise get one twice.
pub fn free_port() -> io::Result<u16> {
    Ok(bind_fresh()?.local_addr()?.port())
}

/// A listener on 127.0.0.1 whose port this process has never handed out before (see
/// [`free_port`]); kept bound, so nothing else can take it.
pub(crate) fn bind_fresh() -> io::Result<TcpListener> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Listeners refused for a reused port stay bound until one is accepted, so each try
    // gets another port.
    let mut refused = Vec::new();
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if given.contains(&port) {
            refused.push(listener);
            continue;
        }
        given.push(port);
        return Ok(listener);
    }
}

/// Where `nats-server` is, or an error that says how to install it: `$HERALD_NATS_SERVER`,
/// then the workspace's `.venv/bin` (the pinned official binary `scripts/test` installs), then
/// `PATH`.
pub fn nats_server_binary() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HERALD_NATS_SERVER") {
        return Ok(PathBuf::from(bin));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin");
    let candidates = std::iter::once(venv)
        .chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in candidates {
        let bin = dir.join("nats-server");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "nats-server is not installed: run scripts/test, which puts the pinned official binary in .venv/bin",
    ))
}

/// How a `nats-server` fixture is configured.
#[derive(Clone, Debug, Default)]
pub struct NatsConfig {
    /// Enable JetStream with a store directory of its own.
    pub jetstream: bool,
    /// Extra lines for the `jetstream { }` block (for example a sync setting, where the
    /// installed version supports one).
    pub jetstream_extra: Vec<String>,
}

/// A running `nats-server`, killed on drop.
pub struct NatsServer {
    child: Child,
    addr: SocketAddr,
    version: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts connections.
    pub fn start(config: &NatsConfig) -> io::Result<NatsServer> {
        let bin = nats_server_binary()?;
        let version = nats_server_version(&bin);
        let dir = tempfile::Builder::new().prefix("herald-nats-").tempdir()?;
        let port = free_port()?;
        let mut conf = format!("listen: 127.0.0.1:{port}\n");
        if config.jetstream {
            conf.push_str(&format!(
                "jetstream {{\n  store_dir: \"{}\"\n",
                dir.path().join("js").display()
            ));
            for line in &config.jetstream_extra {
                conf.push_str(&format!("  {line}\n"));
            }
            conf.push_str("}\n");
        }
        let conf_path = dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let child = spawn_nats(&bin, &conf_path, addr, Duration::from_secs(10))?;
        Ok(NatsServer {
            child,
            addr,
            version,
            _dir: dir,
        })
    }

    /// The `nats://` URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `nats-server --version` printed.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory the fixture owns (config and JetStream store).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `nats-server --version` prints, trimmed.
fn nats_server_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Starts `nats-server -c conf` and waits until `addr` accepts connections; its output goes
/// to `nats.log` beside the config.
fn spawn_nats(bin: &Path, conf: &Path, addr: SocketAddr, timeout: Duration) -> io::Result<Child> {
    let log_path = conf.with_file_name(format!(
        "{}.log",
        conf.file_stem().and_then(|s| s.to_str()).unwrap_or("nats")
    ));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            return Err(io::Error::other(format!(
                "nats-server exited before it was ready: {status}; last lines of its log (newest first):\n{tail}"
            )));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nats-server did not accept connections on {addr} in time"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
