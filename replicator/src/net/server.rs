//! `replicator serve`: volumes under a root directory, offered to authorized clients.
//!
//! Each connection is one session: the client is checked against the authorized file
//! (re-read for every connection, so edits apply at once), asks for a volume and a direction,
//! and the server runs the same engine as a local sync on a blocking thread. One writer per
//! volume, and no reader while it is written: a second session gets "volume busy" and the
//! first goes on unaffected. Server-side state (indexes, sync state) lives in
//! `ROOT/.replicator/`, which no volume name can reach (names never start with `.`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};

use super::closing::{self, Endpoint};
use super::conn::{end_session, peer_fingerprint, versions_differ};
use super::endpoint::{self, NetOptions};
use super::identity::{Identity, TrustList};
use super::lanes::{self, FirstError, describe};
use super::open::{CloseCode, Direction, MAX_LANES, Open, VolumeName, encode_accept};
use crate::apply::fsops::stale_temps;
use crate::manifest::Limits;
use crate::progress::NoProgress;
use crate::protocol::SessionError;
use crate::protocol::dry_run::DryRun;
use crate::protocol::message::{Message, Unfinished};
use crate::protocol::receiver::{Patching, ReceiverOptions, run_receiver};
use crate::state::{StateDir, SyncStatus, unix_now};
use crate::sync::{SyncOptions, run_source};
use crate::transport::{MessageRx, MessageTx, TransportError};
use crate::volume;

/// Time a client has, after the handshake, to say what it wants and open its lanes.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `Open` frame.
const MAX_OPEN: usize = 1024;

/// Default of [`ServeOptions::staging_max_age`]: a week.
pub const DEFAULT_STAGING_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of [`ServeOptions::staging_max_bytes`]: 64 GiB.
pub const DEFAULT_STAGING_MAX_BYTES: u64 = 64 << 30;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Volumes live in `root/NAME`.
    pub root: PathBuf,
    /// Fingerprints of the clients allowed in.
    pub authorized: PathBuf,
    pub identity: Identity,
    pub net: NetOptions,
    pub version: u32,
    /// Most manifest entries accepted in a push.
    pub max_entries: u64,
    /// Whether a push may create device nodes ([`ReceiverOptions::allow_devices`]).
    pub allow_devices: bool,
    /// Hash threads when sending (pull).
    pub threads: usize,
    /// Partial files of a sync abandoned this long ago are removed.
    pub staging_max_age: Duration,
    /// Partial files of abandoned syncs are removed, oldest first, beyond this many bytes.
    pub staging_max_bytes: u64,
    /// Asked before a push or pull is accepted; an `Err` refuses the session with that text.
    /// The deployer's agents use it to refuse pushes into volumes they own (fencing).
    pub policy: Option<Policy>,
}

/// A server owner's veto over sessions: `(volume, direction) → Ok or why not`.
#[derive(Clone)]
pub struct Policy(pub Arc<PolicyFn>);

/// The check itself: volume name and direction in, refusal text out.
pub type PolicyFn = dyn Fn(&str, Direction) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Policy")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    Writer,
    Readers(usize),
    /// A writer past `Done`: the volume is complete and durable, only the receiver's own
    /// bookkeeping (its index) remains. New sessions wait for it instead of being refused.
    Finishing,
}

/// How long a new session waits for a finishing writer before it is refused as busy.
const FINISHING_WAIT: Duration = Duration::from_secs(5);

/// Who holds which volume.
#[derive(Default)]
struct Locks(Mutex<HashMap<String, Hold>>);

struct LockGuard {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Ok(mut held) = self.shared.locks.0.lock() else {
            return;
        };
        match held.get(&self.name).copied() {
            Some(Hold::Readers(n)) if n > 1 => {
                held.insert(self.name.clone(), Hold::Readers(n - 1));
            }
            _ => {
                held.remove(&self.name);
            }
        }
    }
}

impl LockGuard {
    /// Marks a writer's volume as finishing (see [`Hold::Finishing`]); the lock itself is
    /// still released when the guard drops.
    fn finisher(&self) -> impl FnOnce() + Send + 'static {
        let (shared, name) = (self.shared.clone(), self.name.clone());
        move || {
            if let Ok(mut held) = shared.locks.0.lock()
                && held.get(&name) == Some(&Hold::Writer)
            {
                held.insert(name, Hold::Finishing);
            }
        }
    }
}

