//! The peer identity as an X.509 certificate, for TLS software outside the mesh.
//!
//! [`Certificate::new`] makes a self-signed certificate whose subject public key *is* the
//! node's ed25519 key, with the peer id as its common name, and exports the private key as
//! PKCS#8 (PEM or DER). [`Certificate::peer_id_of`] checks such a certificate (ed25519 key,
//! valid self-signature, inside its validity period) and returns the peer id it stands for.
//! [`server_config`] and [`client_config`] are rustls configurations for mutual TLS between
//! two such identities: each side accepts exactly the certificates that name a peer
//! (optionally one given peer), and [`peer_of`] reads the peer id back from a connection.
//!
//! ```
//! use micromesh::{Identity, auth::Certificate};
//!
//! let identity = Identity::generate();
//! let cert = Certificate::new(&identity)?;
//! assert!(cert.pem().starts_with("-----BEGIN CERTIFICATE-----"));
//! assert!(cert.private_key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
//! assert_eq!(Certificate::peer_id_of(cert.der())?, identity.peer_id());
//! # Ok::<(), micromesh::auth::CertificateError>(())
//! ```

use std::{fmt, sync::Arc};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use crate::{Identity, PeerId};

/// The DER prefix of a PKCS#8 v1 ed25519 private key (RFC 8410): the 32 secret bytes follow.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The object identifier of Ed25519 (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// Why a certificate cannot be made or does not stand for a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// rcgen could not build the certificate.
    #[error("cannot build the certificate: {0}")]
    Build(String),
    /// The bytes are not a DER X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Malformed(String),
    /// The certificate's key is not ed25519, so it names no micromesh peer.
    #[error("the certificate's key is not ed25519 (algorithm {0})")]
    NotEd25519(String),
    /// The certificate is not signed by its own key.
    #[error("the certificate is not signed by its own key")]
    Signature,
    /// The certificate is outside its validity period.
    #[error("the certificate is outside its validity period")]
    Expired,
    /// A rustls configuration could not be built.
    #[error("cannot configure TLS: {0}")]
    Tls(String),
}

/// A node's identity as a self-signed X.509 certificate and PKCS#8 private key.
#[derive(Clone)]
pub struct Certificate {
    der: CertificateDer<'static>,
    pem: String,
    key_der: Vec<u8>,
    key_pem: String,
    peer: PeerId,
}

impl Certificate {
    /// Makes the certificate of `identity`: its ed25519 key, its peer id as common name, valid
    /// from 1975 to 4096 (the identity has no expiry; grants carry the time limits).
    ///
    /// # Errors
    ///
    /// [`Error::Build`] if rcgen refuses (it does not for ed25519 keys).
    pub fn new(identity: &Identity) -> Result<Self, Error> {
        let key_der = pkcs8_of(identity);
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(key_der.clone()),
            &rcgen::PKCS_ED25519,
        )
        .map_err(|e| Error::Build(e.to_string()))?;
        let peer = identity.peer_id();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| Error::Build(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, peer.to_string());
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| Error::Build(e.to_string()))?;
        Ok(Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            key_pem: key_pair.serialize_pem(),
            key_der,
            peer,
        })
    }

    /// The certificate, DER-encoded.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The certificate, PEM-encoded.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The private key as PKCS#8 DER. Secret: anyone holding it *is* this peer.
    pub fn private_key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// The private key as PKCS#8 PEM. Secret: anyone holding it *is* this peer.
    pub fn private_key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes the private key (PKCS#8 PEM) to a new file at `path`, with owner-only
    /// permissions on Unix. Never replaces an existing file.
    ///
    /// # Errors
    ///
    /// [`identity::Error::Io`](crate::identity::Error::Io) if the file exists or cannot be
    /// written.
    pub fn save_private_key(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<(), crate::identity::Error> {
        crate::identity::write_private_file(path.as_ref(), self.key_pem.as_bytes())
    }

    /// The peer the certificate stands for.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// Checks a DER certificate made by [`Certificate::new`] (or any self-signed ed25519
    /// certificate) and returns the peer id of its key.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`], [`Error::NotEd25519`], [`Error::Signature`] or [`Error::Expired`].
    pub fn peer_id_of(der: &[u8]) -> Result<PeerId, Error> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Malformed(format!(
                "{} bytes follow the certificate",
                rest.len()
            )));
        }
        let spki = &cert.tbs_certificate.subject_pki;
        let algorithm = spki.algorithm.algorithm.to_id_string();
        if algorithm != ED25519_OID {
            return Err(Error::NotEd25519(algorithm));
        }
        let key: [u8; 32] = spki
            .subject_public_key
            .data
            .as_ref()
            .try_into()
            .map_err(|_| Error::Malformed("an ed25519 key is 32 bytes".into()))?;
        if cert.signature_algorithm.algorithm.to_id_string() != ED25519_OID {
            return Err(Error::Signature);
        }
        let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key)
            .map_err(|e| Error::Malformed(format!("invalid ed25519 key: {e}")))?;
        if !public.verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data) {
            return Err(Error::Signature);
        }
        if !cert.validity().is_valid() {
            return Err(Error::Expired);
        }
        Ok(libp2p::identity::PublicKey::from(public).to_peer_id())
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The identity's secret key as PKCS#8 DER.
fn pkcs8_of(identity: &Identity) -> Vec<u8> {
    let keypair = identity
        .keypair()
        .clone()
        .try_into_ed25519()
        .expect("identities are ed25519");
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(keypair.secret().as_ref());
    der
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts exactly the certificates that stand for a peer ([`Certificate::peer_id_of`]), or
/// for one expected peer, and checks TLS 1.3 handshake signatures with their ed25519 key.
#[derive(Debug)]
struct PeerVerifier {
    expected: Option<PeerId>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: usize,
    ) -> Result<(), rustls::Error> {
        if intermediates != 0 {
            return Err(rustls::Error::General(
                "a peer certificate stands alone: no intermediates".into(),
            ));
        }
        let peer = Certificate::peer_id_of(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        match self.expected {
            Some(expected) if expected != peer => Err(rustls::Error::General(format!(
                "the certificate is of peer {peer}, expected {expected}"
            ))),
            _ => Ok(()),
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates.len())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates.len())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn key_of(certificate: &Certificate) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certificate.key_der.clone()))
}

