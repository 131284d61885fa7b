//! Logs and metrics.

use std::{io::IsTerminal, net::TcpListener, sync::OnceLock};

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

/// Serves `GET /metrics` on its own listener; returns the bound port.
pub fn serve_metrics(address: &str) -> anyhow::Result<u16> {
    let listener = TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address} (admin_listen)"))?;
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
    let size = f64::from(pool.size());
    let idle = pool.num_idle() as f64;
    metrics::gauge!("hookbox_db_pool_connections", "process" => process, "state" => "idle")
        .set(idle);
    metrics::gauge!("hookbox_db_pool_connections", "process" => process, "state" => "in_use")
        .set(size - idle);
}
