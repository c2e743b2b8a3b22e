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
//!
//! Small frames (manifest entries, chunks of small files) travel in batches. [`LaneTx`] keeps
//! each lane's small frames in a buffer until it holds [`WRITE_BATCH`] bytes, a message that
//! ends a phase is sent, or the engine calls [`MessageTx::flush`] before it waits for the
//! peer; a writer task hands everything queued to QUIC in one write; a reader reads whatever
//! has arrived (up to [`READ_BATCH`]), parses every whole frame in it and passes them on as
//! one batch. Without this every manifest entry went out in a packet of its own, woken and
//! encrypted on its own: 16,000 `sendmsg` calls and 0.4 s for a 20,000-entry manifest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::manifest::Limits;
use crate::protocol::message::{MAX_FRAME, Message};
use crate::transport::{MessageRx, MessageTx, TransportError};

/// Frames (sending) or batches of frames (receiving) buffered per lane and direction, on top
/// of QUIC's own windows.
const LANE_DEPTH: usize = 8;

/// Most bytes of small frames a lane buffers before handing them on, and most bytes a writer
/// gathers from its queue into one stream write.
pub const WRITE_BATCH: usize = 64 << 10;

/// Frames below this size are copied into the lane's batch; larger ones are handed on as they
/// are (a chunk's payload is never copied).
const COPY_BELOW: usize = 4 << 10;

/// Most bytes a reader takes from its stream at once.
pub const READ_BATCH: usize = 64 << 10;

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

/// [`read_error`] for a stream read through `AsyncRead`, which wraps quinn's error.
fn io_read_error(e: std::io::Error) -> String {
    let shown = e.to_string();
    match e
        .into_inner()
        .map(|inner| inner.downcast::<quinn::ReadError>())
    {
        Some(Ok(e)) => read_error(quinn::ReadExactError::ReadError(*e)),
        _ => shown,
    }
}

/// A frame to write: its head, and a chunk payload sent from where it already is.
type Frame = (Bytes, Option<Bytes>);

/// Sending half: the engine's [`MessageTx`].
pub struct LaneTx {
    lanes: Vec<mpsc::Sender<Frame>>,
    /// Small frames not yet handed to each lane's writer.
    pending: Vec<BytesMut>,
    next: usize,
    bytes: Arc<AtomicU64>,
    error: FirstError,
}

/// Receiving half: the engine's [`MessageRx`].
pub struct LaneRx {
    lanes: Vec<Lane>,
    next: usize,
    bytes: Arc<AtomicU64>,
    error: FirstError,
}

/// A batch of frames one reader parsed from one read, in order; an error ends the lane.
type Batch = Vec<Result<Message, TransportError>>;

/// The receiving end of one lane: its channel and the rest of the batch being consumed.
struct Lane {
    batches: mpsc::Receiver<Batch>,
    current: std::vec::IntoIter<Result<Message, TransportError>>,
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
        self.send_frame((frame, None))?;
        self.flush()
    }

    /// Queues one frame on the next lane, batching it if it is small.
    fn send_frame(&mut self, (head, payload): Frame) -> Result<(), TransportError> {
        let lane = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        let len = head.len() + payload.as_ref().map_or(0, Bytes::len);
        if len >= COPY_BELOW {
            self.hand_on(lane)?;
            return self.lanes[lane]
                .blocking_send((head, payload))
                .map_err(|_| self.error.to_transport());
        }
        let buf = &mut self.pending[lane];
        buf.extend_from_slice(&head);
        if let Some(p) = payload {
            buf.extend_from_slice(&p);
        }
        if buf.len() >= WRITE_BATCH {
            self.hand_on(lane)?;
        }
        Ok(())
    }

    /// Passes lane `i`'s batched frames to its writer.
    fn hand_on(&mut self, i: usize) -> Result<(), TransportError> {
        if self.pending[i].is_empty() {
            return Ok(());
        }
        let batch = self.pending[i].split().freeze();
        self.lanes[i]
            .blocking_send((batch, None))
            .map_err(|_| self.error.to_transport())
    }
}

