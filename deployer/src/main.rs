//! The `deployer` command line.
//!
//! Exit codes: 0 success, 1 the operation failed (a node unreachable, an agent refused),
//! 2 invalid configuration or usage.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use deployer::agent::docker::DockerRuntime;
use deployer::agent::runtime::Runtime;
use deployer::agent::state::StateDir;
use deployer::agent::{AGENT_PORT, Agent, AgentOptions, REPLICATOR_PORT};
use deployer::deploy::{Access, connect_all, deploy, states};
use deployer::migrate::MigrationOptions;
use replicator::net::endpoint::NetOptions;
use replicator::net::identity::{Identity, TrustList};

#[derive(Parser)]
#[command(
    name = "deployer",
    version,
    about = "Deploy stateful applications from Flocker-style application.yml and deployment.yml"
)]
struct Cli {
    /// Log level (error, warn, info, debug); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct AccessArgs {
    /// The deployer's identity directory (default: $DEPLOYER_IDENTITY_DIR, else
    /// ~/.config/deployer/identity).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Pinned agent fingerprints, "FINGERPRINT HOST:PORT" per line (default: IDENTITY/known_agents).
    #[arg(long)]
    known_agents: Option<PathBuf>,
    /// Seconds to wait for an agent.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Take the cluster's deploy lease from another deploy (only after that deploy died).
    #[arg(long)]
    break_lease: bool,
}

impl AccessArgs {
    fn dir(&self) -> PathBuf {
        self.identity.clone().unwrap_or_else(default_identity_dir)
    }

    fn access(&self) -> Result<Access, Failure> {
        let (identity, _) =
            Identity::load_or_create(&self.dir()).map_err(|e| Failure::Usage(e.to_string()))?;
        let known = self
            .known_agents
            .clone()
            .unwrap_or_else(|| self.dir().join("known_agents"));
        let known_agents = TrustList::load(&known).map_err(|e| Failure::Usage(e.to_string()))?;
        if !(self.timeout.is_finite() && self.timeout >= 0.5) {
            return Err(Failure::Usage(
                "--timeout must be at least 0.5 seconds".into(),
            ));
        }
        Ok(Access {
            identity,
            known_agents,
            timeout: Duration::from_secs_f64(self.timeout),
            break_lease: self.break_lease,
        })
    }
}

fn default_identity_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEPLOYER_IDENTITY_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".config"))
        .unwrap_or_else(|| PathBuf::from("/etc"))
        .join("deployer")
        .join("identity")
}

