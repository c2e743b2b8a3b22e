//! The `process` runtime: an application's `command` as a supervised process, like Nomad's
//! raw_exec. No Docker needed; this is what `deployer demo` and the tests use.
//!
//! The process gets its own process group (so it outlives an agent restart and is stopped as
//! a whole), its output appended to `STATE/logs/APP.log`, and in its environment:
//! `DEPLOYER_APP`, `DEPLOYER_VOLUME` (the volume directory), `DEPLOYER_LISTEN_<internal>`
//! (the address to listen on for each internal port), the application's `environment`, and
//! Docker-style link variables (`ALIAS_PORT_<local>_TCP_ADDR`/`_PORT`) pointing at the
//! routing proxy. After an agent restart, a recorded pid is adopted again if it is alive and
//! its environment names the application.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Application;

#[derive(Default)]
pub struct ProcessRuntime {
    /// Children this agent started (reaped here); adopted processes are only polled.
    children: Mutex<HashMap<u32, Child>>,
}

/// Everything a runtime needs to start one application.
pub struct Launch<'a> {
    pub app: &'a Application,
    pub volume: &'a Path,
    pub ports: &'a std::collections::BTreeMap<u16, SocketAddr>,
    /// Where this node's routing proxy listens (for links).
    pub node_ip: std::net::IpAddr,
    pub log: &'a Path,
}

impl ProcessRuntime {
    pub fn start(&self, l: &Launch<'_>) -> Result<String, String> {
        let Some((program, args)) = l.app.command.split_first() else {
            return Err(format!(
                "application {} has no `command`; the process runtime needs one",
                l.app.name
            ));
        };
        if let Some(dir) = l.log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l.log)
            .map_err(|e| format!("{}: {e}", l.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(&l.app.environment)
            .env("DEPLOYER_APP", &l.app.name)
            .env("DEPLOYER_VOLUME", l.volume)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        for (internal, addr) in l.ports {
            cmd.env(format!("DEPLOYER_LISTEN_{internal}"), addr.to_string());
        }
        cmd.envs(link_env(l.app, l.node_ip));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let pid = child.id();
        if let Ok(mut c) = self.children.lock() {
            c.insert(pid, child);
        }
        Ok(pid.to_string())
    }

    /// Alive: our child not yet exited, or an adopted pid still running as `app`.
    pub fn is_running(&self, handle: &str, app: &str) -> bool {
        let Ok(pid) = handle.parse::<u32>() else {
            return false;
        };
        if let Ok(mut c) = self.children.lock()
            && let Some(child) = c.get_mut(&pid)
        {
            return match child.try_wait() {
                Ok(None) => true,
                _ => {
                    c.remove(&pid);
                    false
                }
            };
        }
        adoptable(pid, app)
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`.
    pub fn stop(&self, handle: &str, app: &str, grace: Duration) {
        let Ok(pid) = handle.parse::<u32>() else {
            return;
        };
        if !self.is_running(handle, app) {
            return;
        }
        let signal = |sig| {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(p, sig);
            }
        };
        signal(rustix::process::Signal::TERM);
        // Polled from 1 ms up: most applications exit within milliseconds of SIGTERM, and
        // every millisecond here is downtime during a move.
        let deadline = Instant::now() + grace;
        let mut pause = Duration::from_millis(1);
        while Instant::now() < deadline && self.is_running(handle, app) {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        if self.is_running(handle, app) {
            signal(rustix::process::Signal::KILL);
            while self.is_running(handle, app) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A process we did not start (agent restarted): running, not a zombie, and started by a
/// deployer agent for `app`.
fn adoptable(pid: u32, app: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("DEPLOYER_APP={app}");
    env.split(|&b| b == 0).any(|v| v == want.as_bytes())
}

/// Docker-style link variables: `ALIAS_PORT_<local>_TCP=tcp://NODE:REMOTE`, `_ADDR`, `_PORT`,
/// all pointing at this node's routing proxy, which forwards to wherever the linked
/// application runs.
pub fn link_env(app: &Application, node_ip: std::net::IpAddr) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for link in &app.links {
        let prefix = format!(
            "{}_PORT_{}_TCP",
            link.alias.to_uppercase().replace('-', "_"),
            link.local_port
        );
        out.push((
            prefix.clone(),
            format!("tcp://{node_ip}:{}", link.remote_port),
        ));
        out.push((format!("{prefix}_ADDR"), node_ip.to_string()));
        out.push((format!("{prefix}_PORT"), link.remote_port.to_string()));
    }
    out
}
