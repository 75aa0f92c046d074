//! `herald`: Herald's notification server.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use herald_core::{
    Event, EventKind, Extended, Hub, HubOptions, Notification, OwnedDelivery, Scope,
    SubscribeOptions,
};
use tracing_subscriber::EnvFilter;

/// The key under which the server publishes its own lifecycle events.
const SYSTEM_KEY: &str = "herald/system";
/// `Extended` event code for "the server started".
const EVENT_STARTED: u32 = 1;

#[derive(Parser)]
#[command(name = "herald", version, about = "Herald, the notification server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on its embedded defaults until SIGINT or SIGTERM.
    Serve {
        /// Delivery threads for asynchronous sinks (default: one per CPU).
        #[arg(long, env = "HERALD_WORKERS")]
        workers: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { workers } => serve(workers),
    }
}

fn serve(workers: Option<usize>) -> anyhow::Result<()> {
    let mut options = HubOptions::default();
    if let Some(w) = workers {
        options.workers = w;
    }
    let hub = Hub::new(options);
    self_check(&hub).context("engine self-check failed")?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "herald ready");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(shutdown_signal())?;

    tracing::info!("shutting down");
    let report = hub.shutdown(Duration::from_secs(10));
    tracing::info!(
        drained = report.drained,
        unpaired = report.unpaired.len(),
        "herald stopped"
    );
    Ok(())
}

/// Publishes a "started" event through the hub and waits for it to come back, so "ready" means
/// the engine really delivers.
fn self_check(hub: &Hub) -> anyhow::Result<()> {
    let mut rx = hub.subscribe_receiver(
        Scope::Exact(SYSTEM_KEY.into()),
        EventKind::Extended.into(),
        SubscribeOptions::default(),
    )?;
    hub.notify(Notification::new(
        SYSTEM_KEY,
        Event::Extended(Extended {
            event: EVENT_STARTED,
            data: Default::default(),
        }),
    ))?;
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(OwnedDelivery::Events(batch)) if batch.len() == 1 => Ok(()),
        Ok(other) => bail!("unexpected delivery {other:?}"),
        Err(e) => bail!("the started event did not come back: {e}"),
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
