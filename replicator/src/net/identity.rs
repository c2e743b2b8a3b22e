//! Host identities and the lists of identities a host trusts.
//!
//! An identity is an Ed25519 key pair with a self-signed certificate, created on first use in
//! the identity directory (`key.pem` mode 0600, `cert.pem`). Peers know each other by the
//! *fingerprint*: the BLAKE3 hash of the certificate (DER), written as 64 hex digits. There is
//! no certificate authority: trust is a list of fingerprints (like SSH's authorized_keys), so
//! a fingerprint exchanged out of band is all an operator needs.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::codec::{from_hex, to_hex};

const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";

/// BLAKE3 of a certificate's DER encoding: the name of a peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_cert(cert: &[u8]) -> Self {
        Fingerprint(*blake3::hash(cert).as_bytes())
    }

    /// Parses 64 hex digits (upper or lower case).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(format!(
                "a fingerprint is 64 hex digits, got {} characters: {s:?}",
                s.len()
            ));
        }
        from_hex::<32>(s)
            .map(Fingerprint)
            .ok_or_else(|| format!("not a hex fingerprint: {s:?}"))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// This host's key pair and certificate.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: Fingerprint,
    pub dir: PathBuf,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
            dir: self.dir.clone(),
        }
    }
}

impl Identity {
    /// `$REPLICATOR_IDENTITY_DIR`, else `$XDG_CONFIG_HOME/replicator/identity`, else
    /// `~/.config/replicator/identity`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("REPLICATOR_IDENTITY_DIR") {
            return PathBuf::from(d);
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("/etc"));
        config.join("replicator").join("identity")
    }

    /// Loads the identity in `dir`, creating it first if the directory holds none.
    /// Returns the identity and whether it was just created.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), IdentityError> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Ok((Self::load(dir)?, false));
        }
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| {
            IdentityError::Invalid {
                path: key_path.clone(),
                why: format!("cannot generate a key: {e}"),
            }
        })?;
        let params =
            rcgen::CertificateParams::new(vec!["replicator".to_string()]).map_err(|e| {
                IdentityError::Invalid {
                    path: dir.to_path_buf(),
                    why: e.to_string(),
                }
            })?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Invalid {
                path: dir.to_path_buf(),
                why: format!("cannot sign the certificate: {e}"),
            })?;
        // The certificate first: a directory with a key always has its certificate too.
        let cert_path = dir.join(CERT_FILE);
        write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        crate::state::fsync_dir(dir).map_err(io_at(dir))?;
        Ok((Self::load(dir)?, true))
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| IdentityError::Invalid {
            path: key_path.clone(),
            why: format!("not a PEM private key: {e}"),
        })?;
        let cert =
            CertificateDer::from_pem_file(&cert_path).map_err(|e| IdentityError::Invalid {
                path: cert_path.clone(),
                why: format!("not a PEM certificate: {e}"),
            })?;
        Ok(Identity {
            fingerprint: Fingerprint::of_cert(&cert),
            cert,
            key,
            dir: dir.to_path_buf(),
        })
    }
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_at(path))?;
    f.write_all(data).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

/// A list of trusted fingerprints, read from a file: one per line, optionally followed by
/// addresses or a comment; `#` starts a comment. Used for the server's authorized clients and
/// the client's known peers.
#[derive(Clone, Debug, Default)]
pub struct TrustList {
    entries: Vec<(Fingerprint, Vec<String>)>,
}

impl TrustList {
    pub fn new() -> Self {
        TrustList::default()
    }

    pub fn add(&mut self, fp: Fingerprint) {
        self.entries.push((fp, Vec::new()));
    }

    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<TrustList, IdentityError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TrustList::new()),
            Err(e) => return Err(io_at(path)(e)),
        };
        Self::parse(&text).map_err(|why| IdentityError::Invalid {
            path: path.to_path_buf(),
            why,
        })
    }

    pub fn parse(text: &str) -> Result<TrustList, String> {
        let mut list = TrustList::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            let fp = Fingerprint::parse(first).map_err(|e| format!("line {}: {e}", n + 1))?;
            list.entries.push((fp, words.map(str::to_string).collect()));
        }
        Ok(list)
    }

    /// Trusted for any address, or for `addr` when the line names addresses.
    pub fn trusts(&self, fp: &Fingerprint, addr: Option<&str>) -> bool {
        self.entries.iter().any(|(f, addrs)| {
            f == fp && (addrs.is_empty() || addr.is_some_and(|a| addrs.iter().any(|x| x == a)))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_key_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("id");
        let (a, created) = Identity::load_or_create(&d).unwrap();
        assert!(created);
        let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = Identity::load_or_create(&d).unwrap();
        assert!(!created);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint, Fingerprint::of_cert(&b.cert));
    }

    #[test]
    fn fingerprint_round_trips_and_rejects_garbage() {
        let fp = Fingerprint([0xab; 32]);
        assert_eq!(Fingerprint::parse(&fp.to_string()).unwrap(), fp);
        assert_eq!(
            Fingerprint::parse(&fp.to_string().to_uppercase()).unwrap(),
            fp
        );
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn trust_list_comments_and_addresses() {
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let text = format!("# clients\n{a} laptop-of-ann\n\n{b} 10.0.0.7:7700  # only there\n");
        // A word after the fingerprint that is not an address still restricts: keep
        // comments behind '#'.
        let list = TrustList::parse(&text.replace(" laptop-of-ann", " # laptop")).unwrap();
        assert!(list.trusts(&a, None));
        assert!(list.trusts(&a, Some("1.2.3.4:1")));
        assert!(list.trusts(&b, Some("10.0.0.7:7700")));
        assert!(!list.trusts(&b, Some("10.0.0.8:7700")));
        assert!(!list.trusts(&Fingerprint([3; 32]), None));
        assert!(TrustList::parse("nothex\n").is_err());
    }
}
