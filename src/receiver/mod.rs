//! The HTTP(S) receiver: stateless, so run as many as needed.

mod delivery;
pub mod error;
pub mod group_commit;
pub mod headers;
mod limits;
pub mod network;
mod readiness;
mod refusals;
mod request_span;
mod tls;

use std::{collections::HashMap, net::TcpListener, sync::Arc, time::Duration};

use actix_web::{dev::Server, http::StatusCode, web, App, HttpResponse, HttpServer};
use anyhow::Context;
use ipnet::IpNet;
use sqlx::PgPool;

use crate::{
    config::{Config, Source},
    secret::Secret,
    telemetry,
};
use error::detail_response;

/// What every request handler shares.
pub struct ReceiverState {
    pool: PgPool,
    /// The group commit of the whole receiver; each HTTP worker runs its share.
    group_commit: group_commit::GroupCommitSettings,
    /// HTTP workers, each running its share of `group_commit`.
    workers: usize,
    /// Each HTTP worker's own connections, by worker, for the pool gauges.
    worker_pools: Arc<std::sync::Mutex<Vec<Option<PgPool>>>>,
    sources: HashMap<String, Arc<SourceRuntime>>,
    trusted_proxies: Vec<IpNet>,
    max_body_bytes: usize,
    request_timeout: Duration,
    refusals: refusals::RefusalLog,
    readiness: readiness::Readiness,
}

/// A source with what the receiver derives from it once, at start.
pub struct SourceRuntime {
    source: Source,
    /// Keys of same-scheme sources in other environments, to diagnose a sender
    /// that signs with the wrong environment's key.
    foreign_keys: Vec<Secret>,
    limits: limits::AddressLimits,
    private_headers: Vec<String>,
}

impl ReceiverState {
    fn new(config: &Config, pool: PgPool) -> Self {
        let sources = config
            .sources
            .iter()
            .map(|source| {
                let foreign_keys = config
                    .sources
                    .iter()
                    .filter(|other| {
                        other.environment != source.environment
                            && other.scheme.name() == source.scheme.name()
                    })
                    .flat_map(|other| other.keys.iter().cloned())
                    .collect();
                let runtime = SourceRuntime {
                    source: source.clone(),
                    foreign_keys,
                    limits: limits::AddressLimits::new(
                        source.rate_limit,
                        config.receiver.refusal_rate_limit,
                    ),
                    private_headers: delivery::private_headers(source),
                };
                (source.name.clone(), Arc::new(runtime))
            })
            .collect::<HashMap<String, Arc<SourceRuntime>>>();
        let runtimes: Vec<Arc<SourceRuntime>> = sources.values().cloned().collect();
        tokio::spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            loop {
                every_minute.tick().await;
                runtimes
                    .iter()
                    .for_each(|runtime| runtime.limits.forget_idle());
            }
        });
        // Refused deliveries are written on a connection of their own, never
        // one the committers need.
        let refusal_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.receiver.request_timeout.0)
            .connect_lazy_with((*pool.connect_options()).clone());
        let workers = http_workers(config);
        let settings = group_commit::GroupCommitSettings {
            max_batch: config.receiver.batch_max_size,
            max_wait: config.receiver.batch_max_wait.0,
            committers: committers(config, workers),
            queue_capacity: config.receiver.queue_capacity,
            statement_timeout: crate::db::PoolSettings::receiver(config)
                .statement_timeout
                .unwrap_or(config.receiver.request_timeout.0),
        };
        let worker_pools = Arc::new(std::sync::Mutex::new(vec![None; workers]));
        tokio::spawn(record_pools(pool.clone(), worker_pools.clone()));
        Self {
            group_commit: settings,
            workers,
            worker_pools,
            refusals: refusals::RefusalLog::start(
                refusal_pool,
                config.receiver.refusals_detailed_per_minute,
            ),
            readiness: readiness::Readiness::new(pool.clone()),
            pool,
            sources,
            trusted_proxies: config.trusted_proxies.clone(),
            max_body_bytes: config.receiver.max_body_bytes,
            request_timeout: config.receiver.request_timeout.0,
        }
    }

    /// Starts HTTP worker `index`'s group commit on the calling thread (the
    /// worker's), with a pool of its own: a connection belongs to the runtime
    /// it was opened on, and one opened elsewhere would wake that runtime's
    /// thread on every answer.
    fn start_group_commit(&self, index: usize) -> group_commit::GroupCommit {
        let index = index % self.workers;
        let settings = self.group_commit.share(self.workers, index);
        let pool = self
            .pool
            .options()
            .clone()
            .max_connections(settings.committers as u32)
            .min_connections(0)
            .connect_lazy_with(
                // The batch statement and the key checks it causes read rows
                // by key only. Planned while the inbox held a page or two (a
                // fresh install, or one emptied by retention, once analyzed),
                // they would read the whole table for every key instead, and
                // go on doing so as it grows, until the next ANALYZE.
                (*self.pool.connect_options())
                    .clone()
                    .options([("enable_seqscan", "off")]),
            );
        if let Ok(mut pools) = self.worker_pools.lock() {
            pools[index] = Some(pool.clone());
        }
        group_commit::GroupCommit::start(pool, settings)
    }
}

