//! Shared by the bench binaries: the seeded generator every workload is made from.

pub mod rng;
