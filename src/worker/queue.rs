//! The worker's SQL: claim, finish, rescue, release. Each is one statement.

use std::{collections::HashSet, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{handler::Event, routing::RouteTable};
use crate::config::Config;
use crate::status::{AttemptOutcome, EventStatus};

/// The statuses the queue gauges report: those an operator waits on.
pub const GAUGED_STATUSES: [EventStatus; 4] = [
    EventStatus::Pending,
    EventStatus::Processing,
    EventStatus::Retrying,
    EventStatus::Dead,
];

/// An attempt's row as the claim drew it: its id and when it started. The
/// row itself is written when the attempt ends (schema V17); until then both
/// are on the event's row. `inbox_attempts` is partitioned by `started_at`,
/// so the row lands in the partition of the attempt's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptRow {
    pub id: i64,
    pub started_at: DateTime<Utc>,
}

/// A claimed event and the attempt it starts.
pub struct Claimed {
    pub event: Event,
    pub attempt: AttemptRow,
    /// The handler the event's route names (`None`: no route matches).
    pub handler: Option<String>,
    /// Ordered after an event of its key that has already finished, in a
    /// source with `stale = "skip"`: it ends `skipped` without running.
    pub stale: bool,
    /// NULL payload: pruned before a replay asked for it again.
    pub payload_missing: bool,
    /// A handler that has not started by then does not start: the lease would
    /// run out under it.
    pub start_by: std::time::Instant,
}

/// What a worker may claim: the sources it knows, its routes, and the
/// handlers whose limits and circuits the database keeps.
#[derive(Debug, Default)]
pub struct ClaimPlan {
    pub sources: Vec<String>,
    pub routes: RouteTable,
    pub limited: Vec<String>,
    pub max_in_flight: Vec<Option<i32>>,
    pub rate: Vec<Option<f64>>,
    pub burst: Vec<Option<f64>>,
    pub has_circuit: Vec<bool>,
}

impl ClaimPlan {
    pub fn new(config: &Config) -> Self {
        let mut plan = Self {
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            routes: RouteTable::new(&config.routes),
            ..Self::default()
        };
        for (name, handler) in &config.handlers {
            let flow = handler.flow;
            if flow.is_limited() {
                plan.limited.push(name.clone());
                plan.max_in_flight
                    .push(flow.max_in_flight.map(|n| n.min(i32::MAX as u32) as i32));
                plan.rate.push(flow.rate.map(|(rate, _)| rate));
                plan.burst.push(flow.rate.map(|(_, burst)| burst));
                plan.has_circuit.push(flow.circuit.is_some());
            }
        }
        plan
    }
}

/// Claims up to `limit` due events under a lease, counts the attempt and
/// notes it on the event's row (its id and start): all committed before any
/// handler runs. One statement; the database decides what may start
/// (`inbox_claim`, migrations/V4, V17).
pub async fn claim(
    pool: &PgPool,
    worker_id: &str,
    limit: i64,
    lease: Duration,
    plan: &ClaimPlan,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let start_by = std::time::Instant::now() + lease.mul_f64(0.9);
    let rows = sqlx::query!(
        r#"
        SELECT id AS "id!", source AS "source!", event_key AS "event_key!", event_type,
               attempts AS "attempts!", payload, payload_is_json AS "payload_is_json!", attempt_id AS "attempt_id!",
               attempt_started_at AS "attempt_started_at!", handler, stale AS "stale!"
        FROM inbox_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        "#,
        worker_id,
        i32::try_from(limit).unwrap_or(i32::MAX),
        lease.as_secs_f64(),
        &plan.sources,
        &plan.routes.positions,
        &plan.routes.sources,
        &plan.routes.patterns as &[Option<String>],
        &plan.routes.handlers,
        &plan.limited,
        &plan.max_in_flight as &[Option<i32>],
        &plan.rate as &[Option<f64>],
        &plan.burst as &[Option<f64>],
        &plan.has_circuit,
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
                // The payload is stored once, as bytes (schema V12): its JSON is
                // parsed here, in the worker, not by the database.
                payload_json: row
                    .payload
                    .as_deref()
                    .filter(|_| row.payload_is_json)
                    .and_then(|bytes| serde_json::from_slice(bytes).ok()),
                payload: row.payload.unwrap_or_default(),
            },
            attempt: AttemptRow {
                id: row.attempt_id,
                started_at: row.attempt_started_at,
            },
            handler: row.handler,
            stale: row.stale,
            start_by,
        })
        .collect())
}

