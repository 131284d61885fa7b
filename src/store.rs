//! What the receiver writes: each event once under its key, and an audit row for
//! every delivery.

use std::net::IpAddr;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A verified delivery, ready to be stored.
pub struct NewDelivery<'a> {
    pub source: &'a str,
    pub environment: &'a str,
    pub event_key: &'a str,
    pub event_type: Option<&'a str>,
    pub payload: &'a [u8],
    /// The payload as JSON text, when it is JSON PostgreSQL can store.
    pub payload_json: Option<&'a str>,
    pub headers: serde_json::Value,
    pub payload_sha256: &'a str,
    pub remote_addr: Option<IpAddr>,
    /// `accepted` for deliveries over HTTP, `imported` for operator imports.
    pub new_outcome: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// A new event was stored.
    Stored,
    /// The key was stored already, with the same payload.
    Duplicate,
    /// The key was stored already, with a different payload.
    Conflict,
}

impl IngestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "accepted",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("the event row vanished while its delivery was recorded")]
    Vanished,
}

/// Stores the event if its key is new and always records the delivery, in one
/// statement (so one transaction). The caller answers only after this returns.
pub async fn ingest(
    conn: &mut PgConnection,
    delivery: &NewDelivery<'_>,
) -> Result<(IngestOutcome, Uuid), StoreError> {
    let id = Uuid::now_v7();
    let remote_addr = delivery.remote_addr.map(|ip| ip.to_string());
    // A concurrent first delivery of the same key can commit after this
    // statement's snapshot: then neither branch sees a row, and one more try does.
    for _ in 0..3 {
        let row = sqlx::query!(
            r#"
            WITH inserted AS (
                INSERT INTO inbox_events (id, source, environment, event_key, event_type,
                                          payload, payload_json, headers, payload_sha256)
                VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9)
                ON CONFLICT (source, event_key) DO NOTHING
                RETURNING id
            ), existing AS (
                SELECT e.id, e.payload_sha256
                FROM inbox_events e
                WHERE e.source = $2 AND e.event_key = $4
                  AND NOT EXISTS (SELECT 1 FROM inserted)
            ), event AS (
                SELECT id, CASE WHEN $11::text = 'imported' THEN 'imported' ELSE 'accepted' END AS outcome,
                       'accepted' AS kind
                FROM inserted
                UNION ALL
                SELECT id,
                       CASE WHEN $11::text = 'imported' THEN 'imported'
                            WHEN payload_sha256 = $9 THEN 'duplicate' ELSE 'conflict' END,
                       CASE WHEN payload_sha256 = $9 THEN 'duplicate' ELSE 'conflict' END
                FROM existing
            ), delivery AS (
                INSERT INTO inbox_deliveries (source, remote_addr, outcome, reason, event_id, payload_sha256, status_code)
                SELECT $2, $10::text::inet, event.outcome,
                       CASE WHEN $11::text = 'imported' AND event.kind <> 'accepted' THEN event.kind END,
                       event.id, $9, 200
                FROM event
                RETURNING event_id
            )
            SELECT event.id AS "id!", event.kind AS "kind!"
            FROM event JOIN delivery ON delivery.event_id = event.id
            "#,
            id,
            delivery.source,
            delivery.environment,
            delivery.event_key,
            delivery.event_type,
            delivery.payload,
            delivery.payload_json,
            delivery.headers,
            delivery.payload_sha256,
            remote_addr,
            delivery.new_outcome,
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            let outcome = match row.kind.as_str() {
                "accepted" => IngestOutcome::Stored,
                "duplicate" => IngestOutcome::Duplicate,
                _ => IngestOutcome::Conflict,
            };
            return Ok((outcome, row.id));
        }
    }
    Err(StoreError::Vanished)
}

/// A delivery that was refused: audited with its precise reason, nothing stored.
pub struct Rejection<'a> {
    pub source: &'a str,
    pub remote_addr: Option<IpAddr>,
    pub outcome: &'static str,
    pub reason: &'a str,
    pub payload_sha256: Option<&'a str>,
    pub status_code: u16,
}

pub async fn record_rejection(pool: &PgPool, rejection: &Rejection<'_>) -> Result<(), StoreError> {
    sqlx::query!(
        r#"
        INSERT INTO inbox_deliveries (source, remote_addr, outcome, reason, payload_sha256, status_code)
        VALUES ($1, $2::text::inet, $3, $4, $5, $6)
        "#,
        rejection.source,
        rejection.remote_addr.map(|ip| ip.to_string()),
        rejection.outcome,
        rejection.reason,
        rejection.payload_sha256,
        i32::from(rejection.status_code),
    )
    .execute(pool)
    .await?;
    Ok(())
}
