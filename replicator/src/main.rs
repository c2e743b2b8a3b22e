//! The `replicator` command line: argument parsing, progress display, summaries, exit codes.
//!
//! Exit codes: 0 success, 1 the sync (or digest) failed, 2 usage error, 3 the peer refused
//! (identity not trusted, version mismatch, volume busy), 4 the connection failed or broke
//! (rerunning resumes).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use replicator::chunk::ChunkerParams;
use replicator::net::client::{ClientOptions, pull, push};
use replicator::net::endpoint::NetOptions;
use replicator::net::identity::{Fingerprint, Identity, TrustList};
use replicator::net::open::{MAX_LANES, RemoteSpec, resolve};
use replicator::net::server::{ServeOptions, Server};
use replicator::progress::Progress;
use replicator::protocol::compression::Compression;
use replicator::protocol::dry_run::{Change, DryRun};
use replicator::protocol::message::PROTOCOL_VERSION;
use replicator::protocol::receiver::DEFAULT_MAX_ENTRIES;
use replicator::state::StateDir;
use replicator::sync::{Summary, SyncError, SyncOptions, sync_local};

#[derive(Parser)]
#[command(
    name = "replicator",
    version,
    about = "Replicate a volume (directory tree or block image) with verified, content-defined chunks"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make DST mirror SRC (a directory tree, a disk image or a block device).
    Sync(SyncArgs),
    /// Print the root digest of a volume: equal digests mean the volumes mirror each other.
    Digest(DigestArgs),
    /// Build a small sample tree and sync it, printing the summary (a first run to try).
    Demo(DemoArgs),
    /// Print this host's identity fingerprint, creating the identity on first use.
    Id(IdArgs),
    /// Offer the volumes under --root to authorized clients over QUIC.
    Serve(ServeArgs),
    /// Measure a link to a `replicator serve` (throughput, RTT, CPU), or with --local PATH
    /// the chunk/hash/compress pipeline on your own data.
    Bench(BenchArgs),
}

#[derive(Args, Clone)]
struct IdentityArgs {
    /// Identity directory (default: $REPLICATOR_IDENTITY_DIR, else ~/.config/replicator/identity).
    #[arg(long)]
    identity: Option<PathBuf>,
}

impl IdentityArgs {
    fn dir(&self) -> PathBuf {
        self.identity.clone().unwrap_or_else(Identity::default_dir)
    }

    fn load(&self) -> Result<Identity, Failure> {
        let dir = self.dir();
        let (id, created) =
            Identity::load_or_create(&dir).map_err(|e| Failure::Failed(Box::new(e)))?;
        if created {
            eprintln!(
                "replicator: created a new identity in {} (fingerprint {})",
                dir.display(),
                id.fingerprint
            );
        }
        Ok(id)
    }
}

#[derive(Args, Clone)]
struct NetArgs {
    /// Seconds without a sign of life from the peer before the connection is declared lost.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Protocol version to announce (testing only).
    #[arg(long, hide = true, default_value_t = PROTOCOL_VERSION)]
    protocol_version: u32,
}

impl NetArgs {
    fn options(&self) -> Result<NetOptions, Failure> {
        if !(self.timeout.is_finite() && self.timeout >= 0.5) {
            return Err(Failure::Usage(
                "--timeout must be at least 0.5 seconds".into(),
            ));
        }
        Ok(NetOptions {
            idle_timeout: Duration::from_secs_f64(self.timeout),
        })
    }
}

#[derive(Args)]
struct IdArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Address and UDP port to listen on.
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: String,
    /// Directory holding the volumes (one subdirectory or image file per volume name).
    #[arg(long)]
    root: PathBuf,
    /// File of client fingerprints allowed in, one per line (default: IDENTITY/authorized_clients).
    #[arg(long)]
    authorized: Option<PathBuf>,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    net: NetArgs,
    /// Most manifest entries accepted in one push.
    #[arg(long, default_value_t = DEFAULT_MAX_ENTRIES)]
    max_entries: u64,
    /// Create device nodes a push brings (refused by default: a node opens this host's device).
    #[arg(long)]
    allow_devices: bool,
    /// Hours after which the partial files of an abandoned sync are removed.
    #[arg(long, default_value_t = 168.0)]
    staging_max_age_hours: f64,
    /// GiB of partial files that abandoned syncs may keep in all; beyond it the oldest go.
    #[arg(long, default_value_t = 64.0)]
    staging_max_gib: f64,
    /// Hashing threads when sending (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Clone)]