/// What identifies each claim's lease, as arrays for a statement: the
/// event, its attempt number and the id of its attempt in flight (drawn from
/// a sequence by the claim, so no two claims share it).
struct ClaimKeys {
    ids: Vec<Uuid>,
    attempts: Vec<i32>,
    attempt_ids: Vec<i64>,
}

impl ClaimKeys {
    fn of(claims: &[&Claimed]) -> Self {
        Self {
            ids: claims.iter().map(|c| c.event.id).collect(),
            attempts: claims.iter().map(|c| c.event.attempt).collect(),
            attempt_ids: claims.iter().map(|c| c.attempt.id).collect(),
        }
    }
}

/// Locks, for their completion transaction, the events whose lease is still
/// this worker's in the claim given (the event's attempt count and the id of
/// its attempt in flight); the others have been taken over by another worker, a rescue
/// or a newer claim of this worker's, and are neither locked nor waited for
/// (SKIP LOCKED: a row locked by someone else is one this claim no longer
/// holds). The claim is checked before the lock is taken, so a stale
/// completion does not lock the row of a newer claim of the same event: the
/// attempt in flight's id is on the event row (schema V17), so PostgreSQL
/// checks it again on the row as it is now if another transaction changed
/// the row meanwhile (a rescue, a replay and a new claim by this same
/// worker included).
///
/// A row can also be locked for a moment by a claim that skipped it: a claim
/// (`FOR UPDATE SKIP LOCKED`) locks a candidate before it rechecks it, and
/// keeps the lock of one that another worker claimed meanwhile until its own
/// statement commits. Such a row still shows as this worker's; it is tried
/// again every 25 ms for up to two seconds, instead of being taken for a
/// lease lost (which cost the attempt, and ran an external handler twice:
/// the outcome was not recorded and the lease ran out).
pub async fn lock_held(
    conn: &mut PgConnection,
    worker_id: &str,
    claims: &[&Claimed],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    /// How long apart, and for how long at most, a row that is still this
    /// worker's but locked by someone else is tried again: far longer than
    /// a claim takes (a claim's statement reached 0.7 s with four workers
    /// taking batches of 500 on two cores).
    const APART: Duration = Duration::from_millis(25);
    const AT_MOST: Duration = Duration::from_secs(2);
    let give_up = tokio::time::Instant::now() + AT_MOST;
    let mut held = lock_still_held(conn, worker_id, claims).await?;
    while tokio::time::Instant::now() < give_up {
        let missing: Vec<&Claimed> = claims
            .iter()
            .copied()
            .filter(|claim| !held.contains(&claim.event.id))
            .collect();
        if missing.is_empty() {
            break;
        }
        let looks_held = still_held(conn, worker_id, &missing).await?;
        let locked_elsewhere: Vec<&Claimed> = missing
            .into_iter()
            .filter(|claim| looks_held.contains(&claim.event.id))
            .collect();
        if locked_elsewhere.is_empty() {
            break;
        }
        tokio::time::sleep(APART).await;
        held.extend(lock_still_held(conn, worker_id, &locked_elsewhere).await?);
    }
    Ok(held)
}

