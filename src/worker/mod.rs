//! The worker: claims stored events and hands each to its handler, exactly
//! once for transactional handlers, with retries and an attempt row per try.

pub mod handler;
pub mod handlers;
mod queue;
pub mod retry;
mod routing;

use std::{collections::HashMap, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use sqlx::{postgres::PgListener, Acquire, PgPool};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    cli::CommonArgs,
    config::{Config, HandlerSection},
    db::{self, PoolSettings},
};
pub use handler::{Event, ExternalHandler, Handler, HandlerError};
use retry::RetryPolicy;
use routing::Router;

/// The channel the inbox's trigger notifies when events are stored.
const CHANNEL: &str = "hookbox_events";
/// `last_error` and attempt errors are kept short.
const ERROR_LIMIT: usize = 1000;

enum Runner {
    InTransaction(Arc<dyn Handler>),
    External(Arc<dyn ExternalHandler>),
}

/// Handlers provided in code by a binary that embeds hookbox, by the name its
/// `[handler.NAME]` table (`kind = "library"`) gives them.
#[derive(Default)]
pub struct LibraryHandlers(HashMap<String, Arc<dyn Handler>>);

impl LibraryHandlers {
    pub fn with(mut self, name: &str, handler: impl Handler + 'static) -> Self {
        self.0.insert(name.to_owned(), Arc::new(handler));
        self
    }
}

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    Skipped,
    Retry,
    Dead,
    /// The lease was lost before the outcome could be recorded: nothing committed.
    LeaseLost,
}

pub struct Worker {
    pool: PgPool,
    id: String,
    router: Router,
    handlers: HashMap<String, Runner>,
    policy: RetryPolicy,
    lease: Duration,
    poll_interval: Duration,
    concurrency: usize,
    grace: Duration,
    /// The configured sources, so their gauges read 0 once drained.
    sources: Vec<String>,
}

pub fn pool_settings(config: &Config) -> PoolSettings {
    PoolSettings {
        // Claims, completions, the listener and rescue all need a connection.
        max_connections: config
            .database
            .max_connections
            .max(config.worker.concurrency as u32 + 2),
        acquire_timeout: config.database.acquire_timeout.0,
        statement_timeout: None,
        application_name: "hookbox-worker",
    }
}

