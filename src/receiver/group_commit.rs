//! Group commit: concurrent deliveries share one transaction, so the receiver
//! is not bounded by how many single commits PostgreSQL can make. Each request
//! is still answered only after the commit that holds its rows.
//!
//! Requests queue here (bounded: a full queue is a 503, never unbounded
//! memory). A collector takes what is queued as soon as a committer is free,
//! up to `max_batch` deliveries, waiting at most `max_wait` for more; while
//! every committer is busy, requests gather into the next batch by themselves.
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

use sqlx::{Acquire, PgPool};
use tokio::{
    sync::{mpsc, oneshot, Semaphore},
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
    /// Starts the collector on the current runtime; it ends once every handle
    /// is dropped and what was queued is committed.
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

async fn collect(pool: PgPool, settings: GroupCommitSettings, mut queue: mpsc::Receiver<Waiting>) {
    let committers = Arc::new(Semaphore::new(settings.committers.max(1)));
    let max_batch = settings.max_batch.max(1);
    loop {
        let Ok(committer) = committers.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
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
            continue;
        }
        let pool = pool.clone();
        let statement_timeout = settings.statement_timeout;
        tokio::spawn(async move {
            commit(&pool, batch, statement_timeout).await;
            drop(committer);
        });
    }
}

async fn commit(pool: &PgPool, batch: Vec<Waiting>, statement_timeout: Duration) {
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
    match store_all(pool, &deliveries, limits).await {
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
                let result = store_all(pool, std::slice::from_ref(delivery), limits)
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
    deliveries: &[NewDelivery],
    limits: Limits,
) -> Result<Vec<(IngestOutcome, Uuid)>, CommitError> {
    let mut tries = 0;
    loop {
        match store_once(pool, deliveries, limits).await {
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

async fn store_once(
    pool: &PgPool,
    deliveries: &[NewDelivery],
    limits: Limits,
) -> Result<Vec<(IngestOutcome, Uuid)>, CommitError> {
    let failed = |error: StoreError| CommitError::BatchFailed(Arc::new(error));
    let mut connection = tokio::time::timeout_at(limits.deadline, pool.acquire())
        .await
        .map_err(|_| CommitError::DeadlinePassed)?
        .map_err(|error| failed(error.into()))?;
    let budget = limits.deadline.saturating_duration_since(Instant::now());
    if budget < SHORTEST_BUDGET {
        return Err(CommitError::DeadlinePassed);
    }
    // One transaction: the batch's statements commit together or not at all,
    // so a 503 always means that none of its events was stored.
    let mut transaction = connection.begin().await.map_err(|e| failed(e.into()))?;
    let (identity, outcomes) = async {
        if budget < limits.statement_timeout {
            // Rare (the queue was slow): the tighter limit applies to this
            // batch's statements only.
            store::set_local_statement_timeout(&mut transaction, budget).await?;
        }
        let identity = store::transaction_identity(&mut transaction).await?;
        let outcomes = store::ingest_batch(&mut transaction, deliveries, Origin::Http).await?;
        Ok((identity, outcomes))
    }
    .await
    .map_err(failed)?;
    match transaction.commit().await {
        Ok(()) => Ok(outcomes),
        // The server answered the COMMIT: the transaction is rolled back.
        Err(error @ sqlx::Error::Database(_)) => Err(failed(error.into())),
        // The connection failed during COMMIT: it may have committed or not.
        Err(error) => {
            drop(connection);
            match committed(pool, &identity, limits.deadline).await {
                Some(true) => Ok(outcomes),
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
