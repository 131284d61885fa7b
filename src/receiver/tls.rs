//! Native TLS with rustls and the `ring` provider; TLS 1.3 unless the config
//! explicitly allows 1.2.

use std::{fs::File, io::BufReader, sync::Arc};

use anyhow::Context;

use crate::config::TlsSection;

pub fn server_config(tls: &TlsSection) -> anyhow::Result<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        File::open(&tls.cert_file)
            .with_context(|| format!("cannot open {}", tls.cert_file.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{} is not a PEM certificate chain", tls.cert_file.display()))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        File::open(&tls.key_file)
            .with_context(|| format!("cannot open {}", tls.key_file.display()))?,
    ))
    .with_context(|| format!("{} is not a PEM private key", tls.key_file.display()))?
    .with_context(|| format!("{} holds no private key", tls.key_file.display()))?;

    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("unsupported TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")
}
