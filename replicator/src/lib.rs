//! Volume replication: content-defined chunks, verified transfer, crash-safe apply.
//!
//! Data flows one way through the modules:
//! [`volume`] (read a tree or block volume) → [`chunk`] (FastCDC + BLAKE3) → [`manifest`]
//! (entries, encoding, root digest) → [`protocol`] (session messages and state machines) →
//! [`transport`] (in-process or network) → [`apply`] (temp files, renames, fsync, verify).
//! [`snapshot`] is the sender's scan; [`index`] and [`state`] are the durable bookkeeping kept
//! outside volumes; [`sync`] joins both ends for a local sync.

pub mod apply;
pub mod bench;
pub mod chunk;
pub mod codec;
pub mod crashpoint;
pub mod demo;
pub mod digest;
pub mod index;
pub mod manifest;
pub mod net;
pub mod progress;
pub mod protocol;
pub mod snapshot;
pub mod state;
pub mod sync;
pub mod transport;
pub mod volume;
