//! Logs and metrics.

use std::{
    io::IsTerminal,
    net::{IpAddr, SocketAddr, TcpListener},
    sync::OnceLock,
};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info`.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ],
            )
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding binary's own).
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The addresses an `admin_listen` value names: one (`127.0.0.1:9091`) or a
/// range of ports (`127.0.0.1:9091-9099`), tried in order. `None` if invalid.
pub fn listen_candidates(address: &str) -> Option<Vec<SocketAddr>> {
    if let Ok(single) = address.parse::<SocketAddr>() {
        return Some(vec![single]);
    }
    let (host, ports) = address.rsplit_once(':')?;
    let (first, last) = ports.split_once('-')?;
    let (first, last): (u16, u16) = (first.parse().ok()?, last.parse().ok()?);
    let ip: IpAddr = host.trim_matches(['[', ']']).parse().ok()?;
    (first > 0 && first <= last).then(|| {
        (first..=last)
            .map(|port| SocketAddr::new(ip, port))
            .collect()
    })
}

/// Serves `GET /metrics` on its own listener, on the first address of
/// `address` that is free (see [`listen_candidates`]); returns the bound port.
pub fn serve_metrics(address: &str) -> anyhow::Result<u16> {
    let candidates = listen_candidates(address)
        .with_context(|| format!("{address} is not an address or a range (admin_listen)"))?;
    let listener = candidates
        .iter()
        .find_map(|candidate| TcpListener::bind(candidate).ok())
        .with_context(|| format!("cannot listen on {address}: in use (admin_listen)"))?;
    let port = listener.local_addr()?.port();
    let handle = metrics_handle();
    let server = HttpServer::new(move || {
        App::new().route(
            "/metrics",
            web::get().to(move || async move {
                HttpResponse::Ok()
                    .content_type("text/plain; version=0.0.4")
                    .body(handle.render())
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    tokio::spawn(server);
    Ok(port)
}

/// Database pool usage, as gauges labelled by process.
pub fn record_pool(process: &'static str, pool: &sqlx::PgPool) {
    record_pools(process, std::iter::once(pool));
}

/// [`record_pool`] over several pools of one process, summed.
pub fn record_pools<'p>(process: &'static str, pools: impl Iterator<Item = &'p sqlx::PgPool>) {
    let (size, idle) = pools.fold((0.0, 0.0), |(size, idle), pool| {
        (size + f64::from(pool.size()), idle + pool.num_idle() as f64)
    });
    metrics::gauge!("hookbox_db_pool_connections", "process" => process, "state" => "idle")
        .set(idle);
    metrics::gauge!("hookbox_db_pool_connections", "process" => process, "state" => "in_use")
        .set(size - idle);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_address_is_one_address_or_a_range_of_ports() {
        assert_eq!(listen_candidates("127.0.0.1:9091").unwrap().len(), 1);
        let range = listen_candidates("127.0.0.1:9091-9099").unwrap();
        assert_eq!(range.len(), 9);
        assert_eq!(range[8].port(), 9099);
        assert_eq!(listen_candidates("[::1]:9091-9092").unwrap().len(), 2);
        assert!(listen_candidates("127.0.0.1:9099-9091").is_none());
        assert!(listen_candidates("localhost:9091").is_none());
    }
}
