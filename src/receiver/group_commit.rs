//! Group commit: concurrent deliveries share one transaction, so the receiver
//! is not bounded by how many single commits PostgreSQL can make. Each request
//! is still answered only after the commit that holds its rows.
//!
//! Requests queue here (bounded: a full queue is a 503, never unbounded
//! memory). A collector takes what is queued as soon as a committer is free,
//! up to `max_batch` deliveries, waiting at most `max_wait` for more; while
//! every committer is busy, requests gather into the next batch by themselves.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};

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
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0} deliveries are already waiting to be committed")]
    QueueFull(usize),
    #[error("the batch holding this delivery was not committed")]
    BatchFailed(#[source] Arc<StoreError>),
    #[error("the receiver is stopping")]
    Stopped,
}

type Reply = oneshot::Sender<Result<(IngestOutcome, Uuid), CommitError>>;

struct Waiting {
    delivery: NewDelivery,
    reply: Reply,
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

    pub async fn store(&self, delivery: NewDelivery) -> Result<(IngestOutcome, Uuid), CommitError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Waiting { delivery, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!("hookbox_ingest_queue_full_total").increment(1);
                    CommitError::QueueFull(self.capacity)
                }
                mpsc::error::TrySendError::Closed(_) => CommitError::Stopped,
            })?;
        answer.await.unwrap_or(Err(CommitError::Stopped))
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
        batch.retain(|waiting| !waiting.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, batch).await;
            drop(committer);
        });
    }
}

async fn commit(pool: &PgPool, batch: Vec<Waiting>) {
    metrics::histogram!("hookbox_ingest_batch_size").record(batch.len() as f64);
    let (deliveries, replies): (Vec<NewDelivery>, Vec<Reply>) = batch
        .into_iter()
        .map(|waiting| (waiting.delivery, waiting.reply))
        .unzip();
    match store_all(pool, &deliveries).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        // The database refused some row of the batch: store each delivery on
        // its own so that only the offending one fails.
        Err(error) if error.is_refusal_of_data() && deliveries.len() > 1 => {
            tracing::warn!(
                batch = deliveries.len(),
                error = format!("{:#}", anyhow::Error::new(error)),
                "a batch was refused; storing its deliveries one by one"
            );
            for (delivery, reply) in deliveries.iter().zip(replies) {
                let result = store_all(pool, std::slice::from_ref(delivery))
                    .await
                    .map(|mut outcomes| outcomes.remove(0))
                    .map_err(|e| CommitError::BatchFailed(Arc::new(e)));
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for reply in replies {
                let _ = reply.send(Err(CommitError::BatchFailed(error.clone())));
            }
        }
    }
}

async fn store_all(
    pool: &PgPool,
    deliveries: &[NewDelivery],
) -> Result<Vec<(IngestOutcome, Uuid)>, StoreError> {
    let mut connection = pool.acquire().await?;
    store::ingest_batch(&mut connection, deliveries, Origin::Http).await
}
