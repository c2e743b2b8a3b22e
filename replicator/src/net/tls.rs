//! TLS 1.3 configurations for QUIC with pinned-fingerprint trust.
//!
//! Both sides present their self-signed certificate (mutual TLS). The verifiers here check the
//! handshake signatures — proof that the peer holds the private key of the certificate it
//! showed — but not who the peer is: that is decided right after the handshake, before any
//! data moves, by comparing the peer's fingerprint with the trust list ([`super::conn`]). Doing
//! the check there lets both sides exchange a clear message naming the fingerprint (a failed
//! TLS handshake carries only an alert code).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::identity::Identity;

/// ALPNs a replicator peer of `version` offers: its own, then the version-less one.
pub fn replicator_alpns(version: u32) -> Vec<Vec<u8>> {
    vec![
        format!("replicator/{version}").into_bytes(),
        ALPN_ANY_VERSION.to_vec(),
    ]
}

/// Offered by every version after its own: when two versions meet, the handshake settles on
/// this one and the server answers with a message naming both versions instead of a bare
/// TLS alert.
pub const ALPN_ANY_VERSION: &[u8] = b"replicator";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct SignatureOnly {
    algs: WebPkiSupportedAlgorithms,
}

impl SignatureOnly {
    fn new() -> Self {
        SignatureOnly {
            algs: provider().signature_verification_algorithms,
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SignatureOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(String);

fn setup<E: std::fmt::Display>(e: E) -> TlsSetupError {
    TlsSetupError(e.to_string())
}

/// Server side: requires a client certificate; speaks the protocols in `alpn`, in order of
/// preference.
pub fn server_config(
    id: &Identity,
    alpn: Vec<Vec<u8>>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsSetupError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .with_client_cert_verifier(Arc::new(SignatureOnly::new()))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(setup)?;
    cfg.alpn_protocols = alpn;
    quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(setup)
}

/// Client side: presents our certificate; the server's is checked after the handshake.
pub fn client_config(
    id: &Identity,
    alpn: Vec<Vec<u8>>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsSetupError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SignatureOnly::new()))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(setup)?;
    cfg.alpn_protocols = alpn;
    quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(setup)
}