struct ChunkArgs {
    /// Smallest chunk in bytes.
    #[arg(long, default_value_t = ChunkerParams::default().min)]
    chunk_min: u32,
    /// Average chunk in bytes.
    #[arg(long, default_value_t = ChunkerParams::default().avg)]
    chunk_avg: u32,
    /// Largest chunk in bytes.
    #[arg(long, default_value_t = ChunkerParams::default().max)]
    chunk_max: u32,
}

impl ChunkArgs {
    fn params(&self) -> ChunkerParams {
        ChunkerParams {
            min: self.chunk_min,
            avg: self.chunk_avg,
            max: self.chunk_max,
        }
    }
}

#[derive(Args)]
struct SyncArgs {
    /// Source volume: a directory, a disk image file or a block device; or HOST:PORT/VOLUME.
    src: PathBuf,
    /// Destination; created if absent. Or HOST:PORT/VOLUME on a `replicator serve`.
    dst: PathBuf,
    #[command(flatten)]
    chunks: ChunkArgs,
    /// Re-read every source file even when size, times and inode are unchanged.
    #[arg(long)]
    checksum: bool,
    /// Compress chunks on the wire: never, always (zstd level 1), or auto (measured at run
    /// time: raw, level 1 or level 3, whichever moves data faster; local syncs: never).
    #[arg(long, default_value = "auto", value_parser = ["never", "always", "auto"])]
    compress: String,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Change nothing: print what the sync would create, update, set attributes of and
    /// delete (one line each, then a summary; with --json the summary alone).
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Patch large files (1 MiB and up, at most half changed, one name) at their final name
    /// instead of rebuilding them under a temp name: writes only what changed, but a crash
    /// during the commit leaves such a file part old, part new until the next sync (the
    /// destination is marked incomplete meanwhile). For destinations nothing reads during
    /// the sync, as in a migration.
    #[arg(long)]
    inplace: bool,
    /// The source is in use (a database, say, writing while it serves): a chunk that
    /// changes or vanishes after the scan is skipped instead of failing the sync. Such a
    /// sync commits nothing and exits 5 ("unfinished"); its partial files are kept, and a
    /// rerun sends only what changed since and what was skipped. Stop the writer for the
    /// last run, without --live, to get a complete copy.
    #[arg(long)]
    live: bool,
    /// Where sync state and indexes live (default: $REPLICATOR_STATE_DIR, else the XDG state dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Hashing threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    peer: PeerArgs,
}

/// How a client finds and trusts a server.
#[derive(Args, Clone)]
struct PeerArgs {
    /// Fingerprint of the server to trust (repeatable); see `replicator id` on the server.
    #[arg(long = "peer-id")]
    peer_id: Vec<String>,
    /// File of trusted server fingerprints, "FINGERPRINT [HOST:PORT...]" per line
    /// (default: IDENTITY/known_peers).
    #[arg(long)]
    known_peers: Option<PathBuf>,
    /// Parallel QUIC streams carrying the session.
    #[arg(long, default_value_t = 4)]
    lanes: u8,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// A `replicator serve` to measure the link to (HOST:PORT).
    peer_addr: Option<String>,
    /// Measure the chunk/hash/compress pipeline on this volume instead of a link.
    #[arg(long)]
    local: Option<PathBuf>,
    /// How long to stream, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Send compressible (text-like) data with zstd on, instead of random data raw.
    #[arg(long)]
    compress: bool,
    #[command(flatten)]
    chunks: ChunkArgs,
    /// Threads for --local (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(Args)]
struct DigestArgs {
    path: PathBuf,
    #[command(flatten)]
    chunks: ChunkArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Directory to work in (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Sync(a) => run_sync(a),
        Command::Digest(a) => run_digest(a),
        Command::Demo(a) => run_demo(a),
        Command::Id(a) => run_id(a),
        Command::Serve(a) => run_serve(a),
        Command::Bench(a) => run_bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("replicator: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(err)) => {
            eprintln!("replicator: {}", error_chain(&*err));
            ExitCode::from(1)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("replicator: refused: {msg}");
            ExitCode::from(3)
        }
        Err(Failure::Connection(msg)) => {
            eprintln!("replicator: {msg}");
            ExitCode::from(4)
        }
        Err(Failure::Unfinished(msg)) => {
            eprintln!("replicator: {msg}");
            ExitCode::from(5)
        }
    }
}

enum Failure {
    Usage(String),
    Failed(Box<dyn std::error::Error>),
    Refused(String),
    Connection(String),
    /// A `--live` sync ended before the destination was complete (exit code 5).
    Unfinished(String),
}

impl From<SyncError> for Failure {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Usage(m) => Failure::Usage(m),
            SyncError::Nested(_) => Failure::Usage(e.to_string()),
            SyncError::Refused { message, .. } => Failure::Refused(message),
            SyncError::Connection(m) => Failure::Connection(m),
            other => Failure::Failed(Box::new(other)),
        }
    }
}

