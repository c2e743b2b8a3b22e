//! The client side of `replicator sync` when one end is `HOST:PORT/VOLUME`.
//!
//! The async part (connect, check the server, open the lanes) runs on a small tokio runtime;
//! the sync engine then runs on the calling thread, talking to the lanes through blocking
//! channels, exactly as it does for a local sync.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quinn::Connection;

use super::closing::{self, Endpoint};
use super::conn::{end_session, peer_fingerprint};
use super::endpoint::{self, Bulk, NetOptions};
use super::identity::{Identity, TrustList};
use super::lanes::{self, FirstError, LaneRx, LaneTasks, LaneTx, describe};
use super::open::{CloseCode, Direction, Open, RemoteSpec, decode_accept, resolve};
use crate::manifest::Limits;
use crate::progress::Progress;
use crate::protocol::SessionError;
use crate::protocol::message::PROTOCOL_VERSION;
use crate::protocol::receiver::{Patching, ReceiverOptions, run_receiver};
use crate::state::StateDir;
use crate::sync::{
    Ends, Summary, SyncError, SyncOptions, canonical_target, run_source, source_volume,
};
use crate::transport::MessageTx;

/// Who we are and whom we trust, for one client run.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub identity: Identity,
    /// Pinned server fingerprints (`--peer-id` plus the known-peers file).
    pub trusted: TrustList,
    /// Where pins can be added, for the refusal message.
    pub known_peers: PathBuf,
    pub net: NetOptions,
    pub lanes: u8,
    /// Protocol version to speak (always the current one outside tests).
    pub version: u32,
}

impl ClientOptions {
    pub fn new(identity: Identity, trusted: TrustList, known_peers: PathBuf) -> Self {
        ClientOptions {
            identity,
            trusted,
            known_peers,
            net: NetOptions::default(),
            lanes: 4,
            version: PROTOCOL_VERSION,
        }
    }
}

/// An open session: the connection and the engine's ends of the lanes.
pub struct Session {
    pub runtime: tokio::runtime::Runtime,
    pub endpoint: Endpoint,
    pub conn: Connection,
    pub tx: LaneTx,
    pub rx: LaneRx,
    pub tasks: LaneTasks,
}

impl Session {
    /// Ends the session (see [`end_session`]) and gives the close a moment to leave.
    ///
    /// Not the whole drain period (three probe timeouts, ~90 ms on loopback): the close goes
    /// out at once, and if it is lost the server only learns of the end by its timeout,
    /// after it has finished and logged the session anyway.
    pub fn finish(self, spoke_last: bool, ok: bool) {
        let Session {
            runtime,
            endpoint,
            conn,
            tx,
            rx,
            tasks,
        } = self;
        drop(tx);
        let stats = conn.stats();
        tracing::debug!(
            mtu = stats.path.current_mtu,
            rtt_us = stats.path.rtt.as_micros() as u64,
            cwnd = stats.path.cwnd,
            sent_packets = stats.path.sent_packets,
            lost_packets = stats.path.lost_packets,
            congestion_events = stats.path.congestion_events,
            black_holes = stats.path.black_holes_detected,
            udp_datagrams_sent = stats.udp_tx.datagrams,
            "QUIC path at the end of the session"
        );
        runtime.block_on(async {
            end_session(&conn, tasks, spoke_last, ok).await;
            drop(rx);
            let flush = (conn.rtt() * 2 + Duration::from_millis(10)).min(Duration::from_secs(1));
            let _ = tokio::time::timeout(flush, endpoint.wait_idle()).await;
        });
    }
}

fn refused_or_lost(e: &quinn::ConnectionError) -> SyncError {
    if let quinn::ConnectionError::ApplicationClosed(c) = e
        && let Some(code) = CloseCode::from_u64(c.error_code.into_inner())
        && !matches!(code, CloseCode::Done | CloseCode::Failed)
    {
        return SyncError::Refused {
            code,
            message: String::from_utf8_lossy(&c.reason).into_owned(),
        };
    }
    SyncError::Connection(describe(e))
}

