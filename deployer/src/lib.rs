//! The deployer: Flocker-style `application.yml` + `deployment.yml`, node agents that run
//! applications and route their ports, and `deployer deploy` that converges a cluster.

pub mod agent;
pub mod api;
pub mod config;
pub mod demo;
pub mod deploy;
pub mod migrate;
pub mod plan;
pub mod trust;
pub mod util;
