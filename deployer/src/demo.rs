//! `deployer demo`: the whole story on one machine, without Docker. Three agents on
//! 127.0.0.1-3 (process runtime, state in a temporary directory), the example key-value
//! application deployed on one of them, writes through the routing proxy of another node,
//! reads through a third, the cluster's status — then everything is stopped and removed.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use replicator::net::identity::{Identity, TrustList};

use crate::agent::state::StateDir;
use crate::deploy::{Access, connect_all, deploy, states};
use crate::migrate::MigrationOptions;

const NODES: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
const PORT: u16 = 17700;

/// `deployer agent` processes on this machine (the demo's and `migration-bench`'s), killed
/// when dropped. Their applications outlive them by design: deploy nothing first.
#[derive(Default)]
pub struct LocalAgents(Vec<Child>);

impl LocalAgents {
    /// Starts `exe agent` on `ip` (API on `port`, volume server on `port + 1`) with state
    /// `state`; returns its fingerprint once it serves.
    pub fn start(
        &mut self,
        exe: &Path,
        ip: &str,
        port: u16,
        state: &Path,
    ) -> Result<String, String> {
        let mut child = Command::new(exe)
            .args(["agent", "--listen", ip, "--port", &port.to_string()])
            .args(["--replicator-port", &(port + 1).to_string(), "--state"])
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start an agent: {e}"))?;
        let stdout = child.stdout.take().ok_or("agent has no stdout")?;
        self.0.push(child);
        let mut banner = String::new();
        BufReader::new(stdout)
            .read_line(&mut banner)
            .map_err(|e| e.to_string())?;
        let fp = banner.split_whitespace().last().unwrap_or_default();
        if fp.len() != 64 {
            return Err(format!("agent on {ip} did not start: {banner:?}"));
        }
        Ok(fp.to_string())
    }
}

impl Drop for LocalAgents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request to the example key-value store at `addr`, on its own connection, once.
pub fn kv_once(addr: &str, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("connection closed without an answer"));
    }
    Ok(line.trim().to_string())
}

/// [`kv_once`], retried until it answers (up to 10 s).
fn kv(addr: &str, cmd: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kv_once(addr, cmd) {
            Ok(r) => return Ok(r),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("{addr}: {cmd}: {e}")),
        }
    }
}

/// A client writing `SET {prefix}{i} {i}` through `addr` as fast as it is answered, until
/// stopped — the load a move must not lose anything of.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl WriteLoad {
    pub fn start(addr: &str, prefix: &str) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, addr, prefix) = (stop.clone(), addr.to_string(), prefix.to_string());
        let thread = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                if kv_once(&addr, &format!("SET {prefix}{i} {i}")).is_ok_and(|r| r == "OK") {
                    acked.push(i);
                }
                i += 1;
            }
            acked
        });
        WriteLoad { stop, thread }
    }

    /// Stops writing; returns the `i` of every acknowledged write.
    pub fn stop(self) -> Result<Vec<u64>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the writer thread panicked".to_string())
    }
}

