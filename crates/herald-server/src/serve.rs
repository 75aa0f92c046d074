//! The accept loop: HTTP/1.1 connections served by hyper, with upgrades (WebSocket) and a
//! graceful shutdown.
//!
//! Herald serves HTTP/1.1 only: every transport it speaks (SSE, WebSocket, long-poll, the EWS
//! and MAPI/HTTP endpoints) is HTTP/1.1, and a connection builder without protocol detection
//! keeps the memory of each of tens of thousands of idle streams smaller (measured with
//! `herald-load` S4; see docs/benchmarks.md).

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a client has to send a request's headers, unless configured.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes the kernel notice a peer that vanished (killed machine, lost network) within about
/// `lease`: keep-alive probes on idle connections, and a limit on how long sent data may stay
/// unacknowledged. The stream then fails, and its connection goes offline.
fn set_lease(stream: &tokio::net::TcpStream, lease: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let probe = (lease / 3).max(Duration::from_secs(1));
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(probe)
            .with_interval((lease / 9).max(Duration::from_secs(1)))
            .with_retries(3),
    )?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(lease))?;
    Ok(())
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then waits up to `drain` for
/// open connections to finish. Returns whether they all did. With `lease`, dead peers are
/// detected within about that long (see `set_lease`).
pub async fn serve_http1(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
    lease: Option<Duration>,
) -> bool {
    serve_http1_with(
        listener,
        router,
        shutdown,
        drain,
        lease,
        HEADER_READ_TIMEOUT,
    )
    .await
}

/// [`serve_http1`], closing connections whose request headers take longer than
/// `header_timeout` (slowloris).
pub async fn serve_http1_with(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
    lease: Option<Duration>,
    header_timeout: Duration,
) -> bool {
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if let Some(lease) = lease {
                    if let Err(e) = set_lease(&stream, lease) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP keep-alive");
                    }
                }
                let service = TowerToHyperService::new(router.clone());
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let stop = shutdown.clone();
                connections.spawn(async move {
                    let mut conn = std::pin::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        () = stop.cancelled() => {
                            // Finish the request in flight (streams end themselves on the
                            // same signal), then close.
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    connections.close();
    tokio::time::timeout(drain, connections.wait())
        .await
        .is_ok()
}
