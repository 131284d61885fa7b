//! Flow control, for operators: skip events (releasing their ordering key),
//! pause and resume sources and handlers, and see what is held back and why.
//! Every change is an `inbox_actions` row (`skip`, `pause`, `resume`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{add_affected, record_action};
use crate::status::EventStatus;

/// What a pause applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum PauseTarget {
    /// No worker starts new work for the source's events.
    Source(String),
    /// No worker starts new work for the events routed to the handler.
    Handler(String),
}

impl PauseTarget {
    fn kind(&self) -> &'static str {
        match self {
            Self::Source(_) => "source",
            Self::Handler(_) => "handler",
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Source(name) | Self::Handler(name) => name,
        }
    }
}

impl std::fmt::Display for PauseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("--reason is required: it is recorded with the action")]
    NoReason,
    #[error("name at least one event id")]
    NothingNamed,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn require_reason(reason: &str) -> Result<(), FlowError> {
    if reason.trim().is_empty() {
        return Err(FlowError::NoReason);
    }
    Ok(())
}

/// What `skip` did.
#[derive(Clone, Debug, Serialize)]
pub struct SkipReport {
    pub action_id: i64,
    pub skipped: i64,
    /// Named events that were not skipped: in flight, already finished, or unknown.
    pub not_skipped: Vec<Uuid>,
}

/// Ends waiting events (`pending`, `retrying`, `dead`) as `skipped`, which
/// releases their ordering key; one action row, linked to each event.
pub async fn skip(
    pool: &PgPool,
    ids: &[Uuid],
    actor: &str,
    reason: &str,
) -> Result<SkipReport, FlowError> {
    require_reason(reason)?;
    if ids.is_empty() {
        return Err(FlowError::NothingNamed);
    }
    let mut transaction = pool.begin().await?;
    let action_id = record_action(
        &mut transaction,
        actor,
        "skip",
        &serde_json::json!({ "ids": ids }),
        Some(reason),
    )
    .await?;
    let error = format!("skipped by {actor}: {reason}");
    let skipped = sqlx::query!(
        r#"
        WITH skipped AS (
            UPDATE inbox_event_state
            SET status = 'skipped', processed_at = now(), last_error = $2
            WHERE id = ANY($1) AND status IN ('pending', 'retrying', 'dead')
            RETURNING id, source, ordering_key
        ), linked AS (
            INSERT INTO inbox_action_events (action_id, event_id)
            SELECT $3, id FROM skipped
            RETURNING event_id
        )
        SELECT s.id, s.source, s.ordering_key FROM skipped s JOIN linked l ON l.event_id = s.id
        "#,
        ids,
        error,
        action_id,
    )
    .fetch_all(&mut *transaction)
    .await?;
    let (sources, keys): (Vec<String>, Vec<String>) = skipped
        .iter()
        .filter_map(|row| Some((row.source.clone(), row.ordering_key.clone()?)))
        .unzip();
    if !keys.is_empty() {
        // Their keys' next events, if a claim set them aside, are due now.
        sqlx::query!("SELECT inbox_wake_next($1, $2)", &sources, &keys)
            .execute(&mut *transaction)
            .await?;
    }
    let skipped: Vec<Uuid> = skipped.into_iter().map(|row| row.id).collect();
    add_affected(&mut transaction, action_id, skipped.len() as i64).await?;
    // The next event of each released key may now start.
    sqlx::query!("SELECT pg_notify('hookbox_events', '')")
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(SkipReport {
        action_id,
        skipped: skipped.len() as i64,
        not_skipped: ids
            .iter()
            .filter(|id| !skipped.contains(id))
            .copied()
            .collect(),
    })
}

/// Pauses `target`: the receiver keeps accepting, no worker starts new work
/// for it (each checks at every claim), work in flight finishes. Returns
/// `false` if it was paused already (nothing recorded).
pub async fn pause(
    pool: &PgPool,
    target: &PauseTarget,
    actor: &str,
    reason: &str,
) -> Result<bool, FlowError> {
    change_pause(pool, target, actor, reason, PauseChange::Pause).await
}

