//! The deployer: Flocker-style `application.yml` + `deployment.yml`, node agents, and
//! (in later steps) the two-phase push that moves a stateful application between nodes.

pub mod config;
