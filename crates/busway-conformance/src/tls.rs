//! TLS in backend tests: the check that a refused certificate gives a
//! clear error, and (feature `tls`) a private CA with a `localhost`
//! certificate and a TLS-terminating relay in front of a server that
//! listens in plain text.
//!
//! The servers on the test machine listen without TLS, so a backend's TLS
//! test puts `tls_relay` in front of one: a real rustls server (the
//! certificate of `TestPki`) forwarding the decrypted stream upstream.

#[cfg(feature = "tls")]
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "tls")]
use std::sync::Arc;

use anyhow::ensure;
#[cfg(feature = "tls")]
use tokio::net::{TcpListener, TcpStream};
#[cfg(feature = "tls")]
use tokio_rustls::rustls;

#[cfg(feature = "tls")]
/// A fresh CA, and a server configuration with a certificate for
/// `localhost` signed by it.
pub struct TestPki {
    /// The CA certificate, in PEM: what a client is told to trust.
    pub ca_pem: String,
    /// A TLS server presenting the `localhost` certificate.
    pub server: rustls::ServerConfig,
}

#[cfg(feature = "tls")]
impl TestPki {
    /// Generates the CA and the server certificate.
    pub fn generate() -> anyhow::Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "busway test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate()?;
        let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
            .signed_by(&server_key, &issuer)?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server,
        })
    }
}

/// A CA certificate file, removed on drop.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub struct CaFile(std::path::PathBuf);

#[cfg(feature = "tls")]
impl CaFile {
    /// Writes `pem` (a CA certificate) to a fresh file, for a `tls_ca=PATH`
    /// URL setting.
    pub fn write(pem: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("busway-test-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, pem)?;
        Ok(Self(path))
    }

    /// Where the file is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(feature = "tls")]
impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(feature = "tls")]
/// Starts a TLS server (`server`) on a free local port that relays each
/// connection to `upstream` (`host:port`, plain TCP). Returns the port and
/// the count of TLS handshakes that completed.
pub async fn tls_relay(
    server: rustls::ServerConfig,
    upstream: String,
) -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    Ok((port, handshakes))
}

/// `error` and all its sources, joined with `: `.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Checks the error of a connection refused for its certificate: it names
/// `host`, says the certificate is the problem, and does not show `password`.
pub fn check_certificate_refusal(
    error: &(dyn std::error::Error + 'static),
    host: &str,
    password: &str,
) -> anyhow::Result<()> {
    let text = error_chain(error);
    ensure!(
        text.contains(host),
        "the error does not name {host}: {text}"
    );
    ensure!(
        !text.contains(password),
        "the error shows the password: {text}"
    );
    ensure!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "the error does not say the certificate is the problem: {text}"
    );
    Ok(())
}
