//! What both ends do with an established connection: learn who the peer is, and end a
//! session so that the last message is delivered before the connection goes away.

use std::time::Duration;

use quinn::Connection;
use rustls::pki_types::CertificateDer;

use super::identity::Fingerprint;
use super::lanes::LaneTasks;
use super::open::CloseCode;
use super::tls::ALPN_ANY_VERSION;

/// How long the side that spoke last waits for the peer to close.
const LINGER: Duration = Duration::from_secs(5);

/// The fingerprint of the certificate the peer proved it holds the key of.
pub fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_cert(c))
}

/// True when the handshake settled on the version-less ALPN: the peers' versions differ.
pub fn versions_differ(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_none_or(|p| p == ALPN_ANY_VERSION)
}

/// Ends a session. The side that spoke last (sent `Done` or `Error`) waits for the peer to
/// close, so its last frames arrive; the other side closes at once.
pub async fn end_session(conn: &Connection, tasks: LaneTasks, spoke_last: bool, ok: bool) {
    tasks.flush().await;
    if spoke_last {
        let _ = tokio::time::timeout(LINGER, conn.closed()).await;
    }
    let (code, why) = if ok {
        (CloseCode::Done, "done")
    } else {
        (CloseCode::Failed, "session failed")
    };
    super::closing::close(conn, code.varint(), why.as_bytes());
}
