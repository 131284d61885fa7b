//! What the console reads, beyond what the CLI's `ops` functions already give.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    ops::{events::EventSummary, filter::EventFilter},
    status::EventStatus,
};

/// A payload search: JSON containment (`{"event":{"type":"x"}}`) or one
/// field equal to a value (`uid = ABC`, `event.type = x`, `/event/type = x`).
/// Both become containment, so one query serves both.
pub fn parse_payload_search(text: &str) -> Result<Option<serde_json::Value>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.starts_with('{') {
        return match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value @ serde_json::Value::Object(_)) => Ok(Some(value)),
            _ => Err("a payload search starting with { must be a JSON object".into()),
        };
    }
    let (path, value) = text
        .split_once('=')
        .ok_or("write a JSON object to contain, or field = value")?;
    let fields: Vec<&str> = path
        .trim()
        .trim_start_matches('/')
        .split(['.', '/'])
        .filter(|f| !f.is_empty())
        .collect();
    if fields.is_empty() {
        return Err("name the field before =".into());
    }
    let value = value.trim();
    // `n = 5` and `flag = true` match numbers and booleans; anything else is text.
    let mut contained = match serde_json::from_str::<serde_json::Value>(value) {
        Ok(scalar) if !scalar.is_object() && !scalar.is_array() => scalar,
        _ => serde_json::Value::String(value.trim_matches('"').to_owned()),
    };
    for field in fields.iter().rev() {
        contained = serde_json::json!({ *field: contained });
    }
    Ok(Some(contained))
}