/// Resumes `target` and wakes the workers. Returns `false` if it was not paused.
pub async fn resume(
    pool: &PgPool,
    target: &PauseTarget,
    actor: &str,
    reason: &str,
) -> Result<bool, FlowError> {
    change_pause(pool, target, actor, reason, PauseChange::Resume).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PauseChange {
    Pause,
    Resume,
}

/// The row in `inbox_pauses` and, if it changed, the action that says so.
async fn change_pause(
    pool: &PgPool,
    target: &PauseTarget,
    actor: &str,
    reason: &str,
    change: PauseChange,
) -> Result<bool, FlowError> {
    require_reason(reason)?;
    let mut transaction = pool.begin().await?;
    let changed = match change {
        PauseChange::Pause => sqlx::query!(
            "INSERT INTO inbox_pauses (kind, name, actor, reason) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, name) DO NOTHING",
            target.kind(),
            target.name(),
            actor,
            reason,
        )
        .execute(&mut *transaction)
        .await?
        .rows_affected(),
        PauseChange::Resume => sqlx::query!(
            "DELETE FROM inbox_pauses WHERE kind = $1 AND name = $2",
            target.kind(),
            target.name(),
        )
        .execute(&mut *transaction)
        .await?
        .rows_affected(),
    } == 1;
    if changed {
        let action = match change {
            PauseChange::Pause => "pause",
            PauseChange::Resume => "resume",
        };
        let filter = serde_json::to_value(target).unwrap_or_default();
        let action_id =
            record_action(&mut transaction, actor, action, &filter, Some(reason)).await?;
        add_affected(&mut transaction, action_id, 1).await?;
        if change == PauseChange::Resume {
            // What waited may start now.
            sqlx::query!("SELECT pg_notify('hookbox_events', '')")
                .execute(&mut *transaction)
                .await?;
        }
    }
    transaction.commit().await?;
    Ok(changed)
}

/// A pause in force.
#[derive(Clone, Debug, Serialize)]
pub struct Pause {
    pub kind: String,
    pub name: String,
    pub paused_at: DateTime<Utc>,
    pub actor: String,
    pub reason: String,
}

pub async fn pauses(pool: &PgPool) -> Result<Vec<Pause>, sqlx::Error> {
    sqlx::query_as!(
        Pause,
        "SELECT kind, name, paused_at, actor, reason FROM inbox_pauses ORDER BY kind, name"
    )
    .fetch_all(pool)
    .await
}

/// An ordered event held back, and the event holding it (`inbox_blocked_events`).
#[derive(Clone, Debug, Serialize)]
pub struct BlockedEvent {
    pub id: Uuid,
    pub source: String,
    pub ordering_key: String,
    pub event_type: Option<String>,
    pub status: EventStatus,
    pub received_at: DateTime<Utc>,
    pub blocked_by: Uuid,
    pub blocked_by_status: EventStatus,
    pub blocked_by_error: Option<String>,
}

pub async fn blocked(
    pool: &PgPool,
    source: Option<&str>,
    limit: i64,
) -> Result<Vec<BlockedEvent>, sqlx::Error> {
    sqlx::query_as!(
        BlockedEvent,
        r#"
        SELECT id AS "id!", source AS "source!", ordering_key AS "ordering_key!", event_type,
               status AS "status!: EventStatus", received_at AS "received_at!",
               blocked_by AS "blocked_by!", blocked_by_status AS "blocked_by_status!: EventStatus",
               blocked_by_error
        FROM inbox_blocked_events
        WHERE ($1::text IS NULL OR source = $1)
        ORDER BY source, ordering_key, received_at
        LIMIT $2
        "#,
        source,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// A handler's circuit as the database keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct CircuitState {
    pub handler: String,
    pub circuit: String,
    pub failures: i32,
    pub open_until: Option<DateTime<Utc>>,
}

/// Circuits that are not closed.
pub async fn open_circuits(pool: &PgPool) -> Result<Vec<CircuitState>, sqlx::Error> {
    sqlx::query_as!(
        CircuitState,
        "SELECT handler, circuit, failures, open_until FROM inbox_handler_state
         WHERE circuit <> 'closed' ORDER BY handler"
    )
    .fetch_all(pool)
    .await
}
