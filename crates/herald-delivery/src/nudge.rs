//! The UDP nudger: while a subscriber has something waiting, a datagram carrying its opaque
//! context goes to its address at once, then every `repeat`, until it fetches (MAPI's
//! `EcRRegisterPushNotification`; Herald's `udp` subscriptions). Held while offline.

use std::net::SocketAddr;
use std::time::Duration;

use herald_log::Gate;
use tokio::sync::watch;

/// Where the datagrams go and what they carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NudgeTarget {
    /// The subscriber's address.
    pub addr: SocketAddr,
    /// The datagram's payload.
    pub context: Vec<u8>,
}

/// Sends the target's context while `pending` is true and the gate is open: at once, then
/// every `repeat`. The target may be set or changed at any time (`None`: no datagrams).
/// Runs until both senders are dropped; spawn it on the session's tracked tasks.
pub(crate) async fn nudge(
    mut pending: watch::Receiver<bool>,
    mut target: watch::Receiver<Option<NudgeTarget>>,
    repeat: Duration,
    mut gate: Gate,
) {
    let mut socket: Option<(bool, tokio::net::UdpSocket)> = None;
    loop {
        // Something waiting, and somewhere to send it.
        if pending.wait_for(|p| *p).await.is_err() {
            return;
        }
        let t = match target.wait_for(Option::is_some).await {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        let Some(t) = t else { continue };
        gate.opened().await;
        if !*pending.borrow() {
            continue;
        }
        let v4 = t.addr.is_ipv4();
        if socket.as_ref().is_none_or(|(is_v4, _)| *is_v4 != v4) {
            let bind = if v4 { "0.0.0.0:0" } else { "[::]:0" };
            match tokio::net::UdpSocket::bind(bind).await {
                Ok(s) => socket = Some((v4, s)),
                Err(e) => {
                    tracing::warn!(error = %e, "no UDP socket for push notifications");
                    return;
                }
            }
        }
        if let Some((_, s)) = &socket {
            if let Err(e) = s.send_to(&t.context, t.addr).await {
                tracing::debug!(error = %e, addr = %t.addr, "UDP push failed");
            }
        }
        tokio::time::sleep(repeat).await;
    }
}
