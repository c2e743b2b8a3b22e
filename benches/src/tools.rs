//! The tools under test, each run as a real client and a real server process on loopback:
//! `replicator serve` + `replicator sync`, an rsync daemon + `rsync`, and `nc -l | zstd -d |
//! tar -x` fed by `tar -c | zstd -1 | nc`. Every tool writes to its own destination.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::measure::{Measured, Usage, loopback_tx_bytes, measured_command, wait_tcp_listen};
use crate::workload::{Workload, WorkloadKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolKind {
    Replicator,
    Rsync,
    TarZstdNc,
}

impl ToolKind {
    pub fn name(self) -> &'static str {
        match self {
            ToolKind::Replicator => "replicator",
            ToolKind::Rsync => "rsync",
            ToolKind::TarZstdNc => "tar-zstd-nc",
        }
    }

    /// Whether the tool can send only what changed (tar|zstd|nc always copies everything).
    pub fn incremental(self) -> bool {
        self != ToolKind::TarZstdNc
    }

    /// The programs the tool needs and how to get them.
    fn requirements(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ToolKind::Replicator => &[],
            ToolKind::Rsync => &[("rsync", "apt-get install rsync")],
            ToolKind::TarZstdNc => &[
                ("tar", "apt-get install tar"),
                ("zstd", "apt-get install zstd"),
                ("nc", "apt-get install netcat-openbsd"),
            ],
        }
    }
}

/// Fails naming what to install when a requested tool's programs are missing: a column is
/// never dropped silently.
pub fn check_installed(tools: &[ToolKind]) -> Result<(), String> {
    let mut missing = Vec::new();
    for tool in tools {
        for (program, install) in tool.requirements() {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                missing.push(format!(
                    "`{program}` (needed by {}): install it with `{install}`",
                    tool.name()
                ));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "missing programs:\n  {}\nor leave those tools out with --tools",
        missing.join("\n  ")
    ))
}

/// What one run of one tool measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub wall_seconds: f64,
    pub client: Usage,
    pub server: Usage,
    /// Bytes sent on the loopback interface during the run (headers included, both ways).
    pub wire_bytes: u64,
    /// The replicator's own count of chunk bytes sent, before compression (its summary).
    pub payload_bytes: Option<u64>,
    pub chunks_sent: Option<u64>,
    pub error: Option<String>,
}

/// The bench's working area and the settings shared by all runs.
pub struct Tools {
    work: PathBuf,
    replicator: PathBuf,
    compress: String,
    port: u16,
    server_fingerprint: String,
    /// Patch files in place: `replicator sync --inplace`, and `rsync --inplace` for trees
    /// too (it always is for the image).
    pub inplace: bool,
}

impl Tools {
    pub fn new(work: &Path, replicator: &Path, compress: &str, port: u16) -> io::Result<Tools> {
        fs::create_dir_all(work.join("logs"))?;
        let server_fingerprint = identity(replicator, &work.join("ident-server"))?;
        let client_fingerprint = identity(replicator, &work.join("ident-client"))?;
        fs::write(work.join("authorized"), format!("{client_fingerprint}\n"))?;
        fs::write(
            work.join("rsyncd.conf"),
            format!(
                "use chroot = no\nmunge symlinks = no\nnumeric ids = yes\n\
                 [bench]\npath = {}\nread only = no\nuid = root\ngid = root\n",
                work.join("dst-rsync").display()
            ),
        )?;
        Ok(Tools {
            work: work.to_path_buf(),
            replicator: replicator.to_path_buf(),
            compress: compress.to_string(),
            port,
            server_fingerprint,
            inplace: false,
        })
    }

    fn dst_root(&self, tool: ToolKind) -> PathBuf {
        self.work.join(format!("dst-{}", tool.name()))
    }

    /// Where `tool` puts its copy of the workload's source.
    pub fn destination(&self, tool: ToolKind, w: &Workload) -> PathBuf {
        self.dst_root(tool).join(base_name(&w.source))
    }

