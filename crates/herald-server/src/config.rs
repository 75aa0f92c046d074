//! Server configuration: defaults, then a TOML file, then `HERALD_*` environment variables,
//! then command-line flags, each layer winning over the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything `herald serve` can be told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`HERALD_LISTEN`, `--listen`).
    pub listen: SocketAddr,
    /// Directory holding the event log (`HERALD_DATA_DIR`, `--data-dir`).
    pub data_dir: PathBuf,
    /// Where the event log lives (`[log] backend`).
    pub log: LogConfig,
    /// The NATS JetStream cluster, when `log.backend` is `jetstream`.
    pub jetstream: JetStreamConfig,
    /// How much history the log keeps.
    pub retention: RetentionConfig,
    /// Request and connection limits.
    pub limits: Limits,
    /// Durable subscriptions.
    pub subscriptions: SubscriptionsConfig,
    /// API keys and subscriber tokens.
    pub auth: AuthConfig,
    /// Webhook delivery.
    pub webhooks: WebhooksConfig,
    /// Exchange Web Services notifications.
    pub ews: EwsConfig,
    /// MAPI over HTTP notifications.
    pub mapi: MapiConfig,
    /// Client connections: their presence and leases.
    pub connections: ConnectionsConfig,
    /// The server's own online/offline state.
    pub state: StateConfig,
    /// Hooks called before and after every connect and cancel.
    pub hooks: HooksConfig,
    /// Log output.
    pub logging: LoggingConfig,
    /// The figures kept in memory for the console (`GET /v1/stats`).
    pub stats: StatsConfig,
    /// How long a graceful shutdown waits for connections to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8470)),
            data_dir: PathBuf::from("herald-data"),
            log: LogConfig::default(),
            jetstream: JetStreamConfig::default(),
            retention: RetentionConfig::default(),
            limits: Limits::default(),
            subscriptions: SubscriptionsConfig::default(),
            auth: AuthConfig::default(),
            webhooks: WebhooksConfig::default(),
            ews: EwsConfig::default(),
            mapi: MapiConfig::default(),
            connections: ConnectionsConfig::default(),
            state: StateConfig::default(),
            hooks: HooksConfig::default(),
            logging: LoggingConfig::default(),
            stats: StatsConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the event log lives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `embedded` (the default: one redb file in the data directory, nothing else to run) or
    /// `jetstream` (a NATS JetStream cluster shared by several Herald nodes).
    pub backend: LogBackend,
}

/// The event log's implementation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// One redb file in the data directory.
    #[default]
    Embedded,
    /// A NATS JetStream stream (see `[jetstream]`).
    Jetstream,
}

/// The NATS JetStream cluster the log runs on (`log.backend = "jetstream"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    /// `nats://` URLs of some or all of the cluster's servers.
    pub servers: Vec<String>,
    /// The stream's name (its key-value buckets are named after it).
    pub stream: String,
    /// Replicas of the stream and buckets: 3 survives the loss of one server.
    pub replicas: usize,
    /// A NATS credentials file.
    pub credentials: Option<PathBuf>,
    /// A CA file for TLS to the servers.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate for mutual TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    pub tls_key: Option<PathBuf>,
    /// How long one request to the cluster may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// This node's name: letters, digits, `-` and `_`, at most 64 (default: the host name
    /// and port, other characters made `-`). Connection ids made here end in `.<node>`.
    pub node: Option<String>,
    /// How long a node holds push work (webhooks) without renewing its lease, and how long
    /// a silent node is given before a survivor takes its push work and says its
    /// connections are offline.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            stream: "HERALD".to_owned(),
            replicas: 3,
            credentials: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            request_timeout: Duration::from_secs(10),
            node: None,
            lease: Duration::from_secs(10),
        }
    }
}

