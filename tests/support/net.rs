//! Network test equipment: identities, `replicator serve` processes, and a UDP relay that
//! drops, reorders, duplicates or blackholes packets between a client and a server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::replicator_bin;

/// An identity directory and its fingerprint.
#[derive(Clone, Debug)]
pub struct Ident {
    pub dir: PathBuf,
    pub fingerprint: String,
}

impl Ident {
    pub fn create(dir: &Path) -> Ident {
        let out = Command::new(replicator_bin())
            .arg("id")
            .arg("--identity")
            .arg(dir)
            .output()
            .expect("replicator id");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ident {
            dir: dir.to_path_buf(),
            fingerprint: String::from_utf8(out.stdout)
                .expect("utf8")
                .trim()
                .to_string(),
        }
    }
}

/// A running `replicator serve`; killed when dropped. Its stderr (the log) is collected.
pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub ident: Ident,
    pub root: PathBuf,
    log: Arc<Mutex<String>>,
    log_thread: Option<JoinHandle<()>>,
}

impl ServerProc {
    /// Starts a server over `root` that authorizes `clients`, on `listen` (port 0 = any).
    pub fn start(ident: &Ident, root: &Path, clients: &[&Ident], extra: &[&str]) -> ServerProc {
        Self::start_on(ident, root, clients, "127.0.0.1:0", extra)
    }

    pub fn start_on(
        ident: &Ident,
        root: &Path,
        clients: &[&Ident],
        listen: &str,
        extra: &[&str],
    ) -> ServerProc {
        Self::spawn(
            Self::command(ident, root, clients, listen, extra),
            ident,
            root,
        )
    }

