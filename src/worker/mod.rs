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
use sqlx::{postgres::PgListener, PgPool};
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
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
    batch_size: usize,
    /// Cancelled when the worker stops: handlers not yet started do not start.
    stopping: CancellationToken,
    /// One per handler running at once (a transactional batch takes one).
    slots: Arc<Semaphore>,
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
                HandlerSection::Exec { command, timeout, env } => {
                    Runner::External(Arc::new(handlers::exec::ExecHandler::new(command, timeout.0).passing(env)))
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
            batch_size: config.worker.batch_size,
            stopping: CancellationToken::new(),
            slots: Arc::new(Semaphore::new(config.worker.concurrency)),
            grace: config.worker.shutdown_grace.0,
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// One step, for tests and tools: claims up to `batch_size` due events and
    /// processes them all. Returns their outcomes.
    pub async fn process_next(&self) -> anyhow::Result<Vec<AttemptOutcome>> {
        let slot = self.slots.clone().acquire_owned().await?;
        let claimed =
            queue::claim(&self.pool, &self.id, self.batch_size as i64, self.lease).await?;
        self.process_batch(claimed, slot).await
    }

    /// Returns expired leases to the queue (or to `dead`); how many were rescued.
    pub async fn rescue_expired_leases(&self) -> anyhow::Result<u64> {
        Ok(queue::rescue_expired(&self.pool, self.policy.max_attempts as i32).await?)
    }

    /// Events whose effects are transactional (sql and library handlers, and
    /// those with nothing to run) complete together in one transaction, holding
    /// `slot`; then each external handler runs in a slot of its own.
    async fn process_batch(
        &self,
        claimed: Vec<queue::Claimed>,
        slot: OwnedSemaphorePermit,
    ) -> anyhow::Result<Vec<AttemptOutcome>> {
        let (external, transactional): (Vec<_>, Vec<_>) = claimed
            .into_iter()
            .map(|claimed| {
                let handler = self
                    .router
                    .route(&claimed.event.source, claimed.event.event_type.as_deref());
                Routed { claimed, handler }
            })
            .partition(|routed| {
                !routed.claimed.payload_missing
                    && matches!(self.runner(routed), Some(Runner::External(_)))
            });
        let mut outcomes = Vec::new();
        if !transactional.is_empty() {
            outcomes.extend(self.complete_in_one_transaction(transactional).await?);
        }
        drop(slot);
        let external = external
            .into_iter()
            .map(|routed| self.complete_external(routed));
        for outcome in futures_util::future::join_all(external).await {
            outcomes.push(outcome?);
        }
        Ok(outcomes)
    }

    /// A handler starts only while the worker runs and the lease has time left.
    fn may_start(&self, claimed: &queue::Claimed, now: std::time::Instant) -> bool {
        !self.stopping.is_cancelled() && now < claimed.start_by
    }

    fn runner(&self, routed: &Routed<'_>) -> Option<&Runner> {
        routed.handler.and_then(|name| self.handlers.get(name))
    }

    /// One transaction for the whole batch. Handlers usually succeed, so the
    /// batch first runs without savepoints and takes its events' row locks at
    /// the end, with the outcomes; if a handler fails or a lease turns out to
    /// be lost, that transaction is rolled back (nothing of it survives) and
    /// the batch runs again the careful way.
    async fn complete_in_one_transaction(
        &self,
        batch: Vec<Routed<'_>>,
    ) -> anyhow::Result<Vec<AttemptOutcome>> {
        match self.complete_optimistically(&batch).await? {
            Some(outcomes) => Ok(outcomes),
            None => self.complete_carefully(&batch).await,
        }
    }

    /// `None` if the batch needs the careful way; its transaction is rolled back.
    async fn complete_optimistically(
        &self,
        batch: &[Routed<'_>],
    ) -> anyhow::Result<Option<Vec<AttemptOutcome>>> {
        let mut transaction = self.pool.begin().await?;
        let mut finished = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for routed in batch {
            let attempted = self.attempt_in(routed, &mut transaction, None).await?;
            if matches!(attempted, Attempted::Ran(Err(_))) {
                transaction.rollback().await?;
                return Ok(None);
            }
            let (finish, outcome) = self.decide(routed, attempted);
            finished.push(finish);
            outcomes.push(outcome);
        }
        if queue::finish(&mut transaction, &self.id, &finished).await? < finished.len() {
            transaction.rollback().await?;
            return Ok(None);
        }
        transaction.commit().await?;
        for (routed, finish) in batch.iter().zip(&finished) {
            log_outcome(&routed.claimed.event, finish);
        }
        Ok(Some(outcomes))
    }

    /// Locks the batch's events first, skipping those whose lease was lost;
    /// each handler runs in a savepoint, so a failing event rolls back alone
    /// while the others' effects commit together with their outcomes.
    async fn complete_carefully(
        &self,
        batch: &[Routed<'_>],
    ) -> anyhow::Result<Vec<AttemptOutcome>> {
        let mut transaction = self.pool.begin().await?;
        let events: Vec<&Event> = batch.iter().map(|r| &r.claimed.event).collect();
        let held = queue::lock_held(&mut transaction, &self.id, &events).await?;
        let mut savepoint = Savepoint::default();
        let mut finished = Vec::with_capacity(batch.len());
        let mut recorded = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for routed in batch {
            let event = &routed.claimed.event;
            if !held.contains(&event.id) {
                lease_lost(event);
                outcomes.push(AttemptOutcome::LeaseLost);
                continue;
            }
            let attempted = self
                .attempt_in(routed, &mut transaction, Some(&mut savepoint))
                .await?;
            let (finish, outcome) = self.decide(routed, attempted);
            finished.push(finish);
            recorded.push(event);
            outcomes.push(outcome);
        }
        queue::finish(&mut transaction, &self.id, &finished).await?;
        transaction.commit().await?;
        for (event, finish) in recorded.into_iter().zip(&finished) {
            log_outcome(event, finish);
        }
        Ok(outcomes)
    }

    /// Runs one event's handler in `transaction`, inside `savepoint` if given.
    async fn attempt_in(
        &self,
        routed: &Routed<'_>,
        transaction: &mut sqlx::PgConnection,
        savepoint: Option<&mut Savepoint>,
    ) -> Result<Attempted, sqlx::Error> {
        let started = std::time::Instant::now();
        let attempted = match self.runner(routed) {
            Some(_) if !self.may_start(&routed.claimed, started) => Attempted::NotStarted,
            None => Attempted::NoRoute,
            Some(_) if routed.claimed.payload_missing => Attempted::PayloadPruned,
            Some(Runner::External(_)) => {
                unreachable!("external handlers complete on their own")
            }
            Some(Runner::InTransaction(handler)) => match savepoint {
                Some(savepoint) => {
                    savepoint.enter(transaction).await?;
                    let result = handler.handle(&routed.claimed.event, transaction).await;
                    savepoint.leave(transaction, result.is_ok()).await?;
                    Attempted::Ran(result)
                }
                None => Attempted::Ran(handler.handle(&routed.claimed.event, transaction).await),
            },
        };
        record_duration(routed.handler, started);
        Ok(attempted)
    }

    /// External effects happen outside any transaction (and hold no
    /// connection); their outcome is recorded afterwards if the lease still holds.
    async fn complete_external(&self, routed: Routed<'_>) -> anyhow::Result<AttemptOutcome> {
        let _slot = self.slots.acquire().await?;
        let event = &routed.claimed.event;
        let Some(Runner::External(handler)) = self.runner(&routed) else {
            unreachable!("only external handlers complete on their own");
        };
        let started = std::time::Instant::now();
        let attempted = if !self.may_start(&routed.claimed, started) {
            Attempted::NotStarted
        } else {
            Attempted::Ran(handler.handle(event).await)
        };
        record_duration(routed.handler, started);
        let mut transaction = self.pool.begin().await?;
        if queue::lock_held(&mut transaction, &self.id, &[event])
            .await?
            .is_empty()
        {
            lease_lost(event);
            return Ok(AttemptOutcome::LeaseLost);
        }
        let (finish, outcome) = self.decide(&routed, attempted);
        queue::finish(&mut transaction, &self.id, std::slice::from_ref(&finish)).await?;
        transaction.commit().await?;
        log_outcome(event, &finish);
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
        routed: &Routed<'a>,
        attempted: Attempted,
    ) -> (queue::Finish<'a>, AttemptOutcome) {
        let event = &routed.claimed.event;
        let finish =
            |event_status, attempt_outcome, error: Option<String>, retry_in| queue::Finish {
                event_id: event.id,
                attempt: event.attempt,
                attempt_id: routed.claimed.attempt_id,
                event_status,
                attempt_outcome,
                handler: routed.handler,
                error: error.map(|e| truncate(e, ERROR_LIMIT)),
                retry_in,
            };
        match attempted {
            Attempted::NotStarted => (
                finish(
                    "retrying",
                    "retry",
                    Some("released: the handler had not started when the worker stopped or the lease ran short".into()),
                    Some(Duration::ZERO),
                ),
                AttemptOutcome::Retry,
            ),
            Attempted::NoRoute => {
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
            Attempted::PayloadPruned => (
                finish("dead", "dead", Some(PAYLOAD_PRUNED.into()), None),
                AttemptOutcome::Dead,
            ),
            Attempted::Ran(Ok(())) => (
                finish("succeeded", "succeeded", None, None),
                AttemptOutcome::Succeeded,
            ),
            Attempted::Ran(Err(HandlerError::Permanent { message })) => (
                finish("dead", "dead", Some(message), None),
                AttemptOutcome::Dead,
            ),
            Attempted::Ran(Err(HandlerError::Retryable {
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
        let housekeeping = tokio::spawn(housekeeping(worker.clone(), shutdown.clone()));
        let mut tasks: JoinSet<anyhow::Result<Vec<AttemptOutcome>>> = JoinSet::new();
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
        match queue::release(&worker.pool, &worker.id).await {
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

/// What became of an event's handler in one attempt.
enum Attempted {
    NoRoute,
    /// The payload was pruned before a replay asked for the event again.
    PayloadPruned,
    /// Not started: the worker is stopping or the lease is nearly over.
    NotStarted,
    Ran(Result<(), HandlerError>),
}

/// A claimed event and the handler its route names.
struct Routed<'a> {
    claimed: queue::Claimed,
    handler: Option<&'a str>,
}

/// One savepoint reused through a batch: a success releases it and sets the
/// next in the same round trip; a failure rolls back to it, which keeps it.
#[derive(Default)]
struct Savepoint {
    open: bool,
    needs_renewal: bool,
}

impl Savepoint {
    async fn enter(&mut self, transaction: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let statement = match (self.open, self.needs_renewal) {
            (false, _) => "SAVEPOINT hookbox_event",
            (true, true) => "RELEASE SAVEPOINT hookbox_event; SAVEPOINT hookbox_event",
            (true, false) => return Ok(()),
        };
        sqlx::Executor::execute(transaction, statement).await?;
        self.open = true;
        self.needs_renewal = false;
        Ok(())
    }

    async fn leave(
        &mut self,
        transaction: &mut sqlx::PgConnection,
        succeeded: bool,
    ) -> Result<(), sqlx::Error> {
        if succeeded {
            self.needs_renewal = true;
        } else {
            sqlx::Executor::execute(transaction, "ROLLBACK TO SAVEPOINT hookbox_event").await?;
        }
        Ok(())
    }
}

const PAYLOAD_PRUNED: &str = "payload was pruned; nothing to process";

fn lease_lost(event: &Event) {
    tracing::warn!(event_id = %event.id, source = %event.source, "lease lost before the outcome was recorded; nothing committed");
}

fn record_duration(handler: Option<&str>, started: std::time::Instant) {
    if let Some(name) = handler {
        metrics::histogram!("hookbox_handler_seconds", "handler" => name.to_owned())
            .record(started.elapsed().as_secs_f64());
    }
}

/// The error text is not logged: SQL errors and a program's stderr may quote
/// the payload. It is kept in the attempt row, which the database guards.
fn log_outcome(event: &Event, finish: &queue::Finish<'_>) {
    match finish.attempt_outcome {
        "dead" => {
            tracing::warn!(event_id = %event.id, source = %event.source, handler = finish.handler, "event is dead; the attempt row holds the error")
        }
        "retry" => {
            tracing::info!(event_id = %event.id, source = %event.source, handler = finish.handler, "attempt failed; will retry; the attempt row holds the error")
        }
        _ => {
            tracing::info!(event_id = %event.id, source = %event.source, outcome = finish.attempt_outcome, "attempt finished")
        }
    }
    metrics::counter!("hookbox_attempts_total", "handler" => finish.handler.unwrap_or("").to_owned(), "outcome" => finish.attempt_outcome)
        .increment(1);
}

fn log_task(done: Result<anyhow::Result<Vec<AttemptOutcome>>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(
            error = format!("{error:#}"),
            "attempts not recorded; their leases will expire and they will be retried"
        ),
        Err(error) if error.is_cancelled() => {}
        Err(error) => tracing::error!(error = %error, "attempt task failed"),
    }
}

/// Lease rescue and the queue gauges, on their own task: a slow count over a
/// large table never holds up claiming.
async fn housekeeping(worker: Arc<Worker>, shutdown: CancellationToken) {
    let every = (worker.lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match worker.rescue_expired_leases().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("hookbox_lease_rescues_total").increment(n);
                tracing::warn!(rescued = n, "expired leases rescued");
            }
            Err(error) => tracing::warn!(error = format!("{error:#}"), "lease rescue failed"),
        }
        worker.record_gauges().await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
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
        let config = cli.common.load_config_for(crate::config::Role::Worker)?;
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
