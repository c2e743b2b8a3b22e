//! QUIC endpoints tuned for bulk transfer.
//!
//! Defaults that matter on real hosts: UDP socket buffers of a few MiB (the kernel's default
//! ~200 KiB drops bursts even on loopback, which QUIC reads as congestion), flow-control
//! windows large enough for a fast link with some latency, GSO on (quinn's default, kept
//! explicit), keep-alives well inside the idle timeout so a quiet but healthy peer is never
//! dropped while a vanished one is noticed within the timeout.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use super::closing::{Endpoint, GatedCubic};
use super::identity::Identity;
use super::socket::{BoundedGso, MAX_DATAGRAM};
use super::tls;

/// UDP socket buffer size asked for (the kernel may cap it without privileges).
const SOCKET_BUFFER: usize = 8 << 20;
/// The receive buffer (as the kernel reports it, twice what was granted) from which this
/// endpoint accepts datagrams larger than Ethernet's.
const BIG_DATAGRAM_BUFFER: usize = 4 << 20;
/// Flow-control window of one stream (lane). Small on purpose: it bounds what a lane can
/// have in flight and, after losses, the out-of-order data its reassembly buffer holds.
/// quinn gives up on a stream with more than 1024 gaps there ("too many gaps in stream
/// buffer"), which 16 MiB and even 4 MiB windows reached on loopback while a receiver was busy
/// with a million-file destination; 1 MiB lanes also carry more (633 vs 376 MB/s on
/// loopback: less queueing, fewer drops at the socket).
const STREAM_WINDOW: u32 = 1 << 20;
/// Flow-control window of a connection (all lanes): 8 MiB in flight is ~80 MB/s at 100 ms
/// RTT, far more on a LAN.
const CONNECTION_WINDOW: u32 = 8 << 20;

/// Connection settings shared by client and server.
#[derive(Clone, Copy, Debug)]
pub struct NetOptions {
    /// A peer silent for this long is gone (`--timeout`).
    pub idle_timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Settings of every connection of one endpoint; `closing` is the endpoint's flag that lets
/// its connections' closes out past a full congestion window ([`closing`](super::closing)),
/// `bulk` whether this end searches for large datagrams ([`Bulk::probes`]).
fn transport_config(
    opts: &NetOptions,
    closing: Arc<AtomicBool>,
    bulk: Bulk,
) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(opts.idle_timeout)
        .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(10_000)));
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(
            (opts.idle_timeout / 3).max(Duration::from_millis(100)),
        ))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(64))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .enable_segmentation_offload(true)
        .mtu_discovery_config(bulk.probes().then(mtu_discovery))
        .congestion_controller_factory(Arc::new(GatedCubic::new(closing)));
    Arc::new(t)
}

/// Path MTU discovery of one size, the largest UDP datagram, above quinn's safe 1,452 bytes.
/// Where the path carries it (loopback, the case that matters for a sync between two
/// containers or volumes on one host), 45 times fewer packets cost far less CPU per byte at
/// both ends: QUIC's work is mostly per packet. `minimum_change` above half the range makes
/// quinn's binary search probe that one size and stop, so a connection spends one 64 KB
/// probe, not the dozen of a full search (1.5 MB on the wire, measured), and only in the
/// direction that carries the data ([`Bulk`]).
/// Elsewhere the probe fails in `sendmsg` (larger than the interface: nothing is sent) or
/// is lost, and the path stays at 1,452 bytes, as before. Jumbo-frame LANs (9,000) are not
/// searched for; that would take the interface's MTU as the bound.
fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut m = MtuDiscoveryConfig::default();
    m.upper_bound(MAX_DATAGRAM)
        .minimum_change(MAX_DATAGRAM / 2 + 1000);
    m
}

/// A UDP socket with large buffers. Root may exceed the sysctl caps (`*BUFFORCE`).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use rustix::net::sockopt;
    let socket = UdpSocket::bind(addr)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
    }
    tracing::debug!(
        recv = sockopt::socket_recv_buffer_size(&socket).unwrap_or(0),
        send = sockopt::socket_send_buffer_size(&socket).unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket)
}

