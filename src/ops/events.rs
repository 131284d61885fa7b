//! `hookbox events list|show`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::filter::EventFilter;
use crate::status::EventStatus;

#[derive(Clone, Debug, Serialize)]
pub struct EventSummary {
    pub id: Uuid,
    pub source: String,
    pub event_type: Option<String>,
    pub status: EventStatus,
    pub attempts: i32,
    pub received_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Newest first: by id, which is time-ordered and drawn when the event is
/// received (the console pages the same way), so a page is read off the
/// primary key or the status index, however many events are stored.
pub async fn list(
    pool: &PgPool,
    filter: &EventFilter,
    limit: i64,
) -> Result<Vec<EventSummary>, sqlx::Error> {
    sqlx::query_as!(
        EventSummary,
        r#"
        SELECT id, source, event_type, status AS "status: EventStatus", attempts, received_at, next_attempt_at, processed_at, last_error
        FROM inbox_event_state
        WHERE ($1::text IS NULL OR source = $1)
          AND (cardinality($2::text[]) = 0 OR status = ANY($2))
          AND ($3::text IS NULL OR event_type LIKE $3)
          AND ($4::timestamptz IS NULL OR received_at >= $4)
          AND ($5::timestamptz IS NULL OR received_at < $5)
        ORDER BY id DESC
        LIMIT $6
        "#,
        filter.source,
        &filter.statuses as &[EventStatus],
        filter.type_pattern(),
        filter.since,
        filter.until,
        limit,
    )
    .fetch_all(pool)
    .await
}

#[derive(Clone, Debug, Serialize)]
pub struct EventDetail {
    pub id: Uuid,
    pub source: String,
    pub environment: String,
    pub event_key: String,
    pub event_type: Option<String>,
    pub status: EventStatus,
    pub attempts: i32,
    pub received_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub processed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub payload_sha256: String,
    pub headers: Option<serde_json::Value>,
    /// Only when asked for; `None` also once pruned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    pub payload_pruned: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TimelineEntry {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub outcome: String,
    pub detail: String,
}

/// An event by id, or by `source:key`.
pub enum EventReference {
    Id(Uuid),
    Key { source: String, key: String },
}

impl std::str::FromStr for EventReference {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = text.parse() {
            return Ok(Self::Id(id));
        }
        match text.split_once(':') {
            Some((source, key)) if !source.is_empty() && !key.is_empty() => Ok(Self::Key {
                source: source.to_owned(),
                key: key.to_owned(),
            }),
            _ => Err(format!("`{text}` is neither an event id nor source:key")),
        }
    }
}

pub async fn show(
    pool: &PgPool,
    reference: &EventReference,
    with_payload: bool,
) -> Result<Option<(EventDetail, Vec<TimelineEntry>)>, sqlx::Error> {
    let (id, source, key) = match reference {
        EventReference::Id(id) => (Some(*id), None, None),
        EventReference::Key { source, key } => (None, Some(source.as_str()), Some(key.as_str())),
    };
    let row = sqlx::query!(
        r#"
        SELECT id AS "id!", source AS "source!", environment AS "environment!", event_key AS "event_key!",
               event_type, status AS "status!: EventStatus", attempts AS "attempts!", received_at AS "received_at!",
               next_attempt_at AS "next_attempt_at!", locked_by, locked_until, processed_at, last_error,
               payload_sha256 AS "payload_sha256!", headers,
               CASE WHEN $4 THEN payload END AS payload, payload IS NULL AS "payload_pruned!"
        FROM inbox_events
        WHERE ($1::uuid IS NOT NULL AND id = $1) OR (source = $2 AND event_key = $3)
        "#,
        id,
        source,
        key,
        with_payload,
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let timeline = sqlx::query_as!(
        TimelineEntry,
        r#"
        SELECT at AS "at!", kind AS "kind!", outcome AS "outcome!", detail AS "detail!"
        FROM inbox_event_timeline WHERE event_id = $1
        ORDER BY at, CASE kind WHEN 'delivery' THEN 0 WHEN 'action' THEN 1 ELSE 2 END
        "#,
        row.id
    )
    .fetch_all(pool)
    .await?;
    let detail = EventDetail {
        id: row.id,
        source: row.source,
        environment: row.environment,
        event_key: row.event_key,
        event_type: row.event_type,
        status: row.status,
        attempts: row.attempts,
        received_at: row.received_at,
        next_attempt_at: row.next_attempt_at,
        locked_by: row.locked_by,
        locked_until: row.locked_until,
        processed_at: row.processed_at,
        last_error: row.last_error,
        payload_sha256: row.payload_sha256,
        headers: row.headers,
        payload: row
            .payload
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        payload_pruned: row.payload_pruned,
    };
    Ok(Some((detail, timeline)))
}