/// Why a volume could not be locked.
#[derive(Debug)]
struct Busy {
    why: String,
    /// The holder is a writer only finishing (see [`Hold::Finishing`]): worth waiting for.
    finishing: bool,
}

/// [`try_lock`], waiting (up to [`FINISHING_WAIT`]) while a writer is only finishing.
async fn lock_volume(shared: &Arc<Shared>, name: &str, write: bool) -> Result<LockGuard, String> {
    let deadline = Instant::now() + FINISHING_WAIT;
    loop {
        match try_lock(shared, name, write) {
            Err(busy) if busy.finishing && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return other.map_err(|busy| busy.why),
        }
    }
}

fn try_lock(shared: &Arc<Shared>, name: &str, write: bool) -> Result<LockGuard, Busy> {
    let mut held = shared.locks.0.lock().map_err(|_| Busy {
        why: "lock table poisoned".to_string(),
        finishing: false,
    })?;
    let current = held.get(name).copied();
    match (current, write) {
        (None, true) => held.insert(name.to_string(), Hold::Writer),
        (None, false) => held.insert(name.to_string(), Hold::Readers(1)),
        (Some(Hold::Readers(n)), false) => held.insert(name.to_string(), Hold::Readers(n + 1)),
        (Some(Hold::Writer | Hold::Finishing), _) => {
            return Err(Busy {
                why: format!("volume {name} is busy: another session is writing it"),
                finishing: current == Some(Hold::Finishing),
            });
        }
        (Some(Hold::Readers(_)), true) => {
            return Err(Busy {
                why: format!("volume {name} is busy: another session is reading it"),
                finishing: false,
            });
        }
    };
    Ok(LockGuard {
        shared: shared.clone(),
        name: name.to_string(),
    })
}

struct Shared {
    opts: ServeOptions,
    root: PathBuf,
    states: StateDir,
    locks: Locks,
}

/// Creates the directory volumes live in, if missing, as mode 0700, and returns its
/// canonical path. A push brings its files' owners and modes, setuid bits included (a
/// database volume keeps its owner's uid, so they cannot be dropped): a root only root can
/// enter keeps the other users of this host from reaching them. Containers see a volume
/// through their bind mount, which the modes above it do not affect. An existing root that
/// others can enter is left as it is, with a warning when this process is root.
pub fn prepare_root(path: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !path.is_dir() {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
            other => other?,
        }
    }
    let root = path.canonicalize()?;
    let mode = std::fs::metadata(&root)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 && rustix::process::geteuid().is_root() {
        tracing::warn!(
            root = %root.display(),
            mode = format_args!("{mode:o}"),
            "other users of this host can enter the volume root and reach setuid files a \
             push brings; chmod 700 it"
        );
    }
    Ok(root)
}

