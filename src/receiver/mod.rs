//! The HTTP(S) receiver: stateless, so run as many as needed.

mod delivery;
pub mod error;
pub mod group_commit;
pub mod headers;
mod limits;
pub mod network;
mod readiness;
mod refusals;
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
    group_commit: group_commit::GroupCommit,
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
        // /readyz needs a connection besides the committers.
        let committers = config
            .receiver
            .batch_committers
            .min(config.database.max_connections.saturating_sub(1).max(1) as usize);
        let settings = group_commit::GroupCommitSettings {
            max_batch: config.receiver.batch_max_size,
            max_wait: config.receiver.batch_max_wait.0,
            committers,
            queue_capacity: config.receiver.queue_capacity,
            statement_timeout: pool_settings(config)
                .statement_timeout
                .unwrap_or(config.receiver.request_timeout.0),
        };
        Self {
            group_commit: group_commit::GroupCommit::start(pool.clone(), settings),
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

        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(tracing_actix::RequestSpan)
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

/// A span per request that names the route, never the body or credentials.
mod tracing_actix {
    use std::future::{ready, Ready};

    use actix_web::{
        dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform},
        Error,
    };
    use futures_util::future::LocalBoxFuture;
    use tracing::Instrument;

    pub struct RequestSpan;

    impl<S, B> Transform<S, ServiceRequest> for RequestSpan
    where
        S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
        B: 'static,
    {
        type Response = ServiceResponse<B>;
        type Error = Error;
        type Transform = RequestSpanService<S>;
        type InitError = ();
        type Future = Ready<Result<Self::Transform, Self::InitError>>;

        fn new_transform(&self, service: S) -> Self::Future {
            ready(Ok(RequestSpanService { service }))
        }
    }

    pub struct RequestSpanService<S> {
        service: S,
    }

    impl<S, B> Service<ServiceRequest> for RequestSpanService<S>
    where
        S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
        B: 'static,
    {
        type Response = ServiceResponse<B>;
        type Error = Error;
        type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

        forward_ready!(service);

        fn call(&self, request: ServiceRequest) -> Self::Future {
            let span =
                tracing::info_span!("request", method = %request.method(), path = %request.path());
            let future = self.service.call(request);
            Box::pin(
                async move {
                    let response = future.await?;
                    tracing::debug!(status = response.status().as_u16(), "answered");
                    Ok(response)
                }
                .instrument(span),
            )
        }
    }
}

pub fn pool_settings(config: &Config) -> crate::db::PoolSettings {
    let request_timeout = config.receiver.request_timeout.0;
    crate::db::PoolSettings {
        max_connections: config.database.max_connections,
        acquire_timeout: config.database.acquire_timeout.0.min(request_timeout),
        // The database gives up before the sender does: nothing is left waiting.
        statement_timeout: Some(request_timeout.mul_f64(0.8)),
        application_name: "hookbox-receiver",
    }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "hookbox-receiver",
    version,
    about = "Receive, verify and store webhooks"
)]
struct ReceiverCli {
    #[command(flatten)]
    common: crate::cli::CommonArgs,
}

/// `hookbox-receiver`: serves until SIGTERM or Ctrl-C, then drains in-flight requests.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = ReceiverCli::parse();
    crate::telemetry::init_logging(cli.common.log_format);
    let result = actix_web::rt::System::new().block_on(async {
        let config = cli.common.load_config_for(crate::config::Role::Receiver)?;
        let pool = crate::db::pool(&config.database_url()?, &pool_settings(&config))?;
        let app = Application::build(&config, pool).await?;
        tracing::info!(
            port = app.port(),
            admin_port = app.admin_port(),
            "receiver listening"
        );
        let handle = app.handle();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
        tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        });
        app.run_until_stopped().await?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookbox-receiver: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