/// One line: the error and its causes, without repeating a cause already in the message.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Renders progress with indicatif when stderr is a terminal, and a dry run's changes on
/// stdout, one per line.
struct Shown {
    bar: Option<ProgressBar>,
    list_changes: bool,
}

impl Shown {
    fn bar() -> ProgressBar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

impl Progress for Shown {
    fn set_total(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
    fn phase(&self, name: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(name.to_string());
        }
    }
    fn restart(&self, name: &str, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(name.to_string());
            bar.set_length(total);
            bar.set_position(0);
            bar.reset_eta();
        }
    }
    fn change(&self, change: &Change) {
        if !self.list_changes {
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{change}")),
            None => println!("{change}"),
        }
    }
}

fn run_sync(a: SyncArgs) -> Result<(), Failure> {
    let chunker = a.chunks.params();
    chunker.validate().map_err(Failure::Usage)?;
    let remote_src = remote_spec(&a.src)?;
    let remote_dst = remote_spec(&a.dst)?;
    let mut opts = SyncOptions {
        chunker,
        checksum: a.checksum,
        // On a network link compression pays; in-process it only costs CPU.
        compress: match Compression::parse(&a.compress) {
            Some(Compression::Auto) if remote_src.is_none() && remote_dst.is_none() => {
                Compression::Never
            }
            Some(c) => c,
            None => return Err(Failure::Usage(format!("bad --compress {}", a.compress))),
        },
        dry_run: DryRun::asked(a.dry_run),
        inplace: a.inplace,
        live: a.live,
        ..SyncOptions::default()
    };
    if let Some(dir) = &a.state_dir {
        opts.state_dir = dir.clone();
    }
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let list = a.dry_run && !a.json;
    let summary = match (remote_src, remote_dst) {
        (None, None) => with_progress(list, |p| sync_local(&a.src, &a.dst, &opts, p))?,
        (Some(_), Some(_)) => {
            return Err(Failure::Usage(
                "both ends are remote; run the sync on one of the hosts".into(),
            ));
        }
        (None, Some(remote)) => {
            let client = client_options(&a.peer)?;
            with_progress(list, |p| push(&a.src, &remote, &opts, &client, p))?
        }
        (Some(remote), None) => {
            let client = client_options(&a.peer)?;
            with_progress(list, |p| pull(&remote, &a.dst, &opts, &client, p))?
        }
    };
    print_summary(&summary, a.json);
    match summary.complete {
        true => Ok(()),
        false => Err(Failure::Unfinished(format!(
            "unfinished: {} chunks changed at the source while they were sent ({} files \
             incomplete); nothing was committed, partial files are kept: rerun to finish",
            summary.chunks_stale, summary.files_unfinished
        ))),
    }
}

fn remote_spec(p: &std::path::Path) -> Result<Option<RemoteSpec>, Failure> {
    let Some(s) = p.to_str() else {
        return Ok(None);
    };
    RemoteSpec::parse(s).transpose().map_err(Failure::Usage)
}

fn client_options(a: &PeerArgs) -> Result<ClientOptions, Failure> {
    let identity = a.identity.load()?;
    let known_peers = a
        .known_peers
        .clone()
        .unwrap_or_else(|| a.identity.dir().join("known_peers"));
    let mut trusted = TrustList::load(&known_peers).map_err(|e| Failure::Usage(e.to_string()))?;
    for p in &a.peer_id {
        trusted.add(Fingerprint::parse(p).map_err(|e| Failure::Usage(format!("--peer-id: {e}")))?);
    }
    let mut client = ClientOptions::new(identity, trusted, known_peers);
    client.net = a.net.options()?;
    client.version = a.net.protocol_version;
    client.lanes = a.lanes.clamp(1, MAX_LANES);
    Ok(client)
}