/// Retention limits of the log; a limit left out is no limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Events older than this are removed (default 7 days).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// The oldest events are removed beyond this many bytes of records.
    pub max_bytes: Option<u64>,
    /// The oldest events are removed beyond this many events.
    pub max_events: Option<u64>,
    /// How long an `Idempotency-Key` is remembered (default 24 hours).
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            max_bytes: None,
            max_events: None,
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Limits on what clients may send and hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Most events in one `POST /v1/events` (400 beyond it).
    pub max_batch_events: usize,
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Per-subscriber queue, in events, before the subscriber resyncs from the log.
    pub queue_capacity: usize,
    /// Longest long-poll wait a client may ask for.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most events one page of `GET …/events` returns.
    pub max_page: usize,
    /// Interval of SSE keep-alive comments and WebSocket pings.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Most subscriptions on one WebSocket connection.
    pub max_ws_subscriptions: usize,
    /// Most `publish` batches one WebSocket connection may have unanswered (each frame is at
    /// most 64 KiB, so at most 4 MiB at the default); at the bound the server reads no more
    /// frames from it until one is answered.
    pub max_ws_publishes_in_flight: usize,
    /// How long a client has to send a request's headers; slower ones are disconnected.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_batch_events: 1000,
            max_key_bytes: 1024,
            queue_capacity: 4096,
            max_wait: Duration::from_secs(120),
            max_page: 1000,
            keepalive: Duration::from_secs(15),
            max_ws_subscriptions: 256,
            max_ws_publishes_in_flight: 64,
            header_timeout: crate::serve::HEADER_READ_TIMEOUT,
        }
    }
}

/// Durable subscriptions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriptionsConfig {
    /// A subscription nobody polls or fetches for this long is removed, like an EWS pull
    /// subscription past its timeout.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most durable subscriptions the server holds; past it a create is answered 429.
    pub max: usize,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        SubscriptionsConfig {
            idle_timeout: Duration::from_secs(30 * 60),
            max: 100_000,
        }
    }
}

/// Who may use the API. With nothing configured the API is open, which Herald accepts only
/// while it listens on loopback (or with `allow_open`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Producer (and administrator) API keys, as given to clients.
    pub keys: Vec<String>,
    /// The secret that signs subscriber tokens (HS256). At least 32 bytes.
    pub token_secret: Option<String>,
    /// An Ed25519 public key (PEM) that verifies subscriber tokens signed with EdDSA.
    pub token_public_key: Option<String>,
    /// Serve without authentication even on a non-loopback address (explicit opt-out).
    pub allow_open: bool,
    /// Users of the Exchange endpoints (Basic authentication): address → password. A user
    /// may use their own mailbox, whose key prefix is the address.
    pub users: std::collections::BTreeMap<String, String>,
}

impl AuthConfig {
    /// Whether anything would authenticate requests.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
            || self.token_secret.is_some()
            || self.token_public_key.is_some()
            || !self.users.is_empty()
    }
}

/// Webhook delivery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// How long one request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The first retry's delay; each retry doubles it, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// The longest delay between retries.
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    /// A subscription failing this long is paused (an operational event says so).
    #[serde(with = "humantime_serde")]
    pub fail_after: Duration,
    /// An idle subscription gets a status delivery this often.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Most events in one delivery.
    pub max_batch: usize,
    /// How long a rotated-out secret keeps signing.
    #[serde(with = "humantime_serde")]
    pub secret_grace: Duration,
    /// Networks webhooks may reach although they are private, loopback or link-local.
    pub allowed_networks: Vec<String>,
    /// Allow loopback targets (default: only while Herald itself listens on loopback).
    pub allow_loopback: Option<bool>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            request_timeout: Duration::from_secs(15),
            retry_base: Duration::from_secs(5),
            retry_cap: Duration::from_secs(3600),
            fail_after: Duration::from_secs(24 * 3600),
            status_interval: Duration::from_secs(30 * 60),
            max_batch: 100,
            secret_grace: Duration::from_secs(24 * 3600),
            allowed_networks: Vec::new(),
            allow_loopback: None,
        }
    }
}

