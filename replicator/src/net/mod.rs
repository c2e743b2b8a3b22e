//! Syncing between hosts: QUIC (quinn + rustls TLS 1.3), mutual authentication by pinned
//! fingerprints, and `replicator serve`.
//!
//! - [`identity`]: key pairs, fingerprints, trust lists.
//! - [`tls`]: TLS configurations (signatures checked in the handshake, identities right after).
//! - [`endpoint`]: tuned QUIC endpoints (socket buffers, windows, keep-alive, idle timeout,
//!   path MTU discovery up to 64 KB datagrams).
//! - `socket`: the UDP socket under quinn, GSO batches bounded to one send.
//! - [`closing`]: closes that leave even when the congestion window is full.
//! - [`open`]: the session request, volume names, `HOST:PORT/VOLUME` specs, close codes.
//! - [`lanes`]: a session's messages striped over several streams, as the engine's transport.
//! - [`conn`]: peer identity and orderly session end, shared by both sides.
//! - [`client`] and [`server`]: the two ends.

pub mod client;
pub mod closing;
pub mod conn;
pub mod endpoint;
pub mod identity;
pub mod lanes;
pub mod open;
pub mod server;
mod socket;
pub mod tls;

/// Completes on SIGINT or SIGTERM: what `replicator serve` and `deployer agent` stop on.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