fn run_bench(a: BenchArgs) -> Result<(), Failure> {
    if let Some(path) = &a.local {
        let chunker = a.chunks.params();
        chunker.validate().map_err(Failure::Usage)?;
        let threads = a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let r = replicator::bench::local(path, chunker, threads)
            .map_err(|e| Failure::Failed(Box::new(e)))?;
        if a.json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            println!(
                "{}: {} in {} chunks\n  read+chunk+hash: {:.0} MB/s on {} threads\n  zstd (wire level): {:.0} MB/s on 1 thread, ratio {:.2} over {}",
                r.path,
                human(r.bytes),
                r.chunks,
                r.scan_megabytes_per_second,
                r.threads,
                r.compress_megabytes_per_second,
                r.compress_ratio,
                human(r.compress_sample_bytes)
            );
        }
        return Ok(());
    }
    let Some(addr) = &a.peer_addr else {
        return Err(Failure::Usage(
            "give HOST:PORT of a `replicator serve`, or --local PATH".into(),
        ));
    };
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(Failure::Usage("--seconds must be positive".into()));
    }
    let client = client_options(&a.peer)?;
    let r = replicator::bench::link(
        addr,
        &client,
        Duration::from_secs_f64(a.seconds),
        a.compress,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        println!(
            "{}: {:.0} MB/s over {} lanes ({} in {:.1}s, {} on the wire), RTT {:.2} ms\n  CPU: client {:.2}s, server {:.2}s ({:.0}% and {:.0}% of one core)\n  path: {}-byte datagrams, {} packets lost",
            r.peer,
            r.megabytes_per_second,
            r.lanes,
            human(r.bytes),
            r.seconds,
            human(r.bytes_on_wire),
            r.rtt_ms,
            r.client_cpu_seconds,
            r.server_cpu_seconds,
            100.0 * r.client_cpu_seconds / r.seconds,
            100.0 * r.server_cpu_seconds / r.seconds,
            r.path_mtu,
            r.lost_packets
        );
    }
    Ok(())
}

fn run_id(a: IdArgs) -> Result<(), Failure> {
    let id = a.identity.load()?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"fingerprint": id.fingerprint.to_string(), "dir": id.dir})
        );
    } else {
        println!("{}", id.fingerprint);
    }
    Ok(())
}

fn run_serve(a: ServeArgs) -> Result<(), Failure> {
    let identity = a.identity.load()?;
    let listen = resolve(&a.listen).map_err(Failure::Usage)?;
    if !(a.staging_max_age_hours.is_finite() && a.staging_max_age_hours >= 0.0) {
        return Err(Failure::Usage(
            "--staging-max-age-hours must be >= 0".into(),
        ));
    }
    if !(a.staging_max_gib.is_finite() && a.staging_max_gib >= 0.0) {
        return Err(Failure::Usage("--staging-max-gib must be >= 0".into()));
    }
    let opts = ServeOptions {
        listen,
        root: a.root.clone(),
        authorized: a
            .authorized
            .clone()
            .unwrap_or_else(|| a.identity.dir().join("authorized_clients")),
        identity,
        net: a.net.options()?,
        version: a.net.protocol_version,
        max_entries: a.max_entries.max(1),
        allow_devices: a.allow_devices,
        threads: a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1),
        staging_max_age: Duration::from_secs_f64(a.staging_max_age_hours * 3600.0),
        staging_max_bytes: (a.staging_max_gib * (1u64 << 30) as f64) as u64,
        policy: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(Box::new(e)))?;
    runtime.block_on(async {
        let authorized = opts.authorized.clone();
        let fingerprint = opts.identity.fingerprint;
        let server = Server::bind(opts).map_err(|e| Failure::Failed(Box::new(e)))?;
        let addr = server
            .local_addr()
            .map_err(|e| Failure::Failed(Box::new(e)))?;
        // One line on stdout that scripts can read: where, and who we are.
        println!("listening on {addr} fingerprint {fingerprint}");
        tracing::info!(authorized = %authorized.display(), "serving");
        server.run(replicator::net::shutdown_signal()).await;
        Ok(())
    })
}

