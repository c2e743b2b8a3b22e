//! Measuring a run the same way for every tool: wall time, CPU seconds and peak RSS of each
//! end (from `wait4`, which folds in the children an end waited for — rsync's forked daemon
//! child, the members of a shell pipeline), and bytes on the wire from the loopback counters.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// What one process (with the descendants it reaped) used.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    pub exit_code: Option<i32>,
}

/// The hidden first argument that makes this binary run one command and report its usage.
pub const MEASURE_ARG: &str = "__measure";

/// A command run under a fresh copy of this (small) binary, which reaps it with `wait4` and
/// writes its usage to a file. The indirection keeps the figures clean: a child spawned
/// straight from the bench would inherit the bench's own peak RSS (Linux carries the old
/// address space's high-water mark across `exec`), and the bench holds big buffers.
pub struct Measured {
    wrapper: Child,
    report: PathBuf,
}

/// Builds the wrapper command for `program args`; the caller sets stdio and spawns it.
pub fn measured_command(program: &str, report: &Path) -> io::Result<Command> {
    let _ = fs::remove_file(report);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(MEASURE_ARG).arg(report).arg("--").arg(program);
    Ok(cmd)
}

impl Measured {
    pub fn spawn(mut cmd: Command, report: &Path) -> io::Result<Measured> {
        Ok(Measured {
            wrapper: cmd.spawn()?,
            report: report.to_path_buf(),
        })
    }

    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.wrapper.stdout.take()
    }

    /// Waits for the command to end on its own.
    pub fn wait(mut self) -> io::Result<Usage> {
        self.wrapper.wait()?;
        let text = fs::read_to_string(&self.report)
            .map_err(|e| io::Error::other(format!("no usage report from the wrapper: {e}")))?;
        serde_json::from_str(&text).map_err(io::Error::other)
    }

    /// Stops a server: once it has no child processes left (so the connection children it
    /// forked are reaped and counted), SIGTERM, then wait.
    pub fn stop(self) -> io::Result<Usage> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let server = loop {
            if let Some(pid) = children(self.wrapper.id()).first() {
                break Some(*pid);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(server) = server {
            while !children(server).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(p) = rustix::process::Pid::from_raw(server as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
        }
        self.wait()
    }
}

fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The wrapper's side: runs `command` with this process's stdio, reaps it with `wait4`,
/// writes its usage as JSON to `report`, and exits with its exit code.
pub fn run_measured(report: &Path, command: &[String]) -> io::Result<i32> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::other("no command to measure"))?;
    let child = Command::new(program).args(args).spawn()?;
    let pid = child.id() as i32;
    // Reaped below with wait4; std must not wait for it again.
    drop(child);
    let (status, ru) = wait4(pid)?;
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let exit_code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    let usage = Usage {
        cpu_seconds: secs(ru.ru_utime) + secs(ru.ru_stime),
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: ru.ru_maxrss.max(0) as u64 * 1024,
        exit_code,
    };
    fs::write(report, serde_json::to_vec(&usage)?)?;
    Ok(exit_code.unwrap_or(128))
}

#[allow(unsafe_code)]
fn wait4(pid: libc::pid_t) -> io::Result<(libc::c_int, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both out-pointers are valid, exclusive and live for the whole call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Bytes sent on the loopback interface so far (each packet counted once).
pub fn loopback_tx_bytes() -> u64 {
    fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Flushes dirty pages and drops the page cache, so each run reads from disk. Returns false
/// where that is not permitted (not root, read-only /proc): runs are then warm.
pub fn drop_caches() -> bool {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Waits until something listens on TCP `addr` (read from /proc/net/tcp, so no probe
/// connection is spent on a one-shot listener like `nc -l`).
pub fn wait_tcp_listen(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("only IPv4 listeners are awaited"));
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let deadline = Instant::now() + timeout;
    loop {
        let table = fs::read_to_string("/proc/net/tcp")?;
        if listening(&table, &want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("nothing listens on {addr}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn listening(table: &str, local: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local_col = cols.nth(1);
        let state = cols.nth(1);
        local_col == Some(local) && state == Some("0A")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_child_counts_its_cpu_and_memory() {
        // A shell that burns a little CPU, measured the way the bench's wrapper does.
        let tmp = tempfile::tempdir().expect("tmp");
        let report = tmp.path().join("usage.json");
        let cmd = [
            "sh".to_string(),
            "-c".into(),
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 3".into(),
        ];
        assert_eq!(run_measured(&report, &cmd).expect("run"), 3);
        let usage: Usage =
            serde_json::from_slice(&fs::read(&report).expect("report")).expect("json");
        assert_eq!(usage.exit_code, Some(3));
        assert!(usage.cpu_seconds > 0.0, "{usage:?}");
        assert!(usage.peak_rss_bytes > 100 * 1024, "{usage:?}");
    }

    #[test]
    fn listening_sockets_are_found_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n   \
            1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000\n";
        assert!(listening(table, "0100007F:1F90"));
        assert!(
            !listening(table, "0100007F:1F91"),
            "established is not listening"
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        wait_tcp_listen(l.local_addr().expect("addr"), Duration::from_secs(2)).expect("seen");
    }
}
