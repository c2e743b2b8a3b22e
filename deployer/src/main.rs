//! The `deployer` command line.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 invalid configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deployer",
    version,
    about = "Deploy stateful applications from Flocker-style application.yml and deployment.yml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check both configuration files and print what they describe; runs nothing.
    Validate {
        deployment: PathBuf,
        application: PathBuf,
    },
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
    match cli.command {
        Command::Validate {
            deployment,
            application,
        } => match deployer::config::load(&deployment, &application) {
            Ok(cluster) => {
                for (node, apps) in &cluster.nodes {
                    let list = if apps.is_empty() {
                        "(nothing)".to_string()
                    } else {
                        apps.join(", ")
                    };
                    println!("{node}: {list}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("deployer: {e}");
                ExitCode::from(2)
            }
        },
    }
}
