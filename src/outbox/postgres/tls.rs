//! TLS to the PostgreSQL outbox, with `sslmode` meaning what it means to libpq
//! (what people who write PostgreSQL URLs know), and a warning whenever the
//! connection ends up in plain text.
//!
//! tokio-postgres knows only `disable`/`prefer`/`require` and refuses the URL for
//! `verify-ca`/`verify-full` (and for `sslrootcert`), so both are taken out of the
//! URL here ([`split`]) and applied by the worker:
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default) | when the server offers it, else plain text | no |
//! | `require` | always | no (with `sslrootcert`: as `verify-ca`, as libpq does) |
//! | `verify-ca` | always | chain to a trusted root; not the host name |
//! | `verify-full` | always | chain and host name |
//!
//! Trusted roots: the file `sslrootcert=PATH` names (PEM), else the system's.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// What the URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of the roots to trust instead of the system's.
    pub root_cert: Option<PathBuf>,
}

/// A refused URL parameter (the message names it; never the URL).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "outbox.url: sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full"
    )]
    Mode(String),
    #[error("outbox.url: sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("TLS set-up for PostgreSQL: {0}")]
    Setup(String),
}

/// The URL without `sslmode`/`sslrootcert` (for tokio-postgres), and what they
/// said. No `sslmode` means `prefer`, as with libpq.
pub fn split(url: &str) -> Result<(String, TlsParams), TlsError> {
    let mut params = TlsParams {
        mode: SslMode::Prefer,
        root_cert: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), params));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                params.mode = match percent_decode(value).as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(TlsError::Mode(other.chars().take(40).collect())),
                }
            }
            "sslrootcert" => params.root_cert = Some(PathBuf::from(percent_decode(value))),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// `%XX` escapes decoded (a path in a URL); anything malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b.get(i),
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (Some(b'%'), Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (Some(&c), _, _) => {
                out.push(c);
                i += 1;
            }
            (None, _, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rustls client config for `params` (not called for `disable`).
pub fn client_config(params: &TlsParams) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (params.mode, &params.root_cert) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(NoVerification(provider.clone()))
        }
        (SslMode::Require | SslMode::VerifyCa, root) => Arc::new(AnyName(roots(root, &provider)?)),
        (SslMode::VerifyFull, root) => roots(root, &provider)?,
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// A verifier of the chain and name against the roots in `file`, or the system's.
fn roots(
    file: &Option<PathBuf>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let Some(path) = file else {
        let v = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        return Ok(Arc::new(v));
    };
    let bad = |message: String| TlsError::RootCert {
        path: path.display().to_string(),
        message,
    };
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        store.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(v)
}

/// `verify-ca`: the inner verifier's answer, except that a certificate valid for
/// another name is accepted (the chain was verified before the name is checked).
#[derive(Debug)]
struct AnyName(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require`: encrypted, certificate not checked (as libpq: these modes
/// protect against a passive listener, not an impostor). The handshake's
/// signatures are still verified.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (url, p) = split("postgres://u:p@h/db").unwrap();
        assert_eq!(url, "postgres://u:p@h/db");
        assert_eq!(p.mode, SslMode::Prefer, "libpq's default");
        for (mode, want) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let (url, p) = split(&format!(
                "postgres://u:p@h/db?application_name=x&sslmode={mode}&sslrootcert=%2Fetc%2Fca.pem"
            ))
            .unwrap();
            assert_eq!(url, "postgres://u:p@h/db?application_name=x");
            assert_eq!(p.mode, want);
            assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        }
        let e = split("postgres://u:s3cret@h/db?sslmode=allow-ish")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn every_mode_but_disable_has_a_client_config() {
        for mode in [
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            let p = TlsParams {
                mode,
                root_cert: None,
            };
            assert!(client_config(&p).is_ok(), "{mode:?}");
        }
        let missing = TlsParams {
            mode: SslMode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
        };
        let e = client_config(&missing).unwrap_err().to_string();
        assert!(
            e.contains("sslrootcert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }
}
