//! Group commit: concurrent deliveries share one transaction, so the receiver
//! is not bounded by how many single commits PostgreSQL can make. Each request
//! is still answered only after the commit that holds its rows.
//!
//! Requests queue here (bounded: a full queue is a 503, never unbounded
//! memory). A collector takes what is queued as soon as a committer is free,
//! up to `max_batch` deliveries, waiting at most `max_wait` for more; while
//! every committer is busy, requests gather into the next batch by themselves.
//! A batch is three round trips (BEGIN, the statement, COMMIT), and each
//! committer keeps its connection from one batch to the next while deliveries
//! keep coming; after a second without any, it hands it back to the pool.
//!
//! The receiver runs one group commit per HTTP worker, on that worker's thread
//! and with connections of its own (see [`GroupCommitSettings::share`]): a
//! request, its batch and its answer stay on one thread, where handing them
//! between threads cost a fifth of the receiver's CPU and a wake-up each way.
//!
//! A 503 means "nothing stored", so a request gives up at its deadline only
//! while it is still queued. Once taken into a batch it waits for the batch's
//! outcome, and the batch's statements are limited to the earliest deadline
//! among its requests: the answer is late by at most a commit, never wrong.

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{pool::PoolConnection, Acquire, PgPool, Postgres};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use crate::store::{self, IngestOutcome, NewDelivery, Origin, StoreError};
use uuid::Uuid;

/// How deliveries are gathered into transactions.
#[derive(Clone, Copy, Debug)]
pub struct GroupCommitSettings {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Batches committing at once, each on its own connection.
    pub committers: usize,
    /// Deliveries waiting for a batch; beyond this, 503.
    pub queue_capacity: usize,
    /// The limit every statement of the pool already has; a batch whose
    /// earliest deadline is nearer sets a tighter one for itself.
    pub statement_timeout: Duration,
}

impl GroupCommitSettings {
    /// What HTTP worker `index` of `workers` gets: its share of the
    /// committers and of the queue, at least one of each. Each worker commits
    /// the deliveries it serves, so a request and its batch never change
    /// threads.
    ///
    /// ```
    /// # use hookbox::receiver::group_commit::GroupCommitSettings;
    /// # use std::time::Duration;
    /// let receiver = GroupCommitSettings {
    ///     max_batch: 256,
    ///     max_wait: Duration::ZERO,
    ///     committers: 3,
    ///     queue_capacity: 8192,
    ///     statement_timeout: Duration::from_secs(8),
    /// };
    /// let shares: Vec<usize> = (0..2).map(|w| receiver.share(2, w).committers).collect();
    /// assert_eq!(shares, [2, 1]);
    /// assert_eq!(receiver.share(4, 3).committers, 1, "at least one each");
    /// assert_eq!(receiver.share(2, 0).queue_capacity, 4096);
    /// ```
    pub fn share(&self, workers: usize, index: usize) -> Self {
        let workers = workers.max(1);
        let index = index % workers;
        let part = |total: usize| (total / workers + usize::from(index < total % workers)).max(1);
        Self {
            committers: part(self.committers),
            queue_capacity: part(self.queue_capacity),
            ..*self
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0} deliveries are already waiting to be committed")]
    QueueFull(usize),
    #[error("the delivery's deadline passed before it could be committed")]
    DeadlinePassed,
    #[error("the batch holding this delivery was not committed")]
    BatchFailed(#[source] Arc<StoreError>),
    #[error("the receiver is stopping")]
    Stopped,
}

type Reply = oneshot::Sender<Result<(IngestOutcome, Uuid), CommitError>>;

struct Waiting {
    delivery: NewDelivery,
    reply: Reply,
    deadline: Instant,
    state: Arc<AtomicU8>,
}

// A waiting request's state: the collector and the request race to move it
// out of QUEUED, and exactly one of them wins.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

fn move_from_queued(state: &AtomicU8, to: u8) -> bool {
    state
        .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// The requests' side: hands a delivery over and waits for its commit.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Waiting>,
    capacity: usize,
}

impl GroupCommit {
    /// Starts the collector on the current runtime (an HTTP worker's own, in
    /// the receiver); it ends once every handle is dropped and what was queued
    /// is committed. `pool` is the collector's own: its connections belong to
    /// this runtime, so a batch's round trips wake no other thread.
    pub fn start(pool: PgPool, settings: GroupCommitSettings) -> Self {
        let capacity = settings.queue_capacity.max(1);
        let (queue, receiver) = mpsc::channel(capacity);
        tokio::spawn(collect(pool, settings, receiver));
        Self { queue, capacity }
    }

    /// Stores `delivery` in the next batch. Past `deadline` it gives up if its
    /// batch has not started; a batch that has started is waited for.
    pub async fn store(
        &self,
        delivery: NewDelivery,
        deadline: Instant,
    ) -> Result<(IngestOutcome, Uuid), CommitError> {
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        self.queue
            .try_send(Waiting {
                delivery,
                reply,
                deadline,
                state: state.clone(),
            })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!("hookbox_ingest_queue_full_total").increment(1);
                    CommitError::QueueFull(self.capacity)
                }
                mpsc::error::TrySendError::Closed(_) => CommitError::Stopped,
            })?;
        let answer = match tokio::time::timeout_at(deadline, &mut answer).await {
            Ok(answer) => answer,
            Err(_) if move_from_queued(&state, ABANDONED) => {
                return Err(CommitError::DeadlinePassed)
            }
            Err(_) => answer.await,
        };
        answer.unwrap_or(Err(CommitError::Stopped))
    }
}

