//! `hookbox status`: per source, events by status, the oldest due event, and
//! recent throughput.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub pending: i64,
    pub processing: i64,
    pub retrying: i64,
    pub succeeded: i64,
    pub dead: i64,
    pub skipped: i64,
    /// Seconds the oldest due event has waited past its `next_attempt_at`.
    pub oldest_due_seconds: Option<f64>,
    pub last_delivery_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub deliveries_5m: i64,
    pub deliveries_1h: i64,
    pub completed_5m: i64,
    pub completed_1h: i64,
}

pub async fn status(pool: &PgPool) -> Result<Vec<SourceStatus>, sqlx::Error> {
    sqlx::query_as!(
        SourceStatus,
        r#"
        SELECT h.source AS "source!", h.pending AS "pending!", h.processing AS "processing!",
               h.retrying AS "retrying!", h.succeeded AS "succeeded!", h.dead AS "dead!", h.skipped AS "skipped!",
               extract(epoch FROM h.oldest_due_age)::float8 AS oldest_due_seconds,
               h.last_delivery_at, h.last_failure_at,
               (SELECT count(*) FROM inbox_deliveries d
                 WHERE d.source = h.source AND d.received_at > now() - interval '5 minutes') AS "deliveries_5m!",
               (SELECT count(*) FROM inbox_deliveries d
                 WHERE d.source = h.source AND d.received_at > now() - interval '1 hour') AS "deliveries_1h!",
               (SELECT count(*) FROM inbox_attempts a JOIN inbox_event_state e ON e.id = a.event_id
                 WHERE e.source = h.source AND a.outcome = 'succeeded'
                   AND a.finished_at > now() - interval '5 minutes') AS "completed_5m!",
               (SELECT count(*) FROM inbox_attempts a JOIN inbox_event_state e ON e.id = a.event_id
                 WHERE e.source = h.source AND a.outcome = 'succeeded'
                   AND a.finished_at > now() - interval '1 hour') AS "completed_1h!"
        FROM inbox_source_health h
        ORDER BY h.source
        "#
    )
    .fetch_all(pool)
    .await
}
