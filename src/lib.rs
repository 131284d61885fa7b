//! hookbox: a durable inbox for incoming webhooks.
//!
//! The receiver verifies each delivery's signature over the raw bytes and
//! stores the event once under its key; the worker hands each stored event to
//! its handler exactly once, with retries and an attempt row for every step.
//!
//! A binary that embeds hookbox needs only the root's types: a [`Config`], a
//! [`Worker`] and the [`Handler`]s it provides in code (see [`Worker`] for a
//! complete example). The operator tools (`cli`, `ops`, `console`,
//! `pgcluster`, `reconcile`) sit behind the default `cli` feature; embedders
//! may turn it off.

pub mod alerts;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
#[cfg(feature = "cli")]
pub mod console;
pub mod db;
pub mod duration;
pub mod event_key;
pub mod glob;
pub mod headers;
#[cfg(feature = "cli")]
pub mod ops;
#[cfg(feature = "cli")]
pub mod pgcluster;
pub mod probe;
pub mod receiver;
#[cfg(feature = "cli")]
pub mod reconcile;
pub mod secret;
pub mod signature;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use async_trait::async_trait;
pub use config::Config;
pub use status::{AttemptOutcome, DeliveryOutcome, EventStatus};
pub use worker::{Event, ExternalHandler, Handler, HandlerError, LibraryHandlers, Worker};

/// Cancels `token` on SIGTERM or Ctrl-C, for binaries that embed a worker or
/// a receiver and stop them the way hookbox's own processes do.
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