/// The figures the server keeps in memory for the console and `GET /v1/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsConfig {
    /// How often a sample is taken (default 10 s).
    #[serde(with = "humantime_serde")]
    pub sample_every: Duration,
    /// How far back samples are kept (default 1 hour; at most 3,600 samples are kept
    /// whatever the two settings).
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            sample_every: Duration::from_secs(10),
            keep: Duration::from_secs(3600),
        }
    }
}

/// How logs are written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter (`info`, `herald=debug`, …); `HERALD_LOG` overrides it.
    pub filter: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

/// Exchange Web Services notifications.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EwsConfig {
    /// How long an EWS "minute" is (Timeout, StatusFrequency, ConnectionTimeout are given in
    /// minutes). 60 s; tests shorten it.
    #[serde(with = "humantime_serde")]
    pub minute: Duration,
    /// Streaming heartbeat interval (ConnectionStatus OK).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// First push retry delay; each retry doubles it while it stays within StatusFrequency.
    #[serde(with = "humantime_serde")]
    pub push_retry_base: Duration,
    /// Open streaming connections per account (Exchange's HangingConnectionLimit).
    pub max_streaming_connections: u32,
    /// Subscriptions per mailbox (Exchange's EWSMaxSubscriptions).
    pub max_subscriptions_per_mailbox: u32,
}

impl Default for EwsConfig {
    fn default() -> Self {
        EwsConfig {
            minute: Duration::from_secs(60),
            heartbeat: Duration::from_secs(30),
            push_retry_base: Duration::from_secs(30),
            max_streaming_connections: 10,
            max_subscriptions_per_mailbox: 200,
        }
    }
}

/// Values given on the command line (absent ones do not override).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--log-backend` and `--jetstream-servers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogOverride>,
    /// `--jetstream-servers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamOverride>,
}

/// `--log-backend`.
#[derive(Clone, Debug, Serialize)]
pub struct LogOverride {
    /// The backend.
    pub backend: LogBackend,
}

/// `--jetstream-servers`.
#[derive(Clone, Debug, Serialize)]
pub struct JetStreamOverride {
    /// The servers.
    pub servers: Vec<String>,
}

/// The top-level keys the environment may set; other `HERALD_*` variables (such as
/// `HERALD_LOG` or `HERALD_CONFIG`) are not configuration keys.
const ENV_KEYS: [&str; 17] = [
    "log",
    "jetstream",
    "connections",
    "state",
    "hooks",
    "ews",
    "mapi",
    "listen",
    "data_dir",
    "retention",
    "limits",
    "subscriptions",
    "auth",
    "webhooks",
    "logging",
    "stats",
    "shutdown_timeout",
];

