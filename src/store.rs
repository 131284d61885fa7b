//! What the receiver writes: each event once under its key, and an audit row for
//! every delivery.

use std::net::IpAddr;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{event_key::EventOrdering, status::DeliveryOutcome};

/// A verified delivery, ready to be stored.
#[derive(Clone, Debug)]
pub struct NewDelivery {
    pub source: String,
    pub environment: String,
    pub event_key: String,
    pub event_type: Option<String>,
    /// For a source with an `ordering_key`: the event's key and time.
    pub ordering: Option<EventOrdering>,
    pub payload: Vec<u8>,
    /// The payload is JSON PostgreSQL's `jsonb` can hold: `inbox_events.payload_json`
    /// is then computed from the bytes (stored once).
    pub payload_is_json: bool,
    pub headers: serde_json::Value,
    pub payload_sha256: String,
    pub remote_addr: Option<IpAddr>,
}

/// How deliveries reached hookbox, as their audit rows say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Over HTTP: the row's outcome is what happened to the event.
    Http,
    /// An operator's import: the outcome is `imported`, the reason what happened.
    Import,
}

impl Origin {
    fn delivery_outcome(self) -> DeliveryOutcome {
        match self {
            Self::Http => DeliveryOutcome::Accepted,
            Self::Import => DeliveryOutcome::Imported,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// A new event was stored.
    Accepted,
    /// The key was stored already, with the same payload.
    Duplicate,
    /// The key was stored already, with a different payload.
    Conflict,
}

impl IngestOutcome {
    /// The outcome a delivery's audit row records for it (over HTTP).
    pub fn delivery_outcome(self) -> DeliveryOutcome {
        match self {
            Self::Accepted => DeliveryOutcome::Accepted,
            Self::Duplicate => DeliveryOutcome::Duplicate,
            Self::Conflict => DeliveryOutcome::Conflict,
        }
    }

    /// The text of [`Self::delivery_outcome`], as responses and audit rows say it.
    pub fn as_str(self) -> &'static str {
        self.delivery_outcome().as_str()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("the event row vanished while its delivery was recorded")]
    Vanished,
    /// A duplicate's event was deleted (`hookbox prune --keys-older-than`)
    /// between the statement's key check and its delivery row: tried again,
    /// the key is new and its delivery is stored as a new event.
    #[error("a duplicate's event was pruned while its delivery was recorded")]
    PrunedMeanwhile,
}

impl StoreError {
    /// See [`crate::db::refuses_the_data`]: retrying the same rows fails again.
    pub fn is_refusal_of_data(&self) -> bool {
        matches!(self, Self::Database(error) if crate::db::refuses_the_data(error))
    }

    /// See [`crate::db::lost_a_race`]: the same rows, tried again, go in.
    pub fn lost_a_race(&self) -> bool {
        match self {
            Self::Database(error) => crate::db::lost_a_race(error),
            Self::PrunedMeanwhile => true,
            Self::Vanished => false,
        }
    }

    /// The SQLSTATE, for logs: unlike the message, it never quotes the data.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Self::Database(sqlx::Error::Database(db)) => db.code().map(String::from),
            _ => None,
        }
    }
}