/// Connects to `address` (`HOST:PORT`), checks its fingerprint and opens a session on
/// `volume` (empty for a bench).
pub fn open_session(
    address: &str,
    direction: Direction,
    volume: &str,
    opts: &SyncOptions,
    client: &ClientOptions,
) -> Result<Session, SyncError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| SyncError::Connection(format!("cannot start the network runtime: {e}")))?;
    let addr = resolve(address).map_err(SyncError::Usage)?;
    let ep = runtime.block_on(async {
        let bulk = match direction {
            Direction::Pull => Bulk::Downstream,
            Direction::Push | Direction::Bench => Bulk::Upstream,
        };
        endpoint::client(&client.identity, addr, &client.net, client.version, bulk)
            .map_err(|e| SyncError::Connection(e.to_string()))
    })?;
    let opened = runtime.block_on(async {
        let connecting = ep
            .connect(addr, "replicator")
            .map_err(|e| SyncError::Connection(format!("cannot connect to {address}: {e}")))?;
        let conn = connecting.await.map_err(|e| match e {
            quinn::ConnectionError::TimedOut => SyncError::Connection(format!(
                "no answer from {address} (is `replicator serve` running there?)"
            )),
            e => refused_or_lost(&e),
        })?;
        let Some(fp) = peer_fingerprint(&conn) else {
            closing::close(
                &conn,
                CloseCode::UntrustedServer.varint(),
                b"no certificate",
            );
            return Err(SyncError::Connection(format!(
                "{address} sent no certificate"
            )));
        };
        if !client.trusted.trusts(&fp, Some(address)) {
            let ours = client.identity.fingerprint;
            closing::close(
                &conn,
                CloseCode::UntrustedServer.varint(),
                format!(
                    "client {ours} does not trust this server's fingerprint {fp}; \
                     it must pin it with --peer-id {fp}"
                )
                .as_bytes(),
            );
            return Err(SyncError::Refused {
                code: CloseCode::UntrustedServer,
                message: format!(
                    "the server at {address} presents fingerprint {fp}, which is not pinned; \
                     if that is the right server, pass --peer-id {fp} or add the line \
                     \"{fp} {address}\" to {}",
                    client.known_peers.display()
                ),
            });
        }
        let lost = |e: quinn::ConnectionError| refused_or_lost(&e);
        let write_lost = |e: quinn::WriteError| match e {
            quinn::WriteError::ConnectionLost(c) => refused_or_lost(&c),
            other => SyncError::Connection(other.to_string()),
        };
        let lanes_wanted = client.lanes.clamp(1, super::open::MAX_LANES);
        let request = Open {
            version: client.version,
            direction,
            volume: volume.to_string(),
            lanes: lanes_wanted,
            chunker: opts.chunker,
            compress: opts.compress,
            checksum: opts.checksum,
            live: opts.live,
            dry_run: opts.dry_run == crate::protocol::dry_run::DryRun::Ask,
        };
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for lane in 0..lanes_wanted {
            let (mut s, r) = conn.open_bi().await.map_err(lost)?;
            if lane == 0 {
                s.write_all(&request.encode()).await.map_err(write_lost)?;
            } else {
                s.write_all(&[lane]).await.map_err(write_lost)?;
            }
            sends.push(s);
            recvs.push(r);
        }
        let accepted = read_accept(&conn, &mut recvs[0]).await?;
        if accepted != lanes_wanted {
            return Err(SyncError::Connection(format!(
                "server accepted {accepted} lanes, {lanes_wanted} were asked for"
            )));
        }
        let error = FirstError::default();
        let (tx, rx, tasks) = lanes::start(sends, recvs, Limits::default(), error);
        Ok((conn, tx, rx, tasks))
    });
    let (conn, tx, rx, tasks) = match opened {
        Ok(o) => o,
        Err(e) => {
            // Let our close (or refusal) reach the server before the endpoint goes away.
            runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
            });
            return Err(e);
        }
    };
    Ok(Session {
        runtime,
        endpoint: ep,
        conn,
        tx,
        rx,
        tasks,
    })
}