impl Worker {
    pub fn from_config(
        config: &Config,
        pool: PgPool,
        mut library: LibraryHandlers,
    ) -> anyhow::Result<Self> {
        let mut handlers = HashMap::new();
        for (name, handler) in &config.handlers {
            let runner = match &handler.section {
                HandlerSection::Sql { statement } => Runner::InTransaction(Arc::new(handlers::sql::SqlHandler::new(statement))),
                HandlerSection::Http { url, timeout, permanent_statuses, .. } => Runner::External(Arc::new(
                    handlers::http::HttpHandler::new(url, timeout.0, permanent_statuses, handler.signing_key.clone())?,
                )),
                HandlerSection::Exec { command, timeout } => {
                    Runner::External(Arc::new(handlers::exec::ExecHandler::new(command, timeout.0)))
                }
                HandlerSection::Library {} => Runner::InTransaction(library.0.remove(name).with_context(|| {
                    format!("[handler.{name}] is kind = \"library\" but this binary provides no handler of that name")
                })?),
            };
            handlers.insert(name.clone(), runner);
        }
        Ok(Self {
            pool,
            id: worker_id(),
            router: Router::new(&config.routes),
            handlers,
            policy: RetryPolicy::from(&config.worker.retry),
            lease: config.worker.lease.0,
            poll_interval: config.worker.poll_interval.0,
            concurrency: config.worker.concurrency,
            grace: config.worker.shutdown_grace.0,
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// One step, for tests and tools: claims up to `concurrency` due events and
    /// processes them all. Returns their outcomes.
    pub async fn process_next(&self) -> anyhow::Result<Vec<AttemptOutcome>> {
        let claimed =
            queue::claim(&self.pool, &self.id, self.concurrency as i64, self.lease).await?;
        let outcomes =
            futures_util::future::join_all(claimed.into_iter().map(|c| self.process(c))).await;
        outcomes.into_iter().collect()
    }

    /// Returns expired leases to the queue (or to `dead`); how many were rescued.
    pub async fn rescue_expired_leases(&self) -> anyhow::Result<u64> {
        Ok(queue::rescue_expired(&self.pool, self.policy.max_attempts as i32).await?)
    }

    async fn process(&self, claimed: queue::Claimed) -> anyhow::Result<AttemptOutcome> {
        let event = &claimed.event;
        let handler_name = self
            .router
            .route(&event.source, event.event_type.as_deref());
        let runner = handler_name.and_then(|name| self.handlers.get(name));

        let started = std::time::Instant::now();
        // External effects happen outside any transaction (and hold no connection).
        let external = match runner {
            Some(Runner::External(handler)) if !claimed.payload_missing => {
                Some(handler.handle(event).await)
            }
            _ => None,
        };

        let mut transaction = self.pool.begin().await?;
        if !queue::lock_if_lease_held(&mut transaction, event.id, &self.id, event.attempt).await? {
            tracing::warn!(event_id = %event.id, source = %event.source, "lease lost before the outcome was recorded; nothing committed");
            return Ok(AttemptOutcome::LeaseLost);
        }
        let result: Option<Result<(), HandlerError>> = match runner {
            None => None,
            Some(_) if claimed.payload_missing => Some(Err(HandlerError::permanent(
                "payload was pruned; nothing to process",
            ))),
            Some(Runner::External(_)) => external,
            Some(Runner::InTransaction(handler)) => {
                let mut savepoint = transaction.begin().await?;
                let result = handler.handle(event, &mut savepoint).await;
                if result.is_ok() {
                    savepoint.commit().await?;
                } else {
                    savepoint.rollback().await?;
                }
                Some(result)
            }
        };

        if let Some(name) = handler_name {
            metrics::histogram!("hookbox_handler_seconds", "handler" => name.to_owned())
                .record(started.elapsed().as_secs_f64());
        }
        let (finish, outcome) = self.decide(event, handler_name, result);
        queue::finish(&mut transaction, event.id, claimed.attempt_id, &finish).await?;
        transaction.commit().await?;
        match outcome {
            AttemptOutcome::Dead => {
                tracing::warn!(event_id = %event.id, source = %event.source, error = finish.error.as_deref(), "event is dead")
            }
            AttemptOutcome::Retry => {
                tracing::info!(event_id = %event.id, source = %event.source, error = finish.error.as_deref(), "attempt failed; will retry")
            }
            _ => {
                tracing::info!(event_id = %event.id, source = %event.source, outcome = finish.attempt_outcome, "attempt finished")
            }
        }
        metrics::counter!("hookbox_attempts_total", "handler" => handler_name.unwrap_or("").to_owned(), "outcome" => finish.attempt_outcome)
            .increment(1);
        Ok(outcome)
    }

    /// Queue depth, the oldest due event's age and pool usage, as gauges.
    async fn record_gauges(&self) {
        crate::telemetry::record_pool("worker", &self.pool);
        let Ok((counts, oldest)) = queue::depth(&self.pool).await else {
            return;
        };
        // Every status of every source with open events, zeros included, so a
        // drained queue reads 0 rather than its last value.
        let sources: std::collections::BTreeSet<&str> = counts
            .iter()
            .map(|(source, _, _)| source.as_str())
            .chain(self.sources.iter().map(String::as_str))
            .collect();
        for source in sources {
            for status in ["pending", "processing", "retrying", "dead"] {
                let n = counts
                    .iter()
                    .find(|(s, st, _)| s == source && st == status)
                    .map_or(0, |(_, _, n)| *n);
                metrics::gauge!("hookbox_events", "source" => source.to_owned(), "status" => status).set(n as f64);
            }
        }
        metrics::gauge!("hookbox_oldest_due_seconds").set(oldest.unwrap_or(0.0));
    }

    /// The retry decision: data in, outcome out.
    fn decide<'a>(
        &self,
        event: &Event,
        handler: Option<&'a str>,
        result: Option<Result<(), HandlerError>>,
    ) -> (queue::Finish<'a>, AttemptOutcome) {
        let finish =
            |event_status, attempt_outcome, error: Option<String>, retry_in| queue::Finish {
                event_status,
                attempt_outcome,
                handler,
                error: error.map(|e| truncate(e, ERROR_LIMIT)),
                retry_in,
            };
        match result {
            None => {
                let why = format!(
                    "no route matches source {} and type {}",
                    event.source,
                    event.event_type.as_deref().unwrap_or("(none)")
                );
                (
                    finish("skipped", "skipped", Some(why), None),
                    AttemptOutcome::Skipped,
                )
            }
            Some(Ok(())) => (
                finish("succeeded", "succeeded", None, None),
                AttemptOutcome::Succeeded,
            ),
            Some(Err(HandlerError::Permanent { message })) => (
                finish("dead", "dead", Some(message), None),
                AttemptOutcome::Dead,
            ),
            Some(Err(HandlerError::Retryable {
                message,
                retry_after,
            })) => {
                let attempt = u32::try_from(event.attempt).unwrap_or(u32::MAX);
                if self.policy.is_exhausted(attempt) {
                    let message = format!("{message} (gave up after {attempt} attempts)");
                    (
                        finish("dead", "dead", Some(message), None),
                        AttemptOutcome::Dead,
                    )
                } else {
                    let wait = self
                        .policy
                        .random_delay(attempt)
                        .max(retry_after.unwrap_or_default());
                    (
                        finish("retrying", "retry", Some(message), Some(wait)),
                        AttemptOutcome::Retry,
                    )
                }
            }
        }
    }

    /// Runs until `shutdown` is cancelled: then stops claiming, gives in-flight
    /// work the grace period, and releases what did not finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let worker = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(worker.pool.clone(), wake.clone(), shutdown.clone()));
        let rescue_every =
            (worker.lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut next_rescue = tokio::time::Instant::now();
        let mut tasks: JoinSet<anyhow::Result<AttemptOutcome>> = JoinSet::new();
        tracing::info!(worker_id = %worker.id, concurrency = worker.concurrency, "worker started");

        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_rescue {
                match worker.rescue_expired_leases().await {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics::counter!("hookbox_lease_rescues_total").increment(n);
                        tracing::warn!(rescued = n, "expired leases rescued");
                    }
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "lease rescue failed")
                    }
                }
                worker.record_gauges().await;
                next_rescue = tokio::time::Instant::now() + rescue_every;
            }
            let free = worker.concurrency - tasks.len();
            let mut more_may_be_due = false;
            if free > 0 {
                match queue::claim(&worker.pool, &worker.id, free as i64, worker.lease).await {
                    Ok(claimed) => {
                        more_may_be_due = claimed.len() == free;
                        if !claimed.is_empty() {
                            metrics::histogram!("hookbox_claim_batch_size")
                                .record(claimed.len() as f64);
                        }
                        for item in claimed {
                            let worker = worker.clone();
                            tasks.spawn(async move { worker.process(item).await });
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "cannot claim events; retrying shortly");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(worker.poll_interval.min(Duration::from_secs(1))) => {}
                        }
                        continue;
                    }
                }
            }
            while let Some(done) = tasks.try_join_next() {
                log_task(done);
            }
            if more_may_be_due && tasks.len() < worker.concurrency {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(worker.poll_interval) => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_task(done),
            }
        }

        tracing::info!(
            in_flight = tasks.len(),
            "stopping: no more claims; waiting for in-flight work"
        );
        let deadline = tokio::time::sleep(worker.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(done) => log_task(done),
                    None => break,
                },
                _ = &mut deadline => {
                    tracing::warn!(in_flight = tasks.len(), "grace period over; abandoning in-flight work");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        match queue::release(&worker.pool, &worker.id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "unfinished events released"),
            Err(error) => {
                tracing::warn!(error = %error, "cannot release unfinished events; their leases will expire")
            }
        }
        listener.abort();
        tracing::info!("worker stopped");
        Ok(())
    }
}

