//! `hookbox replay`: run finished events again, in bounded batches, safely
//! while workers run and safely twice.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::status::EventStatus;

use super::{add_affected, events::EventSummary, filter::EventFilter, record_action};

/// Events that may be replayed: neither queued already nor in flight.
const REPLAYABLE: [EventStatus; 4] = [
    EventStatus::Dead,
    EventStatus::Skipped,
    EventStatus::Retrying,
    EventStatus::Succeeded,
];

#[derive(Clone, Debug)]
pub struct ReplayRequest {
    pub ids: Vec<Uuid>,
    pub filter: EventFilter,
    /// A succeeded event's handler will run again: it must be asked for.
    pub include_succeeded: bool,
    pub reason: String,
    pub actor: String,
    pub batch_size: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("name event ids or a filter (--source, --status, --type, --since, --until)")]
    NothingNamed,
    #[error("--reason is required: it is recorded with the action")]
    NoReason,
    #[error("replaying succeeded events runs their handlers again: add --include-succeeded")]
    SucceededNeedsFlag,
    #[error("status {0} cannot be replayed (only dead, skipped, retrying and succeeded events)")]
    NotReplayable(EventStatus),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub action_id: Option<i64>,
    pub replayed: i64,
}

impl ReplayRequest {
    /// The statuses this replay touches.
    fn statuses(&self) -> Result<Vec<EventStatus>, ReplayError> {
        if self.ids.is_empty() && self.filter.is_empty() {
            return Err(ReplayError::NothingNamed);
        }
        if self.reason.trim().is_empty() {
            return Err(ReplayError::NoReason);
        }
        let statuses: Vec<EventStatus> = if self.filter.statuses.is_empty() {
            REPLAYABLE
                .into_iter()
                .filter(|s| self.include_succeeded || *s != EventStatus::Succeeded)
                .collect()
        } else {
            self.filter.statuses.clone()
        };
        if let Some(bad) = statuses.iter().find(|s| !REPLAYABLE.contains(s)) {
            return Err(ReplayError::NotReplayable(*bad));
        }
        if statuses.contains(&EventStatus::Succeeded) && !self.include_succeeded {
            return Err(ReplayError::SucceededNeedsFlag);
        }
        Ok(statuses)
    }
}

/// What a replay would touch: the count and the first `limit` events.
pub async fn preview(
    pool: &PgPool,
    request: &ReplayRequest,
    limit: i64,
) -> Result<(i64, Vec<EventSummary>), ReplayError> {
    let statuses = request.statuses()?;
    let filter = &request.filter;
    // One scan: the window count is the whole match, the rows the first `limit`.
    let rows = sqlx::query!(
        r#"
        SELECT id, source, event_type, status AS "status: EventStatus", attempts, received_at, next_attempt_at, processed_at, last_error,
               count(*) OVER () AS "total!"
        FROM inbox_event_state
        WHERE status = ANY($1)
          AND ($2::text IS NULL OR source = $2)
          AND ($3::text IS NULL OR event_type LIKE $3)
          AND ($4::timestamptz IS NULL OR received_at >= $4)
          AND ($5::timestamptz IS NULL OR received_at < $5)
          AND (cardinality($6::uuid[]) = 0 OR id = ANY($6))
        ORDER BY id
        LIMIT $7
        "#,
        &statuses as &[EventStatus],
        filter.source,
        filter.type_pattern(),
        filter.since,
        filter.until,
        &request.ids,
        limit,
    )
    .fetch_all(pool)
    .await?;
    let total = rows.first().map_or(0, |row| row.total);
    let sample = rows
        .into_iter()
        .map(|row| EventSummary {
            id: row.id,
            source: row.source,
            event_type: row.event_type,
            status: row.status,
            attempts: row.attempts,
            received_at: row.received_at,
            next_attempt_at: row.next_attempt_at,
            processed_at: row.processed_at,
            last_error: row.last_error,
        })
        .collect();
    Ok((total, sample))
}

/// Resets matching events to `pending` (attempt history kept, attempt count
/// restarted) in batches of `batch_size`, each its own short transaction,
/// and records one action. `progress` is told how many each batch replayed.
pub async fn replay(
    pool: &PgPool,
    request: &ReplayRequest,
    progress: impl Fn(u64),
) -> Result<ReplayReport, ReplayError> {
    let statuses = request.statuses()?;
    let filter = &request.filter;
    let recorded = serde_json::json!({ "filter": filter, "ids": request.ids, "include_succeeded": request.include_succeeded });
    let action_id = {
        let mut conn = pool.acquire().await?;
        record_action(
            &mut conn,
            &request.actor,
            "replay",
            &recorded,
            Some(&request.reason),
        )
        .await?
    };
    let mut replayed = 0i64;
    // One status at a time, each in id order from where its last batch ended
    // (keyset paging on inbox_events_status_id_idx): no batch reads past the
    // events that earlier batches replayed.
    for status in &statuses {
        replayed += replay_status(pool, request, status, action_id, &progress).await?;
    }
    tracing::info!(action_id, replayed, "replay recorded");
    Ok(ReplayReport {
        action_id: Some(action_id),
        replayed,
    })
}

async fn replay_status(
    pool: &PgPool,
    request: &ReplayRequest,
    status: &EventStatus,
    action_id: i64,
    progress: &impl Fn(u64),
) -> Result<i64, ReplayError> {
    let filter = &request.filter;
    let mut after = Uuid::nil();
    let mut replayed = 0i64;
    loop {
        let mut transaction = pool.begin().await?;
        let ids = sqlx::query_scalar!(
            r#"
            WITH batch AS (
                SELECT id FROM inbox_event_state
                WHERE status = $2 AND id > $1
                  AND ($3::text IS NULL OR source = $3)
                  AND ($4::text IS NULL OR event_type LIKE $4)
                  AND ($5::timestamptz IS NULL OR received_at >= $5)
                  AND ($6::timestamptz IS NULL OR received_at < $6)
                  AND (cardinality($7::uuid[]) = 0 OR id = ANY($7))
                ORDER BY id
                LIMIT $8
                -- Waits, never skips: the finished events a replay takes are
                -- locked only for moments (a duplicate delivery's key-share
                -- lock, a prune), and a skipped one would be left unreplayed.
                -- NO KEY UPDATE does not conflict with key-share locks at all.
                FOR NO KEY UPDATE
            ), replayed AS (
                UPDATE inbox_event_state e
                SET status = 'pending', attempts = 0, next_attempt_at = now(), processed_at = NULL, last_error = NULL
                FROM batch WHERE e.id = batch.id
                RETURNING e.id
            ), linked AS (
                INSERT INTO inbox_action_events (action_id, event_id)
                SELECT $9, id FROM replayed
                RETURNING event_id
            )
            SELECT event_id AS "id!" FROM linked ORDER BY event_id
            "#,
            after,
            status.as_str(),
            filter.source,
            filter.type_pattern(),
            filter.since,
            filter.until,
            &request.ids,
            request.batch_size,
            action_id,
        )
        .fetch_all(&mut *transaction)
        .await?;
        let count = ids.len() as i64;
        if count > 0 {
            add_affected(&mut transaction, action_id, count).await?;
            sqlx::query!("SELECT pg_notify('hookbox_events', '')")
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        replayed += count;
        progress(count as u64);
        match ids.last() {
            Some(last) if count == request.batch_size => after = *last,
            _ => break,
        }
    }
    Ok(replayed)
}