/// HTTP workers: `receiver.http_workers`, or one per core and one more; at
/// most one per connection the committers may hold, since each needs one.
///
/// One more than the cores because each worker is a pipeline of batches that
/// waits for its commits: with one per core, the cores sat idle a third of the
/// time while every worker waited for its commit (BENCHMARKS.md).
fn http_workers(config: &Config) -> usize {
    let wanted = match config.receiver.http_workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from) + 1,
        n => n,
    };
    wanted.min(most_committers(config))
}

/// Batches committing at once in all: `receiver.batch_committers`, at least
/// one per HTTP worker, and at most `database.max_connections - 1` (`/readyz`
/// needs a connection besides them).
fn committers(config: &Config, workers: usize) -> usize {
    config
        .receiver
        .batch_committers
        .max(workers)
        .min(most_committers(config))
}

fn most_committers(config: &Config) -> usize {
    config.database.max_connections.saturating_sub(1).max(1) as usize
}

/// The pool gauges, every second, over the receiver's pool and every HTTP
/// worker's: recording them per request cost more than the gauges are worth.
async fn record_pools(pool: PgPool, worker_pools: Arc<std::sync::Mutex<Vec<Option<PgPool>>>>) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        every_second.tick().await;
        let pools: Vec<PgPool> = match worker_pools.lock() {
            Ok(pools) => pools.iter().flatten().cloned().collect(),
            Err(_) => Vec::new(),
        };
        telemetry::record_pools("receiver", std::iter::once(&pool).chain(pools.iter()));
    }
}

/// A bound receiver: its ports are known before it runs (port 0 in tests).
pub struct Application {
    port: u16,
    admin_port: Option<u16>,
    server: Server,
}

impl Application {
    pub async fn build(config: &Config, pool: PgPool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.receiver.listen).with_context(|| {
            format!(
                "cannot listen on {} (receiver.listen)",
                config.receiver.listen
            )
        })?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(ReceiverState::new(config, pool));
        let request_timeout = config.receiver.request_timeout.0;
        let workers = state.workers;
        // Called once on each worker's thread (again if actix restarts one).
        let next_worker = Arc::new(std::sync::atomic::AtomicUsize::new(0));

        let server = HttpServer::new(move || {
            let index = next_worker.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let group_commit = web::Data::new(state.start_group_commit(index));
            App::new()
                .app_data(state.clone())
                .app_data(group_commit)
                .wrap(request_span::RequestSpan)
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .service(
                    web::resource("/webhooks/{source}")
                        .route(web::post().to(delivery::receive))
                        .default_service(web::to(|| async {
                            detail_response(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
                        })),
                )
                .default_service(web::to(|| async {
                    detail_response(StatusCode::NOT_FOUND, "Not Found")
                }))
        })
        .client_request_timeout(request_timeout)
        .client_disconnect_timeout(Duration::from_secs(1))
        .keep_alive(Duration::from_secs(30))
        .shutdown_timeout(request_timeout.as_secs().max(1))
        .workers(workers)
        .disable_signals();

        let server = match &config.receiver.tls {
            Some(tls) => server.listen_rustls_0_23(listener, tls::server_config(tls)?)?,
            None => server.listen(listener)?,
        }
        .run();

        let admin_port = match config.receiver.admin_listen.as_str() {
            "" => None,
            address => Some(telemetry::serve_metrics(address)?),
        };
        Ok(Self {
            port,
            admin_port,
            server,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// Stops the server gracefully (in-flight requests finish) when awaited.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(state: web::Data<ReceiverState>) -> HttpResponse {
    if state.readiness.is_ready().await {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    } else {
        detail_response(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
    }
}

/// Runs a receiver for `config` until `shutdown` is cancelled, then lets
/// in-flight requests finish. What `hookbox-receiver` runs; `pool` is made
/// with [`crate::db::PoolSettings::receiver`].
pub async fn run(
    config: &Config,
    pool: PgPool,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = Application::build(config, pool).await?;
    tracing::info!(
        port = app.port(),
        admin_port = app.admin_port(),
        "receiver listening"
    );
    let handle = app.handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.stop(true).await;
    });
    app.run_until_stopped().await?;
    Ok(())
}