    /// The command line of a server over `root` that authorizes `clients` (written to its
    /// authorized-clients file now), listening on `listen`.
    pub fn command(
        ident: &Ident,
        root: &Path,
        clients: &[&Ident],
        listen: &str,
        extra: &[&str],
    ) -> Command {
        let authorized = ident.dir.join("authorized_clients");
        let list: String = clients
            .iter()
            .map(|c| format!("{}\n", c.fingerprint))
            .collect();
        std::fs::write(&authorized, list).expect("write authorized");
        let mut cmd = Command::new(replicator_bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--root")
            .arg(root)
            .arg("--identity")
            .arg(&ident.dir)
            .args(["--log", "info"])
            .args(extra);
        cmd
    }

    /// Starts `cmd`, a server's command line (perhaps run by another program, which must
    /// pass its stdout and stderr through), and waits for its banner.
    pub fn spawn(mut cmd: Command, ident: &Ident, root: &Path) -> ServerProc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn replicator serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("server banner");
        // "listening on ADDR fingerprint FP"
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected banner {line:?}"));
        let log = Arc::new(Mutex::new(String::new()));
        let log_thread = Some(collect(child.stderr.take().expect("stderr"), log.clone()));
        ServerProc {
            child,
            addr,
            ident: ident.clone(),
            root: root.to_path_buf(),
            log,
            log_thread,
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (up to 10 s).
    pub fn wait_log(&self, needle: &str) -> String {
        for _ in 0..200 {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server never logged {needle:?}; log:\n{}", self.log());
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.log_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn collect(stderr: ChildStderr, log: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = log.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    })
}

/// `replicator sync` as a client: `--identity`, `--peer-id` of the server, JSON summary.
pub fn client_sync(
    client: &Ident,
    server_fp: &str,
    src: &str,
    dst: &str,
    state: &Path,
    extra: &[&str],
) -> Output {
    client_command(client, server_fp, src, dst, state, extra)
        .output()
        .expect("run replicator sync")
}

pub fn client_command(
    client: &Ident,
    server_fp: &str,
    src: &str,
    dst: &str,
    state: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = client_command_shown(client, server_fp, src, dst, state, extra);
    cmd.arg("--json");
    cmd
}

/// `replicator sync` without `--json`: its stdout is what a user reads.
pub fn client_command_shown(
    client: &Ident,
    server_fp: &str,
    src: &str,
    dst: &str,
    state: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(replicator_bin());
    cmd.arg("sync")
        .arg("--identity")
        .arg(&client.dir)
        .arg("--peer-id")
        .arg(server_fp)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .arg(src)
        .arg(dst);
    cmd
}

/// What the relay does to packets, changeable while it runs.
#[derive(Default)]
pub struct Faults {
    /// Per-mille of packets dropped.
    pub drop_per_mille: AtomicU32,
    /// Per-mille of packets sent twice.
    pub duplicate_per_mille: AtomicU32,
    /// Per-mille of packets held back and sent after the next one.
    pub reorder_per_mille: AtomicU32,
    /// Drop everything.
    pub blackhole: AtomicBool,
}

/// A UDP relay between clients and one server. Each client address gets its own upstream
/// socket, so the server sees one peer per client.
pub struct Relay {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    /// Bytes relayed from clients to the server (after faults).
    pub upstream_bytes: Arc<AtomicU64>,
    /// Bytes relayed from the server to clients (after faults).
    pub downstream_bytes: Arc<AtomicU64>,
    /// The largest datagram a client sent (before faults).
    pub largest_upstream: Arc<AtomicUsize>,
    /// The largest datagram the server sent (before faults).
    pub largest_downstream: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct Mangler {
    faults: Arc<Faults>,
    seed: u64,
    held: Option<Vec<u8>>,
}

impl Mangler {
    fn roll(&mut self, per_mille: &AtomicU32) -> bool {
        // xorshift64*: deterministic per relay, good enough for fault injection.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % 1000;
        r < u64::from(per_mille.load(Ordering::Relaxed))
    }

    /// Sends `packet` through the faults; returns the bytes actually sent.
    fn send(&mut self, socket: &UdpSocket, to: SocketAddr, packet: &[u8]) -> u64 {
        if self.faults.blackhole.load(Ordering::Relaxed) {
            return 0;
        }
        let faults = self.faults.clone();
        if self.roll(&faults.drop_per_mille) {
            return 0;
        }
        let mut sent = 0;
        if self.held.is_none() && self.roll(&faults.reorder_per_mille) {
            self.held = Some(packet.to_vec());
            return 0;
        }
        let copies = if self.roll(&faults.duplicate_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if socket.send_to(packet, to).is_ok() {
                sent += packet.len() as u64;
            }
        }
        if let Some(h) = self.held.take()
            && socket.send_to(&h, to).is_ok()
        {
            sent += h.len() as u64;
        }
        sent
    }
}

impl Relay {
    pub fn start(server: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay");
        front
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = front.local_addr().expect("addr");
        let faults = Arc::new(Faults::default());
        let stop = Arc::new(AtomicBool::new(false));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let down = downstream_bytes.clone();
        let largest_upstream = Arc::new(AtomicUsize::new(0));
        let largest_downstream = Arc::new(AtomicUsize::new(0));
        let (f, s, up) = (faults.clone(), stop.clone(), upstream_bytes.clone());
        let (big_up, big_down) = (largest_upstream.clone(), largest_downstream.clone());
        let front = Arc::new(front);
        let main = std::thread::spawn(move || {
            let mut uplinks: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut back_threads = Vec::new();
            let mut mangler = Mangler {
                faults: f.clone(),
                seed: 0x9e37_79b9_7f4a_7c15,
                held: None,
            };
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let uplink = uplinks.entry(client).or_insert_with(|| {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind uplink"));
                    u.set_read_timeout(Some(Duration::from_millis(100)))
                        .expect("timeout");
                    let (u2, front2, f2, s2) = (u.clone(), front.clone(), f.clone(), s.clone());
                    let (big_down, down) = (big_down.clone(), down.clone());
                    back_threads.push(std::thread::spawn(move || {
                        let mut m = Mangler {
                            faults: f2,
                            seed: 0x2545_f491_4f6c_dd1d,
                            held: None,
                        };
                        let mut buf = vec![0u8; 65536];
                        while !s2.load(Ordering::Relaxed) {
                            if let Ok((n, _)) = u2.recv_from(&mut buf) {
                                big_down.fetch_max(n, Ordering::Relaxed);
                                let sent = m.send(&front2, client, &buf[..n]);
                                down.fetch_add(sent, Ordering::Relaxed);
                            }
                        }
                    }));
                    u
                });
                big_up.fetch_max(n, Ordering::Relaxed);
                let sent = mangler.send(uplink, server, &buf[..n]);
                up.fetch_add(sent, Ordering::Relaxed);
            }
            for t in back_threads {
                let _ = t.join();
            }
        });
        Relay {
            addr,
            faults,
            upstream_bytes,
            downstream_bytes,
            largest_upstream,
            largest_downstream,
            stop,
            threads: vec![main],
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
