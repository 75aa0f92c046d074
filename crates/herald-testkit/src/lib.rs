//! Fixtures for Herald's tests and benchmarks. Nothing here ships in the `herald` binary.
//!
//! [`NatsServer`] starts a real `nats-server` (Debian's package) on a free loopback port with
//! its own store directory, and kills it when dropped. [`memlog::MemoryLog`] is an event log
//! held in memory, for tests that run on tokio's paused clock. [`powercut::PowerCutDisk`] is
//! a disk that loses power, for the embedded log's crash tests.

pub mod arb;
pub mod memlog;
pub mod powercut;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs the process's TLS crypto provider (ring) for HTTP clients; safe to call often.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free TCP port on 127.0.0.1 (free when this returns; take it soon).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Where `nats-server` is, or an error that says how to install it.
pub fn nats_server_binary() -> io::Result<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in candidates {
        let bin = dir.join("nats-server");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "nats-server is not installed: run `apt-get install nats-server` (scripts/test does)",
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
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
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
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut server = NatsServer {
            child,
            addr,
            version,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "nats-server exited before it was ready: {status}"
                )));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nats-server did not accept connections in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