/// The largest datagram this endpoint tells peers it accepts (the peer's path MTU discovery
/// stops there): the largest there is when the socket's receive buffer holds a few MiB of
/// them, else quinn's 1,472 bytes. Without privileges the kernel caps the buffer at
/// `net.core.rmem_max` (~200 KiB by default), which holds three 64 KB datagrams: a burst of
/// them would be dropped and read as congestion.
fn accepted_datagram(socket: &UdpSocket) -> u16 {
    let buffer = rustix::net::sockopt::socket_recv_buffer_size(socket).unwrap_or(0);
    if buffer >= BIG_DATAGRAM_BUFFER {
        MAX_DATAGRAM
    } else {
        ETHERNET_DATAGRAM
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// Which way a client endpoint's connection carries its bulk. Path MTU discovery is worth
/// its 64 KB probe only for the direction that carries data; the other carries
/// acknowledgements and short replies, which fit in any datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bulk {
    /// From the client (a push, a bench): the client probes for large datagrams; the server
    /// is told to keep to Ethernet's 1,472 bytes, so it never sends a 64 KB probe.
    Upstream,
    /// From the server (a pull): the client tells the server it accepts large datagrams
    /// ([`accepted_datagram`]) and does not probe its own direction.
    Downstream,
    /// Either way (the deployer's agent calls): both ends probe.
    Both,
}

impl Bulk {
    /// Whether this end searches for datagrams above quinn's first 1,200 bytes.
    fn probes(self) -> bool {
        self != Bulk::Downstream
    }

    /// The largest datagram this end tells its peer it accepts.
    fn accepted(self, socket: &UdpSocket) -> u16 {
        match self {
            Bulk::Downstream | Bulk::Both => accepted_datagram(socket),
            Bulk::Upstream => ETHERNET_DATAGRAM,
        }
    }
}

/// The largest UDP payload QUIC's peers may assume without asking (quinn's default).
const ETHERNET_DATAGRAM: u16 = 1472;

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    closing: Arc<AtomicBool>,
    bulk: Bulk,
) -> Result<Endpoint, EndpointError> {
    let bind = |source| EndpointError::Bind { addr, source };
    let socket = udp_socket(addr).map_err(bind)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| bind(std::io::Error::other("no async runtime")))?;
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(bulk.accepted(&socket))
        .expect("within QUIC's bounds");
    let socket = Arc::new(BoundedGso(runtime.wrap_udp_socket(socket).map_err(bind)?));
    let inner =
        quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime).map_err(bind)?;
    Ok(Endpoint::new(inner, closing))
}

/// A listening endpoint presenting `id`, speaking replicator protocol `version`.
pub fn server(
    id: &Identity,
    addr: SocketAddr,
    opts: &NetOptions,
    version: u32,
) -> Result<Endpoint, EndpointError> {
    server_with_alpn(id, addr, opts, tls::replicator_alpns(version))
}

/// A listening endpoint for any protocol named by `alpn` (the deployer's agents use this).
pub fn server_with_alpn(
    id: &Identity,
    addr: SocketAddr,
    opts: &NetOptions,
    alpn: Vec<Vec<u8>>,
) -> Result<Endpoint, EndpointError> {
    let crypto = tls::server_config(id, alpn)?;
    let closing = Arc::new(AtomicBool::new(false));
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(opts, closing.clone(), Bulk::Both));
    endpoint(addr, Some(cfg), closing, Bulk::Both)
}

/// A client endpoint on an ephemeral port of the family of `peer`, for a session whose
/// data flows as `bulk` says.
pub fn client(
    id: &Identity,
    peer: SocketAddr,
    opts: &NetOptions,
    version: u32,
    bulk: Bulk,
) -> Result<Endpoint, EndpointError> {
    client_with_alpn(id, peer, opts, tls::replicator_alpns(version), bulk)
}

/// A client endpoint offering the protocols in `alpn`.
pub fn client_with_alpn(
    id: &Identity,
    peer: SocketAddr,
    opts: &NetOptions,
    alpn: Vec<Vec<u8>>,
    bulk: Bulk,
) -> Result<Endpoint, EndpointError> {
    let local: SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let crypto = tls::client_config(id, alpn)?;
    let closing = Arc::new(AtomicBool::new(false));
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(opts, closing.clone(), bulk));
    let mut ep = endpoint(local, None, closing, bulk)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}