fn log_task(done: Result<anyhow::Result<AttemptOutcome>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(
            error = format!("{error:#}"),
            "attempt not recorded; its lease will expire and it will be retried"
        ),
        Err(error) if error.is_cancelled() => {}
        Err(error) => tracing::error!(error = %error, "attempt task failed"),
    }
}

/// Wakes the claim loop on every notification; reconnects after a database
/// restart (polling covers the gap).
async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(_) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection dropped: events may have come meanwhile.
                    Ok(None) => wake.notify_one(),
                    Err(_) => break,
                },
            }
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let unique = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &unique[unique.len() - 6..]
    )
}

#[derive(Parser, Debug)]
#[command(
    name = "hookbox-worker",
    version,
    about = "Process stored webhook events"
)]
struct WorkerCli {
    #[command(flatten)]
    common: CommonArgs,
}

/// `hookbox-worker`: runs until SIGTERM or Ctrl-C, then stops gracefully.
pub fn main() -> ExitCode {
    let cli = WorkerCli::parse();
    crate::telemetry::init_logging(cli.common.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async {
        let config = cli.common.load_config()?;
        let pool = db::pool(&config.database_url()?, &pool_settings(&config))?;
        let worker = Worker::from_config(&config, pool, LibraryHandlers::default())?;
        if !config.worker.admin_listen.is_empty() {
            let port = crate::telemetry::serve_metrics(&config.worker.admin_listen)?;
            tracing::info!(admin_port = port, "metrics served");
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
        worker.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookbox-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}
