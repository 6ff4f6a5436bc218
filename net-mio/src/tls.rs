//! TLS 1.3 for every connection, and the key pair that is a node's identity.
//!
//! Each node (tracker or client) holds an ECDSA P-256 key pair and presents
//! a self-signed certificate for it; both ends of every connection present
//! one (mutual TLS). The verifiers here check only what TLS itself must: that
//! the certificate parses and that the other end signed the handshake with
//! its key. Who that key belongs to is not decided here: the driver reports
//! the key's [`KeyId`] to the core, which knows which id may be tracker 2 or
//! the sharer a downloader was sent to (see `shoal_core::identity`).

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use shoal_core::identity::KeyId;
use thiserror::Error;

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
    #[error("{path}: not a PKCS#8 ECDSA P-256 key ({error})")]
    BadKey { path: String, error: String },
    #[error("cannot make a key pair: {0}")]
    Generate(String),
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// A node's key pair, its certificate, and its id (the SHA-256 of the
/// public key).
pub struct Identity {
    key: PrivatePkcs8KeyDer<'static>,
    cert: CertificateDer<'static>,
    id: KeyId,
}

impl Identity {
    /// A fresh key pair, kept in memory only (a client's: its key is bound to
    /// its session, which ends with the process).
    pub fn ephemeral() -> Result<Identity, IdentityError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Identity::from_pair(pair)
    }

    /// The key pair kept at `path` (PKCS#8 DER), made there on first use
    /// (readable by its owner only).
    pub fn load_or_create(path: &Path) -> Result<Identity, IdentityError> {
        let shown = path.display().to_string();
        let io_err = |error| IdentityError::Io { path: shown.clone(), error };
        match fs::File::open(path) {
            Ok(f) => {
                use std::io::Read;
                let mut der = Vec::new();
                f.take(MAX_KEY_FILE).read_to_end(&mut der).map_err(io_err)?;
                let key = PrivatePkcs8KeyDer::from(der);
                let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| IdentityError::BadKey { path: shown.clone(), error: e.to_string() })?;
                Identity::from_pair(pair)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| IdentityError::Generate(e.to_string()))?;
                write_private(path, &pair.serialize_der()).map_err(io_err)?;
                Identity::from_pair(pair)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn from_pair(pair: rcgen::KeyPair) -> Result<Identity, IdentityError> {
        let id = KeyId::of_public_key(&pair.public_key_der());
        let params = rcgen::CertificateParams::new(vec!["shoal".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params.self_signed(&pair).map_err(|e| IdentityError::Generate(e.to_string()))?;
        Ok(Identity { key: PrivatePkcs8KeyDer::from(pair.serialize_der()), cert: cert.der().clone(), id })
    }

    /// Who this node is.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The configuration for connections this node accepts: TLS 1.3, the
    /// other end must present a key too.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        self.server(false)
    }

    /// The configuration for connections this node opens.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        self.client(false)
    }

    /// [`Identity::server_config`] for bulk peer connections: its secrets may
    /// leave rustls once the handshake is done ([`crate::records`]), and it
    /// sends no session tickets (nothing but records follows the handshake).
    pub fn peer_server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        self.server(true)
    }

    /// [`Identity::client_config`] for bulk peer connections (no resumption:
    /// every connection proves its key afresh).
    pub fn peer_client_config(&self) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        self.client(true)
    }

    fn server(&self, bulk: bool) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let provider = provider();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AnyKey(provider)))
            .with_single_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        if bulk {
            cfg.enable_secret_extraction = true;
            cfg.send_tls13_tickets = 0;
        }
        Ok(Arc::new(cfg))
    }

    fn client(&self, bulk: bool) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let provider = provider();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyKey(provider)))
            .with_client_auth_cert(vec![self.cert.clone()], PrivateKeyDer::Pkcs8(self.key.clone_key()))
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        if bulk {
            cfg.enable_secret_extraction = true;
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(cfg))
    }
}

