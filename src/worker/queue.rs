//! The worker's SQL: claim, finish, rescue, release. Each is one statement.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::handler::Event;

/// A claimed event and the attempt row written for it.
pub struct Claimed {
    pub event: Event,
    pub attempt_id: i64,
    /// NULL payload: pruned before a replay asked for it again.
    pub payload_missing: bool,
}

/// Claims up to `limit` due events under a lease, counts the attempt and
/// writes its row: all committed before any handler runs.
pub async fn claim(
    pool: &PgPool,
    worker_id: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"
        WITH due AS (
            SELECT id FROM inbox_events
            WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
            ORDER BY next_attempt_at, id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE inbox_events e
            SET status = 'processing', attempts = e.attempts + 1, locked_by = $2,
                locked_until = now() + make_interval(secs => $3)
            FROM due WHERE e.id = due.id
            RETURNING e.id, e.source, e.event_key, e.event_type, e.attempts, e.payload, e.payload_json
        ), attempt AS (
            INSERT INTO inbox_attempts (event_id, attempt, worker_id)
            SELECT id, attempts, $2 FROM claimed
            RETURNING id, event_id
        )
        SELECT c.id AS "id!", c.source AS "source!", c.event_key AS "event_key!", c.event_type,
               c.attempts AS "attempts!", c.payload, c.payload_json, a.id AS "attempt_id!"
        FROM claimed c JOIN attempt a ON a.event_id = c.id
        "#,
        limit,
        worker_id,
        lease.as_secs_f64(),
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Claimed {
            payload_missing: row.payload.is_none(),
            event: Event {
                id: row.id,
                source: row.source,
                event_key: row.event_key,
                event_type: row.event_type,
                attempt: row.attempts,
                payload: row.payload.unwrap_or_default(),
                payload_json: row.payload_json,
            },
            attempt_id: row.attempt_id,
        })
        .collect())
}

/// Locks the event for its completion transaction if the lease is still this
/// worker's; `false` means another worker or a rescue has taken it over.
pub async fn lock_if_lease_held(
    conn: &mut PgConnection,
    event_id: Uuid,
    worker_id: &str,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let held = sqlx::query_scalar!(
        r#"
        SELECT true AS "held!" FROM inbox_events
        WHERE id = $1 AND status = 'processing' AND locked_by = $2 AND attempts = $3
          AND locked_until > now()
        FOR UPDATE
        "#,
        event_id,
        worker_id,
        attempt,
    )
    .fetch_optional(conn)
    .await?;
    Ok(held.is_some())
}

/// How an attempt ended, as the tables record it.
pub struct Finish<'a> {
    pub event_status: &'static str,
    pub attempt_outcome: &'static str,
    pub handler: Option<&'a str>,
    pub error: Option<String>,
    /// For `retrying`: when the next attempt is due.
    pub retry_in: Option<Duration>,
}

/// Records the outcome on the event and its attempt row (one statement).
pub async fn finish(
    conn: &mut PgConnection,
    event_id: Uuid,
    attempt_id: i64,
    finish: &Finish<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        WITH event AS (
            UPDATE inbox_events
            SET status = $2,
                processed_at = CASE WHEN $2 IN ('succeeded', 'skipped', 'dead') THEN now() END,
                next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at
                                       ELSE now() + make_interval(secs => $5::float8) END,
                last_error = $4, locked_by = NULL, locked_until = NULL
            WHERE id = $1
            RETURNING id
        )
        UPDATE inbox_attempts
        SET finished_at = now(), outcome = $3, handler = $6, error = $4
        WHERE id = $7 AND EXISTS (SELECT 1 FROM event)
        "#,
        event_id,
        finish.event_status,
        finish.attempt_outcome,
        finish.error.as_deref(),
        finish.retry_in.map(|d| d.as_secs_f64()),
        finish.handler,
        attempt_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Expired leases: the worker died or hung. The event becomes due again, or
/// `dead` once it has used its attempts, so a poison event cannot loop forever.
pub async fn rescue_expired(pool: &PgPool, max_attempts: i32) -> Result<u64, sqlx::Error> {
    let result = sqlx::query!(
        r#"
        WITH expired AS (
            SELECT id FROM inbox_events
            WHERE status = 'processing' AND locked_until < now()
            ORDER BY locked_until
            LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ), rescued AS (
            UPDATE inbox_events e
            SET status = CASE WHEN e.attempts >= $1 THEN 'dead' ELSE 'retrying' END,
                processed_at = CASE WHEN e.attempts >= $1 THEN now() END,
                next_attempt_at = now(),
                last_error = 'lease expired: worker ' || e.locked_by || ' did not finish attempt ' || e.attempts,
                locked_by = NULL, locked_until = NULL
            FROM expired WHERE e.id = expired.id
            RETURNING e.id, e.attempts, e.last_error
        )
        UPDATE inbox_attempts a
        SET finished_at = now(), outcome = 'lease_expired', error = rescued.last_error
        FROM rescued
        WHERE a.event_id = rescued.id AND a.attempt = rescued.attempts AND a.finished_at IS NULL
        "#,
        max_attempts,
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// At shutdown, hands back what this worker could not finish in its grace
/// period. Rows still locked by an unfinished transaction are skipped: their
/// lease expires and rescue takes them.
pub async fn release(pool: &PgPool, worker_id: &str) -> Result<u64, sqlx::Error> {
    let result = sqlx::query!(
        r#"
        WITH mine AS (
            SELECT id FROM inbox_events
            WHERE status = 'processing' AND locked_by = $1
            FOR UPDATE SKIP LOCKED
        ), released AS (
            UPDATE inbox_events e
            SET status = 'retrying', next_attempt_at = now(), locked_by = NULL, locked_until = NULL,
                last_error = 'released: the worker stopped before the handler finished'
            FROM mine WHERE e.id = mine.id
            RETURNING e.id, e.attempts
        )
        UPDATE inbox_attempts a
        SET finished_at = now(), outcome = 'retry', error = 'released: the worker stopped before the handler finished'
        FROM released
        WHERE a.event_id = released.id AND a.attempt = released.attempts AND a.finished_at IS NULL
        "#,
        worker_id,
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Events not yet finished, by source and status, and how long the oldest due
/// event has waited (seconds), for the gauges.
pub async fn depth(
    pool: &PgPool,
) -> Result<(Vec<(String, String, i64)>, Option<f64>), sqlx::Error> {
    let counts = sqlx::query!(
        r#"
        SELECT source, status, count(*) AS "count!"
        FROM inbox_events
        WHERE status IN ('pending', 'processing', 'retrying', 'dead')
        GROUP BY source, status
        "#
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.source, row.status, row.count))
    .collect();
    let oldest = sqlx::query_scalar!(
        r#"
        SELECT extract(epoch FROM now() - min(next_attempt_at))::float8
        FROM inbox_events
        WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
        "#
    )
    .fetch_one(pool)
    .await?;
    Ok((counts, oldest))
}
