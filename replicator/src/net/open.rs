//! Opening a session on a connection: what the client asks for, and naming volumes.
//!
//! After the TLS handshake and the identity checks, the client sends one `Open` frame on the
//! first stream: protocol version, direction, volume name, number of lanes and the sync
//! options the sending side must use. The server answers `Accept` on the same stream, or
//! closes the connection with a [`CloseCode`] and a message saying why.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use crate::chunk::ChunkerParams;
use crate::codec::{DecodeError, Reader, Writer};
use crate::protocol::compression::Compression;

/// Default port of `replicator serve`.
pub const DEFAULT_PORT: u16 = 7700;
/// Most lanes a client may ask for.
pub const MAX_LANES: u8 = 16;
/// Longest volume name.
pub const MAX_VOLUME_NAME: usize = 128;

const OPEN: u8 = 0x20;
const ACCEPT: u8 = 0x21;

/// Why a connection was closed; sent as the QUIC application close code, with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// The session ended normally.
    Done = 0,
    /// The server does not know the client's fingerprint.
    Unauthorized = 1,
    /// The client does not trust the server's fingerprint.
    UntrustedServer = 2,
    /// The two sides speak different protocol versions.
    Version = 3,
    /// The volume is being written (or read, for a push) by another session.
    Busy = 4,
    /// Bad volume name, unknown volume, bad options.
    BadRequest = 5,
    /// The sync failed; an `Error` message said why.
    Failed = 6,
    /// The server is shutting down.
    Shutdown = 7,
}

impl CloseCode {
    pub fn from_u64(v: u64) -> Option<CloseCode> {
        use CloseCode::*;
        [
            Done,
            Unauthorized,
            UntrustedServer,
            Version,
            Busy,
            BadRequest,
            Failed,
            Shutdown,
        ]
        .into_iter()
        .find(|c| *c as u64 == v)
    }

    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

/// A volume's name on a server: letters, digits, `-`, `_`, `.`; not starting with `.`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: &str) -> Result<VolumeName, String> {
        if name.is_empty() || name.len() > MAX_VOLUME_NAME {
            return Err(format!(
                "volume name must be 1 to {MAX_VOLUME_NAME} characters"
            ));
        }
        if name.starts_with('.') {
            return Err(format!("volume name {name:?} must not start with '.'"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "volume name {name:?} has {c:?}: only letters, digits, '-', '_' and '.' are allowed"
            ));
        }
        Ok(VolumeName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which way the volume flows, seen from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The client sends its volume; the server writes it.
    Push = 0,
    /// The server sends its volume; the client writes it.
    Pull = 1,
    /// The client streams generated data; the server checks and discards it.
    Bench = 2,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Push => "push",
            Direction::Pull => "pull",
            Direction::Bench => "bench",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u32,
    pub direction: Direction,
    /// Empty for a bench session.
    pub volume: String,
    pub lanes: u8,
    /// Options for the sending side when the server sends (pull).
    pub chunker: ChunkerParams,
    pub compress: Compression,
    pub checksum: bool,
    /// The source is in use (`--live`): stale chunks end the pull unfinished, not failed.
    pub live: bool,
    /// A dry run (`--dry-run`): a push then only reads the volume, so the server takes a
    /// reader's lock and makes its receiver insist on the dry run.
    pub dry_run: bool,
}

impl Open {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(OPEN);
        w.varint(u64::from(self.version));
        w.u8(self.direction as u8);
        w.bytes(self.volume.as_bytes());
        w.u8(self.lanes);
        w.varint(u64::from(self.chunker.min));
        w.varint(u64::from(self.chunker.avg));
        w.varint(u64::from(self.chunker.max));
        let compress = match self.compress {
            Compression::Never => 0,
            Compression::Always => 1,
            Compression::Auto => 1 | 4,
        };
        w.u8(compress
            | (u8::from(self.checksum) << 1)
            | (u8::from(self.live) << 3)
            | (u8::from(self.dry_run) << 4));
        frame(w.buf)
    }

