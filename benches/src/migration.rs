//! `migration-bench`: what moving a stateful application costs its users. Three agents on
//! 127.0.0.31-33 (process runtime), the example key-value store with a 1 GiB volume under a
//! steady write load (2 MB/s of acknowledged, fsynced writes through a routing proxy), moved
//! twice: A→B with the two-phase push, then B→C (an empty node, like B was) with
//! stop–copy–start (`deploy --no-pre-copy`). For each: total time, the downtime the deployer
//! measured and predicted, the longest pause a client saw between two acknowledged writes,
//! and acknowledged writes lost (must be 0).
//!
//! ```text
//! cargo build --release -p deployer -p benches
//! target/release/migration-bench            # --volume-mib 256 for a quick run
//! target/release/migration-bench --neighbour-mb-per-s 300   # on a busy host
//! target/release/migration-bench --volume-mib 256 --table-mib 768   # a database's table
//! ```

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use deployer::demo::LocalAgents;

use benches::rng::{Rng, text};

const NODES: [&str; 3] = ["127.0.0.31", "127.0.0.32", "127.0.0.33"];
const AGENT_PORT: u16 = 17720;
const KV_PORT: u16 = 17180;
/// Each write: one key with a value of this many bytes.
const VALUE_BYTES: usize = 16 * 1024;

#[derive(Parser)]
#[command(
    name = "migration-bench",
    about = "Downtime of moving a stateful app: two-phase push vs stop-copy-start"
)]
struct Cli {
    /// Size of the application's volume.
    #[arg(long, default_value_t = 1024)]
    volume_mib: u64,
    /// Steady write load during the moves, in MB/s of acknowledged writes.
    #[arg(long, default_value_t = 2.0)]
    write_mb_per_s: f64,
    /// Work directory (agents' state and volumes; removed first).
    #[arg(long, default_value = "/var/tmp/replicator-migration-bench")]
    work_dir: PathBuf,
    /// Directory for migration.md and migration.json.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The deployer binary (default: next to this one).
    #[arg(long)]
    deployer: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Another program on the same filesystem writing this many MB/s without fsync during
    /// the moves (a busy host: its dirty pages are there when the final delta commits).
    #[arg(long, default_value_t = 0.0)]
    neighbour_mb_per_s: f64,
    /// A table of this many MiB in the volume besides it (`table.db`), over which each
    /// write of the store also writes one page, as a database does: a big file with
    /// scattered changes for the final delta to carry.
    #[arg(long, default_value_t = 0)]
    table_mib: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migration-bench: {e}");
            ExitCode::from(1)
        }
    }
}

struct Bench {
    deployer: PathBuf,
    work: PathBuf,
    application: PathBuf,
}

impl Bench {
    fn deployer(&self, args: &[&str]) -> Result<std::process::Output, String> {
        Command::new(&self.deployer)
            .args(args)
            .arg("--identity")
            .arg(self.work.join("me"))
            .output()
            .map_err(|e| format!("running deployer: {e}"))
    }

    /// Writes a deployment with the application on node `on` (none when out of range).
    fn deployment(&self, on: usize) -> Result<PathBuf, String> {
        let mut s = "version: 1\nnodes:\n".to_string();
        for (i, ip) in NODES.iter().enumerate() {
            let apps = if i == on { "[kv]" } else { "[]" };
            let _ = writeln!(s, "  \"{ip}:{AGENT_PORT}\": {apps}");
        }
        let path = self.work.join(format!("deployment-{on}.yml"));
        std::fs::write(&path, s).map_err(|e| e.to_string())?;
        Ok(path)
    }