/// A bound server, ready to [`Server::run`].
pub struct Server {
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the endpoint. Call inside a tokio runtime.
    pub fn bind(opts: ServeOptions) -> Result<Server, ServeError> {
        let root_err = |source| ServeError::Root {
            path: opts.root.clone(),
            source,
        };
        let root = prepare_root(&opts.root).map_err(root_err)?;
        let states = StateDir::new(root.join(".replicator").join("state"));
        let endpoint = endpoint::server(&opts.identity, opts.listen, &opts.net, opts.version)?;
        Ok(Server {
            endpoint,
            shared: Arc::new(Shared {
                opts,
                root,
                states,
                locks: Locks::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = self.shared.clone();
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(handle(shared.clone(), incoming));
                }
                () = &mut shutdown => break,
            }
        }
        sweeper.abort();
        self.endpoint
            .close(CloseCode::Shutdown.varint(), b"server shutting down");
        self.endpoint.wait_idle().await;
    }
}

/// Bounds the staging (partial files) of abandoned syncs, at start, hourly, and after every
/// session that failed: staging older than the configured age goes, then the oldest staging
/// until what remains fits the configured size. Volumes in use are skipped.
async fn sweep_loop(shared: Arc<Shared>) {
    loop {
        sweep(&shared).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn sweep(shared: &Arc<Shared>) {
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || sweep_once(&s)).await;
}

/// One abandoned sync's partial files.
struct Staging {
    volume: String,
    started_unix: u64,
    bytes: u64,
}

fn sweep_once(shared: &Arc<Shared>) {
    let Ok(dir) = std::fs::read_dir(&shared.root) else {
        return;
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if VolumeName::new(&name).is_err() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(state) = shared.states.target(&shared.root.join(&name)).read() else {
            continue;
        };
        let SyncStatus::Incomplete { started_unix } = state.status else {
            continue;
        };
        let Ok(_guard) = try_lock(shared, &name, true) else {
            continue;
        };
        match stale_temps(&shared.root.join(&name), false) {
            Ok((files, bytes)) if files > 0 => found.push(Staging {
                volume: name,
                started_unix,
                bytes,
            }),
            Ok(_) => {}
            Err(e) => tracing::warn!(volume = %name, "cannot measure abandoned staging: {e}"),
        }
    }
    let now = unix_now();
    let doomed = over_bounds(
        found,
        now,
        shared.opts.staging_max_age.as_secs(),
        shared.opts.staging_max_bytes,
    );
    for (staging, why) in doomed {
        let Ok(_guard) = try_lock(shared, &staging.volume, true) else {
            continue;
        };
        match stale_temps(&shared.root.join(&staging.volume), true) {
            Ok((files, bytes)) => tracing::info!(
                volume = %staging.volume,
                files,
                bytes,
                age_s = now.saturating_sub(staging.started_unix),
                "removed abandoned staging ({why})"
            ),
            Err(e) => {
                tracing::warn!(volume = %staging.volume, "cannot remove abandoned staging: {e}")
            }
        }
    }
}

/// Which stagings go: every one older than `max_age` seconds, then the oldest of the rest
/// until the others total at most `max_bytes`.
fn over_bounds(
    mut found: Vec<Staging>,
    now: u64,
    max_age: u64,
    max_bytes: u64,
) -> Vec<(Staging, &'static str)> {
    found.sort_by_key(|s| s.started_unix);
    let mut doomed = Vec::new();
    let mut total: u64 = found.iter().map(|s| s.bytes).sum();
    for s in found {
        let why = if now.saturating_sub(s.started_unix) >= max_age {
            "older than --staging-max-age-hours"
        } else if total > max_bytes {
            "over --staging-max-gib"
        } else {
            continue;
        };
        total -= s.bytes;
        doomed.push((s, why));
    }
    doomed
}

fn refuse(conn: &Connection, code: CloseCode, why: &str) {
    closing::close(conn, code.varint(), why.as_bytes());
}

async fn handle(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, "handshake failed: {}", describe(&e));
            return;
        }
    };
    let Some(fp) = peer_fingerprint(&conn) else {
        refuse(&conn, CloseCode::Unauthorized, "no client certificate");
        return;
    };
    let authorized_file = &shared.opts.authorized;
    let authorized = TrustList::load(authorized_file).unwrap_or_else(|e| {
        tracing::error!("cannot read the authorized clients: {e}");
        TrustList::new()
    });
    if !authorized.trusts(&fp, None) {
        tracing::warn!(
            %remote,
            client = %fp,
            "refused an unknown client; to allow it, add the line \"{fp}\" to {}",
            authorized_file.display()
        );
        refuse(
            &conn,
            CloseCode::Unauthorized,
            &format!(
                "the server does not know this client (fingerprint {fp}); its operator must \
                 add \"{fp}\" to the server's authorized file"
            ),
        );
        return;
    }
    let setup = tokio::time::timeout(SETUP_TIMEOUT, accept_session(&shared, &conn)).await;
    let (open, sends, recvs, guard) = match setup {
        Ok(Ok(s)) => s,
        Ok(Err((code, why))) => {
            tracing::warn!(%remote, client = %fp, "refused: {why}");
            refuse(&conn, code, &why);
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, client = %fp, "client did not open its session in time");
            refuse(&conn, CloseCode::BadRequest, "session setup timed out");
            return;
        }
    };
    let started = Instant::now();
    let error = FirstError::default();
    let (mut tx, mut rx, tasks) = lanes::start(sends, recvs, Limits::default(), error);
    let s = shared.clone();
    let o = open.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        // The volume is held until the session's work is over (past `Done` a push only marks
        // it finishing: new sessions wait for it), not until after the goodbye.
        let result = run_session(&s, &o, &mut tx, &mut rx, guard);
        let bytes = (rx.wire_bytes(), tx.wire_bytes());
        drop(tx);
        (result, bytes)
    })
    .await;
    let (result, (bytes_in, bytes_out)) = match outcome {
        Ok(r) => r,
        Err(_) => (
            Err(SessionError::Protocol("session thread panicked".into())),
            (0, 0),
        ),
    };
    let spoke_last = match &result {
        Ok(ended) => ended.spoke_last,
        Err(e) => !matches!(e, SessionError::Peer(_) | SessionError::Transport(_)),
    };
    let verdict = match &result {
        Ok(Ended { dry_run: true, .. }) => "ok (dry run: nothing changed)".to_string(),
        Ok(Ended {
            unfinished: Some(u),
            ..
        }) => format!(
            "unfinished ({} chunks changed at the source while sent, {} files incomplete; \
             partial files kept)",
            u.chunks, u.files
        ),
        Ok(_) => "ok".to_string(),
        Err(e @ SessionError::Transport(TransportError::Malformed(_))) => format!("failed: {e}"),
        Err(e @ SessionError::Transport(_)) => match conn.close_reason() {
            Some(reason) => format!("failed: {}", describe(&reason)),
            None => format!("failed: {e}"),
        },
        Err(e) => format!("failed: {e}"),
    };
    end_session(&conn, tasks, spoke_last, result.is_ok()).await;
    tracing::info!(
        client = %fp,
        %remote,
        volume = %open.volume,
        direction = %open.direction,
        bytes_in,
        bytes_out,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %verdict,
        "session"
    );
    if result.is_err() && open.direction == Direction::Push {
        // A broken push may have left staging behind: keep the total within bounds.
        sweep(&shared).await;
    }
}

