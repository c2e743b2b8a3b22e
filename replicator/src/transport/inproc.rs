//! In-process transport: two bounded channels, for local sync and for tests.
//!
//! Messages are handed over as values (no copy of chunk data); each is still measured by its
//! framed wire length so local and network summaries compare.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{MessageRx, MessageTx, TransportError};
use crate::protocol::message::Message;

pub struct InprocTx {
    tx: Sender<Message>,
    bytes: Arc<AtomicU64>,
}

pub struct InprocRx {
    rx: Receiver<Message>,
}

/// One direction: a sender and a receiver sharing a bounded queue of `depth` messages.
pub fn pipe(depth: usize) -> (InprocTx, InprocRx, Arc<AtomicU64>) {
    let (tx, rx) = bounded(depth);
    let bytes = Arc::new(AtomicU64::new(0));
    (
        InprocTx {
            tx,
            bytes: bytes.clone(),
        },
        InprocRx { rx },
        bytes,
    )
}

impl MessageTx for InprocTx {
    fn send(&mut self, msg: Message) -> Result<(), TransportError> {
        self.bytes
            .fetch_add(msg.wire_len() as u64, Ordering::Relaxed);
        self.tx.send(msg).map_err(|_| TransportError::Closed)
    }

    fn wire_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl MessageRx for InprocRx {
    fn recv(&mut self) -> Result<Message, TransportError> {
        self.rx.recv().map_err(|_| TransportError::Closed)
    }
}