/// One of the batches that may commit at once, and the connection it keeps
/// from one batch to the next. Kept, a connection is neither handed back to
/// the pool nor taken from it for each batch: the pool tests every connection
/// handed back with a round trip of its own.
#[derive(Default)]
struct Committer {
    connection: Option<(PoolConnection<Postgres>, std::time::Instant)>,
}

impl Committer {
    /// The kept connection, unless it sat idle long enough that the pool
    /// should test it first (a database restart may have broken it).
    fn take_connection(&mut self) -> Option<PoolConnection<Postgres>> {
        let (connection, used_at) = self.connection.take()?;
        (used_at.elapsed() < crate::db::TEST_CONNECTIONS_IDLE_FOR).then_some(connection)
    }

    /// Keeps a connection whose batch ended as the server said it would.
    fn keep(&mut self, connection: PoolConnection<Postgres>) {
        self.connection = Some((connection, std::time::Instant::now()));
    }

    /// Hands the connection back to the pool: an idle receiver holds none,
    /// so readiness probes and the pool's own limits see them.
    fn release(&mut self) {
        self.connection = None;
    }
}

/// A committer lent to a batch. It is handed back when the batch ends, even
/// by a panic, so the number of committers never shrinks. Its connection is
/// clean whenever that happens: a batch holds its connection outside the
/// committer until it has committed.
struct Lent {
    committer: Option<Committer>,
    free: mpsc::Sender<Committer>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(committer) = self.committer.take() {
            // Never full: the channel holds as many committers as there are.
            let _ = self.free.try_send(committer);
        }
    }
}

async fn collect(pool: PgPool, settings: GroupCommitSettings, mut queue: mpsc::Receiver<Waiting>) {
    let count = settings.committers.max(1);
    let (free_committers, mut free) = mpsc::channel(count);
    for _ in 0..count {
        let _ = free_committers.try_send(Committer::default());
    }
    let max_batch = settings.max_batch.max(1);
    let mut held = None;
    loop {
        let mut committer = match held.take() {
            Some(committer) => committer,
            None => match free.recv().await {
                Some(committer) => committer,
                None => return,
            },
        };
        let first = loop {
            match tokio::time::timeout(crate::db::TEST_CONNECTIONS_IDLE_FOR, queue.recv()).await {
                Ok(Some(first)) => break first,
                Ok(None) => return,
                // Idle for a second: every committer not busy hands its
                // connection back; busy ones do so once they are free.
                Err(_) => {
                    committer.release();
                    let mut idle = Vec::new();
                    while let Ok(mut other) = free.try_recv() {
                        other.release();
                        idle.push(other);
                    }
                    for other in idle {
                        let _ = free_committers.try_send(other);
                    }
                }
            }
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(waiting) => batch.push(waiting),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, queue.recv()).await {
                        Ok(Some(waiting)) => batch.push(waiting),
                        _ => break,
                    }
                }
            }
        }
        // A request that gave up (its client left, or its deadline passed) is
        // not stored: nobody would learn that it was.
        batch.retain(|waiting| {
            !waiting.reply.is_closed() && move_from_queued(&waiting.state, TAKEN)
        });
        if batch.is_empty() {
            held = Some(committer);
            continue;
        }
        let pool = pool.clone();
        let statement_timeout = settings.statement_timeout;
        let mut lent = Lent {
            committer: Some(committer),
            free: free_committers.clone(),
        };
        tokio::spawn(async move {
            if let Some(committer) = lent.committer.as_mut() {
                commit(&pool, committer, batch, statement_timeout).await;
            }
        });
    }
}