/// ring, with AES-128-GCM preferred: ring's default puts AES-256-GCM first,
/// whose 14 rounds to AES-128's 10 cost the bulk transfer (both ends choose
/// it, as both run shoal); 128-bit keys are TLS 1.3's mandatory suite.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Writes `bytes` to a new file at `path` that only its owner can read,
/// through a temporary name, so a crash never leaves half a key.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// The key id of the certificate the other end presented.
pub fn peer_key(certs: Option<&[CertificateDer<'_>]>) -> Option<KeyId> {
    let cert = certs?.first()?;
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(KeyId::of_public_key(ee.subject_public_key_info().as_ref()))
}

/// A blocking TLS stream (tests and tools).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Opens a blocking TLS connection to `addr` with `identity`'s key and
/// completes the handshake: the stream, and the key the other end proved.
pub fn connect_blocking(
    addr: std::net::SocketAddr,
    identity: &Identity,
    timeout: std::time::Duration,
) -> io::Result<(TlsStream, KeyId)> {
    let sock = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let cfg = identity.client_config().map_err(|e| io::Error::other(e.to_string()))?;
    let conn = rustls::ClientConnection::new(cfg, server_name()).map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    let key = peer_key(s.conn.peer_certificates()).ok_or_else(|| io::Error::other("no usable certificate"))?;
    Ok((s, key))
}

/// The server name a client sends (trackers and peers are known by key, not
/// by name; TLS wants one).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("shoal").expect("a valid DNS name")
}

/// Accepts any well-formed certificate whose key signed the handshake: the
/// core decides whether that key is the one it expects.
#[derive(Debug)]
struct AnyKey(Arc<CryptoProvider>);

impl AnyKey {
    fn check_cert(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        webpki::EndEntityCert::try_from(cert)
            .map(|_| ())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn tls13(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for AnyKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        AnyKey::check_cert(end_entity).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(msg, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for AnyKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        AnyKey::check_cert(end_entity).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(msg, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// What a fuzzer (or a test) feeds in as a peer would: `data[0]` picks the
/// door. Even: the rest is what arrives on an accepted connection before and
/// during its TLS handshake, in pieces whose sizes the following bytes set.
/// Odd: the rest is a certificate a peer presents, parsed for its key. No
/// panic, and a handshake never completes without a certificate whose key
/// signed it.
#[doc(hidden)]
pub fn fuzz_peer_input(data: &[u8]) {
    static SERVER: std::sync::OnceLock<Arc<rustls::ServerConfig>> = std::sync::OnceLock::new();
    let Some((&door, rest)) = data.split_first() else { return };
    if door % 2 == 1 {
        let cert = CertificateDer::from(rest.to_vec());
        let key = peer_key(Some(std::slice::from_ref(&cert)));
        if key.is_some() {
            assert!(AnyKey::check_cert(&cert).is_ok(), "a key from a certificate the verifier refuses");
        }
        return;
    }
    let cfg = SERVER.get_or_init(|| {
        let me = Identity::ephemeral().expect("a key pair");
        me.server_config().expect("a server configuration")
    });
    let Ok(mut conn) = rustls::ServerConnection::new(cfg.clone()) else { return };
    let mut input = rest;
    while !input.is_empty() {
        let n = (input[0] as usize % 64 + 1) * 64;
        let (piece, more) = input[1..].split_at(n.min(input.len() - 1));
        input = more;
        let mut r = piece;
        while !r.is_empty() {
            match conn.read_tls(&mut r) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                return;
            }
        }
        let mut sink = Vec::new();
        let _ = conn.write_tls(&mut sink);
    }
    assert!(conn.is_handshaking(), "a handshake completed from bytes no key signed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz body over a real ClientHello (whole, cut, and corrupted) and
    /// a real certificate (whole and cut).
    #[test]
    fn handshake_and_certificate_input_never_panics() {
        let me = Identity::ephemeral().unwrap();
        let mut client = rustls::ClientConnection::new(me.client_config().unwrap(), server_name()).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let cert = me.cert.to_vec();
        assert_eq!(peer_key(Some(std::slice::from_ref(&me.cert))), Some(me.id()));
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for cut in [0, 1, 5, hello.len() / 2, hello.len()] {
            inputs.push([&[0u8, 63][..], &hello[..cut]].concat());
            inputs.push([&[1u8][..], &cert[..cut.min(cert.len())]].concat());
        }
        for i in (0..hello.len()).step_by(7) {
            let mut h = hello.clone();
            h[i] ^= 0x5a;
            inputs.push([&[2u8, 0][..], &h].concat());
            let mut c = cert.clone();
            c[i % cert.len()] ^= 0x5a;
            inputs.push([&[3u8][..], &c].concat());
        }
        for input in inputs {
            fuzz_peer_input(&input);
        }
    }
}