/// The claims whose lease is still this worker's, locked (those locked by
/// someone else are skipped).
async fn lock_still_held(
    conn: &mut PgConnection,
    worker_id: &str,
    claims: &[&Claimed],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let ClaimKeys {
        ids,
        attempts,
        attempt_ids,
    } = ClaimKeys::of(claims);
    // The lease conditions sit inside CASE so that the plan stays on the
    // primary key: written plainly they match the lease index's predicate,
    // and the planner may walk that index (every recently claimed event).
    let held = sqlx::query_scalar!(
        r#"
        SELECT e.id
        FROM inbox_event_state e
        JOIN unnest($1::uuid[], $3::int4[], $4::int8[]) AS c(event_id, attempt, attempt_id)
          ON c.event_id = e.id
        WHERE CASE WHEN e.status = 'processing' AND e.locked_by = $2 AND e.locked_until > now()
                        AND e.attempts = c.attempt AND e.attempt_id = c.attempt_id
                   THEN true ELSE false END
        ORDER BY e.id
        FOR NO KEY UPDATE OF e SKIP LOCKED
        "#,
        &ids,
        worker_id,
        &attempts,
        &attempt_ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(held.into_iter().collect())
}

/// The claims whose lease is still this worker's, as committed now, without
/// locking anything: the same conditions as [`lock_still_held`].
async fn still_held(
    conn: &mut PgConnection,
    worker_id: &str,
    claims: &[&Claimed],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let ClaimKeys {
        ids,
        attempts,
        attempt_ids,
    } = ClaimKeys::of(claims);
    let held = sqlx::query_scalar!(
        r#"
        SELECT e.id
        FROM inbox_event_state e
        JOIN unnest($1::uuid[], $3::int4[], $4::int8[]) AS c(event_id, attempt, attempt_id)
          ON c.event_id = e.id
        WHERE CASE WHEN e.status = 'processing' AND e.locked_by = $2 AND e.locked_until > now()
                        AND e.attempts = c.attempt AND e.attempt_id = c.attempt_id
                   THEN true ELSE false END
        "#,
        &ids,
        worker_id,
        &attempts,
        &attempt_ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(held.into_iter().collect())
}

/// How an attempt ended, as the tables record it.
pub struct Finish<'a> {
    pub event_id: Uuid,
    /// The attempt's number (the event's `attempts` when it was claimed).
    pub attempt: i32,
    pub attempt_row: AttemptRow,
    pub event_status: EventStatus,
    pub attempt_outcome: AttemptOutcome,
    pub handler: Option<&'a str>,
    pub error: Option<String>,
    /// For `retrying`: when the next attempt is due.
    pub retry_in: Option<Duration>,
    /// The handler never started: the attempt is handed back uncounted, so
    /// `attempts` never passes `max_attempts` this way.
    pub not_started: bool,
}

/// Records the outcomes on the events and writes their attempt rows (one
/// statement), for the events this worker still holds in this attempt; returns how many
/// that was. The row locks it takes are held until the transaction ends, so a
/// count equal to `finishes.len()` means no other worker or rescue can take
/// any of them before the commit.
pub async fn finish(
    conn: &mut PgConnection,
    worker_id: &str,
    finishes: &[&Finish<'_>],
) -> Result<usize, sqlx::Error> {
    let ids: Vec<Uuid> = finishes.iter().map(|f| f.event_id).collect();
    let attempts: Vec<i32> = finishes.iter().map(|f| f.attempt).collect();
    let attempt_ids: Vec<i64> = finishes.iter().map(|f| f.attempt_row.id).collect();
    let attempt_starts: Vec<DateTime<Utc>> =
        finishes.iter().map(|f| f.attempt_row.started_at).collect();
    let statuses: Vec<EventStatus> = finishes.iter().map(|f| f.event_status).collect();
    let outcomes: Vec<AttemptOutcome> = finishes.iter().map(|f| f.attempt_outcome).collect();
    let handlers: Vec<Option<&str>> = finishes.iter().map(|f| f.handler).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    let retry_in: Vec<Option<f64>> = finishes
        .iter()
        .map(|f| f.retry_in.map(|d| d.as_secs_f64()))
        .collect();
    let not_started: Vec<bool> = finishes.iter().map(|f| f.not_started).collect();
    // One function, so that each connection plans it once, generically:
    // sent as a statement, its first five plans on every connection read
    // the whole state table (migrations/V15).
    let finished = sqlx::query!(
        r#"
        SELECT source AS "source!", ordering_key, frees_key
        FROM inbox_finish($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        "#,
        worker_id,
        &ids,
        &attempt_ids,
        &attempt_starts,
        &attempts,
        &statuses as &[EventStatus],
        &outcomes as &[AttemptOutcome],
        &handlers as &[Option<&str>],
        &errors as &[Option<&str>],
        &retry_in as &[Option<f64>],
        &not_started,
    )
    .fetch_all(&mut *conn)
    .await?;
    let (sources, keys): (Vec<String>, Vec<String>) = finished
        .iter()
        .filter(|row| row.frees_key == Some(true))
        .filter_map(|row| Some((row.source.clone(), row.ordering_key.clone()?)))
        .unzip();
    if !keys.is_empty() {
        wake_next(conn, &sources, &keys).await?;
    }
    Ok(finished.len())
}

/// Makes the first two unfinished events of each key due at once, if a claim
/// had set them aside while they waited (migrations/V9): what frees a key
/// calls this after its change, in the same transaction.
async fn wake_next(
    conn: &mut PgConnection,
    sources: &[String],
    keys: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT inbox_wake_next($1, $2)", sources, keys)
        .execute(conn)
        .await?;
    Ok(())
}

/// Expired leases: the worker died or hung. The event becomes due again, or
/// `dead` once it has used its attempts, so a poison event cannot loop forever.
/// The attempt's row is written here, `lease_expired` (its outcome never
/// came). Returns how many attempts that was.
pub async fn rescue_expired(pool: &PgPool, max_attempts: i32) -> Result<u64, sqlx::Error> {
    let rescued = sqlx::query_scalar!(
        r#"
        WITH expired AS (
            SELECT id, locked_by, attempt_id, attempt_started_at, attempt_handler
            FROM inbox_event_state
            WHERE status = 'processing' AND locked_until < now()
            ORDER BY locked_until
            LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ), rescued AS (
            UPDATE inbox_event_state e
            SET status = CASE WHEN e.attempts >= $1 THEN 'dead' ELSE 'retrying' END,
                processed_at = CASE WHEN e.attempts >= $1 THEN now() END,
                -- Spread over a second: events rescued together are not
                -- claimed together again (and do not fail together again).
                next_attempt_at = now() + random() * interval '1 second',
                last_error = 'lease expired: worker ' || e.locked_by || ' did not finish attempt ' || e.attempts,
                locked_by = NULL, locked_until = NULL,
                attempt_id = NULL, attempt_started_at = NULL, attempt_handler = NULL, attempt_limited = false
            FROM expired WHERE e.id = expired.id
            RETURNING e.id, e.attempts, e.last_error, expired.locked_by, expired.attempt_id,
                      expired.attempt_started_at, expired.attempt_handler
        ), written AS (
            INSERT INTO inbox_attempts (id, event_id, attempt, worker_id, handler, started_at, finished_at, outcome, error)
            SELECT r.attempt_id, r.id, r.attempts, r.locked_by, r.attempt_handler, r.attempt_started_at,
                   now(), 'lease_expired', r.last_error
            FROM rescued r WHERE r.attempt_id IS NOT NULL
            RETURNING 1
        ), closed AS (
            -- An attempt claimed before schema version 17, or by hand, has
            -- an open row instead. CASE keeps the plan on (event_id, attempt).
            UPDATE inbox_attempts a
            SET finished_at = now(), outcome = 'lease_expired', error = r.last_error
            FROM rescued r
            WHERE r.attempt_id IS NULL AND a.event_id = r.id AND a.attempt = r.attempts
              AND CASE WHEN a.finished_at IS NULL THEN true ELSE false END
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM written) + (SELECT count(*) FROM closed) AS "n!"
        "#,
        max_attempts,
    )
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(rescued).unwrap_or(0))
}

/// At shutdown, hands back what this worker could not finish in its grace
/// period. Rows still locked by an unfinished transaction are skipped: their
/// lease expires and rescue takes them.
///
/// The attempt counts (its handler may have acted), so an event released on
/// its last attempt ends `dead`, as a rescued one does; its attempt's row is
/// written here. Returns how many attempts that was.
pub async fn release(
    pool: &PgPool,
    worker_id: &str,
    max_attempts: i32,
) -> Result<u64, sqlx::Error> {
    let released = sqlx::query_scalar!(
        r#"
        WITH mine AS (
            SELECT id, attempt_id, attempt_started_at, attempt_handler FROM inbox_event_state
            WHERE status = 'processing' AND locked_by = $1
            FOR UPDATE SKIP LOCKED
        ), released AS (
            UPDATE inbox_event_state e
            SET status = CASE WHEN e.attempts >= $2 THEN 'dead' ELSE 'retrying' END,
                processed_at = CASE WHEN e.attempts >= $2 THEN now() END,
                next_attempt_at = now(), locked_by = NULL, locked_until = NULL,
                last_error = 'released: the worker stopped before the handler finished',
                attempt_id = NULL, attempt_started_at = NULL, attempt_handler = NULL, attempt_limited = false
            FROM mine WHERE e.id = mine.id
            RETURNING e.id, e.attempts, e.status, e.last_error, mine.attempt_id, mine.attempt_started_at,
                      mine.attempt_handler
        ), written AS (
            INSERT INTO inbox_attempts (id, event_id, attempt, worker_id, handler, started_at, finished_at, outcome, error)
            SELECT r.attempt_id, r.id, r.attempts, $1, r.attempt_handler, r.attempt_started_at, now(),
                   CASE WHEN r.status = 'dead' THEN 'dead' ELSE 'retry' END, r.last_error
            FROM released r WHERE r.attempt_id IS NOT NULL
            RETURNING 1
        ), closed AS (
            -- An attempt claimed before schema version 17 has an open row
            -- instead. CASE keeps the plan on (event_id, attempt).
            UPDATE inbox_attempts a
            SET finished_at = now(), outcome = CASE WHEN r.status = 'dead' THEN 'dead' ELSE 'retry' END,
                error = r.last_error
            FROM released r
            WHERE r.attempt_id IS NULL AND a.event_id = r.id AND a.attempt = r.attempts
              AND CASE WHEN a.finished_at IS NULL THEN true ELSE false END
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM written) + (SELECT count(*) FROM closed) AS "n!"
        "#,
        worker_id,
        max_attempts,
    )
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(released).unwrap_or(0))
}

/// Events not yet finished, by source and status, and how long the oldest due
/// event has waited (seconds), for the gauges.
pub async fn depth(
    pool: &PgPool,
) -> Result<(Vec<(String, EventStatus, i64)>, Option<f64>), sqlx::Error> {
    let counts = sqlx::query!(
        r#"
        SELECT source, status AS "status: EventStatus", count(*) AS "count!"
        FROM inbox_event_state
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
        FROM inbox_event_state
        WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
        "#
    )
    .fetch_one(pool)
    .await?;
    Ok((counts, oldest))
}

/// What an external handler's attempt does to its handler's circuit, in the
/// transaction that records the attempt (`inbox_circuit_record`, migrations/V4).
/// A downstream's `Retry-After` opens it for that long, at most `longest`.
pub async fn record_circuit(
    conn: &mut PgConnection,
    handler: &str,
    event_id: Uuid,
    circuit: &crate::config::Circuit,
    result: &Result<(), super::HandlerError>,
    longest: Duration,
) -> Result<(), sqlx::Error> {
    let (succeeded, retry_after, reason) = match result {
        Ok(()) => (true, None, None),
        // A permanent failure says nothing about the downstream's health.
        Err(super::HandlerError::Permanent { .. }) => return Ok(()),
        Err(super::HandlerError::Retryable {
            message,
            retry_after,
        }) => (
            false,
            retry_after.map(|d| d.min(longest).as_secs_f64()),
            Some(message.as_str()),
        ),
    };
    sqlx::query!(
        "SELECT inbox_circuit_record($1, $2, $3, $4, $5, $6, $7)",
        handler,
        event_id,
        succeeded,
        i32::try_from(circuit.failures).unwrap_or(i32::MAX),
        circuit.cool_down.as_secs_f64(),
        retry_after,
        reason,
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Pauses in force, circuits' states and how often each circuit changed, for
/// the gauges (the database is where every worker's view of them meets).
pub struct FlowState {
    pub pauses: Vec<(String, String)>,
    pub circuits: Vec<(String, String)>,
    pub changes: Vec<(String, String, i64)>,
}

pub async fn flow_state(pool: &PgPool) -> Result<FlowState, sqlx::Error> {
    let pauses = sqlx::query!("SELECT kind, name FROM inbox_pauses")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| (row.kind, row.name))
        .collect();
    let circuits = sqlx::query!("SELECT handler, circuit FROM inbox_handler_state")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| (row.handler, row.circuit))
        .collect();
    let changes = sqlx::query!(
        r#"SELECT handler, change, count(*) AS "n!" FROM inbox_circuit_events GROUP BY handler, change"#
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.handler, row.change, row.n))
    .collect();
    Ok(FlowState {
        pauses,
        circuits,
        changes,
    })
}

/// Forgets the ordering keys no unfinished event uses any more (a claim
/// makes a key's row again when it needs it); rows a claim holds are left.
pub async fn clear_ordering_locks(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let result = sqlx::query!(
        r#"
        DELETE FROM inbox_ordering_locks l
        USING (
            SELECT o.source, o.ordering_key FROM inbox_ordering_locks o
            WHERE NOT EXISTS (
                SELECT 1 FROM inbox_event_state e
                WHERE e.source = o.source AND e.ordering_key = o.ordering_key
                  AND (e.status IN ('pending', 'processing', 'retrying') OR (e.status = 'dead' AND e.dead_blocks)))
            LIMIT 1000
            FOR UPDATE SKIP LOCKED
        ) idle
        WHERE l.source = idle.source AND l.ordering_key = idle.ordering_key
        "#
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
