//! How session messages travel: a pair of one-way message pipes.
//!
//! The sync sessions in [`crate::protocol`] only see [`MessageTx`] and [`MessageRx`]. Local
//! sync plugs in an in-process pair ([`inproc`]); the network plugs in QUIC streams
//! ([`crate::net::lanes`]).
//! Both ends count the bytes a message takes on the wire, so summaries report the same figure
//! whatever the transport.

pub mod inproc;

use crate::protocol::message::Message;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection closed by peer")]
    Closed,
    /// The peer sent bytes that are not a valid frame: not a broken link but a bad peer.
    #[error("malformed data from peer: {0}")]
    Malformed(String),
    #[error("transport: {0}")]
    Other(String),
}

/// Sends messages to the peer. Blocks while the peer is not keeping up (backpressure).
///
/// A transport may hold back small streaming messages (`Entry`, `Chunk`, `Want`) to send them
/// together; any other message sends everything before it. A session that is about to wait
/// for its peer after streaming messages calls [`MessageTx::flush`] first.
pub trait MessageTx: Send {
    fn send(&mut self, msg: Message) -> Result<(), TransportError>;
    /// Sends whatever is held back.
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    /// Bytes sent so far, counted as framed on the wire.
    fn wire_bytes(&self) -> u64;
}

/// Receives messages from the peer, in the order they were sent.
pub trait MessageRx: Send {
    fn recv(&mut self) -> Result<Message, TransportError>;
}