impl Config {
    /// Loads the configuration: defaults, then `file` (if given; it must exist), then the
    /// environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(Box::new(figment::Error::from(format!(
                    "configuration file {} does not exist",
                    path.display()
                ))));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig.merge(Env::prefixed("HERALD_").split("__").filter(|k| {
            let top = k.as_str().split('.').next().unwrap_or_default();
            // `HERALD_LOG` is the log filter; `HERALD_LOG__BACKEND` is `log.backend`.
            let is_filter = k.as_str().eq_ignore_ascii_case("log");
            !is_filter && ENV_KEYS.iter().any(|n| top.eq_ignore_ascii_case(n))
        }))
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(Box::new)
    }

    /// The outbound policy for pushes.
    pub fn egress(&self) -> Result<crate::egress::EgressPolicy, String> {
        let allowed = self
            .webhooks
            .allowed_networks
            .iter()
            .map(|n| {
                n.parse()
                    .map_err(|e| format!("webhooks.allowed_networks: {n:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::egress::EgressPolicy {
            allow_loopback: self
                .webhooks
                .allow_loopback
                .unwrap_or(self.listen.ip().is_loopback()),
            allowed,
        })
    }

    /// Refuses a lease that streams could not renew in time (they renew on every write).
    pub fn check_timers(&self) -> Result<(), String> {
        if let Some(node) = &self.jetstream.node {
            if node.is_empty()
                || node.len() > 64
                || !node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "jetstream.node {node:?}: use 1 to 64 letters, digits, '-' or '_' (it ends connection ids)"
                ));
            }
        }
        if self.jetstream.lease < Duration::from_secs(1) {
            return Err("jetstream.lease must be at least 1s".to_owned());
        }
        let lease = self.connections.lease;
        for (name, every) in [
            ("limits.keepalive", self.limits.keepalive),
            ("ews.heartbeat", self.ews.heartbeat),
        ] {
            if lease <= every {
                return Err(format!(
                    "connections.lease ({}) must be longer than {name} ({}): streams renew their lease each time they write",
                    humantime::format_duration(lease),
                    humantime::format_duration(every)
                ));
            }
        }
        Ok(())
    }

    /// Refuses to serve without authentication on a non-loopback address, unless told to.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.listen.ip().is_loopback() || self.auth.enabled() || self.auth.allow_open {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {} without authentication: configure [auth] keys (API keys) \
             and token_secret (subscriber tokens), e.g. HERALD_AUTH__KEYS='[\"<key>\"]', or set \
             auth.allow_open = true to serve openly on purpose",
            self.listen
        ))
    }

    /// How deliveries are set up.
    pub fn delivery_options(&self) -> herald_delivery::DeliveryOptions {
        herald_delivery::DeliveryOptions {
            queue_capacity: self.limits.queue_capacity,
            presence: herald_delivery::PresenceOptions {
                lease: self.connections.lease,
                publish: self.connections.presence,
                backlog: self.connections.presence_backlog.max(1),
                node: (self.log.backend == LogBackend::Jetstream).then(|| self.node_name()),
            },
        }
    }

    /// The JetStream log's options (`[jetstream]`, with the retention of `[retention]`).
    pub fn jetstream_options(&self) -> herald_jetstream::JetStreamOptions {
        let j = &self.jetstream;
        let node = self.node_name();
        herald_jetstream::JetStreamOptions {
            servers: j.servers.clone(),
            stream: j.stream.clone(),
            replicas: j.replicas,
            retention: self.log_options().retention,
            idempotency_ttl: self.retention.idempotency_ttl,
            credentials: j.credentials.clone(),
            tls_ca: j.tls_ca.clone(),
            tls_client: j.tls_cert.clone().zip(j.tls_key.clone()),
            request_timeout: j.request_timeout,
            node,
            state_dir: Some(self.data_dir.clone()),
            lease: j.lease,
            ..Default::default()
        }
    }

    /// This node's name in a cluster: `[jetstream] node`, or the host name and port with
    /// every character but letters, digits, `-` and `_` made `-`.
    pub fn node_name(&self) -> String {
        self.jetstream.node.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "herald".to_owned());
            format!("{host}-{}", self.listen.port())
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(64)
                .collect()
        })
    }

    /// The log's options for this configuration.
    pub fn log_options(&self) -> herald_log::LogOptions {
        herald_log::LogOptions {
            retention: herald_log::Retention {
                max_age: self.retention.max_age,
                max_bytes: self.retention.max_bytes,
                max_events: self.retention.max_events,
            },
            idempotency_ttl: self.retention.idempotency_ttl,
            ..Default::default()
        }
    }
}

