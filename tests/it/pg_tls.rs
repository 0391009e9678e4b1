//! `sslmode` in `outbox.url` means what it means to libpq, against the real
//! PostgreSQL of the test run, and a plain-text connection is always warned about
//! (loopback included). The TLS cases need a server with `ssl = on` (Debian's
//! default, with its self-signed "snakeoil" certificate); they are skipped, saying
//! so, where it is off.

use std::sync::{Arc, Mutex};

use midas_worker::outbox::postgres::connect_reporting;
use midas_worker::secret::SecretUrl;

use crate::common::pg::admin_url;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The admin URL with `params` added to its query.
fn with(params: &str) -> SecretUrl {
    let base = admin_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    SecretUrl::new(format!("{base}{sep}{params}"))
}

/// Connect with `params`; whether it is encrypted (as the server sees it) and
/// what was logged at warn, or the error.
async fn try_connect(params: &str) -> Result<(bool, String), String> {
    let buf = Buf::default();
    let out = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || out.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let (client, encrypted) = connect_reporting(&with(params))
        .await
        .map_err(|e| e.to_string())?;
    let server_says: bool = client
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    assert_eq!(encrypted, server_says, "{params}: reported vs pg_stat_ssl");
    let log =
        String::from_utf8_lossy(&buf.0.lock().map(|v| v.clone()).unwrap_or_default()).into_owned();
    Ok((encrypted, log))
}

async fn server_ssl() -> (bool, Option<String>) {
    let (c, _) = connect_reporting(&with("sslmode=disable"))
        .await
        .expect("connect");
    let on: String = c.query_one("SHOW ssl", &[]).await.expect("show").get(0);
    let cert: String = c
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .expect("show")
        .get(0);
    let readable = std::fs::read(&cert).is_ok().then_some(cert);
    (on == "on", readable)
}

#[tokio::test]
async fn sslmode_means_what_libpq_means_and_plain_text_is_warned() {
    let (ssl_on, cert) = server_ssl().await;
    // disable: plain text, warned although the server is on this host
    let (encrypted, log) = try_connect("sslmode=disable").await.expect("disable");
    assert!(!encrypted);
    assert!(log.contains("plain text"), "no warning: {log:?}");
    if !ssl_on {
        eprintln!("PostgreSQL has ssl = off: only sslmode=disable/prefer are checked");
        let (encrypted, log) = try_connect("sslmode=prefer").await.expect("prefer");
        assert!(!encrypted && log.contains("plain text"), "{log:?}");
        return;
    }
    // prefer (also the default) and require: encrypted, certificate not checked
    // (the server's is self-signed), nothing to warn about
    for params in ["sslmode=prefer", "application_name=t", "sslmode=require"] {
        let (encrypted, log) = try_connect(params).await.expect(params);
        assert!(encrypted, "{params}");
        assert!(!log.contains("plain text"), "{params}: {log}");
    }
    // verify-full against the system's roots: a self-signed certificate is refused
    let e = try_connect("sslmode=verify-full").await.unwrap_err();
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("TLS"),
        "{e}"
    );
    let Some(cert) = cert else {
        eprintln!("the server's certificate file is not readable here: verify-ca not checked");
        return;
    };
    // trusting the server's own certificate: verify-ca accepts it whatever name it
    // was made for; verify-full checks the name too (it is not 127.0.0.1's)
    let root = format!("sslrootcert={}", cert.replace('/', "%2F"));
    let (encrypted, _) = try_connect(&format!("sslmode=verify-ca&{root}"))
        .await
        .expect("verify-ca with the server's certificate as root");
    assert!(encrypted);
    if admin_url().contains("@127.0.0.1") {
        let e = try_connect(&format!("sslmode=verify-full&{root}"))
            .await
            .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
    }
}
