//! Closing a connection even while its congestion window is full.
//!
//! quinn-proto 0.11.19 holds a packet back when the bytes in flight plus one full datagram
//! would exceed the congestion window, and it judges by the stream data still queued, even
//! once the connection is closed and the packet it would build holds only ACKs and
//! CONNECTION_CLOSE. A closed connection processes no more ACKs, so the window never opens:
//! the close never leaves, and the peer learns of it only from its idle timeout or a
//! stateless reset ("connection reset" instead of the refusal it should read). Upstream
//! fixed this after that release (quinn-rs/quinn#2785).
//!
//! Large datagrams make it the common case: one 49 KB path MTU probe in flight is more than
//! the initial 14.7 KB window, so a server refusing a client right after the handshake never
//! got its reason out. Here every connection's congestion controller is Cubic behind a gate
//! that stops limiting once the connection, or its whole endpoint, is closing: [`close`]
//! and [`Endpoint::close`] open it before they close.

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn::{Connection, VarInt};

/// Builds each connection's controller: Cubic, gated by the connection's own flag and by
/// the endpoint's.
pub(super) struct GatedCubic {
    cubic: Arc<CubicConfig>,
    endpoint_closing: Arc<AtomicBool>,
}

impl GatedCubic {
    pub(super) fn new(endpoint_closing: Arc<AtomicBool>) -> Self {
        GatedCubic {
            cubic: Arc::new(CubicConfig::default()),
            endpoint_closing,
        }
    }
}

impl ControllerFactory for GatedCubic {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Gated {
            inner: self.cubic.clone().build(now, current_mtu),
            closing: Arc::new(AtomicBool::new(false)),
            endpoint_closing: self.endpoint_closing.clone(),
        })
    }
}

/// One connection's controller. Its clones (what `Connection::congestion_state` returns)
/// share the flags, which is how [`close`] reaches the live one.
struct Gated {
    inner: Box<dyn Controller>,
    closing: Arc<AtomicBool>,
    endpoint_closing: Arc<AtomicBool>,
}

impl Gated {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.endpoint_closing.load(Ordering::Acquire)
    }
}

impl Controller for Gated {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    /// Unlimited once closing: a closing connection sends only ACKs and its close. (Above
    /// `u32::MAX` quinn's pacer stands aside too.)
    fn window(&self) -> u64 {
        if self.is_closing() {
            u64::MAX
        } else {
            self.inner.window()
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Gated {
            inner: self.inner.clone_box(),
            closing: self.closing.clone(),
            endpoint_closing: self.endpoint_closing.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Closes `conn` so that its CONNECTION_CLOSE leaves even when the window is full. Use it
/// instead of `Connection::close`.
pub fn close(conn: &Connection, code: VarInt, reason: &[u8]) {
    if let Ok(gated) = conn.congestion_state().into_any().downcast::<Gated>() {
        gated.closing.store(true, Ordering::Release);
    }
    conn.close(code, reason);
}

/// A quinn endpoint whose [`close`](Endpoint::close) gets every connection's close out.
/// Everything else is quinn's, through `Deref`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    closing: Arc<AtomicBool>,
}

impl Endpoint {
    pub(super) fn new(inner: quinn::Endpoint, closing: Arc<AtomicBool>) -> Self {
        Endpoint { inner, closing }
    }

    /// Closes every connection of the endpoint, as [`close`] closes one.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.closing.store(true, Ordering::Release);
        self.inner.close(code, reason);
    }
}

impl Deref for Endpoint {
    type Target = quinn::Endpoint;

    fn deref(&self) -> &quinn::Endpoint {
        &self.inner
    }
}

impl DerefMut for Endpoint {
    fn deref_mut(&mut self) -> &mut quinn::Endpoint {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gated() -> (Box<dyn Controller>, Arc<AtomicBool>) {
        let endpoint = Arc::new(AtomicBool::new(false));
        let factory = Arc::new(GatedCubic::new(endpoint.clone()));
        (factory.build(Instant::now(), 1200), endpoint)
    }

    #[test]
    fn the_window_is_cubics_until_closing() {
        let (c, _) = gated();
        let cubic = Arc::new(CubicConfig::default()).build(Instant::now(), 1200);
        assert_eq!(c.window(), cubic.window());
        assert_eq!(c.initial_window(), cubic.initial_window());
        let gate = c.clone_box().into_any().downcast::<Gated>().expect("gated");
        gate.closing.store(true, Ordering::Release);
        assert_eq!(c.window(), u64::MAX, "a clone's flag is the live one's");
    }

    #[test]
    fn an_endpoint_closing_opens_every_connection() {
        let (a, endpoint) = gated();
        let b = Arc::new(GatedCubic::new(endpoint.clone())).build(Instant::now(), 1200);
        endpoint.store(true, Ordering::Release);
        assert_eq!((a.window(), b.window()), (u64::MAX, u64::MAX));
    }

    #[test]
    fn congestion_still_shrinks_the_window_before_closing() {
        let (mut c, _) = gated();
        let before = c.window();
        let now = Instant::now();
        c.on_congestion_event(now, now, false, 1200);
        assert!(c.window() < before, "{} < {before}", c.window());
    }
}