    /// Decodes the body of an `Open` frame. The version comes first so that a peer of any
    /// version can read it and name it in the refusal.
    pub fn decode(body: &[u8]) -> Result<Open, DecodeError> {
        let mut r = Reader::new(body);
        if r.u8()? != OPEN {
            return Err(DecodeError::Invalid {
                what: "open",
                why: "not an open request",
            });
        }
        let version = r.varint_max("version", u64::from(u32::MAX))? as u32;
        let direction = match r.u8()? {
            0 => Direction::Push,
            1 => Direction::Pull,
            2 => Direction::Bench,
            t => {
                return Err(DecodeError::UnknownTag {
                    what: "direction",
                    tag: u64::from(t),
                });
            }
        };
        let volume =
            String::from_utf8(r.bytes("volume name", MAX_VOLUME_NAME)?.to_vec()).map_err(|_| {
                DecodeError::Invalid {
                    what: "volume name",
                    why: "not UTF-8",
                }
            })?;
        let lanes = r.u8()?;
        let mut size = |what| r.varint_max(what, u64::from(u32::MAX)).map(|v| v as u32);
        let chunker = ChunkerParams {
            min: size("chunk min")?,
            avg: size("chunk avg")?,
            max: size("chunk max")?,
        };
        let flags = r.u8()?;
        if flags > 31 || flags & 5 == 4 {
            return Err(DecodeError::Invalid {
                what: "open",
                why: "unknown option flags",
            });
        }
        r.finish()?;
        Ok(Open {
            version,
            direction,
            volume,
            lanes,
            chunker,
            compress: match (flags & 1 != 0, flags & 4 != 0) {
                (false, _) => Compression::Never,
                (true, false) => Compression::Always,
                (true, true) => Compression::Auto,
            },
            checksum: flags & 2 != 0,
            live: flags & 8 != 0,
            dry_run: flags & 16 != 0,
        })
    }
}

/// The server's answer: how many lanes it agreed to.
pub fn encode_accept(lanes: u8) -> Vec<u8> {
    frame(vec![ACCEPT, lanes])
}

pub fn decode_accept(body: &[u8]) -> Result<u8, DecodeError> {
    match body {
        [ACCEPT, lanes] => Ok(*lanes),
        _ => Err(DecodeError::Invalid {
            what: "accept",
            why: "not an accept answer",
        }),
    }
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// `HOST:PORT/VOLUME` (or `HOST:/VOLUME` for the default port; `[v6]:PORT/VOLUME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub host: String,
    pub port: u16,
    pub volume: VolumeName,
}

impl RemoteSpec {
    /// `None` when `s` is a local path: it starts with `/` or `.`, or has no `:` before its
    /// first `/`.
    pub fn parse(s: &str) -> Option<Result<RemoteSpec, String>> {
        if s.starts_with('/') || s.starts_with('.') {
            return None;
        }
        let (addr, volume) = s.split_once('/')?;
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let (h, p) = rest.split_once(']')?;
            (h, p.strip_prefix(':')?)
        } else {
            addr.rsplit_once(':')?
        };
        Some(Self::build(host, port, volume, s))
    }

    fn build(host: &str, port: &str, volume: &str, whole: &str) -> Result<RemoteSpec, String> {
        if host.is_empty() {
            return Err(format!("{whole}: no host before ':'"));
        }
        let port = if port.is_empty() {
            DEFAULT_PORT
        } else {
            port.parse()
                .map_err(|_| format!("{whole}: {port:?} is not a port number"))?
        };
        let volume = VolumeName::new(volume).map_err(|e| format!("{whole}: {e}"))?;
        Ok(RemoteSpec {
            host: host.to_string(),
            port,
            volume,
        })
    }

    /// The text form used in trust lists and logs.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn resolve(&self) -> Result<SocketAddr, String> {
        resolve(&self.address())
    }
}

impl fmt::Display for RemoteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address(), self.volume)
    }
}

/// Resolves `host:port` to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["pg", "es-data_1", "a.b", "X9"] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn remote_specs() {
        let r = RemoteSpec::parse("10.0.0.7:7700/pg").unwrap().unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.volume.as_str()),
            ("10.0.0.7", 7700, "pg")
        );
        let r = RemoteSpec::parse("db1:/pg").unwrap().unwrap();
        assert_eq!(r.port, DEFAULT_PORT);
        let r = RemoteSpec::parse("[::1]:9/v").unwrap().unwrap();
        assert_eq!(
            (r.host.as_str(), r.address()),
            ("::1", "[::1]:9".to_string())
        );
        for local in ["/srv/a:b/c", "./x:1/y", "dir/sub", "file", "a:b"] {
            assert!(RemoteSpec::parse(local).is_none(), "{local}");
        }
        assert!(RemoteSpec::parse("h:notaport/v").unwrap().is_err());
        assert!(RemoteSpec::parse("h:1/../etc").unwrap().is_err());
    }

    #[test]
    fn open_round_trips_and_rejects_garbage() {
        let o = Open {
            version: 7,
            direction: Direction::Pull,
            volume: "pg".into(),
            lanes: 4,
            chunker: ChunkerParams::default(),
            compress: Compression::Auto,
            checksum: false,
            live: false,
            dry_run: false,
        };
        let f = o.encode();
        assert_eq!(Open::decode(&f[4..]).unwrap(), o);
        assert!(Open::decode(&f[4..f.len() - 1]).is_err());
        assert!(Open::decode(&[0x20, 1, 9]).is_err());
        let mut bad_flags = f[4..].to_vec();
        *bad_flags.last_mut().unwrap() = 0x80;
        assert!(Open::decode(&bad_flags).is_err());
        assert_eq!(decode_accept(&encode_accept(3)[4..]).unwrap(), 3);
    }
}
