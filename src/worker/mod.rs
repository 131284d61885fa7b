//! The worker: claims stored events and hands each to its handler, exactly
//! once for transactional handlers, with retries and an attempt row per try.
//!
//! This file is the claim loop; `completion` runs handlers and records
//! outcomes, `outcome` decides what an attempt comes to, and `background`
//! listens for new events and rescues expired leases.
#![warn(missing_docs)]

mod background;
pub mod chunks;
mod completion;
mod error;
pub mod handler;
mod handlers;
mod outcome;
mod queue;
mod registry;
pub mod retry;
mod routing;

use std::{collections::HashMap, sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use error::{Error, Result};
pub use handler::{Event, ExternalHandler, Handler, HandlerError};
pub use outcome::Processed;
pub use registry::LibraryHandlers;
use registry::Runner;
use retry::RetryPolicy;

/// A worker process's engine: claims due events in batches under a lease,
/// runs their handlers and records every attempt. Run as many as needed, on
/// any hosts; they share work through the database alone.
///
/// ```
/// use std::collections::BTreeMap;
///
/// use hookbox::{async_trait, db, Config, Event, Handler, HandlerError, LibraryHandlers, Worker};
///
/// struct RecordScore;
///
/// #[async_trait]
/// impl Handler for RecordScore {
///     async fn handle(&self, event: &Event, tx: &mut sqlx::PgConnection) -> Result<(), HandlerError> {
///         sqlx::query("INSERT INTO scores (event_id, body) VALUES ($1, $2)")
///             .bind(event.id)
///             .bind(&event.payload_json)
///             .execute(tx)
///             .await
///             .map_err(|e| HandlerError::retryable(e.to_string()))?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// let toml = r#"
///     [[source]]
///     name = "begini"
///     environment = "sandbox"
///     scheme = "begini"
///     secrets_env = ["BEGINI_API_KEY"]
///
///     [[route]]
///     source = "begini"
///     handler = "scores"
///
///     [handler.scores]
///     kind = "library"
/// "#;
/// // In a real binary: Config::load(path), reading the process environment.
/// let env = BTreeMap::from([
///     ("BEGINI_API_KEY".to_owned(), "sandbox-key-0123456789".to_owned()),
///     ("DATABASE_URL".to_owned(), "postgres://localhost/hookbox".to_owned()),
/// ]);
/// let config = Config::parse(toml, "hookbox.toml".as_ref(), &env)?;
/// let pool = db::pool(&config.database_url_from(&env)?, &db::PoolSettings::worker(&config))?;
/// let handlers = LibraryHandlers::default().with("scores", RecordScore);
/// let worker = Worker::from_config(&config, pool, handlers)?;
/// assert!(!worker.id().is_empty());
/// // worker.run(shutdown_token).await? runs it until the token is cancelled.
/// # Ok(())
/// # }
/// ```
pub struct Worker {
    pool: PgPool,
    id: String,
    plan: queue::ClaimPlan,
    /// Handlers with a circuit: their attempts' outcomes open and close it.
    circuits: HashMap<String, crate::config::Circuit>,
    handlers: HashMap<String, Runner>,
    policy: RetryPolicy,
    lease: Duration,
    poll_interval: Duration,
    concurrency: usize,
    batch_size: usize,
    /// Cancelled when the worker stops: handlers not yet started do not start.
    stopping: CancellationToken,
    /// One per handler running at once (a transactional batch takes one).
    slots: Arc<Semaphore>,
    grace: Duration,
    /// The configured sources, so their gauges read 0 once drained.
    sources: Vec<String>,
    /// The history's partitions this worker makes ahead when elected.
    partitions: crate::db::PartitionSettings,
    /// How many events each transactional handler runs in one call.
    chunks: chunks::ChunkSizes,
}

/// A claimed event and the handler its route names.
struct Routed<'a> {
    claimed: queue::Claimed,
    handler: Option<&'a str>,
}

impl Worker {
    /// A worker for `config`'s routes and handlers; `library` provides the
    /// handlers of `kind = "library"`. Connects to nothing until it runs.
    pub fn from_config(config: &Config, pool: PgPool, library: LibraryHandlers) -> Result<Self> {
        let handlers = registry::build(&config.handlers, library)?;
        Ok(Self {
            chunks: chunks::ChunkSizes::new(handlers.keys()),
            handlers,
            pool,
            id: worker_id(),
            plan: queue::ClaimPlan::new(config),
            circuits: config
                .handlers
                .iter()
                .filter_map(|(name, h)| h.flow.circuit.map(|c| (name.clone(), c)))
                .collect(),
            policy: RetryPolicy::from(&config.worker.retry),
            lease: config.worker.lease.0,
            poll_interval: config.worker.poll_interval.0,
            concurrency: config.worker.concurrency,
            batch_size: config.worker.batch_size,
            stopping: CancellationToken::new(),
            slots: Arc::new(Semaphore::new(config.worker.concurrency)),
            grace: config.worker.shutdown_grace.0,
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            partitions: crate::db::PartitionSettings::from_config(config),
        })
    }