async fn read_accept(
    conn: &quinn::Connection,
    stream: &mut quinn::RecvStream,
) -> Result<u8, SyncError> {
    let mut len = [0u8; 4];
    let mut body = [0u8; 2];
    let read = async {
        stream.read_exact(&mut len).await?;
        stream.read_exact(&mut body).await
    };
    match read.await {
        Ok(()) if u32::from_be_bytes(len) == 2 => decode_accept(&body)
            .map_err(|e| SyncError::Connection(format!("bad answer from server: {e}"))),
        Ok(()) => Err(SyncError::Connection("bad answer from server".into())),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => {
            Err(refused_or_lost(&c))
        }
        // A refusing server drops its streams (which ends them) and closes the connection
        // with the reason; the stream's end can arrive first. Wait for the reason.
        Err(e) => match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(reason) => Err(refused_or_lost(&reason)),
            Err(_) => Err(SyncError::Connection(format!(
                "server ended the session: {e}"
            ))),
        },
    }
}

/// Maps an engine error seen on the client to what the user is told.
fn session_error(e: SessionError, session: &Session) -> SyncError {
    let resume = "; rerun the same command to resume";
    if let SessionError::Transport(_) = &e
        && let Some(reason) = session.conn.close_reason()
    {
        return match refused_or_lost(&reason) {
            SyncError::Connection(m) => SyncError::Connection(format!("{m}{resume}")),
            other => other,
        };
    }
    match e {
        SessionError::Transport(t) => SyncError::Connection(format!("{t}{resume}")),
        e => SyncError::Session(e),
    }
}

/// `replicator sync SRC HOST:PORT/VOLUME`.
pub fn push(
    src: &Path,
    remote: &RemoteSpec,
    opts: &SyncOptions,
    client: &ClientOptions,
    progress: &dyn Progress,
) -> Result<Summary, SyncError> {
    opts.chunker.validate().map_err(SyncError::Usage)?;
    let started = Instant::now();
    let (src, mode) = source_volume(src)?;
    let mut session = open_session(
        &remote.address(),
        Direction::Push,
        remote.volume.as_str(),
        opts,
        client,
    )?;
    let result = run_source(&src, mode, opts, &mut session.tx, &mut session.rx, progress);
    let (sent, back) = (session.tx.wire_bytes(), session.rx.wire_bytes());
    match result {
        Ok(report) => {
            session.finish(false, true);
            let ends = Ends {
                mode,
                source: src.display().to_string(),
                destination: remote.to_string(),
                started,
            };
            Ok(ends.seen_by_sender(&report, sent, back))
        }
        Err(e) => {
            let spoke_last = !matches!(e, SessionError::Peer(_) | SessionError::Transport(_));
            let err = session_error(e, &session);
            session.finish(spoke_last, false);
            Err(err)
        }
    }
}

/// `replicator sync HOST:PORT/VOLUME DST`.
pub fn pull(
    remote: &RemoteSpec,
    dst: &Path,
    opts: &SyncOptions,
    client: &ClientOptions,
    progress: &dyn Progress,
) -> Result<Summary, SyncError> {
    opts.chunker.validate().map_err(SyncError::Usage)?;
    let started = Instant::now();
    let dst = canonical_target(dst);
    let states = StateDir::new(opts.state_dir.clone());
    let mut session = open_session(
        &remote.address(),
        Direction::Pull,
        remote.volume.as_str(),
        opts,
        client,
    )?;
    let result = run_receiver(
        &dst,
        states.target(&dst),
        &mut session.tx,
        &mut session.rx,
        progress,
        // A pull writes what the user asked for, from a server the user pinned.
        ReceiverOptions {
            allow_devices: true,
            dry_run: opts.dry_run,
            inplace: Patching::when(opts.inplace),
            ..ReceiverOptions::default()
        },
    );
    let (back, sent) = (session.tx.wire_bytes(), session.rx.wire_bytes());
    match result {
        Ok(report) => {
            session.finish(true, true);
            let ends = Ends {
                mode: report.mode,
                source: remote.to_string(),
                destination: dst.display().to_string(),
                started,
            };
            Ok(ends.seen_by_receiver(&report, sent, back))
        }
        Err(e) => {
            let spoke_last = !matches!(e, SessionError::Peer(_) | SessionError::Transport(_));
            let err = session_error(e, &session);
            session.finish(spoke_last, false);
            Err(err)
        }
    }
}
