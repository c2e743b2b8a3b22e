//! The UDP socket under quinn: GSO batches that never exceed what one `sendmsg` may carry.
//!
//! quinn hands the socket up to ten datagrams of one size in one transmit (one `sendmsg`
//! with `UDP_SEGMENT`). With datagrams past ~6.5 KB (jumbo frames, loopback) ten of them
//! exceed the 65,507 bytes one UDP send may carry: the kernel refuses with `EMSGSIZE`, and
//! quinn-udp drops that error without a word, since it takes it for a path MTU probe. Every
//! datagram of the batch was lost with no counter showing it; the congestion controller
//! backed off, the black-hole detector fell back to 1,200-byte packets. This wrapper sends
//! such a batch as several smaller ones, each of whole datagrams.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The largest UDP payload one send may carry over IPv4 (65,535 − 20 − 8); IPv6 allows
/// 65,527, so this bound holds for both. Also the largest datagram the endpoints use.
pub const MAX_DATAGRAM: u16 = 65_507;
const MAX_SEND: usize = MAX_DATAGRAM as usize;

/// Splits each GSO transmit into batches of at most [`MAX_DATAGRAM`] bytes.
pub struct BoundedGso(pub Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for BoundedGso {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoundedGso").field(&self.0).finish()
    }
}

/// The pieces `len` bytes of `segment`-sized datagrams are sent in: whole datagrams, each
/// piece at most [`MAX_DATAGRAM`] bytes (one datagram when a single one is larger).
fn pieces(len: usize, segment: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = (MAX_SEND / segment.max(1)).max(1) * segment.max(1);
    (0..len)
        .step_by(step)
        .map(move |at| at..(at + step).min(len))
}

impl AsyncUdpSocket for BoundedGso {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if transmit.contents.len() > MAX_SEND => segment,
            _ => return self.0.try_send(transmit),
        };
        let mut sent_any = false;
        for range in pieces(transmit.contents.len(), segment) {
            let contents = &transmit.contents[range];
            let piece = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                segment_size: (contents.len() > segment).then_some(segment),
                contents,
                src_ip: transmit.src_ip,
            };
            match self.0.try_send(&piece) {
                Ok(()) => sent_any = true,
                // What did not fit now is lost to quinn, which recovers it like any loss;
                // asking it to retry the whole transmit would send the first pieces twice.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && sent_any => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(len: usize, segment: usize) -> Vec<usize> {
        pieces(len, segment).map(|r| r.len()).collect()
    }

    #[test]
    fn pieces_are_whole_datagrams_within_one_send() {
        // Ten 8,952-byte datagrams: seven fit in 65,507 bytes, then the last three.
        assert_eq!(lens(89_520, 8_952), [62_664, 26_856]);
        // The last datagram of a batch may be short.
        assert_eq!(lens(9 * 8_952 + 100, 8_952), [62_664, 2 * 8_952 + 100]);
        // Datagrams of the largest size go one per send.
        assert_eq!(lens(3 * 65_507, 65_507), [65_507; 3]);
        for (len, segment) in [(89_520, 8_952), (200_000, 30_000), (14_520, 1_452)] {
            let all: Vec<_> = pieces(len, segment).collect();
            assert_eq!(all.first().map(|r| r.start), Some(0));
            assert_eq!(all.last().map(|r| r.end), Some(len));
            assert!(all.windows(2).all(|w| w[0].end == w[1].start));
            assert!(all.iter().all(|r| r.len() <= MAX_SEND));
            assert!(all.iter().all(|r| r.start % segment == 0));
        }
    }
}