    /// This worker's id, as `locked_by` and `inbox_attempts.worker_id` record it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// One step, for tests and tools: claims up to `batch_size` due events and
    /// processes them all. Returns what became of each.
    pub async fn process_next(&self) -> Result<Vec<Processed>> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Stopped)?;
        let claimed = queue::claim(
            &self.pool,
            &self.id,
            self.batch_size as i64,
            self.lease,
            &self.plan,
        )
        .await?;
        self.process_batch(claimed, slot).await
    }

    /// Returns expired leases to the queue (or to `dead`); how many were rescued.
    pub async fn rescue_expired_leases(&self) -> Result<u64> {
        Ok(queue::rescue_expired(&self.pool, self.policy.max_attempts as i32).await?)
    }

    /// Events whose effects are transactional (sql and library handlers, and
    /// those with nothing to run) complete together in one transaction, holding
    /// `slot`; then each external handler runs in a slot of its own.
    async fn process_batch(
        &self,
        claimed: Vec<queue::Claimed>,
        slot: OwnedSemaphorePermit,
    ) -> Result<Vec<Processed>> {
        let (external, transactional): (Vec<_>, Vec<_>) = claimed
            .into_iter()
            .map(|claimed| {
                // The database routed it when it claimed it.
                let handler = claimed
                    .handler
                    .as_deref()
                    .and_then(|name| self.handlers.get_key_value(name))
                    .map(|(name, _)| name.as_str());
                Routed { claimed, handler }
            })
            .partition(|routed| {
                !routed.claimed.payload_missing
                    && !routed.claimed.stale
                    && matches!(self.runner(routed), Some(Runner::External(_)))
            });
        let mut processed = Vec::new();
        // A failure of the transactional part (its leases then expire and a
        // rescue retries it) never keeps the batch's external events from running.
        let transactional = match transactional.is_empty() {
            true => Ok(Vec::new()),
            false => self.complete_in_one_transaction(&transactional).await,
        };
        // Broker publishes run all at once, holding the batch's slot, and
        // record their outcomes in one transaction.
        let (together, external): (Vec<_>, Vec<_>) = external
            .into_iter()
            .partition(|routed| self.completes_together(routed));
        let together = match together.is_empty() {
            true => Ok(Vec::new()),
            false => self.complete_together(&together).await,
        };
        drop(slot);
        let external = external
            .into_iter()
            .map(|routed| self.complete_external(routed));
        let external = futures_util::future::join_all(external).await;
        processed.extend(transactional?);
        processed.extend(together?);
        for outcome in external {
            processed.push(outcome?);
        }
        Ok(processed)
    }

    /// A handler starts only while the worker runs and the lease has time left.
    fn may_start(&self, claimed: &queue::Claimed, now: std::time::Instant) -> bool {
        !self.stopping.is_cancelled() && now < claimed.start_by
    }

    fn runner(&self, routed: &Routed<'_>) -> Option<&Runner> {
        routed.handler.and_then(|name| self.handlers.get(name))
    }

    /// Runs until `shutdown` is cancelled: then stops claiming, gives in-flight
    /// work the grace period, and releases what did not finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let worker = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(background::listen(
            worker.pool.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        let housekeeping = tokio::spawn(background::housekeeping(worker.clone(), shutdown.clone()));
        let mut tasks: JoinSet<Result<Vec<Processed>>> = JoinSet::new();
        tracing::info!(worker_id = %worker.id, concurrency = worker.concurrency, "worker started");

        while !shutdown.is_cancelled() {
            let mut more_may_be_due = false;
            // A slot is free only when no claimed event waits for one (the
            // semaphore serves waiters first), so claims never run far ahead.
            if let Ok(slot) = worker.slots.clone().try_acquire_owned() {
                match queue::claim(
                    &worker.pool,
                    &worker.id,
                    worker.batch_size as i64,
                    worker.lease,
                    &worker.plan,
                )
                .await
                {
                    Ok(claimed) => {
                        more_may_be_due = claimed.len() == worker.batch_size;
                        if !claimed.is_empty() {
                            metrics::histogram!("hookbox_claim_batch_size")
                                .record(claimed.len() as f64);
                            let worker = worker.clone();
                            tasks.spawn(async move { worker.process_batch(claimed, slot).await });
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
            if more_may_be_due && worker.slots.available_permits() > 0 {
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
        worker.stopping.cancel();
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
        match queue::release(&worker.pool, &worker.id, worker.policy.max_attempts as i32).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "unfinished events released"),
            Err(error) => {
                tracing::warn!(error = %error, "cannot release unfinished events; their leases will expire")
            }
        }
        listener.abort();
        housekeeping.abort();
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Runs `worker` until `shutdown` is cancelled, with the metrics endpoint
/// `[worker] admin_listen` names: what `hookbox-worker` runs. An embedding
/// binary builds the worker with its library handlers first.
pub async fn run(
    config: &Config,
    worker: Worker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !config.worker.admin_listen.is_empty() {
        let port = crate::telemetry::serve_metrics(&config.worker.admin_listen)?;
        tracing::info!(admin_port = port, "metrics served");
    }
    worker.run(shutdown).await?;
    Ok(())
}

fn log_task(done: Result<Result<Vec<Processed>>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "attempts not recorded; their leases will expire and they will be retried"
        ),
        Err(error) if error.is_cancelled() => {}
        Err(error) => tracing::error!(error = %error, "attempt task failed"),
    }
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