/// Limits the rest of the current transaction's statements to `limit`.
pub async fn set_local_statement_timeout(
    conn: &mut PgConnection,
    limit: std::time::Duration,
) -> Result<(), StoreError> {
    let milliseconds = limit.as_millis().max(1).to_string();
    sqlx::query!(
        "SELECT set_config('statement_timeout', $1, true)",
        milliseconds
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Stores each event whose key is new and records every delivery, in one
/// statement (one round trip; rarely a second, see below). Run it inside a
/// transaction so that the batch commits whole or not at all. Keys are
/// inserted in key order, so batches sharing keys cannot deadlock each other.
/// Outcomes come back in the order of `deliveries`; a key repeated within the batch is stored once and
/// its later deliveries are duplicates or conflicts of the first. The caller
/// answers only after this returns (and, inside a transaction, commits).
pub async fn ingest_batch(
    conn: &mut PgConnection,
    deliveries: &[NewDelivery],
    origin: Origin,
) -> Result<Vec<(IngestOutcome, Uuid)>, StoreError> {
    Ok(ingest_batch_in_transaction(conn, deliveries, origin)
        .await?
        .outcomes)
}

/// What [`ingest_batch_in_transaction`] stored, and the transaction it did so in.
#[derive(Debug)]
pub struct IngestedBatch {
    /// In the order of the deliveries.
    pub outcomes: Vec<(IngestOutcome, Uuid)>,
    /// What answers a COMMIT that got no reply (see [`transaction_outcome`]);
    /// `None` only for an empty batch, which wrote nothing.
    pub transaction: Option<TransactionIdentity>,
}

/// [`ingest_batch`], which also returns the transaction's identity. The
/// identity comes back with the statement's rows, not in a round trip of its
/// own before it: a COMMIT is only sent after those rows arrived, so a batch
/// whose rows were lost was never committed and needs no identity.
pub async fn ingest_batch_in_transaction(
    conn: &mut PgConnection,
    deliveries: &[NewDelivery],
    origin: Origin,
) -> Result<IngestedBatch, StoreError> {
    let mut outcomes: Vec<Option<(IngestOutcome, Uuid)>> = vec![None; deliveries.len()];
    let mut open: Vec<usize> = (0..deliveries.len()).collect();
    let mut transaction = None;
    // A concurrent first delivery of the same key can commit after this
    // statement's snapshot: then neither branch sees a row for it, and one more
    // try (of just those deliveries) does.
    for _ in 0..3 {
        if open.is_empty() {
            break;
        }
        let batch: Vec<&NewDelivery> = open.iter().map(|&i| &deliveries[i]).collect();
        let resolved = ingest_statement(conn, &batch, origin).await?;
        transaction = transaction.or(resolved.transaction);
        for (position, outcome) in resolved.outcomes {
            outcomes[open[position]] = Some(outcome);
        }
        open.retain(|&i| outcomes[i].is_none());
    }
    let outcomes = outcomes
        .into_iter()
        .map(|outcome| outcome.ok_or(StoreError::Vanished))
        .collect::<Result<_, _>>()?;
    // Every delivery resolved, so some statement returned a row, and with it
    // the identity.
    Ok(IngestedBatch {
        outcomes,
        transaction,
    })
}

/// The deliveries one statement resolved, by position in its batch, and the
/// transaction it ran in (`None` when it resolved none).
struct Resolved {
    outcomes: Vec<(usize, (IngestOutcome, Uuid))>,
    transaction: Option<TransactionIdentity>,
}

/// One round trip; returns (position in `batch`, outcome) for each delivery it
/// could resolve.
async fn ingest_statement(
    conn: &mut PgConnection,
    batch: &[&NewDelivery],
    origin: Origin,
) -> Result<Resolved, StoreError> {
    let ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
    let text = |f: for<'d> fn(&'d NewDelivery) -> Option<&'d str>| -> Vec<Option<&str>> {
        batch.iter().map(|d| f(d)).collect()
    };
    let sources = text(|d| Some(&d.source));
    let environments = text(|d| Some(&d.environment));
    let keys = text(|d| Some(&d.event_key));
    let types = text(|d| d.event_type.as_deref());
    let is_json: Vec<bool> = batch.iter().map(|d| d.payload_is_json).collect();
    let shas = text(|d| Some(&d.payload_sha256));
    let headers: Vec<String> = batch.iter().map(|d| d.headers.to_string()).collect();
    let addresses: Vec<Option<String>> = batch
        .iter()
        .map(|d| d.remote_addr.map(|ip| ip.to_string()))
        .collect();
    let payloads: Vec<&[u8]> = batch.iter().map(|d| d.payload.as_slice()).collect();
    let ordering = |f: fn(&EventOrdering) -> bool| -> Vec<Option<bool>> {
        batch.iter().map(|d| d.ordering.as_ref().map(f)).collect()
    };
    let ordering_keys: Vec<Option<&str>> = batch
        .iter()
        .map(|d| d.ordering.as_ref().map(|o| o.key.as_str()))
        .collect();
    let ordered_at: Vec<Option<chrono::DateTime<chrono::Utc>>> = batch
        .iter()
        .map(|d| d.ordering.as_ref().and_then(|o| o.ordered_at))
        .collect();
    let dead_blocks = ordering(|o| o.dead_blocks);
    let skip_if_stale = ordering(|o| o.skip_if_stale);
    let rows = sqlx::query!(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::bytea[], $7::bool[], $8::text[], $9::text[], $10::text[],
                                 $12::text[], $13::timestamptz[], $14::bool[], $15::bool[])
                          WITH ORDINALITY
                     AS i(id, source, environment, event_key, event_type,
                          payload, payload_is_json, headers, payload_sha256, remote_addr,
                          ordering_key, ordered_at, dead_blocks, skip_if_stale, position)
        ), first AS (
            SELECT DISTINCT ON (source, event_key) *
            FROM input ORDER BY source, event_key, position
        ), inserted AS (
            INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256,
                                           ordering_key, ordered_at, ordering_seq, dead_blocks, skip_if_stale)
            SELECT id, source, environment, event_key, event_type, payload_sha256,
                   ordering_key,
                   CASE WHEN ordering_key IS NOT NULL THEN coalesce(ordered_at, now()) END,
                   CASE WHEN ordering_key IS NOT NULL THEN nextval('inbox_ordering_seq') END,
                   dead_blocks, skip_if_stale
            FROM first ORDER BY source, event_key
            ON CONFLICT (source, event_key) DO NOTHING
            RETURNING id, source, event_key, payload_sha256
        ), payload AS (
            -- The bytes of new events only, in the partition of their id.
            INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
            SELECT f.id, f.payload, f.payload_is_json, f.headers::jsonb
            FROM first f JOIN inserted n ON n.id = f.id
        ), stored AS (
            SELECT id, source, event_key, payload_sha256, true AS fresh FROM inserted
            UNION ALL
            SELECT e.id, e.source, e.event_key, e.payload_sha256, false
            FROM inbox_event_state e JOIN first f ON e.source = f.source AND e.event_key = f.event_key
            WHERE NOT EXISTS (SELECT 1 FROM inserted n
                              WHERE n.source = f.source AND n.event_key = f.event_key)
        ), resolved AS (
            SELECT i.position, s.id AS event_id, i.source, i.remote_addr, i.payload_sha256,
                   CASE WHEN s.fresh AND s.id = i.id THEN 'accepted'
                        WHEN s.payload_sha256 = i.payload_sha256 THEN 'duplicate'
                        ELSE 'conflict' END AS kind
            FROM input i JOIN stored s ON s.source = i.source AND s.event_key = i.event_key
        ), delivery AS (
            INSERT INTO inbox_deliveries (source, remote_addr, outcome, reason, event_id,
                                          payload_sha256, status_code)
            SELECT source, remote_addr::inet,
                   CASE WHEN $11::text = 'imported' THEN 'imported' ELSE kind END,
                   CASE WHEN $11::text = 'imported' AND kind <> 'accepted' THEN kind END,
                   event_id, payload_sha256, 200
            FROM resolved ORDER BY position
        )
        SELECT position AS "position!", event_id AS "event_id!", kind AS "kind!: DeliveryOutcome",
               pg_backend_pid() AS "backend_pid!", pg_current_xact_id()::text AS "xid!"
        FROM resolved
        "#,
        &ids,
        &sources as &[Option<&str>],
        &environments as &[Option<&str>],
        &keys as &[Option<&str>],
        &types as &[Option<&str>],
        &payloads as &[&[u8]],
        &is_json,
        &headers,
        &shas as &[Option<&str>],
        &addresses as &[Option<String>],
        origin.delivery_outcome() as DeliveryOutcome,
        &ordering_keys as &[Option<&str>],
        &ordered_at as &[Option<chrono::DateTime<chrono::Utc>>],
        &dead_blocks as &[Option<bool>],
        &skip_if_stale as &[Option<bool>],
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|error| {
        // The statement's one reference that can fail is a delivery's to
        // an event it saw (a new event's rows are its own).
        if crate::db::is_foreign_key_violation(&error) {
            StoreError::PrunedMeanwhile
        } else {
            error.into()
        }
    })?;
    let transaction = rows.first().map(|row| TransactionIdentity {
        backend_pid: row.backend_pid,
        xid: row.xid.clone(),
    });
    let outcomes = rows
        .into_iter()
        .map(|row| {
            let outcome = match row.kind {
                DeliveryOutcome::Accepted => IngestOutcome::Accepted,
                DeliveryOutcome::Duplicate => IngestOutcome::Duplicate,
                _ => IngestOutcome::Conflict,
            };
            // ORDINALITY counts from 1.
            (row.position as usize - 1, (outcome, row.event_id))
        })
        .collect();
    Ok(Resolved {
        outcomes,
        transaction,
    })
}