type Accepted = (Open, Vec<SendStream>, Vec<RecvStream>, Option<LockGuard>);

async fn accept_session(
    shared: &Arc<Shared>,
    conn: &Connection,
) -> Result<Accepted, (CloseCode, String)> {
    let (open, first) = receive_open(conn, shared.opts.version).await?;
    let bad = |why: String| (CloseCode::BadRequest, why);
    let guard = match open.direction {
        Direction::Bench => None,
        Direction::Push | Direction::Pull => {
            let name = VolumeName::new(&open.volume).map_err(bad)?;
            if open.direction == Direction::Pull {
                open.chunker.validate().map_err(bad)?;
                if !shared.root.join(name.as_str()).exists() {
                    return Err(bad(format!("no volume named {name} on this server")));
                }
            }
            if let Some(policy) = &shared.opts.policy {
                (policy.0)(name.as_str(), open.direction).map_err(bad)?;
            }
            // A dry-run push only reads the volume (its receiver insists on the dry run).
            let write = open.direction == Direction::Push && !open.dry_run;
            let guard = lock_volume(shared, name.as_str(), write).await;
            Some(guard.map_err(|why| (CloseCode::Busy, why))?)
        }
    };
    let (sends, recvs) = accept_lanes(conn, first, open.lanes).await?;
    Ok((open, sends, recvs, guard))
}

/// Server side of session setup, step 1: the client's `Open` on the first stream, checked
/// for version and lane count. Returns it with the first stream.
pub async fn receive_open(
    conn: &Connection,
    version: u32,
) -> Result<(Open, (SendStream, RecvStream)), (CloseCode, String)> {
    let lost = |e: quinn::ConnectionError| (CloseCode::BadRequest, describe(&e));
    let (send0, mut recv0) = conn.accept_bi().await.map_err(lost)?;
    let open = read_open(&mut recv0).await?;
    if versions_differ(conn) || open.version != version {
        return Err((
            CloseCode::Version,
            format!(
                "protocol version mismatch: the server speaks version {version}, the client \
                 speaks version {}",
                open.version
            ),
        ));
    }
    if open.lanes == 0 || open.lanes > MAX_LANES {
        return Err((
            CloseCode::BadRequest,
            format!("{} lanes asked for (1 to {MAX_LANES})", open.lanes),
        ));
    }
    Ok((open, (send0, recv0)))
}