/// One page of events, newest first, after the keyset cursor `before`.
pub async fn events_page(
    pool: &PgPool,
    filter: &EventFilter,
    payload: Option<&serde_json::Value>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<EventSummary>, sqlx::Error> {
    // Ids are time-ordered (UUIDv7): paging by id reads each page off the
    // (status, id) index or the primary key, however deep the page.
    sqlx::query_as!(
        EventSummary,
        r#"
        SELECT id AS "id!", source AS "source!", event_type, status AS "status!: EventStatus", attempts AS "attempts!",
               received_at AS "received_at!", next_attempt_at AS "next_attempt_at!", processed_at, last_error
        FROM inbox_events
        WHERE ($1::text IS NULL OR source = $1)
          AND (cardinality($2::text[]) = 0 OR status = ANY($2))
          AND ($3::text IS NULL OR event_type LIKE $3)
          AND ($4::timestamptz IS NULL OR received_at >= $4)
          AND ($5::timestamptz IS NULL OR received_at < $5)
          AND ($6::jsonb IS NULL OR payload_json @> $6)
          AND ($7::uuid IS NULL OR id < $7)
        ORDER BY id DESC
        LIMIT $8
        "#,
        filter.source,
        &filter.statuses as &[EventStatus],
        filter.type_pattern(),
        filter.since,
        filter.until,
        payload,
        before,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// One source on the overview. Only the statuses an operator acts on are
/// counted (from the status index alone): counting every succeeded event of
/// a large inbox would make the page as slow as the table is big.
#[derive(Clone, Debug, Serialize)]
pub struct SourceHealth {
    pub source: String,
    pub pending: i64,
    pub processing: i64,
    pub retrying: i64,
    pub dead: i64,
    pub oldest_due_seconds: Option<f64>,
    pub deliveries_1h: i64,
    pub completed_1h: i64,
    pub failed_1h: i64,
    pub last_delivery_at: Option<DateTime<Utc>>,
}

pub async fn source_health(
    pool: &PgPool,
    sources: &[String],
) -> Result<Vec<SourceHealth>, sqlx::Error> {
    sqlx::query_as!(
        SourceHealth,
        r#"
        WITH open AS (
            SELECT source, status, count(*) AS n
            FROM inbox_event_state
            WHERE status IN ('pending', 'processing', 'retrying', 'dead')
            GROUP BY source, status
        ), recent_attempts AS (
            SELECT e.source,
                   count(*) FILTER (WHERE a.outcome = 'succeeded') AS completed,
                   count(*) FILTER (WHERE a.outcome IN ('retry', 'dead', 'lease_expired')) AS failed
            FROM inbox_attempts a JOIN inbox_event_state e ON e.id = a.event_id
            WHERE a.started_at > now() - interval '1 hour'
            GROUP BY e.source
        )
        SELECT s.source AS "source!",
               coalesce((SELECT n FROM open WHERE open.source = s.source AND status = 'pending'), 0) AS "pending!",
               coalesce((SELECT n FROM open WHERE open.source = s.source AND status = 'processing'), 0) AS "processing!",
               coalesce((SELECT n FROM open WHERE open.source = s.source AND status = 'retrying'), 0) AS "retrying!",
               coalesce((SELECT n FROM open WHERE open.source = s.source AND status = 'dead'), 0) AS "dead!",
               (SELECT extract(epoch FROM now() - min(next_attempt_at))::float8 FROM inbox_event_state
                 WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now() AND source = s.source)
                 AS oldest_due_seconds,
               (SELECT count(*) FROM inbox_deliveries d
                 WHERE d.source = s.source AND d.received_at > now() - interval '1 hour') AS "deliveries_1h!",
               coalesce((SELECT completed FROM recent_attempts r WHERE r.source = s.source), 0) AS "completed_1h!",
               coalesce((SELECT failed FROM recent_attempts r WHERE r.source = s.source), 0) AS "failed_1h!",
               (SELECT max(d.received_at) FROM inbox_deliveries d WHERE d.source = s.source) AS last_delivery_at
        FROM (SELECT unnest($1::text[]) AS source
              UNION SELECT DISTINCT source FROM open) s
        ORDER BY s.source
        "#,
        sources
    )
    .fetch_all(pool)
    .await
}

/// Deliveries, completions and failures per bucket, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub deliveries: i64,
    pub completions: i64,
    pub failures: i64,
}

pub async fn throughput(
    pool: &PgPool,
    span_seconds: f64,
    bucket_seconds: f64,
) -> Result<Vec<Bucket>, sqlx::Error> {
    sqlx::query_as!(
        Bucket,
        r#"
        WITH buckets AS (
            SELECT generate_series(
                date_bin(make_interval(secs => $2), now() - make_interval(secs => $1), 'epoch'),
                now(),
                make_interval(secs => $2)) AS start
        ), deliveries AS (
            SELECT date_bin(make_interval(secs => $2), received_at, 'epoch') AS start, count(*) AS n
            FROM inbox_deliveries
            WHERE received_at >= now() - make_interval(secs => $1 + $2)
            GROUP BY 1
        ), attempts AS (
            SELECT date_bin(make_interval(secs => $2), started_at, 'epoch') AS start,
                   count(*) FILTER (WHERE outcome = 'succeeded') AS completions,
                   count(*) FILTER (WHERE outcome IN ('retry', 'dead', 'lease_expired')) AS failures
            FROM inbox_attempts
            WHERE started_at >= now() - make_interval(secs => $1 + $2)
            GROUP BY 1
        )
        SELECT b.start AS "start!", coalesce(d.n, 0) AS "deliveries!",
               coalesce(a.completions, 0) AS "completions!", coalesce(a.failures, 0) AS "failures!"
        FROM buckets b
        LEFT JOIN deliveries d ON d.start = b.start
        LEFT JOIN attempts a ON a.start = b.start
        ORDER BY b.start
        "#,
        span_seconds,
        bucket_seconds,
    )
    .fetch_all(pool)
    .await
}

#[derive(Clone, Debug, Serialize)]
pub struct ActionRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub filter: serde_json::Value,
    pub affected: i64,
    pub reason: Option<String>,
}

pub async fn actions(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ActionRow>, sqlx::Error> {
    sqlx::query_as!(
        ActionRow,
        r#"
        SELECT id, at, actor, action, filter, affected, reason
        FROM inbox_actions
        WHERE ($1::int8 IS NULL OR id < $1)
        ORDER BY id DESC
        LIMIT $2
        "#,
        before,
        limit
    )
    .fetch_all(pool)
    .await
}

#[derive(Clone, Debug, Serialize)]
pub struct NotificationRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub alert: String,
    pub condition: String,
    pub source: Option<String>,
    pub counts: serde_json::Value,
    pub outcome: String,
    pub status_code: Option<i32>,
    pub error: Option<String>,
}

pub async fn notifications(pool: &PgPool, limit: i64) -> Result<Vec<NotificationRow>, sqlx::Error> {
    sqlx::query_as!(
        NotificationRow,
        r#"
        SELECT id, at, alert, condition, source, counts, outcome, status_code, error
        FROM hookbox_alert_notifications
        ORDER BY id DESC
        LIMIT $1
        "#,
        limit
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_searches_become_containment() {
        assert_eq!(parse_payload_search("  ").unwrap(), None);
        assert_eq!(
            parse_payload_search("uid = ABC").unwrap(),
            Some(serde_json::json!({ "uid": "ABC" }))
        );
        assert_eq!(
            parse_payload_search("/event/type=application.complete").unwrap(),
            Some(serde_json::json!({ "event": { "type": "application.complete" } }))
        );
        assert_eq!(
            parse_payload_search("event.details.score = 5").unwrap(),
            Some(serde_json::json!({ "event": { "details": { "score": 5 } } }))
        );
        assert_eq!(
            parse_payload_search(r#"{"uid":"X"}"#).unwrap(),
            Some(serde_json::json!({ "uid": "X" }))
        );
        assert!(parse_payload_search("{not json").is_err());
        assert!(parse_payload_search("no equals sign").is_err());
    }
}