/// Which server process runs the current transaction, and the transaction's
/// id: what it takes to learn later whether it committed (see
/// [`transaction_outcome`]), even if the connection is lost during COMMIT.
#[derive(Clone, Debug)]
pub struct TransactionIdentity {
    backend_pid: i32,
    xid: String,
}

/// How a transaction whose COMMIT got no answer ended: `Some(true)` committed,
/// `Some(false)` rolled back, `None` unknowable (its id is too old). One still
/// running (its COMMIT not yet made, the client gone) is ended first, so that
/// the answer cannot change afterwards. A question that gets no answer (see
/// [`crate::db::did_not_answer`]) is asked again for half a second, never
/// across a restart of the server; the caller bounds the whole with its
/// deadline.
pub async fn transaction_outcome(
    pool: &PgPool,
    transaction: &TransactionIdentity,
) -> Result<Option<bool>, StoreError> {
    let patience_ends = tokio::time::Instant::now() + NO_ANSWER_PATIENCE;
    loop {
        let status = sqlx::query_scalar!("SELECT pg_xact_status($1::text::xid8)", transaction.xid)
            .fetch_one(pool)
            .await;
        let status = match status {
            Ok(status) => status,
            // The pool's other connections may have broken with the one that
            // lost the COMMIT: ask again, on another one, but only briefly.
            // A server that crashed and came back may have given this
            // transaction's id to another one (an id whose WAL was lost is
            // used again), whose outcome this would then report.
            Err(error)
                if crate::db::did_not_answer(&error)
                    && tokio::time::Instant::now() < patience_ends =>
            {
                tokio::time::sleep(OUTCOME_RETRY_PAUSE).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        match status.as_deref() {
            Some("committed") => return Ok(Some(true)),
            Some("aborted") => return Ok(Some(false)),
            None => return Ok(None),
            Some(_in_progress) => {
                let ended = sqlx::query!(
                    "SELECT pg_terminate_backend($1, 1000)",
                    transaction.backend_pid
                )
                .fetch_one(pool)
                .await;
                match ended {
                    Ok(_) => {}
                    Err(error) if crate::db::did_not_answer(&error) => {}
                    Err(error) => return Err(error.into()),
                }
                // Paced even when the backend is gone at once: a transaction
                // that stays in progress without it would otherwise be asked
                // about without a pause until the deadline.
                tokio::time::sleep(OUTCOME_RETRY_PAUSE).await;
            }
        }
    }
}

/// Between two tries of [`transaction_outcome`] that got no answer.
const OUTCOME_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// How long [`transaction_outcome`] asks again when it gets no answer: long
/// enough for a pool whose other connections broke too, far shorter than a
/// PostgreSQL restart (after which the transaction's id may name another).
const NO_ANSWER_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);