async fn commit(
    pool: &PgPool,
    committer: &mut Committer,
    batch: Vec<Waiting>,
    statement_timeout: Duration,
) {
    metrics::histogram!("hookbox_ingest_batch_size").record(batch.len() as f64);
    let Some(deadline) = batch.iter().map(|waiting| waiting.deadline).min() else {
        return;
    };
    let limits = Limits {
        deadline,
        statement_timeout,
    };
    let (deliveries, replies): (Vec<NewDelivery>, Vec<Reply>) = batch
        .into_iter()
        .map(|waiting| (waiting.delivery, waiting.reply))
        .unzip();
    match store_all(pool, committer, &deliveries, limits).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        // The database refused some row of the batch: store each delivery on
        // its own so that only the offending one fails.
        Err(CommitError::BatchFailed(error))
            if error.is_refusal_of_data() && deliveries.len() > 1 =>
        {
            // The SQLSTATE, not the message: a message may quote the data.
            tracing::warn!(
                batch = deliveries.len(),
                sqlstate = error.sqlstate().as_deref(),
                "a batch was refused; storing its deliveries one by one"
            );
            for (delivery, reply) in deliveries.iter().zip(replies) {
                let result = store_all(pool, committer, std::slice::from_ref(delivery), limits)
                    .await
                    .map(|mut outcomes| outcomes.remove(0));
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// How long a batch's statements may take.
#[derive(Clone, Copy)]
struct Limits {
    /// The earliest deadline among the batch's requests.
    deadline: Instant,
    statement_timeout: Duration,
}

/// Below this, a batch is not started: it could not finish in time.
const SHORTEST_BUDGET: Duration = Duration::from_millis(5);

/// How often a batch that lost a race (a deadlock, a serialization failure)
/// is tried again before its requests are answered 503.
const RACE_RETRIES: usize = 3;

/// Stores the batch in one transaction, trying again when it lost a race with
/// another transaction.
async fn store_all(
    pool: &PgPool,
    committer: &mut Committer,
    deliveries: &[NewDelivery],
    limits: Limits,
) -> Result<Vec<(IngestOutcome, Uuid)>, CommitError> {
    let mut tries = 0;
    loop {
        match store_once(pool, committer, deliveries, limits).await {
            Err(CommitError::BatchFailed(error)) if error.lost_a_race() && tries < RACE_RETRIES => {
                tries += 1;
                metrics::counter!("hookbox_ingest_batch_retries_total").increment(1);
                tracing::info!(
                    batch = deliveries.len(),
                    sqlstate = error.sqlstate().as_deref(),
                    "a batch lost a race with another transaction; trying it again"
                );
            }
            other => return other,
        }
    }
}

/// Stores the batch on the committer's connection (or one from the pool),
/// which it keeps only after a batch that committed: after any failure the
/// connection goes back to the pool, which tests it before its next use.
async fn store_once(
    pool: &PgPool,
    committer: &mut Committer,
    deliveries: &[NewDelivery],
    limits: Limits,
) -> Result<Vec<(IngestOutcome, Uuid)>, CommitError> {
    let failed = |error: StoreError| CommitError::BatchFailed(Arc::new(error));
    let mut connection = match committer.take_connection() {
        Some(connection) => connection,
        None => tokio::time::timeout_at(limits.deadline, pool.acquire())
            .await
            .map_err(|_| CommitError::DeadlinePassed)?
            .map_err(|error| failed(error.into()))?,
    };
    let budget = limits.deadline.saturating_duration_since(Instant::now());
    if budget < SHORTEST_BUDGET {
        return Err(CommitError::DeadlinePassed);
    }
    // One transaction: the batch's statements commit together or not at all,
    // so a 503 always means that none of its events was stored.
    let mut transaction = connection.begin().await.map_err(|e| failed(e.into()))?;
    let stored = async {
        if budget < limits.statement_timeout {
            // Rare (the queue was slow): the tighter limit applies to this
            // batch's statements only.
            store::set_local_statement_timeout(&mut transaction, budget).await?;
        }
        store::ingest_batch_in_transaction(&mut transaction, deliveries, Origin::Http).await
    }
    .await
    .map_err(failed)?;
    match transaction.commit().await {
        Ok(()) => {
            committer.keep(connection);
            Ok(stored.outcomes)
        }
        // The server answered the COMMIT: the transaction is rolled back.
        Err(error @ sqlx::Error::Database(_)) => Err(failed(error.into())),
        // The connection failed during COMMIT: it may have committed or not.
        Err(error) => {
            drop(connection);
            let outcome = match &stored.transaction {
                Some(identity) => committed(pool, identity, limits.deadline).await,
                None => None,
            };
            match outcome {
                Some(true) => Ok(stored.outcomes),
                _ => Err(failed(error.into())),
            }
        }
    }
}

/// Whether a batch whose COMMIT got no answer was committed, asked of the
/// database by the transaction's id. The rows themselves cannot tell: a COMMIT
/// still under way (a slow flush, a synchronous replica) shows none of them
/// yet and may land a moment later, so a transaction still running is ended
/// before its outcome is read. `None` when that cannot be known in time; the
/// caller then answers 503, and a sender that retries is answered `duplicate`
/// if it was stored after all.
async fn committed(
    pool: &PgPool,
    transaction: &store::TransactionIdentity,
    deadline: Instant,
) -> Option<bool> {
    let committed =
        tokio::time::timeout_at(deadline, store::transaction_outcome(pool, transaction))
            .await
            .ok()?
            .ok()??;
    tracing::warn!(
        committed,
        "the database did not answer a batch's COMMIT; its outcome was looked up"
    );
    Some(committed)
}