#[cfg(test)]
// figment's Jail takes closures returning its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn every_section_can_be_set_from_the_environment() {
        let sections = serde_json::to_value(Config::default()).expect("the defaults serialize");
        let sections = sections.as_object().expect("a table");
        for name in sections.keys() {
            assert!(
                ENV_KEYS.contains(&name.as_str()),
                "HERALD_{}__… would be ignored: add {name:?} to ENV_KEYS",
                name.to_uppercase()
            );
        }
    }

    #[test]
    fn defaults_need_no_file() {
        figment::Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).map_err(|e| *e)?;
            assert_eq!(c.listen, "127.0.0.1:8470".parse().unwrap());
            assert_eq!(c.data_dir, PathBuf::from("herald-data"));
            Ok(())
        });
    }

    #[test]
    fn flags_win_over_env_which_wins_over_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                listen = "127.0.0.1:1111"
                data_dir = "from-file"
                [limits]
                max_batch_events = 7
                [retention]
                max_age = "2h"
                "#,
            )?;
            jail.set_env("HERALD_LISTEN", "127.0.0.1:2222");
            jail.set_env("HERALD_LIMITS__MAX_BODY_BYTES", "99");
            jail.set_env("HERALD_LOG", "debug");
            let file = Path::new("herald.toml");
            let c = Config::load(Some(file), &Overrides::default()).map_err(|e| *e)?;
            assert_eq!(c.listen, "127.0.0.1:2222".parse().unwrap());
            assert_eq!(c.data_dir, PathBuf::from("from-file"));
            assert_eq!(c.limits.max_batch_events, 7);
            assert_eq!(c.limits.max_body_bytes, 99);
            assert_eq!(c.retention.max_age, Some(Duration::from_secs(7200)));
            assert_eq!(c.log.backend, LogBackend::Embedded);
            let o = Overrides {
                listen: Some("127.0.0.1:3333".parse().unwrap()),
                data_dir: Some("from-flag".into()),
                ..Default::default()
            };
            let c = Config::load(Some(file), &o).map_err(|e| *e)?;
            assert_eq!(c.listen, "127.0.0.1:3333".parse().unwrap());
            assert_eq!(c.data_dir, PathBuf::from("from-flag"));
            // The log's backend: file, then environment (HERALD_LOG stays the filter), then flags.
            jail.create_file(
                "js.toml",
                "[log]\nbackend = \"jetstream\"\n[jetstream]\nstream = \"S\"\nreplicas = 1\n",
            )?;
            let c =
                Config::load(Some(Path::new("js.toml")), &Overrides::default()).map_err(|e| *e)?;
            assert_eq!(c.log.backend, LogBackend::Jetstream);
            assert_eq!(c.jetstream.stream, "S");
            assert_eq!(c.jetstream.replicas, 1);
            jail.set_env("HERALD_JETSTREAM__STREAM", "FROM_ENV");
            jail.set_env("HERALD_LOG__BACKEND", "embedded");
            let c =
                Config::load(Some(Path::new("js.toml")), &Overrides::default()).map_err(|e| *e)?;
            assert_eq!(c.log.backend, LogBackend::Embedded);
            assert_eq!(c.jetstream.stream, "FROM_ENV");
            let o = Overrides {
                log: Some(LogOverride {
                    backend: LogBackend::Jetstream,
                }),
                jetstream: Some(JetStreamOverride {
                    servers: vec!["nats://a:1".into(), "nats://b:2".into()],
                }),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("js.toml")), &o).map_err(|e| *e)?;
            assert_eq!(c.log.backend, LogBackend::Jetstream);
            assert_eq!(c.jetstream.servers, ["nats://a:1", "nats://b:2"]);
            assert_eq!(
                c.jetstream.stream, "FROM_ENV",
                "a flag changes only what it names"
            );
            let js = c.jetstream_options();
            assert_eq!(js.replicas, 1);
            assert_eq!(js.retention.max_age, c.retention.max_age);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "listen = \"127.0.0.1:1\"\nlisten_port = 3\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("listen_port"), "{err}");
            assert!(Config::load(Some(Path::new("none.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }
}

/// MAPI over HTTP (the `/mapi/emsmdb/` endpoint) and its notification timers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapiConfig {
    /// A session with no request for this long is destroyed (X-ExpirationInfo).
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// The notification timer: a NotificationWait with nothing pending completes after this.
    #[serde(with = "humantime_serde")]
    pub notification_wait: Duration,
    /// Keep-alive interval of long responses (X-PendingPeriod).
    #[serde(with = "humantime_serde")]
    pub pending_period: Duration,
    /// How often a UDP push datagram is repeated while notifications stay unfetched (MAPI
    /// sessions and `udp` subscriptions of the JSON API).
    #[serde(with = "humantime_serde")]
    pub udp_repeat: Duration,
    /// Bytes of RopNotify queued per session before the session stops reading the log
    /// (nothing is dropped: it resumes when the client fetches).
    pub max_queue_bytes: usize,
    /// Notification registrations one session may hold; past it RopRegisterNotification fails
    /// with MAPI_E_NOT_ENOUGH_MEMORY.
    pub max_registrations: usize,
    /// Sessions one user may hold at once; past it Connect fails with ecServerOOM.
    pub max_sessions_per_user: u32,
}

impl Default for MapiConfig {
    fn default() -> Self {
        MapiConfig {
            session_idle: Duration::from_secs(900),
            notification_wait: Duration::from_secs(300),
            pending_period: Duration::from_secs(30),
            udp_repeat: Duration::from_secs(60),
            max_queue_bytes: 4 << 20,
            max_registrations: 1024,
            max_sessions_per_user: 16,
        }
    }
}

/// Client connections (SSE and WebSocket streams, long-poll and webhook subscriptions, EWS
/// streaming connections, MAPI sessions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// A client not heard from for this long is offline: a WebSocket that answers no ping, a
    /// long-poll client that stops polling, a TCP peer that stops acknowledging. A stream
    /// whose lease expires is closed.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Publish every connection's state changes as `connection_state` events on
    /// `$herald/presence/<owner>/<id>` (two log appends per connection). Off, connections are
    /// still listed and hooked, but nobody can subscribe to their presence.
    pub presence: bool,
    /// Most connections whose presence changes wait to be written; while it is full, new
    /// connections are refused (HTTP 503, EWS and MAPI busy errors) until the log catches up.
    /// Nothing is dropped: a connection's many changes cost one entry.
    pub presence_backlog: usize,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            lease: Duration::from_secs(45),
            presence: true,
            presence_backlog: 65_536,
        }
    }
}

