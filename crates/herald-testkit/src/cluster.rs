//! A JetStream cluster of real `nats-server` processes on loopback, for Herald's cluster tests:
//! every node syncs every write (`sync_interval: always`, Herald's promise), every route goes
//! through a [`Proxy`] so that a test can partition a node, and a node can be killed and
//! started again on the same ports and store.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use crate::proxy::Proxy;
use crate::{free_port, nats_server_binary, nats_server_version, spawn_nats};

/// How a [`NatsCluster`] is made.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many `nats-server`s (3 for a replicated stream that survives one loss).
    pub nodes: usize,
    /// Extra lines for each node's `jetstream { }` block.
    pub jetstream_extra: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            jetstream_extra: Vec::new(),
        }
    }
}

/// One `nats-server` of the cluster.
struct Node {
    name: String,
    client: SocketAddr,
    conf: PathBuf,
    child: Option<Child>,
    /// Proxies other nodes dial to reach this node's cluster port.
    inbound: Vec<(usize, Proxy)>,
    /// Proxies a Herald node (or any client) can use instead of `client`, to be cut off.
    client_proxy: Proxy,
}

/// A running cluster; every process is killed when it is dropped.
pub struct NatsCluster {
    bin: PathBuf,
    version: String,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `options.nodes` servers in one cluster and waits until JetStream has a leader
    /// for its meta group (a stream can be created).
    /// Another process may take a port between its choice and the server's bind: such a
    /// start is tried again on fresh ports (three times in all).
    pub fn start(options: &ClusterOptions) -> io::Result<NatsCluster> {
        let mut tries = 0;
        loop {
            match NatsCluster::start_once(options) {
                Err(e) if tries < 2 && e.to_string().contains("address already in use") => {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(options: &ClusterOptions) -> io::Result<NatsCluster> {
        let n = options.nodes.max(1);
        let bin = nats_server_binary()?;
        let version = nats_server_version(&bin);
        let dir = tempfile::Builder::new()
            .prefix("herald-nats-cluster-")
            .tempdir()?;
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<io::Result<_>>()?;
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<io::Result<_>>()?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let local = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
            let mut inbound = Vec::new();
            for j in (0..n).filter(|&j| j != i) {
                inbound.push((j, Proxy::start(local(cluster_ports[i]))?));
            }
            nodes.push(Node {
                name: format!("n{}", i + 1),
                client: local(client_ports[i]),
                conf: dir.path().join(format!("n{}.conf", i + 1)),
                child: None,
                inbound,
                client_proxy: Proxy::start(local(client_ports[i]))?,
            });
        }
        for i in 0..n {
            // Node i reaches node j through the proxy j keeps for i.
            let routes: Vec<String> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let p = nodes[j]
                        .inbound
                        .iter()
                        .find(|(from, _)| *from == i)
                        .map(|(_, p)| p.addr())
                        .expect("a proxy per pair");
                    format!("\"nats-route://{p}\"")
                })
                .collect();
            let mut conf = format!(
                "server_name: {name}\nlisten: {client}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n",
                name = nodes[i].name,
                client = nodes[i].client,
                store = dir.path().join(&nodes[i].name).display(),
            );
            for line in &options.jetstream_extra {
                conf.push_str(&format!("  {line}\n"));
            }
            // Routes only through the proxies: nothing learned by gossip may bypass them, so
            // what a node advertises for routes is a port where nothing listens.
            conf.push_str(&format!(
                "}}\ncluster {{\n  name: herald-test\n  listen: 127.0.0.1:{port}\n  \
                 advertise: \"127.0.0.1:1\"\n  routes: [{routes}]\n}}\n",
                port = cluster_ports[i],
                routes = routes.join(", "),
            ));
            std::fs::write(&nodes[i].conf, conf)?;
        }
        let mut cluster = NatsCluster {
            bin,
            version,
            nodes,
            dir,
        };
        for i in 0..n {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    /// Starts node `i` again (after [`NatsCluster::kill`]) on the same ports and store.
    pub fn start_node(&mut self, i: usize) -> io::Result<()> {
        let node = &mut self.nodes[i];
        if node.child.is_none() {
            node.child = Some(spawn_nats(
                &self.bin,
                &node.conf,
                node.client,
                Duration::from_secs(15),
            )?);
        }
        Ok(())
    }

    /// SIGKILLs node `i` (its store stays on disk).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Cuts node `i` off from every other node (and them from it), in both directions.
    pub fn isolate(&self, i: usize) {
        for (j, node) in self.nodes.iter().enumerate() {
            for (from, p) in &node.inbound {
                if j == i || *from == i {
                    p.cut();
                }
            }
        }
    }

    /// Heals every cut route.
    pub fn heal(&self) {
        for node in &self.nodes {
            for (_, p) in &node.inbound {
                p.heal();
            }
        }
    }

    /// How many servers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no server (never: at least one is started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The `nats://` URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://{}", self.nodes[i].client)
    }

    /// Every node's URL, for a client that may connect to any.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The URL of a proxy in front of node `i`'s client port (see [`NatsCluster::cut_client`]).
    pub fn proxied_url(&self, i: usize) -> String {
        format!("nats://{}", self.nodes[i].client_proxy.addr())
    }

    /// Cuts (or heals, with `false`) the proxy in front of node `i`'s client port.
    pub fn cut_client(&self, i: usize, cut: bool) {
        let p = &self.nodes[i].client_proxy;
        if cut { p.cut() } else { p.heal() }
    }

    /// The server name of node `i` (`n1`, `n2`, …), as JetStream reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// What `nats-server --version` printed.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory of configs, logs and stores.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