impl MessageTx for LaneTx {
    fn send(&mut self, msg: Message) -> Result<(), TransportError> {
        let streaming = matches!(
            msg,
            Message::Entry(_) | Message::Chunk(_) | Message::Want(_)
        );
        let frame = msg.encode_frame_parts();
        let len = (frame.0.len() + frame.1.as_ref().map_or(0, Bytes::len)) as u64;
        self.send_frame(frame)?;
        self.bytes.fetch_add(len, Ordering::Relaxed);
        if !streaming {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        (0..self.lanes.len()).try_for_each(|i| self.hand_on(i))
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
        loop {
            if let Some(item) = lane.current.next() {
                return item;
            }
            match lane.batches.blocking_recv() {
                Some(batch) => lane.current = batch.into_iter(),
                None => return Err(self.error.to_transport()),
            }
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
            let mut parts = Vec::new();
            while let Some(first) = rx.recv().await {
                gather(first, &mut rx, &mut parts);
                let written = stream.write_all_chunks(&mut parts).await;
                parts.clear();
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
        rx_lanes.push(Lane {
            batches: rx,
            current: Vec::new().into_iter(),
        });
        let error = error.clone();
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut reader = FrameReader::default();
            loop {
                let (batch, bytes, end) = reader.next_batch(&mut stream, &limits).await;
                received.fetch_add(bytes, Ordering::Relaxed);
                let failed = batch.last().is_some_and(|r| r.is_err());
                if let Some(Err(TransportError::Other(why))) = batch.last() {
                    error.set(why.clone());
                }
                if (!batch.is_empty() && tx.send(batch).await.is_err()) || failed || end {
                    return;
                }
            }
        }));
    }
    (
        LaneTx {
            pending: vec![BytesMut::new(); tx_lanes.len()],
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

/// Moves `first` and every frame already queued behind it (up to [`WRITE_BATCH`] bytes) into
/// `parts`, for one stream write (QUIC takes the buffers as they are).
fn gather(first: Frame, queue: &mut mpsc::Receiver<Frame>, parts: &mut Vec<Bytes>) {
    let mut total = 0;
    let mut next = Some(first);
    while let Some((head, payload)) = next.take() {
        for piece in std::iter::once(head).chain(payload) {
            total += piece.len();
            parts.push(piece);
        }
        if total < WRITE_BATCH {
            next = queue.try_recv().ok();
        }
    }
}

/// Cuts a lane's byte stream into frames, reading up to [`READ_BATCH`] bytes at a time.
#[derive(Default)]
pub struct FrameReader {
    buf: BytesMut,
    ended: bool,
}

impl FrameReader {
    /// The frames that arrived with the next read, and their bytes on the wire. The flag is
    /// true when the lane is over: cleanly finished between frames, or with the error that
    /// ends the batch.
    pub async fn next_batch(
        &mut self,
        stream: &mut RecvStream,
        limits: &Limits,
    ) -> (Batch, u64, bool) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        loop {
            match self.parse(limits) {
                Ok(Some((msg, len))) => {
                    batch.push(Ok(msg));
                    bytes += len;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    batch.push(Err(e));
                    return (batch, bytes, true);
                }
            }
            if !batch.is_empty() {
                return (batch, bytes, false);
            }
            if self.ended {
                if !self.buf.is_empty() {
                    let e = quinn::ReadExactError::FinishedEarly(self.buf.len());
                    batch.push(Err(TransportError::Malformed(read_error(e))));
                }
                // A lane that ends cleanly: the peer has nothing more to say.
                return (batch, bytes, true);
            }
            // `read_buf` fills spare capacity as it is, without zeroing it first.
            self.buf.reserve(READ_BATCH);
            match tokio::io::AsyncReadExt::read_buf(stream, &mut self.buf).await {
                Ok(0) => self.ended = true,
                Ok(_) => {}
                Err(e) => {
                    batch.push(Err(TransportError::Other(io_read_error(e))));
                    return (batch, bytes, true);
                }
            }
        }
    }

    /// The next whole frame in the buffer and its length on the wire, if there is one.
    fn parse(&mut self, limits: &Limits) -> Result<Option<(Message, u64)>, TransportError> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let n = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(TransportError::Malformed(format!(
                "frame of {n} bytes (limit {MAX_FRAME})"
            )));
        }
        if self.buf.len() < 4 + n {
            self.buf.reserve(4 + n - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(4 + n);
        let body = frame.split_off(4).freeze();
        let msg = Message::decode_frame(&body, limits)
            .map_err(|e| TransportError::Malformed(e.to_string()))?;
        Ok(Some((msg, 4 + n as u64)))
    }
}