/// The server's own state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Start offline (deliveries paused until `herald state online`).
    pub start_offline: bool,
    /// How long going offline waits for pushes already being sent (webhooks, EWS push).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            start_offline: false,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Hooks called before and after connects and cancels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// Write every connect and cancel, with its result, to the audit log (the
    /// `herald::audit` tracing target).
    pub audit: bool,
    /// Most retries of one failed operation that hooks may ask for (default 3).
    pub max_retries: Option<u32>,
    /// Allow and deny rules by owner and key prefix.
    pub access: AccessConfig,
    /// External hooks, called over HTTP in this order of registration.
    pub http: Vec<HttpHookConfig>,
}

/// Allow and deny rules for connects: a connect whose owner and target match a `deny` rule is
/// refused unless it also matches an `allow` rule; with `allow` rules and no `deny` rule,
/// only what they allow connects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// Rules that let a connect through.
    pub allow: Vec<AccessRule>,
    /// Rules that refuse a connect.
    pub deny: Vec<AccessRule>,
}

/// One allow or deny rule; a field left out matches everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessRule {
    /// The owner (token subject, mailbox), or `*`.
    pub owner: Option<String>,
    /// A key prefix (path form: `alice/inbox` covers `alice/inbox/…`).
    pub prefix: Option<String>,
    /// A transport (`sse`, `ws`, `poll`, `webhook`, `udp`, `ews`, `mapi`).
    pub transport: Option<String>,
}

/// An external hook: Herald POSTs JSON before and after each operation and reads the
/// decision from the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHookConfig {
    /// Its name, in logs and refusals.
    #[serde(default)]
    pub name: Option<String>,
    /// Where to POST (http or https).
    pub url: String,
    /// How long to wait for an answer.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// What an unreachable, slow or malformed hook means: `open` lets the operation go on,
    /// `closed` refuses it.
    #[serde(default)]
    pub failure: HookFailure,
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(2)
}

/// What a failing external hook means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookFailure {
    /// Go on as if the hook had said nothing (fail-open).
    #[default]
    Open,
    /// Refuse the operation (fail-closed).
    Closed,
}
