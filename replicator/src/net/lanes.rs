//! A session's messages striped over several QUIC streams ("lanes").
//!
//! Message *k* of a direction travels on lane *k mod n*, so the receiving side restores the
//! order by reading the lanes round-robin — no sequence numbers, no reorder buffer. Chunks in
//! flight thus spread over `n` streams: a lost packet stalls one lane while the others keep
//! filling their receive windows, and each lane has its own writer and reader task.
//!
//! The sync engine is blocking code; it talks to the lanes through bounded channels
//! ([`LaneTx`], [`LaneRx`] implement the engine's transport traits). Backpressure runs end to
//! end: a full QUIC send window blocks the writer task, which fills its channel, which blocks
//! the engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::manifest::Limits;
use crate::protocol::message::{MAX_FRAME, Message};
use crate::transport::{MessageRx, MessageTx, TransportError};

/// Frames buffered per lane and direction, on top of QUIC's own windows.
const LANE_DEPTH: usize = 8;

/// The first failure seen on the connection, so every later call reports the cause rather
/// than "closed".
#[derive(Clone, Default)]
pub struct FirstError(Arc<Mutex<Option<String>>>);

impl FirstError {
    pub fn set(&self, why: String) {
        if let Ok(mut slot) = self.0.lock()
            && slot.is_none()
        {
            *slot = Some(why);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.clone())
    }

    fn to_transport(&self) -> TransportError {
        match self.get() {
            Some(why) => TransportError::Other(why),
            None => TransportError::Closed,
        }
    }
}

/// Describes a connection-level failure the way an operator needs to read it.
pub fn describe(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as C;
    match e {
        C::TimedOut => "connection timed out: the peer stopped answering".into(),
        C::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
        C::ConnectionClosed(c) => format!("connection closed by peer: {c}"),
        C::Reset => "connection reset by peer".into(),
        C::LocallyClosed => "connection closed".into(),
        other => other.to_string(),
    }
}

fn read_error(e: quinn::ReadExactError) -> String {
    match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            format!("stream ended in the middle of a frame ({n} bytes of it read)")
        }
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => describe(&c),
        quinn::ReadExactError::ReadError(e) => e.to_string(),
    }
}

/// A frame to write: its head, and a chunk payload sent from where it already is.
type Frame = (Bytes, Option<Bytes>);

/// Sending half: the engine's [`MessageTx`].
pub struct LaneTx {
    lanes: Vec<mpsc::Sender<Frame>>,
    next: usize,
    bytes: Arc<AtomicU64>,
    error: FirstError,
}

/// Receiving half: the engine's [`MessageRx`].
pub struct LaneRx {
    lanes: Vec<mpsc::Receiver<Result<Message, TransportError>>>,
    next: usize,
    bytes: Arc<AtomicU64>,
    error: FirstError,
}

impl LaneRx {
    /// Framed bytes received so far.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl LaneTx {
    /// Sends `frame` as it is, as the next message. Only a misbehaving peer needs this: the
    /// hostile-peer tests use it to send frames no honest encoder produces.
    pub fn send_raw(&mut self, frame: Bytes) -> Result<(), TransportError> {
        let lane = &self.lanes[self.next];
        self.next = (self.next + 1) % self.lanes.len();
        lane.blocking_send((frame, None))
            .map_err(|_| self.error.to_transport())
    }
}

impl MessageTx for LaneTx {
    fn send(&mut self, msg: Message) -> Result<(), TransportError> {
        let frame = msg.encode_frame_parts();
        let len = (frame.0.len() + frame.1.as_ref().map_or(0, Bytes::len)) as u64;
        let lane = &self.lanes[self.next];
        self.next = (self.next + 1) % self.lanes.len();
        lane.blocking_send(frame)
            .map_err(|_| self.error.to_transport())?;
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn wire_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl MessageRx for LaneRx {
    fn recv(&mut self) -> Result<Message, TransportError> {
        let n = self.lanes.len();
        let lane = &mut self.lanes[self.next];
        self.next = (self.next + 1) % n;
        match lane.blocking_recv() {
            Some(Ok(msg)) => Ok(msg),
            Some(Err(e)) => Err(e),
            None => Err(self.error.to_transport()),
        }
    }
}

/// The tasks moving frames between the channels and the streams.
pub struct LaneTasks {
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

impl LaneTasks {
    /// Waits until every frame handed to the writers is in QUIC's send buffers and the
    /// streams are finished. Call after dropping the [`LaneTx`].
    pub async fn flush(self) {
        for w in self.writers {
            let _ = w.await;
        }
        for r in self.readers {
            r.abort();
        }
    }
}

/// Starts the lane tasks on the current runtime. `send[i]` and `recv[i]` are lane `i`.
pub fn start(
    send: Vec<SendStream>,
    recv: Vec<RecvStream>,
    limits: Limits,
    error: FirstError,
) -> (LaneTx, LaneRx, LaneTasks) {
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let mut tx_lanes = Vec::new();
    let mut writers = Vec::new();
    for mut stream in send {
        let (tx, mut rx) = mpsc::channel::<Frame>(LANE_DEPTH);
        tx_lanes.push(tx);
        let error = error.clone();
        writers.push(tokio::spawn(async move {
            while let Some((head, payload)) = rx.recv().await {
                let written = match payload {
                    Some(p) => stream.write_all_chunks(&mut [head, p]).await,
                    None => stream.write_all(&head).await,
                };
                if let Err(e) = written {
                    error.set(match e {
                        quinn::WriteError::ConnectionLost(c) => describe(&c),
                        other => other.to_string(),
                    });
                    return;
                }
            }
            let _ = stream.finish();
        }));
    }
    let mut rx_lanes = Vec::new();
    let mut readers = Vec::new();
    for mut stream in recv {
        let (tx, rx) = mpsc::channel(LANE_DEPTH);
        rx_lanes.push(rx);
        let error = error.clone();
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let item = read_frame(&mut stream, &limits).await;
                let stop = !matches!(item, Ok(Some(_)));
                let item = match item {
                    Ok(Some((msg, len))) => {
                        received.fetch_add(len, Ordering::Relaxed);
                        Ok(msg)
                    }
                    // A lane that ends cleanly: the peer has nothing more to say.
                    Ok(None) => return,
                    Err(e) => {
                        if let TransportError::Other(why) = &e {
                            error.set(why.clone());
                        }
                        Err(e)
                    }
                };
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        }));
    }
    (
        LaneTx {
            lanes: tx_lanes,
            next: 0,
            bytes: sent,
            error: error.clone(),
        },
        LaneRx {
            lanes: rx_lanes,
            next: 0,
            bytes: received,
            error,
        },
        LaneTasks { writers, readers },
    )
}

/// Reads one frame: `Ok(None)` at a clean end of stream between frames.
pub async fn read_frame(
    stream: &mut RecvStream,
    limits: &Limits,
) -> Result<Option<(Message, u64)>, TransportError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(TransportError::Other(read_error(e))),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(TransportError::Malformed(format!(
            "frame of {n} bytes (limit {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => TransportError::Malformed(read_error(e)),
        e => TransportError::Other(read_error(e)),
    })?;
    let msg = Message::decode_body(&body, limits)
        .map_err(|e| TransportError::Malformed(e.to_string()))?;
    Ok(Some((msg, 4 + n as u64)))
}
