//! hookbox: a durable inbox for incoming webhooks.
//!
//! The receiver verifies each delivery's signature over the raw bytes and
//! stores the event once under its key; the worker hands each stored event to
//! its handler exactly once, with retries and an audit row for every step.

pub mod cli;
pub mod config;
pub mod db;
pub mod duration;
pub mod event_key;
pub mod ops;
pub mod pgcluster;
pub mod probe;
pub mod receiver;
pub mod secret;
pub mod signature;
pub mod store;
pub mod telemetry;
pub mod worker;

/// Cancels `token` on SIGTERM or Ctrl-C: the one way every process is asked to stop.
pub async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("stop requested");
    token.cancel();
}