/// A rustls server configuration presenting `identity`'s certificate and requiring a client
/// certificate that stands for a peer (for `client`, when given). TLS 1.3 only.
///
/// # Errors
///
/// [`Error::Build`] or [`Error::Tls`].
pub fn server_config(
    identity: &Identity,
    client: Option<PeerId>,
) -> Result<rustls::ServerConfig, Error> {
    let certificate = Certificate::new(identity)?;
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        expected: client,
        provider: provider.clone(),
    });
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![certificate.der.clone()], key_of(&certificate))
        .map_err(|e| Error::Tls(e.to_string()))
}

/// A rustls client configuration presenting `identity`'s certificate and accepting a server
/// certificate that stands for a peer (for `server`, when given). TLS 1.3 only; the server
/// name is not checked, the peer id is.
///
/// # Errors
///
/// [`Error::Build`] or [`Error::Tls`].
pub fn client_config(
    identity: &Identity,
    server: Option<PeerId>,
) -> Result<rustls::ClientConfig, Error> {
    let certificate = Certificate::new(identity)?;
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        expected: server,
        provider: provider.clone(),
    });
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![certificate.der.clone()], key_of(&certificate))
        .map_err(|e| Error::Tls(e.to_string()))
}

/// The peer id of the other side of a rustls connection configured by [`server_config`] or
/// [`client_config`], once its handshake is done.
pub fn peer_of(connection: &rustls::CommonState) -> Option<PeerId> {
    let certificate = connection.peer_certificates()?.first()?;
    Certificate::peer_id_of(certificate).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_and_tampered_certificates_are_refused() {
        let cert = Certificate::new(&Identity::generate()).unwrap();
        let mut tampered = cert.der().to_vec();
        // Flip a byte of the common name (inside the signed part).
        let at = tampered
            .windows(4)
            .position(|w| w == b"12D3")
            .expect("the common name holds the peer id");
        tampered[at + 10] ^= 1;
        assert_eq!(Certificate::peer_id_of(&tampered), Err(Error::Signature));
        assert!(matches!(
            Certificate::peer_id_of(b"not a certificate"),
            Err(Error::Malformed(_))
        ));
        // An ECDSA certificate (rcgen's default) names no peer.
        let ecdsa = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        assert!(matches!(
            Certificate::peer_id_of(ecdsa.cert.der()),
            Err(Error::NotEd25519(_))
        ));
    }
}