/// Server side of session setup, step 2: the client's other lanes, in lane order, then the
/// `Accept` answer on the first.
pub async fn accept_lanes(
    conn: &Connection,
    first: (SendStream, RecvStream),
    lanes: u8,
) -> Result<(Vec<SendStream>, Vec<RecvStream>), (CloseCode, String)> {
    let bad = |why: String| (CloseCode::BadRequest, why);
    let mut sends = vec![Some(first.0)];
    let mut recvs = vec![Some(first.1)];
    sends.resize_with(lanes as usize, || None);
    recvs.resize_with(lanes as usize, || None);
    for _ in 1..lanes {
        let (s, mut r) = conn.accept_bi().await.map_err(|e| bad(describe(&e)))?;
        let mut lane = [0u8; 1];
        r.read_exact(&mut lane)
            .await
            .map_err(|e| bad(format!("lane header: {e}")))?;
        let i = lane[0] as usize;
        if i == 0 || i >= lanes as usize || sends[i].is_some() {
            return Err(bad(format!("bad lane number {i}")));
        }
        sends[i] = Some(s);
        recvs[i] = Some(r);
    }
    let mut sends: Vec<SendStream> = sends.into_iter().flatten().collect();
    let recvs: Vec<RecvStream> = recvs.into_iter().flatten().collect();
    sends[0]
        .write_all(&encode_accept(lanes))
        .await
        .map_err(|e| bad(format!("cannot answer: {e}")))?;
    Ok((sends, recvs))
}

async fn read_open(stream: &mut RecvStream) -> Result<Open, (CloseCode, String)> {
    let bad = |why: String| (CloseCode::BadRequest, why);
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| bad(format!("no session request: {e}")))?;
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_OPEN {
        return Err(bad(format!("session request of {n} bytes")));
    }
    let mut body = vec![0u8; n];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| bad(format!("session request: {e}")))?;
    Open::decode(&body).map_err(|e| bad(format!("bad session request: {e}")))
}

/// How a session that did not fail ended.
struct Ended {
    /// This side sent the last message.
    spoke_last: bool,
    /// The client asked for a dry run: nothing was written.
    dry_run: bool,
    /// A live session in which chunks went stale: stale chunks and unfinished files.
    unfinished: Option<Unfinished>,
}

/// Runs the engine for one session.
fn run_session(
    shared: &Shared,
    open: &Open,
    tx: &mut dyn MessageTx,
    rx: &mut dyn MessageRx,
    guard: Option<LockGuard>,
) -> Result<Ended, SessionError> {
    let path = shared.root.join(&open.volume);
    match open.direction {
        Direction::Push => {
            let opts = ReceiverOptions {
                max_entries: shared.opts.max_entries,
                allow_devices: shared.opts.allow_devices,
                on_done: guard.as_ref().map(|g| Box::new(g.finisher()) as _),
                // The open request said whether this is a dry run, and the lock was taken
                // accordingly: the hello must agree (the client's hello asks for patching if
                // it wants it).
                dry_run: match open.dry_run {
                    true => DryRun::Ask,
                    false => DryRun::Refuse,
                },
                inplace: Patching::AsAsked,
            };
            let report = run_receiver(
                &path,
                shared.states.target(&path),
                tx,
                rx,
                &NoProgress,
                opts,
            )?;
            Ok(Ended {
                spoke_last: true,
                dry_run: report.dry_run,
                unfinished: report.unfinished,
            })
        }
        Direction::Pull => {
            let mode = volume::detect_mode(&path).map_err(|e| {
                let e = SessionError::Protocol(format!("volume {}: {e}", open.volume));
                let _ = tx.send(Message::Error {
                    message: e.to_string(),
                });
                e
            })?;
            let opts = SyncOptions {
                chunker: open.chunker,
                checksum: open.checksum,
                compress: open.compress,
                state_dir: shared.states.root().to_path_buf(),
                threads: shared.opts.threads,
                // The client's hello asks for a dry run if it wants one.
                dry_run: DryRun::PeerDecides,
                inplace: false,
                live: open.live,
            };
            let report = run_source(&path, mode, &opts, tx, rx, &crate::progress::NoProgress)?;
            Ok(Ended {
                spoke_last: false,
                dry_run: report.dry_run,
                unfinished: report.unfinished,
            })
        }
        Direction::Bench => bench_sink(tx, rx).map(|_| Ended {
            spoke_last: true,
            dry_run: false,
            unfinished: None,
        }),
    }
}