fn agents_fps(dir: &Path) -> Result<Vec<String>, String> {
    NODES
        .iter()
        .map(|ip| {
            std::fs::read_to_string(dir.join(format!("node-{ip}")).join("fingerprint"))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Runs the demo in `dir` (a fresh temporary directory when `None`, removed afterwards).
pub fn run(dir: Option<PathBuf>) -> Result<(), String> {
    let owned = dir.is_none();
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("deployer-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = story(&dir);
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn story(dir: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (me, _) = Identity::load_or_create(&dir.join("deployer-id")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut agents = LocalAgents::default();
    let mut known = TrustList::new();
    for ip in NODES {
        let state = StateDir(dir.join(format!("node-{ip}")));
        std::fs::create_dir_all(&state.0).map_err(|e| e.to_string())?;
        std::fs::write(state.authorized(), format!("{}\n", me.fingerprint))
            .map_err(|e| e.to_string())?;
        let fp = agents.start(&exe, ip, PORT, &state.0)?;
        known.add(replicator::net::identity::Fingerprint::parse(&fp)?);
        std::fs::write(state.0.join("fingerprint"), &fp).map_err(|e| e.to_string())?;
        println!(
            "agent on {ip}:{PORT} (process runtime), fingerprint {}…",
            &fp[..16]
        );
    }
    // Each agent may push volumes to the others (the trust set for moves).
    let fps: Vec<String> = agents_fps(dir)?;
    for ip in NODES {
        let state = StateDir(dir.join(format!("node-{ip}")));
        let mine = std::fs::read_to_string(state.0.join("fingerprint")).unwrap_or_default();
        let peers: String = fps
            .iter()
            .filter(|f| **f != mine)
            .map(|f| format!("{f}\n"))
            .collect();
        std::fs::write(state.peers(), peers).map_err(|e| e.to_string())?;
    }
    let application = dir.join("application.yml");
    let kv_cmd = format!("[\"{}\", \"example-kv\"]", exe.display());
    std::fs::write(
        &application,
        format!(
            "version: 1\napplications:\n  kv:\n    image: kvstore\n    command: {kv_cmd}\n    volume:\n      mountpoint: /data\n    ports:\n      - internal: 7000\n        external: 17080\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let deployment = dir.join("deployment.yml");
    let nodes = |on: usize| -> String {
        let mut s = "version: 1\nnodes:\n".to_string();
        for (i, ip) in NODES.iter().enumerate() {
            let apps = if i == on { "[kv]" } else { "[]" };
            s.push_str(&format!("  \"{ip}:{PORT}\": {apps}\n"));
        }
        s
    };
    std::fs::write(&deployment, nodes(0)).map_err(|e| e.to_string())?;
    let cluster = crate::config::load(&deployment, &application).map_err(|e| e.to_string())?;
    let access = Access {
        identity: me,
        known_agents: known,
        timeout: Duration::from_secs(5),
        break_lease: false,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // One deploy, printing each action as it happens.
    let run = |cluster: &crate::config::Cluster| {
        rt.block_on(deploy(
            cluster,
            &access,
            false,
            MigrationOptions::default(),
            |a, d| println!("  {a}: {d}"),
        ))
        .map_err(|e| e.to_string())
    };
    println!("\n$ deployer deploy deployment.yml application.yml   # kv on 127.0.0.1");
    let t = Instant::now();
    let report = run(&cluster)?;
    println!(
        "  routes updated on {} ({} ms)",
        report.routes_updated.join(", "),
        t.elapsed().as_millis()
    );

    println!("\nwriting 100 keys through 127.0.0.2:17080 (routed to the node running kv)");
    let t = Instant::now();
    for i in 0..100 {
        let r = kv("127.0.0.2:17080", &format!("SET key{i} value{i}"))?;
        if r != "OK" {
            return Err(format!("write {i}: {r}"));
        }
    }
    println!(
        "  100 acknowledged writes, each fsynced, in {} ms",
        t.elapsed().as_millis()
    );
    println!(
        "reading through 127.0.0.3:17080: {}",
        kv("127.0.0.3:17080", "GET key42")?
    );
    println!("  {}", kv("127.0.0.3:17080", "COUNT")?);

    println!("\n$ deployer deploy (again)   # converged: nothing to do");
    let again = run(&cluster)?;
    if again.actions.is_empty() {
        println!("  nothing to do");
    }

    println!("\n$ deployer status");
    let all = rt
        .block_on(async {
            let clients = connect_all(&cluster, &access).await?;
            let s = states(&clients).await;
            for (_, c) in clients {
                c.close().await;
            }
            s
        })
        .map_err(|e| e.to_string())?;
    for (node, s) in &all {
        let apps: Vec<String> = s
            .applications
            .iter()
            .map(|(n, a)| format!("{n} ({})", if a.running { "running" } else { "stopped" }))
            .collect();
        let vols: Vec<String> = s
            .volumes
            .iter()
            .map(|(n, v)| {
                let role = if v.owner { "owner" } else { "not owner" };
                format!("{n} ({role}, epoch {})", v.epoch)
            })
            .collect();
        println!(
            "  {node}: apps [{}] volumes [{}]",
            apps.join(", "),
            vols.join(", ")
        );
    }

    println!(
        "\nmoving kv to 127.0.0.2 (one line of deployment.yml changed) while a client keeps writing through 127.0.0.3:"
    );
    std::fs::write(&deployment, nodes(1)).map_err(|e| e.to_string())?;
    let moved = crate::config::load(&deployment, &application).map_err(|e| e.to_string())?;
    let writer = WriteLoad::start("127.0.0.3:17080", "live");
    std::thread::sleep(Duration::from_millis(200));
    let moved_report = run(&moved);
    std::thread::sleep(Duration::from_millis(200));
    let acked = writer.stop()?;
    let report = moved_report?;
    let mut lost = 0;
    for i in &acked {
        if kv("127.0.0.1:17080", &format!("GET live{i}"))? != format!("VALUE {i}") {
            lost += 1;
        }
    }
    println!(
        "  {} writes acknowledged during the move, {lost} lost; key42 read through 127.0.0.1: {}",
        acked.len(),
        kv("127.0.0.1:17080", "GET key42")?
    );
    if let Some(m) = report.migrations.first() {
        println!(
            "  downtime {} ms (predicted {} ms) after {} pre-copy rounds",
            m.downtime_ms,
            m.predicted_downtime_ms,
            m.rounds.len()
        );
    }
    if lost > 0 {
        return Err(format!("{lost} acknowledged writes were lost"));
    }

    println!("\n$ deployer deploy (again)   # after the move: nothing to do");
    let again = run(&moved)?;
    if again.actions.is_empty() {
        println!("  nothing to do");
    }

    println!("\ncleaning up: stopping kv and the agents");
    std::fs::write(&deployment, nodes(usize::MAX)).map_err(|e| e.to_string())?;
    let none = crate::config::load(&deployment, &application).map_err(|e| e.to_string())?;
    run(&none)?;
    drop(agents);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