/// Runs `f` with a progress bar when stderr is a terminal; `list_changes` prints a dry
/// run's changes.
fn with_progress<T>(
    list_changes: bool,
    f: impl FnOnce(&dyn Progress) -> Result<T, SyncError>,
) -> Result<T, SyncError> {
    let shown = Shown {
        bar: std::io::stderr().is_terminal().then(Shown::bar),
        list_changes,
    };
    let r = f(&shown);
    if let Some(bar) = &shown.bar {
        bar.finish_and_clear();
    }
    r
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    if s.dry_run {
        // Asked for explicitly: printed even when piped.
        println!(
            "dry run, nothing changed: {} would write {} files{} and delete {} paths; {} chunks of {} to send ({} copied locally); root {}",
            s.destination,
            s.files_written,
            patched(s),
            s.deleted,
            s.chunks_sent,
            human(s.bytes_sent_raw),
            human(s.bytes_copied_locally),
            s.root
        );
        return;
    }
    if !std::io::stdout().is_terminal() && !std::io::stderr().is_terminal() {
        return;
    }
    println!(
        "{} {} ({}): {} files, {} total, {} read, {} chunks sent of {} ({} on the wire), {} copied locally, {} written{}, {} deleted, {:.2}s\nmanifest: {} of {} entries sent{}\nroot {}",
        if s.complete { "synced" } else { "unfinished" },
        s.destination,
        s.mode,
        s.files,
        human(s.bytes_total),
        human(s.bytes_read),
        s.chunks_sent,
        s.chunks_total,
        human(s.bytes_sent_wire),
        human(s.bytes_copied_locally),
        s.files_written,
        patched(s),
        s.deleted,
        s.duration_ms as f64 / 1000.0,
        s.entries_sent,
        s.entries,
        if s.manifest_delta {
            " (a delta against the last sync's)"
        } else {
            ""
        },
        s.root
    );
}

/// " (N patched in place)" when an `--inplace` sync patched any file.
fn patched(s: &Summary) -> String {
    match s.files_patched {
        0 => String::new(),
        n => format!(" ({n} patched in place)"),
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn run_digest(a: DigestArgs) -> Result<(), Failure> {
    let chunker = a.chunks.params();
    chunker.validate().map_err(Failure::Usage)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (root, stats) = replicator::digest::digest_volume(&a.path, chunker, threads)
        .map_err(|e| Failure::Failed(Box::new(e)))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"path": a.path, "root": root.to_hex(), "entries": stats.entries, "bytes_total": stats.bytes_total})
        );
    } else {
        println!("{root}  {}", a.path.display());
    }
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<(), Failure> {
    let tmp;
    let dir = match a.dir {
        Some(d) => d,
        None => {
            tmp = std::env::temp_dir().join(format!("replicator-demo-{}", std::process::id()));
            tmp
        }
    };
    let cleanup = |d: &PathBuf| {
        let _ = std::fs::remove_dir_all(d);
    };
    let src = dir.join("source");
    let dst = dir.join("replica");
    let result = (|| -> Result<(), Failure> {
        let files =
            replicator::demo::make_sample_tree(&src).map_err(|e| Failure::Failed(Box::new(e)))?;
        let opts = SyncOptions {
            state_dir: StateDir::new(dir.join("state")).root().to_path_buf(),
            ..SyncOptions::default()
        };
        if !a.json {
            println!("sample tree: {} ({files} files)", src.display());
        }
        // Timestamps within a second of a scan are not trusted by the quick check (a write in
        // the same clock tick would go unnoticed); let the fresh tree age past that.
        std::thread::sleep(Duration::from_millis(1100));
        let first = with_progress(false, |p| sync_local(&src, &dst, &opts, p))?;
        replicator::demo::edit_sample_tree(&src).map_err(|e| Failure::Failed(Box::new(e)))?;
        let second = with_progress(false, |p| sync_local(&src, &dst, &opts, p))?;
        let (a_root, _) = replicator::digest::digest_volume(&src, opts.chunker, opts.threads)
            .map_err(|e| Failure::Failed(Box::new(e)))?;
        let (b_root, _) = replicator::digest::digest_volume(&dst, opts.chunker, opts.threads)
            .map_err(|e| Failure::Failed(Box::new(e)))?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"full": first, "incremental": second, "mirrors": a_root == b_root})
            );
        } else {
            for (name, s) in [
                ("full sync", &first),
                ("incremental sync after edits", &second),
            ] {
                println!(
                    "{name:>29}: {} files, {} total, {} read, {}/{} chunks sent ({}), {} copied locally, {} deleted, {} ms",
                    s.files,
                    human(s.bytes_total),
                    human(s.bytes_read),
                    s.chunks_sent,
                    s.chunks_total,
                    human(s.bytes_sent_wire),
                    human(s.bytes_copied_locally),
                    s.deleted,
                    s.duration_ms
                );
            }
            println!(
                "source digest  {a_root}\nreplica digest {b_root}\n{}",
                if a_root == b_root {
                    "replica mirrors the source"
                } else {
                    "MISMATCH"
                }
            );
        }
        if a_root != b_root {
            return Err(Failure::Failed(
                "replica digest differs from the source".into(),
            ));
        }
        Ok(())
    })();
    if tmp_owned(&dir) {
        cleanup(&dir);
    }
    result
}

fn tmp_owned(dir: &std::path::Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("replicator-demo-"))
}