#[derive(Subcommand)]
enum Command {
    /// Check both configuration files and print what they describe; runs nothing.
    Validate {
        deployment: PathBuf,
        application: PathBuf,
    },
    /// Make the cluster match the configuration files.
    Deploy {
        deployment: PathBuf,
        application: PathBuf,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Moving an application: stop pre-copying once a round takes no longer than this
        /// many seconds (the expected downtime).
        #[arg(long, default_value_t = 1.0)]
        downtime_budget: f64,
        /// Moving an application: at most this many pre-copy rounds.
        #[arg(long, default_value_t = 8)]
        max_rounds: u32,
        /// Moving an application: seconds it may take to accept connections on its new node
        /// before the move is undone (the volume handed back, the application restarted).
        #[arg(long, default_value_t = 30.0)]
        health_timeout: f64,
        /// Moving an application: no pre-copy; stop it, copy everything, start it
        /// (stop–copy–start: longer downtime, the baseline the two-phase push beats).
        #[arg(long)]
        no_pre_copy: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// What runs where, and every volume with its owner and epoch.
    Status {
        deployment: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Run the agent of this node.
    Agent {
        /// This node's address (the agent, the routing proxy and applications bind to it).
        #[arg(long)]
        listen: IpAddr,
        /// Where the agent keeps its state, identity and volumes.
        #[arg(long)]
        state: PathBuf,
        /// How applications run: `process` (supervised commands, no Docker needed) or
        /// `docker` (containers through the local Docker Engine).
        #[arg(long, default_value = "process", value_parser = ["process", "docker"])]
        runtime: String,
        /// Port of the agent API.
        #[arg(long, default_value_t = AGENT_PORT)]
        port: u16,
        /// Port of the agent's volume server (pushes from peer agents).
        #[arg(long, default_value_t = REPLICATOR_PORT)]
        replicator_port: u16,
        /// Address peers should push volumes to, when they cannot reach
        /// LISTEN:REPLICATOR_PORT directly (NAT, a port forward).
        #[arg(long)]
        advertise_replicator: Option<SocketAddr>,
    },
    /// Run the whole story on this machine without Docker: three agents on 127.0.0.1-3,
    /// the example key-value application deployed, written to and read through the routing
    /// proxies, the cluster's status; then everything is removed.
    Demo {
        /// Work here instead of a temporary directory (kept afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The example key-value application (what the demo deploys).
    #[command(name = "example-kv", hide = true)]
    ExampleKv {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up a cluster's trust from its deployment.yml: per node, an identity and its
    /// authorized files (a bundle to copy into the agent's --state directory), and every
    /// agent pinned for this deployer. Rerunning keeps identities and refreshes the lists.
    Trust {
        deployment: PathBuf,
        /// Directory receiving one bundle per node.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Print a fingerprint: the deployer's (default) or, with --state, an agent's.
    Id {
        #[arg(long)]
        state: Option<PathBuf>,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Let a deployer (or with --peer, a peer agent) talk to the agent whose state is --state.
    Authorize {
        #[arg(long)]
        state: PathBuf,
        fingerprint: String,
        /// The fingerprint is a peer agent's (may push volumes here), not a deployer's.
        #[arg(long)]
        peer: bool,
    },
}

enum Failure {
    Usage(String),
    Failed(String),
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("deployer: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(m)) => {
            eprintln!("deployer: {m}");
            ExitCode::from(1)
        }
    }
}

fn load(deployment: &Path, application: &Path) -> Result<deployer::config::Cluster, Failure> {
    deployer::config::load(deployment, application).map_err(|e| Failure::Usage(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(e.to_string()))
}

fn run(cmd: Command) -> Result<(), Failure> {
    match cmd {
        Command::Validate {
            deployment,
            application,
        } => {
            let cluster = load(&deployment, &application)?;
            for (node, apps) in &cluster.nodes {
                let list = if apps.is_empty() {
                    "(nothing)".to_string()
                } else {
                    apps.join(", ")
                };
                println!("{node}: {list}");
            }
            Ok(())
        }
        Command::Deploy {
            deployment,
            application,
            dry_run,
            json,
            access,
            downtime_budget,
            max_rounds,
            health_timeout,
            no_pre_copy,
        } => {
            if !(downtime_budget.is_finite() && downtime_budget >= 0.0)
                || max_rounds == 0
                || !(health_timeout.is_finite() && health_timeout > 0.0)
            {
                return Err(Failure::Usage(
                    "--downtime-budget must be >= 0, --max-rounds >= 1 and --health-timeout > 0"
                        .into(),
                ));
            }
            let migration = MigrationOptions {
                downtime_budget: Duration::from_secs_f64(downtime_budget),
                max_rounds,
                health_timeout: Duration::from_secs_f64(health_timeout),
                pre_copy: !no_pre_copy,
            };
            let cluster = load(&deployment, &application)?;
            let access = access.access()?;
            let report = runtime()?.block_on(deploy(
                &cluster,
                &access,
                dry_run,
                migration,
                |a, detail| {
                    if !json {
                        if detail.is_empty() {
                            println!("{a}");
                        } else {
                            println!("{a}: {detail}");
                        }
                    }
                },
            ));
            let report = report.map_err(|e| Failure::Failed(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else if report.actions.is_empty() {
                println!("nothing to do: the cluster matches the configuration");
            }
            if !json && !report.routes_updated.is_empty() {
                println!("routes updated on {}", report.routes_updated.join(", "));
            }
            Ok(())
        }
        Command::Trust {
            deployment,
            out,
            json,
            access,
        } => {
            let nodes: Vec<_> = deployer::config::load_nodes(&deployment)
                .map_err(|e| Failure::Usage(e.to_string()))?
                .into_iter()
                .map(|(node, _)| node)
                .collect();
            let report = deployer::trust::setup(&nodes, &access.dir(), &out)
                .map_err(|e| Failure::Failed(format!("setting up trust: {e}")))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
                return Ok(());
            }
            println!(
                "deployer {} pins {} agents in {}",
                report.deployer_fingerprint,
                report.nodes.len(),
                report.known_agents.display()
            );
            for n in &report.nodes {
                println!(
                    "{:<22} {} {}\n{:<22} copy {}/ into the agent's --state directory on {}",
                    n.node,
                    n.fingerprint,
                    if n.created { "(new)" } else { "(kept)" },
                    "",
                    n.bundle.display(),
                    n.node
                );
            }
            Ok(())
        }
        Command::Status {
            deployment,
            json,
            access,
        } => {
            let nodes = deployer::config::load_nodes(&deployment)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            let cluster = deployer::config::Cluster {
                applications: Default::default(),
                nodes,
            };
            let access = access.access()?;
            let all = runtime()?.block_on(async {
                let clients = connect_all(&cluster, &access).await?;
                let s = states(&clients).await;
                for (_, c) in clients {
                    c.close().await;
                }
                s
            });
            let all = all.map_err(|e| Failure::Failed(e.to_string()))?;
            if json {
                let as_map: std::collections::BTreeMap<String, _> =
                    all.iter().map(|(n, s)| (n.to_string(), s)).collect();
                println!("{}", serde_json::to_string(&as_map).unwrap_or_default());
                return Ok(());
            }
            for (node, s) in &all {
                println!("{node} ({})", s.runtime);
                for (name, a) in &s.applications {
                    let ports: Vec<String> = a
                        .ports
                        .iter()
                        .map(|(i, addr)| format!("{i}->{addr}"))
                        .collect();
                    println!(
                        "  app {name}: {} {} restarts {}",
                        if a.running { "running" } else { "NOT RUNNING" },
                        ports.join(" "),
                        a.restarts
                    );
                }
                for (name, v) in &s.volumes {
                    println!(
                        "  volume {name}: {} epoch {}",
                        if v.owner { "owned" } else { "not owned" },
                        v.epoch
                    );
                }
            }
            Ok(())
        }
        Command::Agent {
            listen,
            state,
            runtime: kind,
            port,
            replicator_port,
            advertise_replicator,
        } => {
            let opts = AgentOptions {
                ip: listen,
                port,
                replicator_port,
                advertise_replicator,
                state: StateDir(state),
                net: NetOptions::default(),
            };
            runtime()?.block_on(async move {
                let rt = match kind.as_str() {
                    "docker" => Runtime::Docker(
                        DockerRuntime::connect(&listen.to_string())
                            .await
                            .map_err(Failure::Failed)?,
                    ),
                    _ => Runtime::Process(Default::default()),
                };
                let agent = Agent::open(opts, rt).map_err(Failure::Failed)?;
                println!(
                    "agent listening on {listen}:{port} fingerprint {}",
                    agent.fingerprint()
                );
                agent
                    .run(replicator::net::shutdown_signal())
                    .await
                    .map_err(Failure::Failed)
            })
        }
        Command::Id { state, access } => {
            let dir = match state {
                Some(s) => StateDir(s).identity(),
                None => access.dir(),
            };
            let (id, _) =
                Identity::load_or_create(&dir).map_err(|e| Failure::Failed(e.to_string()))?;
            println!("{}", id.fingerprint);
            Ok(())
        }
        Command::Demo { dir } => deployer::demo::run(dir).map_err(Failure::Failed),
        Command::ExampleKv { args } => kvstore::settings(&args)
            .and_then(|(listen, data)| kvstore::run(&listen, &data))
            .map_err(Failure::Failed),
        Command::Authorize {
            state,
            fingerprint,
            peer,
        } => {
            replicator::net::identity::Fingerprint::parse(&fingerprint).map_err(Failure::Usage)?;
            let dir = StateDir(state);
            let file = if peer { dir.peers() } else { dir.authorized() };
            std::fs::create_dir_all(&dir.0).map_err(|e| Failure::Failed(e.to_string()))?;
            let mut text = std::fs::read_to_string(&file).unwrap_or_default();
            if !text
                .lines()
                .any(|l| l.split_whitespace().next() == Some(fingerprint.as_str()))
            {
                text.push_str(&format!("{fingerprint}\n"));
                replicator::state::write_atomic(&file, text.as_bytes())
                    .map_err(|e| Failure::Failed(e.to_string()))?;
            }
            println!(
                "{} may now {} this agent",
                fingerprint,
                if peer { "push volumes to" } else { "command" }
            );
            Ok(())
        }
    }
}