/// The receiving end of `replicator bench`: verifies every chunk, keeps nothing, and reports
/// the bytes and the CPU time this process spent meanwhile.
fn bench_sink(tx: &mut dyn MessageTx, rx: &mut dyn MessageRx) -> Result<(), SessionError> {
    let cpu_start = crate::bench::process_cpu_seconds();
    let mut bytes = 0u64;
    loop {
        match rx.recv()? {
            Message::Chunk(c) => {
                let data = c
                    .decode_verified()
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                bytes += data.len() as u64;
            }
            Message::ChunksEnd { .. } => break,
            Message::Error { message } => return Err(SessionError::Peer(message)),
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} in a bench session",
                    other.name()
                )));
            }
        }
    }
    let cpu = crate::bench::process_cpu_seconds() - cpu_start;
    tx.send(Message::BenchResult {
        bytes,
        cpu_micros: (cpu.max(0.0) * 1e6) as u64,
    })
    .map_err(SessionError::Transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging(volume: &str, started_unix: u64, bytes: u64) -> Staging {
        Staging {
            volume: volume.into(),
            started_unix,
            bytes,
        }
    }

    fn names(doomed: &[(Staging, &str)]) -> Vec<String> {
        doomed.iter().map(|(s, _)| s.volume.clone()).collect()
    }

    #[test]
    fn a_volume_root_it_creates_only_its_owner_can_enter_and_an_existing_one_is_kept() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tmp.path().join("srv").join("volumes");
        let got = prepare_root(&root).unwrap();
        assert_eq!(got, root.canonicalize().unwrap());
        assert_eq!(mode(&root), 0o700);
        assert_ne!(
            mode(&tmp.path().join("srv")),
            0o700,
            "parents are made as usual"
        );
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_root(&open).unwrap();
        assert_eq!(mode(&open), 0o755, "an existing root is not changed");
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        assert!(prepare_root(&tmp.path().join("file")).is_err());
    }

    #[test]
    fn stagings_past_the_age_go_then_the_oldest_until_the_rest_fits() {
        let found = vec![
            staging("new", 990, 40),
            staging("ancient", 100, 5),
            staging("old", 900, 30),
            staging("middle", 950, 50),
        ];
        // ancient is past the age; of the others (120 bytes) old and middle must go to fit 60.
        let doomed = over_bounds(found, 1000, 500, 60);
        assert_eq!(names(&doomed), ["ancient", "old", "middle"]);
        assert_eq!(doomed[0].1, "older than --staging-max-age-hours");
        assert_eq!(doomed[1].1, "over --staging-max-gib");
    }

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let (identity, _) = Identity::load_or_create(&dir.join("id")).unwrap();
        Arc::new(Shared {
            opts: ServeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                root: dir.to_path_buf(),
                authorized: dir.join("authorized"),
                identity,
                net: NetOptions::default(),
                version: 2,
                max_entries: 10,
                allow_devices: false,
                threads: 1,
                staging_max_age: DEFAULT_STAGING_MAX_AGE,
                staging_max_bytes: DEFAULT_STAGING_MAX_BYTES,
                policy: None,
            },
            root: dir.to_path_buf(),
            states: StateDir::new(dir.join("state")),
            locks: Locks::default(),
        })
    }

    #[test]
    fn a_new_session_waits_for_a_finishing_writer_but_not_for_a_working_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let writer = try_lock(&shared, "v", true).unwrap();
            let busy = lock_volume(&shared, "v", false).await.err().unwrap();
            assert!(busy.contains("busy"), "{busy}");
            writer.finisher()();
            let waiting = tokio::spawn({
                let shared = shared.clone();
                async move { lock_volume(&shared, "v", true).await.map(|_| ()) }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!waiting.is_finished(), "went past a finishing writer");
            drop(writer);
            waiting
                .await
                .unwrap()
                .expect("the lock once the writer is done");
        });
    }

    #[test]
    fn stagings_within_both_bounds_stay() {
        let found = vec![staging("a", 990, 10), staging("b", 995, 10)];
        assert!(over_bounds(found, 1000, 500, 20).is_empty());
    }
}