    /// Empties the tool's destination before a full copy.
    pub fn reset(&self, tool: ToolKind, w: &Workload) -> io::Result<()> {
        let dst = self.destination(tool, w);
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => remove_tree(&dst)?,
            Ok(_) => fs::remove_file(&dst)?,
            Err(_) => {}
        }
        if tool == ToolKind::Replicator {
            let _ = fs::remove_dir_all(self.work.join("replicator-state"));
        }
        // Private, as `replicator serve` creates a root itself (it warns about one that
        // other users can enter).
        let root = self.dst_root(tool);
        fs::create_dir_all(&root)?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
    }

    fn log(&self, name: &str) -> io::Result<Stdio> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("logs").join(format!("{name}.log")))?;
        Ok(Stdio::from(f))
    }

    /// A command for `program`, run under the usage wrapper; its report is named after `role`.
    fn command(&self, program: &str, role: &str) -> io::Result<(Command, PathBuf)> {
        let report = self.work.join("logs").join(format!("usage-{role}.json"));
        Ok((measured_command(program, &report)?, report))
    }

    pub fn run(&self, tool: ToolKind, w: &Workload) -> io::Result<Outcome> {
        settle_after_deletions();
        let wire_before = loopback_tx_bytes();
        let mut outcome = match tool {
            ToolKind::Replicator => self.run_replicator(w)?,
            ToolKind::Rsync => self.run_rsync(w)?,
            ToolKind::TarZstdNc => self.run_tar(w)?,
        };
        outcome.wire_bytes = loopback_tx_bytes().saturating_sub(wire_before);
        Ok(outcome)
    }

    fn run_replicator(&self, w: &Workload) -> io::Result<Outcome> {
        let listen = format!("127.0.0.1:{}", self.port);
        let replicator = self.replicator.to_string_lossy();
        let (mut cmd, report) = self.command(&replicator, "replicator-serve")?;
        cmd.arg("serve")
            .args(["--listen", &listen, "--root"])
            .arg(self.dst_root(ToolKind::Replicator))
            .arg("--authorized")
            .arg(self.work.join("authorized"))
            .arg("--identity")
            .arg(self.work.join("ident-server"))
            .args(["--log", "info"])
            .stdout(Stdio::piped())
            .stderr(self.log("replicator-serve")?);
        let mut server = Measured::spawn(cmd, &report)?;
        // "listening on ADDR fingerprint FP" once the endpoint is bound.
        let mut line = String::new();
        if let Some(out) = server.stdout() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if !line.starts_with("listening on") {
            let _ = server.stop();
            return Err(io::Error::other("replicator serve did not start; see logs"));
        }
        let start_client = Instant::now();
        let (mut cmd, report) = self.command(&replicator, "replicator-sync")?;
        cmd.args(["sync", "--json", "--compress", &self.compress])
            .arg("--state-dir")
            .arg(self.work.join("replicator-state"))
            .arg("--identity")
            .arg(self.work.join("ident-client"))
            .args(["--peer-id", &self.server_fingerprint])
            .args(self.inplace.then_some("--inplace"))
            .arg(&w.source)
            .arg(format!("{listen}/{}", base_name(&w.source)))
            .stdout(Stdio::piped())
            .stderr(self.log("replicator-sync")?);
        let mut client = Measured::spawn(cmd, &report)?;
        let mut json = String::new();
        if let Some(mut out) = client.stdout() {
            out.read_to_string(&mut json)?;
        }
        let client_usage = client.wait()?;
        let wall = start_client.elapsed();
        let server_usage = server.stop()?;
        let summary: Option<serde_json::Value> = serde_json::from_str(&json).ok();
        let field = |k: &str| summary.as_ref().and_then(|s| s[k].as_u64());
        Ok(Outcome {
            wall_seconds: wall.as_secs_f64(),
            error: failure(client_usage, "replicator sync"),
            client: client_usage,
            server: server_usage,
            wire_bytes: 0,
            payload_bytes: field("bytes_sent_raw"),
            chunks_sent: field("chunks_sent"),
        })
    }

    fn run_rsync(&self, w: &Workload) -> io::Result<Outcome> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port + 1).into();
        let (mut cmd, report) = self.command("rsync", "rsyncd")?;
        cmd.args(["--daemon", "--no-detach"])
            .arg(format!(
                "--config={}",
                self.work.join("rsyncd.conf").display()
            ))
            .arg(format!("--port={}", addr.port()))
            .arg("--address=127.0.0.1")
            .arg(format!(
                "--log-file={}",
                self.work.join("logs/rsyncd.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(self.log("rsyncd")?);
        let server = Measured::spawn(cmd, &report)?;
        if let Err(e) = wait_tcp_listen(addr, Duration::from_secs(10)) {
            let _ = server.stop();
            return Err(e);
        }
        let name = base_name(&w.source);
        let (mut cmd, report) = self.command("rsync", "rsync")?;
        if w.kind == WorkloadKind::Image {
            cmd.args(["-a", "--inplace", "--no-whole-file"])
                .arg(&w.source)
                .arg(format!("rsync://{addr}/bench/{name}"));
        } else {
            cmd.args(["-aHAXS", "--delete"])
                .args(self.inplace.then_some("--inplace"))
                .arg(format!("{}/", w.source.display()))
                .arg(format!("rsync://{addr}/bench/{name}/"));
        }
        let start_client = Instant::now();
        cmd.stdout(Stdio::null()).stderr(self.log("rsync")?);
        let client = Measured::spawn(cmd, &report)?;
        let client_usage = client.wait()?;
        let wall = start_client.elapsed();
        let server_usage = server.stop()?;
        Ok(Outcome {
            wall_seconds: wall.as_secs_f64(),
            error: failure(client_usage, "rsync"),
            client: client_usage,
            server: server_usage,
            wire_bytes: 0,
            payload_bytes: None,
            chunks_sent: None,
        })
    }

    fn run_tar(&self, w: &Workload) -> io::Result<Outcome> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port + 2).into();
        let dst = self.dst_root(ToolKind::TarZstdNc);
        let (mut cmd, report) = self.command("sh", "tar-server")?;
        cmd.arg("-c")
            .arg(format!(
                "nc -l {} {} | zstd -d -q | tar -x -C '{}'",
                addr.ip(),
                addr.port(),
                dst.display()
            ))
            .stderr(self.log("tar-server")?);
        let server = Measured::spawn(cmd, &report)?;
        wait_tcp_listen(addr, Duration::from_secs(10))?;
        let parent = w.source.parent().unwrap_or(Path::new("/"));
        let start_client = Instant::now();
        let (mut cmd, report) = self.command("sh", "tar-client")?;
        cmd.arg("-c")
            .arg(format!(
                "tar -c -C '{}' '{}' | zstd -1 -q | nc -N {} {}",
                parent.display(),
                base_name(&w.source),
                addr.ip(),
                addr.port()
            ))
            .stderr(self.log("tar-client")?);
        let client_usage = Measured::spawn(cmd, &report)?.wait()?;
        // The receiving pipeline finishes writing after the sender is done.
        let server_usage = server.wait()?;
        let wall = start_client.elapsed();
        Ok(Outcome {
            wall_seconds: wall.as_secs_f64(),
            error: failure(client_usage, "tar|zstd|nc").or(failure(server_usage, "nc|zstd|tar")),
            client: client_usage,
            server: server_usage,
            wire_bytes: 0,
            payload_bytes: None,
            chunks_sent: None,
        })
    }
}