    fn deploy(&self, on: usize, extra: &[&str]) -> Result<serde_json::Value, String> {
        let d = self.deployment(on)?;
        let mut args = vec!["deploy", "--json"];
        args.extend_from_slice(extra);
        args.push(d.to_str().unwrap_or_default());
        args.push(self.application.to_str().unwrap_or_default());
        let out = self.deployer(&args)?;
        if !out.status.success() {
            return Err(format!(
                "deploy failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("deploy report: {e}"))
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let deployer = match &cli.deployer {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("deployer"),
    };
    if !deployer.is_file() {
        return Err(format!(
            "no deployer binary at {}: cargo build --release -p deployer -p benches",
            deployer.display()
        ));
    }
    let work = cli.work_dir.clone();
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let application = work.join("application.yml");
    std::fs::write(
        &application,
        format!(
            "version: 1\napplications:\n  kv:\n    image: kvstore\n    command: [\"{}\", \"example-kv\"]\n    volume:\n      mountpoint: /data\n    ports:\n      - internal: 7000\n        external: {KV_PORT}\n",
            deployer.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let bench = Bench {
        deployer,
        work: work.clone(),
        application,
    };

    // Trust for the whole cluster in one step, then an agent per bundle.
    let d = bench.deployment(0)?;
    let trust_dir = work.join("trust");
    let out = bench.deployer(&[
        "trust",
        "--json",
        d.to_str().unwrap_or_default(),
        "--out",
        trust_dir.to_str().unwrap_or_default(),
    ])?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let trust: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let mut agents = LocalAgents::default();
    for (i, ip) in NODES.iter().enumerate() {
        let state = trust["nodes"][i]["bundle"]
            .as_str()
            .ok_or("trust report without bundles")?;
        agents.start(&bench.deployer, ip, AGENT_PORT, Path::new(state))?;
    }

    eprintln!("deploying kv on {}", NODES[0]);
    bench.deploy(0, &[])?;
    let volume = PathBuf::from(
        status_volume_path(&bench)?.ok_or("no volume path for kv in the status of node A")?,
    );
    let t = Instant::now();
    fill(&volume.join("bulk"), cli.volume_mib << 20, cli.seed)?;
    if cli.table_mib > 0 {
        let mut rng = Rng::derive(cli.seed, "migration-table");
        fill_file(&volume.join("table.db"), cli.table_mib << 20, &mut rng)?;
    }
    eprintln!(
        "filled the volume with {} MiB and a table of {} MiB in {:.1} s",
        cli.volume_mib,
        cli.table_mib,
        t.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let client = format!("{}:{KV_PORT}", NODES[1]);
    for (method, to, extra) in [
        ("two-phase push", 1usize, &[][..]),
        ("stop-copy-start", 2, &["--no-pre-copy"][..]),
    ] {
        eprintln!("moving kv to {} ({method})", NODES[to]);
        let load = Load::start(&client, cli.write_mb_per_s, method);
        let neighbour = (cli.neighbour_mb_per_s > 0.0)
            .then(|| Neighbour::start(work.join("neighbour.bin"), cli.neighbour_mb_per_s));
        std::thread::sleep(Duration::from_secs(2));
        let started = Instant::now();
        let report = bench.deploy(to, extra);
        let total = started.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let load = load.stop();
        let neighbour_mb = neighbour.map_or(0.0, Neighbour::stop);
        let report = report?;
        let lost = load.lost(&client)?;
        let m = &report["migrations"][0];
        rows.push(serde_json::json!({
            "method": method,
            "volume_mib": cli.volume_mib,
            "table_mib": cli.table_mib,
            "write_mb_per_s": cli.write_mb_per_s,
            "total_seconds": total.as_secs_f64(),
            "downtime_ms": m["downtime_ms"],
            "predicted_downtime_ms": m["predicted_downtime_ms"],
            "downtime_parts": m["downtime_parts"],
            "rounds": m["rounds"],
            "final_delta_bytes": m["final_delta_bytes"],
            "longest_client_pause_ms": load.longest_pause.as_millis() as u64,
            "writes_acknowledged": load.acked.len(),
            "writes_lost": lost,
            "neighbour_mb_written": neighbour_mb,
        }));
        eprintln!(
            "  {}",
            rows.last().map(|r| r.to_string()).unwrap_or_default()
        );
    }
    // Stop the application before the agents go (applications outlive agents by design).
    let _ = bench.deploy(usize::MAX, &[]);
    drop(agents);

    let md = markdown(&rows, cli);
    std::fs::create_dir_all(&cli.out).map_err(|e| e.to_string())?;
    std::fs::write(cli.out.join("migration.md"), &md).map_err(|e| e.to_string())?;
    std::fs::write(
        cli.out.join("migration.json"),
        serde_json::to_string_pretty(&rows).unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    println!("{md}");
    let _ = std::fs::remove_dir_all(&work);
    if rows.iter().any(|r| r["writes_lost"].as_u64() != Some(0)) {
        return Err("acknowledged writes were lost".into());
    }
    Ok(())
}

fn status_volume_path(bench: &Bench) -> Result<Option<String>, String> {
    let d = bench.deployment(0)?;
    let out = bench.deployer(&["status", "--json", d.to_str().unwrap_or_default()])?;
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status: {e}"))?;
    Ok(
        status[format!("{}:{AGENT_PORT}", NODES[0])]["volumes"]["kv"]["path"]
            .as_str()
            .map(str::to_string),
    )
}

/// Writes `bytes` of data into `dir` as 64 MiB files: half text-like, half random, like a
/// database's mix of compressible pages and already-compressed blobs.
fn fill(dir: &Path, bytes: u64, seed: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut rng = Rng::derive(seed, "migration-volume");
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let len = left.min(64 << 20);
        fill_file(&dir.join(format!("blob{i:03}.bin")), len, &mut rng)?;
        left -= len;
        i += 1;
    }
    Ok(())
}

/// Writes a file of `len` bytes, alternating MiBs of text-like and random data, and syncs it.
fn fill_file(path: &Path, len: u64, rng: &mut Rng) -> Result<(), String> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| e.to_string())?);
    let mut written = 0;
    while written < len {
        buf.clear();
        let n = (len - written).min(1 << 20) as usize;
        if (written >> 20) % 2 == 0 {
            text(rng, n, &mut buf);
        } else {
            buf.resize(n, 0);
            rng.fill(&mut buf);
        }
        f.write_all(&buf).map_err(|e| e.to_string())?;
        written += n as u64;
    }
    f.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(|e| e.to_string())
}

/// A client writing at a steady rate through a routing proxy, reconnecting when cut.
struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Loaded>,
}

struct Loaded {
    acked: Vec<String>,
    longest_pause: Duration,
}

impl Load {
    fn start(addr: &str, mb_per_s: f64, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, tag, flag) = (addr.to_string(), tag.replace(' ', "-"), stop.clone());
        let interval = Duration::from_secs_f64(VALUE_BYTES as f64 / (mb_per_s * 1e6));
        let thread = std::thread::spawn(move || {
            let value = "x".repeat(VALUE_BYTES);
            let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
            let mut acked = Vec::new();
            let mut last_ack = Instant::now();
            let mut longest = Duration::ZERO;
            let mut next = Instant::now();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let key = format!("{tag}-{i}");
                if request(&addr, &mut conn, &format!("SET {key} {value}")).as_deref() == Some("OK")
                {
                    let now = Instant::now();
                    longest = longest.max(now - last_ack);
                    last_ack = now;
                    acked.push(key);
                    i += 1;
                }
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            Loaded {
                acked,
                longest_pause: longest,
            }
        });
        Load { stop, thread }
    }

    fn stop(self) -> Loaded {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(Loaded {
            acked: Vec::new(),
            longest_pause: Duration::ZERO,
        })
    }
}

impl Loaded {
    /// How many acknowledged writes cannot be read back.
    fn lost(&self, addr: &str) -> Result<usize, String> {
        let mut conn = None;
        let want = format!("VALUE {}", "x".repeat(VALUE_BYTES));
        let mut lost = 0;
        for key in &self.acked {
            let mut reply = None;
            for _ in 0..50 {
                reply = request(addr, &mut conn, &format!("GET {key}"));
                if reply.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            match reply {
                Some(r) if r == want => {}
                Some(_) => lost += 1,
                None => return Err(format!("{addr}: no answer reading {key}")),
            }
        }
        Ok(lost)
    }
}

/// Another program on the host writing steadily into one file (wrapping at 2 GiB) and
/// never syncing: the kernel holds up to its dirty limit of that file in memory.
struct Neighbour {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Neighbour {
    fn start(path: PathBuf, mb_per_s: f64) -> Neighbour {
        const BLOCK: usize = 1 << 20;
        const WRAP: u64 = 2 << 30;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let interval = Duration::from_secs_f64(BLOCK as f64 / (mb_per_s * 1e6));
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let Ok(file) = std::fs::File::create(&path) else {
                return 0;
            };
            let mut block = vec![0u8; BLOCK];
            Rng::derive(7, "neighbour").fill(&mut block);
            let (mut written, mut next) = (0u64, Instant::now());
            while !flag.load(Ordering::Relaxed) {
                if file.write_all_at(&block, written % WRAP).is_err() {
                    break;
                }
                written += BLOCK as u64;
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            drop(file);
            let _ = std::fs::remove_file(&path);
            written
        });
        Neighbour { stop, thread }
    }

    /// Stops it; the MB it wrote.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0) as f64 / 1e6
    }
}

/// One request on a kept connection; reconnects once if the connection broke.
fn request(
    addr: &str,
    conn: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    line: &str,
) -> Option<String> {
    for _ in 0..2 {
        if conn.is_none() {
            let s = TcpStream::connect(addr).ok()?;
            s.set_nodelay(true).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            let r = BufReader::new(s.try_clone().ok()?);
            *conn = Some((s, r));
        }
        let (s, r) = conn.as_mut()?;
        let mut reply = String::new();
        let ok = s.write_all(format!("{line}\n").as_bytes()).is_ok()
            && r.read_line(&mut reply).is_ok_and(|n| n > 0);
        if ok {
            return Some(reply.trim_end().to_string());
        }
        *conn = None;
    }
    None
}

fn markdown(rows: &[serde_json::Value], cli: &Cli) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Moving the example key-value store with a {} MiB volume under {} MB/s of acknowledged \
         writes (each fsynced), three agents on loopback.{}{}\n",
        cli.volume_mib,
        cli.write_mb_per_s,
        if cli.table_mib > 0 {
            format!(
                " Besides it a {} MiB table, one page of which each write also overwrites \
                 (`--table-mib`).",
                cli.table_mib
            )
        } else {
            String::new()
        },
        if cli.neighbour_mb_per_s > 0.0 {
            format!(
                " Another program writes {} MB/s without fsync on the same filesystem \
                 throughout (`--neighbour-mb-per-s`).",
                cli.neighbour_mb_per_s
            )
        } else {
            String::new()
        }
    );
    md.push_str(
        "| method | total | downtime (measured) | predicted | longest client pause | \
         stop / final delta / handoff / start / reroute | pre-copy rounds | final delta | \
         writes acked / lost |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let rounds = r["rounds"].as_array().map_or(0, Vec::len);
        let predicted = match r["predicted_downtime_ms"].as_u64() {
            Some(p) if rounds > 0 => format!("{p} ms"),
            _ => "—".into(),
        };
        let p = &r["downtime_parts"];
        let _ = writeln!(
            md,
            "| {} | {:.1} s | {} ms | {predicted} | {} ms | {} / {} / {} / {} / {} ms | {rounds} \
             | {:.1} MB | {} / {} |",
            r["method"].as_str().unwrap_or_default(),
            r["total_seconds"].as_f64().unwrap_or(0.0),
            r["downtime_ms"],
            r["longest_client_pause_ms"],
            p["stop_ms"],
            p["final_delta_ms"],
            p["handoff_ms"],
            p["start_ms"],
            p["reroute_ms"],
            r["final_delta_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["writes_acknowledged"],
            r["writes_lost"],
        );
    }
    if let Some(r) = rows.first() {
        let (m, p) = (
            r["downtime_ms"].as_f64().unwrap_or(0.0),
            r["predicted_downtime_ms"].as_f64().unwrap_or(0.0),
        );
        let err = if m > 0.0 {
            (p - m).abs() / m * 100.0
        } else {
            0.0
        };
        let delta = r["downtime_parts"]["final_delta_ms"]
            .as_f64()
            .unwrap_or(0.0);
        let delta_err = if delta > 0.0 {
            (p - delta).abs() / delta * 100.0
        } else {
            0.0
        };
        let _ = writeln!(
            md,
            "\nTargets (two-phase push): downtime under 1 s — {}; predicted within 30% of \
             measured — {:.0}% off, {}. The prediction is the last pre-copy round's time, \
             which forecasts the final delta ({:.0}% off); stopping and starting the \
             application are not in it.",
            if m < 1000.0 { "met" } else { "**not met**" },
            err,
            if err <= 30.0 { "met" } else { "**not met**" },
            delta_err
        );
    }
    md
}
