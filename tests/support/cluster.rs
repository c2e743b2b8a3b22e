//! Deployer test equipment: agents on 127.0.0.x as real processes, a deployer identity that
//! they trust, and the example key-value application's client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::workspace_bin;

pub fn deployer_bin() -> PathBuf {
    workspace_bin("deployer", "deployer")
}

pub fn kvstore_bin() -> PathBuf {
    workspace_bin("kvstore", "kvstore")
}

/// A `deployer agent` process; SIGKILLed when dropped (its applications are not).
pub struct AgentProc {
    pub child: Child,
    pub ip: String,
    pub state: PathBuf,
    pub fingerprint: String,
}

impl AgentProc {
    pub fn start(ip: &str, state: &Path, deployer_fp: &str) -> AgentProc {
        Self::start_with(ip, state, deployer_fp, "process")
    }

    pub fn start_with(ip: &str, state: &Path, deployer_fp: &str, runtime: &str) -> AgentProc {
        Self::start_env(ip, state, deployer_fp, runtime, &[], &[])
    }

    /// Starts an agent with extra arguments and environment (e.g. a replicator crash point).
    pub fn start_env(
        ip: &str,
        state: &Path,
        deployer_fp: &str,
        runtime: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        let out = Command::new(deployer_bin())
            .args(["authorize", "--state"])
            .arg(state)
            .arg(deployer_fp)
            .output()
            .expect("deployer authorize");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = Command::new(deployer_bin())
            .args(["agent", "--listen", ip, "--runtime", runtime, "--state"])
            .arg(state)
            .args(["--log", "info"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("agent banner");
        let fingerprint = line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
        assert_eq!(fingerprint.len(), 64, "unexpected banner {line:?}");
        AgentProc {
            child,
            ip: ip.to_string(),
            state: state.to_path_buf(),
            fingerprint,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three agents, a deployer identity they trust and that pins them, and config files.
pub struct Cluster {
    pub dir: PathBuf,
    pub identity: PathBuf,
    pub agents: Vec<AgentProc>,
}

impl Cluster {
    pub fn start(dir: &Path, ips: &[&str]) -> Cluster {
        Self::start_with(dir, ips, "process")
    }

    pub fn start_with(dir: &Path, ips: &[&str], runtime: &str) -> Cluster {
        let identity = dir.join("deployer-id");
        let out = Command::new(deployer_bin())
            .args(["id", "--identity"])
            .arg(&identity)
            .output()
            .expect("deployer id");
        assert!(out.status.success());
        let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let agents: Vec<AgentProc> = ips
            .iter()
            .map(|ip| AgentProc::start_with(ip, &dir.join(format!("agent-{ip}")), &fp, runtime))
            .collect();
        let known: String = agents
            .iter()
            .map(|a| format!("{} {}:7701\n", a.fingerprint, a.ip))
            .collect();
        std::fs::write(identity.join("known_agents"), known).expect("known agents");
        Cluster {
            dir: dir.to_path_buf(),
            identity,
            agents,
        }
    }

    /// Lets every agent push volumes to every other (the trust set moves need).
    pub fn trust_peers(&self) {
        for a in &self.agents {
            let peers: String = self
                .agents
                .iter()
                .filter(|b| b.fingerprint != a.fingerprint)
                .map(|b| format!("{}\n", b.fingerprint))
                .collect();
            std::fs::write(a.state.join("authorized_peers"), peers).expect("authorized peers");
        }
    }

    /// Restarts agent `i` (after a kill) on the same state.
    pub fn restart_agent(&mut self, i: usize) {
        self.restart_agent_env(i, &[], &[]);
    }

    /// Kills agent `i` if it runs and starts it again on the same state with extra `args`
    /// and `env`.
    pub fn restart_agent_env(&mut self, i: usize, args: &[&str], env: &[(&str, &str)]) {
        self.agents[i].kill();
        let out = Command::new(deployer_bin())
            .args(["id", "--identity"])
            .arg(&self.identity)
            .output()
            .expect("deployer id");
        let deployer_fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (ip, state) = (self.agents[i].ip.clone(), self.agents[i].state.clone());
        self.agents[i] = AgentProc::start_env(&ip, &state, &deployer_fp, "process", args, env);
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }

    pub fn deployer(&self, args: &[&str]) -> Output {
        self.deployer_command(args).output().expect("run deployer")
    }

    /// [`Cluster::deployer`] with `DEPLOYER_CRASH_AT=step`: it aborts right after that step.
    pub fn deployer_crashing_at(&self, step: &str, args: &[&str]) -> Output {
        self.deployer_command(args)
            .env("DEPLOYER_CRASH_AT", step)
            .output()
            .expect("run deployer")
    }

    fn deployer_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(deployer_bin());
        cmd.args(args)
            .arg("--identity")
            .arg(&self.identity)
            .args(["--timeout", "3"]);
        cmd
    }

    /// `deployer deploy --json`, which must succeed; returns the report.
    pub fn deploy(&self, deployment: &Path, application: &Path) -> serde_json::Value {
        let out = self.deployer(&[
            "deploy",
            "--json",
            deployment.to_str().expect("utf8"),
            application.to_str().expect("utf8"),
        ]);
        assert!(
            out.status.success(),
            "deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json report")
    }

    pub fn status(&self, deployment: &Path) -> serde_json::Value {
        let out = self.deployer(&["status", "--json", deployment.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json status")
    }
}

impl Drop for Cluster {
    /// Applications outlive their agents by design; a test must not leave them behind.
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
            kill_apps(&a.state);
        }
    }
}

/// Kills the applications the agent whose state is `state` started (processes or containers).
pub fn kill_apps(state: &Path) {
    let Ok(text) = std::fs::read_to_string(state.join("agent.json")) else {
        return;
    };
    let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    for app in state["apps"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        let Some(handle) = app["handle"].as_str() else {
            continue;
        };
        match handle
            .parse::<i32>()
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // The process runtime gives each application its own process group.
            // (Not `kill -9 -PGID`: some kill(1) builds parse that as `-P GID`.)
            Some(pid) => {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            None => {
                let _ = Command::new("docker")
                    .args(["rm", "-f", handle])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// One request to the key-value store at `addr`, retried until it answers (up to 10 s).
pub fn kv(addr: &str, command: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_kv(addr, command) {
            Ok(reply) => return reply,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("{addr}: {command}: {e}"),
        }
    }
}

pub fn try_kv(addr: &str, command: &str) -> std::io::Result<String> {
    deployer::demo::kv_once(addr, command)
}

/// Builds the example application as a static binary and a `FROM scratch` image of it,
/// tagged `tag`, with the local engine (no registry involved).
pub fn build_kvstore_image(tag: &str, work: &Path) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "-q",
        "--release",
        "-p",
        "kvstore",
        "--target",
        "x86_64-unknown-linux-gnu",
    ])
    .env("RUSTFLAGS", "-C target-feature=+crt-static");
    super::scrub_cargo_env(&mut cmd);
    assert!(
        cmd.status().expect("cargo build").success(),
        "static kvstore build failed"
    );
    let exe = std::env::current_exe().expect("test executable");
    let target = exe
        .parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .expect("target dir");
    let bin = target.join("x86_64-unknown-linux-gnu/release/kvstore");
    std::fs::create_dir_all(work).expect("image dir");
    std::fs::copy(&bin, work.join("kvstore")).expect("copy kvstore");
    docker_build(
        tag,
        work,
        "FROM scratch\nCOPY kvstore /kvstore\nENTRYPOINT [\"/kvstore\"]\n",
    );
}

/// The image `base` (built by [`build_kvstore_image`]) with a `HEALTHCHECK` that runs
/// `kvstore ping` every second, tagged `tag`.
pub fn build_kvstore_image_with_healthcheck(base: &str, tag: &str, work: &Path) {
    std::fs::create_dir_all(work).expect("image dir");
    docker_build(
        tag,
        work,
        &format!(
            "FROM {base}\nHEALTHCHECK --interval=1s --timeout=1s --retries=30 CMD [\"/kvstore\", \"ping\"]\n"
        ),
    );
}

/// `docker build` of `work` with `dockerfile` written there, tagged `tag`.
fn docker_build(tag: &str, work: &Path, dockerfile: &str) {
    std::fs::write(work.join("Dockerfile"), dockerfile).expect("Dockerfile");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(work)
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the Docker engine answers; with `DEPLOYER_REQUIRE_DOCKER=1` (CI), a missing
/// engine is a failure, not a skip.
pub fn docker_available() -> bool {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    let ok = matches!(&out, Ok(o) if o.status.success());
    if !ok {
        let why = match out {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        super::skip_unless_required("DEPLOYER_REQUIRE_DOCKER", "the Docker engine", &why);
    }
    ok
}