fn failure(usage: Usage, what: &str) -> Option<String> {
    match usage.exit_code {
        Some(0) => None,
        Some(code) => Some(format!("{what} exited with code {code} (see the logs)")),
        None => Some(format!("{what} was killed by a signal")),
    }
}

fn base_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into())
}

/// Creates (first time) an identity and returns its fingerprint.
fn identity(replicator: &Path, dir: &Path) -> io::Result<String> {
    let out = Command::new(replicator)
        .args(["id", "--identity"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "replicator id failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Deleting more entries than this calls for a pause before the next timed run.
const RECENTLY_DELETED_MIN: u64 = 10_000;
/// How long ext4 treats a freed inode as recently deleted.
const RECENTLY_DELETED_WINDOW: Duration = Duration::from_secs(30);

/// When the harness last removed a big tree.
static LAST_BIG_DELETE: Mutex<Option<Instant>> = Mutex::new(None);

/// Removes a directory tree, remembering when a big one went (see [`settle_after_deletions`]).
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let many = count_entries(dir, RECENTLY_DELETED_MIN) >= RECENTLY_DELETED_MIN;
    fs::remove_dir_all(dir)?;
    if many {
        *LAST_BIG_DELETE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    Ok(())
}

/// Waits until a big deletion is 30 s old. ext4's inode allocator checks and skips every
/// inode freed in the last 30 s, so a copy started right after a mass deletion spends most
/// of its time there (a 50,000-file copy took 44 s instead of 4 s on this machine).
pub fn settle_after_deletions() {
    let last = *LAST_BIG_DELETE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(wait) = last.and_then(|t| RECENTLY_DELETED_WINDOW.checked_sub(t.elapsed())) {
        eprintln!(
            "   waiting {:.0} s: files deleted just now slow ext4's inode allocation",
            wait.as_secs_f64()
        );
        std::thread::sleep(wait);
    }
}

/// Entries below `dir`, counting stops at `stop`.
fn count_entries(dir: &Path, stop: u64) -> u64 {
    let mut count = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(items) = fs::read_dir(&d) else {
            continue;
        };
        for item in items.flatten() {
            count += 1;
            if count >= stop {
                return count;
            }
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(item.path());
            }
        }
    }
    count
}
