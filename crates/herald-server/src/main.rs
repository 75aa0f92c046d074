//! `herald`: Herald's notification server and its command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use herald_server::cli::{Client, TailQuery, event_from_fields};
use herald_server::config::{Config, JetStreamOverride, LogBackend, LogOverride, Overrides};
use herald_server::progress::ProgressMode;
use herald_server::{AppState, run};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "herald", version, about = "Herald, the notification server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The server's base URL.
    #[arg(
        long,
        env = "HERALD_SERVER",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    server: String,
    /// API key, if the server requires one.
    #[arg(long, env = "HERALD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (defaults: 127.0.0.1:8470, data in ./herald-data) until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Check a configuration and its data directory without starting the server, and say
    /// what to fix: one line per finding (ok, warn, FAIL); exits 1 when anything FAILs.
    /// Stop the server first for the log's integrity check.
    Doctor {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print one JSON object per finding.
        #[arg(long)]
        json: bool,
    },
    /// Publish one event: `herald publish alice/inbox/m1 new_mail -f message_class=IPM.Note`;
    /// or, with `--stdin`, one batch per input line (an event as JSON, or an array of them),
    /// many in flight over one WebSocket and appended in line order.
    Publish {
        /// The object's key.
        #[arg(required_unless_present = "stdin")]
        key: Option<String>,
        /// The kind (new_mail, object_created, object_moved, …).
        #[arg(required_unless_present = "stdin")]
        kind: Option<String>,
        /// Read batches from standard input, one per line.
        #[arg(long, conflicts_with_all = ["key", "kind", "fields", "idempotency_key"])]
        stdin: bool,
        /// With --stdin: line n carries idempotency key `<prefix>-<n>`, so the same input
        /// fed again after a failure appends only what is missing.
        #[arg(long, requires = "stdin")]
        idempotency_prefix: Option<String>,
        /// A field of the event, name=value (repeatable).
        #[arg(short, long = "field")]
        fields: Vec<String>,
        /// Make a retry safe.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print events on a key as they come, resuming across reconnects.
    Tail {
        /// The key.
        key: String,
        /// Include everything below the key.
        #[arg(long, conflicts_with = "children")]
        subtree: bool,
        /// Only what is directly in the key, a folder (not the folder's own changes).
        #[arg(long)]
        children: bool,
        /// Comma-separated kinds.
        #[arg(long)]
        kinds: Option<String>,
        /// Resume after this watermark.
        #[arg(long)]
        after: Option<u64>,
        /// Show the replay's progress on standard error as plain lines even when it is not a
        /// terminal (on a terminal a bar is drawn anyway).
        #[arg(long, env = "HERALD_PROGRESS", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
        progress: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List durable subscriptions.
    Subs {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the server's state, or take it `online` or `offline` (deliveries pause while
    /// offline; events are still accepted). `--watch` prints transitions as they happen.
    State {
        /// `online` or `offline`; without it, print the state.
        #[arg(value_parser = ["online", "offline"])]
        set: Option<String>,
        /// Return only when the transition is done.
        #[arg(long)]
        block: bool,
        /// Print every transition (start, change, done) until interrupted.
        #[arg(long, conflicts_with = "set")]
        watch: bool,
        /// The client token echoed in watched notifications.
        #[arg(long, default_value_t = 0)]
        client_token: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List client connections and whether they are online.
    Connections {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Close a client's stream or session (hooks hear it as a cancel and may refuse).
    Kick {
        /// The connection id (from `herald connections`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the server's health and figures.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage producer API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage subscriber tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the users of the Exchange endpoints (EWS, MAPI/HTTP).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
}

/// What `serve` loads its configuration from (shared with `doctor`, which checks the same).
#[derive(Args)]
struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (wins over HERALD_LISTEN and the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (wins over HERALD_DATA_DIR and the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the log lives: embedded or jetstream (wins over HERALD_LOG__BACKEND and the
    /// file).
    #[arg(long, value_parser = ["embedded", "jetstream"])]
    log_backend: Option<String>,
    /// NATS servers of the JetStream log, comma-separated (wins over
    /// HERALD_JETSTREAM__SERVERS and the file).
    #[arg(long, value_delimiter = ',')]
    jetstream_servers: Vec<String>,
}

impl ServeArgs {
    /// The flags as configuration overrides (absent ones override nothing).
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            log: self.log_backend.as_deref().map(|b| LogOverride {
                backend: if b == "jetstream" {
                    LogBackend::Jetstream
                } else {
                    LogBackend::Embedded
                },
            }),
            jetstream: (!self.jetstream_servers.is_empty()).then(|| JetStreamOverride {
                servers: self.jetstream_servers.clone(),
            }),
        }
    }
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Print the `[auth.users]` line of a user, with an argon2id hash of the password read
    /// from standard input (the first line).
    Add {
        /// The user's address (their mailbox).
        user: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key: prints it once and stores only its hash in the data directory
    /// (a running server picks it up within a second).
    Create {
        /// The data directory (as given to `herald serve`).
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "herald-data")]
        data_dir: PathBuf,
        /// A name, to list and revoke it by.
        #[arg(long)]
        name: Option<String>,
        /// A key prefix it may publish to and read (repeatable; default: all).
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
        /// What it may do: publish, admin (comma-separated).
        #[arg(long, default_value = "publish,admin", value_delimiter = ',')]
        ops: Vec<String>,
    },
    /// List the keys of the data directory (ids, names, scopes; never the keys).
    List {
        /// The data directory.
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "herald-data")]
        data_dir: PathBuf,
    },
    /// Revoke a key by id or name: a running server refuses it within a second and closes
    /// its streams.
    Revoke {
        /// Its id (from `herald keys list`) or name.
        which: String,
        /// The data directory.
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "herald-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a subscriber token signed with auth.token_secret.
    Create {
        /// Who the token is for (owner of what it creates).
        #[arg(long)]
        sub: String,
        /// A key prefix it may read (repeatable; "" for everything).
        #[arg(long = "prefix", required = true)]
        prefixes: Vec<String>,
        /// Comma-separated kinds it may read (default: all).
        #[arg(long)]
        kinds: Option<String>,
        /// Lifetime, e.g. 1h, 30d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Most durable subscriptions it may hold.
        #[arg(long)]
        max_subscriptions: Option<u32>,
        /// Most streaming connections it may hold at once.
        #[arg(long)]
        max_connections: Option<u32>,
        /// A TOML configuration file holding auth.token_secret.
        #[arg(long, env = "HERALD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Revoke one token (`--jti`) or every token of a subject issued before a time (`--sub`):
    /// a running server refuses them within a second and closes their streams.
    Revoke {
        /// The token's id (its `jti`).
        #[arg(long, conflicts_with = "sub", required_unless_present = "sub")]
        jti: Option<String>,
        /// The subject whose tokens are revoked.
        #[arg(long)]
        sub: Option<String>,
        /// Revoke the subject's tokens issued before this many seconds since the Unix epoch
        /// (default: now, i.e. all of them).
        #[arg(long, requires = "sub")]
        before: Option<u64>,
        /// The data directory (as given to `herald serve`).
        #[arg(long, env = "HERALD_DATA_DIR", default_value = "herald-data")]
        data_dir: PathBuf,
    },
}

fn init_tracing(format: &str, filter: &str) {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `herald keys …`.
fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    use herald_server::keys;
    match command {
        KeysCommand::Create {
            data_dir,
            name,
            prefixes,
            ops,
        } => {
            for op in &ops {
                anyhow::ensure!(
                    op == "publish" || op == "admin",
                    "unknown op {op:?}: publish or admin"
                );
            }
            let key = keys::create(
                &data_dir,
                name.as_deref(),
                &prefixes,
                ops.iter().any(|o| o == "publish"),
                ops.iter().any(|o| o == "admin"),
            )
            .with_context(|| format!("writing the key file in {}", data_dir.display()))?;
            println!("{key}");
            eprintln!(
                "stored its hash in {}; the key is not stored anywhere else",
                data_dir.join(keys::KEYS_FILE).display()
            );
            Ok(())
        }
        KeysCommand::List { data_dir } => {
            for e in keys::list(&data_dir)? {
                let g = &e.grant;
                let ops: Vec<&str> = [("publish", g.publish), ("admin", g.admin)]
                    .into_iter()
                    .filter_map(|(o, on)| on.then_some(o))
                    .collect();
                println!(
                    "{}  {:<16} ops={:<13} prefixes={:<24} {}",
                    g.id.0,
                    g.name.as_deref().unwrap_or("-"),
                    ops.join(","),
                    g.prefixes
                        .as_ref()
                        .map_or("(all)".to_owned(), |p| p.join(",")),
                    match e.revoked {
                        Some(t) => format!("revoked at {t}"),
                        None => "live".to_owned(),
                    }
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { which, data_dir } => {
            let n = keys::revoke(&data_dir, &which)?;
            anyhow::ensure!(n > 0, "no live key has the id or name {which:?}");
            eprintln!("revoked {n} key(s)");
            Ok(())
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // One TLS provider for every outbound client (webhooks, EWS push, the CLI).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    if let Command::Doctor { serve, json } = &cli.command {
        init_tracing("text", "warn");
        // Hooks build their HTTP clients inside a runtime.
        let _inside = runtime.enter();
        let findings = herald_server::doctor::run(serve.config.as_deref(), &serve.overrides());
        herald_server::doctor::print(&findings, *json, &mut std::io::stdout().lock())
            .context("writing the findings")?;
        return Ok(if herald_server::doctor::failed(&findings) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    command(cli.command, &runtime).map(|()| ExitCode::SUCCESS)
}

/// Every command but `doctor`.
fn command(command: Command, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let config = Config::load(args.config.as_deref(), &args.overrides())
                .context("loading the configuration")?;
            init_tracing(&config.logging.format, &config.logging.filter);
            runtime.block_on(serve(config))
        }
        Command::Keys { command } => keys_command(command),
        Command::Users {
            command: UsersCommand::Add { user },
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "the password is empty");
            let hash = herald_server::auth::hash_password(password)?;
            println!("{:?} = {:?}", user.to_ascii_lowercase(), hash);
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Revoke {
                    jti,
                    sub,
                    before,
                    data_dir,
                },
        } => {
            use herald_server::keys::{Revocation, revoke_tokens, unix_now};
            let r = match (jti, sub) {
                (Some(jti), _) => Revocation::Token(jti),
                (None, Some(sub)) => Revocation::Subject {
                    sub,
                    // Strictly after now: a token issued this very second is revoked too.
                    before: before.unwrap_or_else(|| unix_now() + 1),
                },
                (None, None) => anyhow::bail!("give --jti or --sub"),
            };
            revoke_tokens(&data_dir, &r)
                .with_context(|| format!("writing the revocations in {}", data_dir.display()))?;
            eprintln!("revoked: {}", r.line().trim());
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    sub,
                    prefixes,
                    kinds,
                    ttl,
                    max_subscriptions,
                    max_connections,
                    config,
                },
        } => {
            anyhow::ensure!(
                !herald_server::auth::is_reserved_subject(&sub),
                "the subject {sub:?} is reserved (unauthenticated and API-key connections are owned by it, and names starting with $ are the server's); choose another"
            );
            let config = Config::load(config.as_deref(), &Overrides::default())
                .context("loading the configuration")?;
            let secret = config
                .auth
                .token_secret
                .context("auth.token_secret is not configured (HERALD_AUTH__TOKEN_SECRET)")?;
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + std::time::Duration::from(ttl).as_secs();
            let claims = herald_server::auth::Claims {
                sub,
                exp,
                jti: Some(uuid::Uuid::new_v4().simple().to_string()),
                iat: Some(herald_server::keys::unix_now()),
                prefixes,
                kinds,
                max_subscriptions,
                max_connections,
            };
            println!("{}", herald_server::auth::mint(&secret, &claims)?);
            Ok(())
        }
        other => {
            init_tracing("text", "warn");
            runtime.block_on(client_command(other))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let data_dir = config.data_dir.clone();
    let state = AppState::open(config, shutdown.clone())
        .await
        .with_context(|| format!("opening the data directory {}", data_dir.display()))?;
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    run(listener, state).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn client_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Publish {
            stdin: true,
            idempotency_prefix,
            client,
            ..
        } => {
            let c = Client::new(&client.server, client.token)?;
            let input = tokio::io::BufReader::new(tokio::io::stdin());
            let n = c
                .publish_lines(
                    input,
                    idempotency_prefix.as_deref(),
                    client.json,
                    &mut std::io::stdout(),
                )
                .await?;
            if !client.json {
                eprintln!("published {n} lines");
            }
        }
        Command::Publish {
            key: Some(key),
            kind: Some(kind),
            fields,
            idempotency_key,
            client,
            ..
        } => {
            let c = Client::new(&client.server, client.token)?;
            let event = event_from_fields(&key, &kind, &fields)?;
            let r = c.publish(event, idempotency_key.as_deref()).await?;
            if client.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let w = r.watermarks.first().copied().unwrap_or(0);
                println!(
                    "published at watermark {w}{}",
                    if r.replayed { " (replayed)" } else { "" }
                );
            }
        }
        Command::Publish { .. } => anyhow::bail!("give a key and a kind, or --stdin"),
        Command::Tail {
            key,
            subtree,
            children,
            kinds,
            after,
            progress,
            client,
        } => {
            let c = Client::new(&client.server, client.token)?;
            let mut out = std::io::stdout();
            let query = TailQuery {
                key,
                subtree,
                children,
                kinds,
                after,
            };
            let progress = ProgressMode::choose(progress);
            tokio::select! {
                r = c.tail(&query, client.json, progress, &mut out) => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Command::Subs { client } => {
            let c = Client::new(&client.server, client.token)?;
            let subs = c.subs().await?;
            if client.json {
                for s in subs {
                    println!("{}", serde_json::to_string(&s)?);
                }
            } else if subs.is_empty() {
                println!("no durable subscriptions");
            } else {
                println!(
                    "{:<38} {:<6} {:>10} {:>8} {:<8} filter",
                    "id", "kind", "acked", "lag", "pending"
                );
                for s in subs {
                    let filter = match (&s.filter.key, &s.filter.subtree, &s.filter.children) {
                        (Some(k), _, _) => k.clone(),
                        (_, Some(t), _) => format!("{t}/…"),
                        (_, _, Some(f)) => format!("{f}/*"),
                        _ => String::new(),
                    };
                    println!(
                        "{:<38} {:<6} {:>10} {:>8} {:<8} {filter}",
                        s.id, "poll", s.acked, s.lag, s.pending
                    );
                }
            }
        }
        Command::State {
            set,
            block,
            watch,
            client_token,
            client,
        } => {
            let c = Client::new(&client.server, client.token)?;
            if watch {
                let mut out = std::io::stdout();
                tokio::select! {
                    r = c.watch_state(client_token, client.json, &mut out) => r?,
                    _ = tokio::signal::ctrl_c() => {}
                }
                return Ok(());
            }
            let s = match set.as_deref() {
                Some(target) => c.set_state(target == "online", block).await?,
                None => c.state().await?,
            };
            if client.json {
                println!("{}", serde_json::to_string(&s)?);
            } else if s.transitioning {
                // A change returns at once: say where it is going.
                println!(
                    "{} (transition in progress)",
                    set.as_deref().unwrap_or(&s.state)
                );
            } else {
                println!("{}", s.state);
            }
        }
        Command::Connections { client } => {
            let c = Client::new(&client.server, client.token)?;
            let list = c.connections().await?;
            if client.json {
                for v in list {
                    println!("{}", serde_json::to_string(&v)?);
                }
            } else if list.is_empty() {
                println!("no connections");
            } else {
                println!(
                    "{:<40} {:<8} {:<8} {:<16} {:>8}  presence key",
                    "id", "via", "state", "owner", "idle ms"
                );
                for v in list {
                    println!(
                        "{:<40} {:<8} {:<8} {:<16} {:>8}  {}",
                        v.id, v.transport, v.state, v.owner, v.idle_ms, v.presence_key
                    );
                }
            }
        }
        Command::Kick { id, client } => {
            let c = Client::new(&client.server, client.token)?;
            c.kick(&id).await?;
            if !client.json {
                println!("kicked {id}");
            }
        }
        Command::Status { client } => {
            let c = Client::new(&client.server, client.token)?;
            let s = c.status().await?;
            if client.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("herald {} up {}s", s.version, s.uptime_seconds);
                println!("log: watermarks {}..={}", s.log_first, s.log_last);
                println!(
                    "subscriptions: {} live, {} durable",
                    s.engine_subscriptions, s.durable_subscriptions
                );
                println!("queue overflows: {}", s.queue_overflows);
            }
        }
        Command::Serve(_)
        | Command::Doctor { .. }
        | Command::Keys { .. }
        | Command::Token { .. }
        | Command::Users { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}
