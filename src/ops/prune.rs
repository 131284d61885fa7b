//! `hookbox prune`: drop old payloads but keep every key (late duplicates are
//! still recognised), and delete old audit rows. Keys themselves go only when
//! asked (`--keys-older-than`): then a whole finished event is deleted, and a
//! later delivery of its key is stored as a new event.
//!
//! The history is partitioned by time (migrations/V10): a partition that lies
//! wholly before the cutoff, and holds nothing prune must keep, is dropped
//! whole, in a moment whatever its size. What remains before the cutoff (a
//! partition that straddles it, the DEFAULT partition, payloads of events
//! received before version 10) is pruned row by row, in bounded batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::{add_affected, record_action};
use crate::status::EventStatus;

/// How long a drop waits for its lock before it gives up (and tries again,
/// then leaves the partition to the row-by-row pass). While it waits, the
/// statements queued behind it wait too (receivers, claims): keep it far
/// below a receiver's statement timeout and a lease.
const DROP_LOCK_TIMEOUT: &str = "250ms";
const DROP_TRIES: u32 = 20;
/// Event ids are made by the receivers' clocks, processing times by the
/// database's: the payload pass looks this far past the cutoff for ids.
const CLOCK_SKEW: &str = "5 minutes";
/// The advisory lock one prune at a time holds ("prune" in ASCII).
const PRUNE_LOCK_KEY: i64 = 0x0070_7275_6e65;

#[derive(Clone, Debug)]
pub struct PruneRequest {
    /// Drop `payload`, `payload_json` and `headers` of events finished before this.
    pub payloads_older_than: Option<Duration>,
    /// Dead events keep their payload unless asked: a replay needs it.
    pub include_dead: bool,
    pub deliveries_older_than: Option<Duration>,
    pub attempts_older_than: Option<Duration>,
    /// Delete whole events (key, state, payload, attempts) finished before
    /// this: the end of their dedup window.
    pub keys_older_than: Option<Duration>,
    pub dry_run: bool,
    pub actor: String,
    pub reason: Option<String>,
    pub batch_size: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub action_id: Option<i64>,
    pub payloads: i64,
    pub deliveries: i64,
    pub attempts: i64,
    /// Whole events deleted, keys included.
    pub events: i64,
    /// The partitions dropped whole (for a dry run: that would be); their
    /// rows are counted above.
    pub partitions: Vec<String>,
}

fn cutoff(age: Duration) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX)
}

pub async fn prune(
    pool: &PgPool,
    request: &PruneRequest,
    progress: impl Fn(u64),
) -> Result<PruneReport, sqlx::Error> {
    let statuses: Vec<EventStatus> = [EventStatus::Succeeded, EventStatus::Skipped]
        .into_iter()
        .chain(request.include_dead.then_some(EventStatus::Dead))
        .collect();
    let targets: Vec<Target> = [
        request
            .payloads_older_than
            .map(|age| Target::Payloads(cutoff(age))),
        request
            .deliveries_older_than
            .map(|age| Target::Deliveries(cutoff(age))),
        request
            .attempts_older_than
            .map(|age| Target::Attempts(cutoff(age))),
        // Last: the payloads, deliveries and attempts it would cascade to
        // are mostly gone by then, dropped whole above.
        request.keys_older_than.map(|age| Target::Keys(cutoff(age))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if request.dry_run {
        let mut report = PruneReport::default();
        for target in &targets {
            for partition in target.droppable_partitions(pool, &statuses).await? {
                report.partitions.push(partition.name);
            }
            *target.counter(&mut report) += target.count(pool, &statuses).await?;
        }
        return Ok(report);
    }

    // One prune at a time: passes of two prunes at once lock the same rows
    // in different orders (the cascade of a deleted event reaches its
    // deliveries in event order, the delivery pass takes them in time
    // order) and deadlock. Held by a connection of its own, for the whole
    // run; a prune that dies releases it with its session.
    let mut lock = pool.acquire().await?;
    let free = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_lock($1) AS "free!""#,
        PRUNE_LOCK_KEY
    )
    .fetch_one(&mut *lock)
    .await?;
    if !free {
        // Warned, not only logged: an operator (or a cron job overlapping
        // its last run) would otherwise see a prune that seems to hang.
        tracing::warn!("another prune is running; waiting for it to end");
        sqlx::query!("SELECT pg_advisory_lock($1)", PRUNE_LOCK_KEY)
            .fetch_one(&mut *lock)
            .await?;
    }
    let outcome = prune_locked(pool, request, &targets, &statuses, progress).await;
    // The lock also goes with the session; unlocking lets the connection
    // go back to the pool clean.
    sqlx::query!("SELECT pg_advisory_unlock($1)", PRUNE_LOCK_KEY)
        .fetch_one(&mut *lock)
        .await?;
    outcome
}

/// The part of a prune that runs under its lock.
async fn prune_locked(
    pool: &PgPool,
    request: &PruneRequest,
    targets: &[Target],
    statuses: &[EventStatus],
    progress: impl Fn(u64),
) -> Result<PruneReport, sqlx::Error> {
    let mut report = PruneReport::default();
    let recorded = serde_json::json!({
        "payloads_older_than": request.payloads_older_than.map(|d| humantime::format_duration(d).to_string()),
        "include_dead": request.include_dead,
        "deliveries_older_than": request.deliveries_older_than.map(|d| humantime::format_duration(d).to_string()),
        "attempts_older_than": request.attempts_older_than.map(|d| humantime::format_duration(d).to_string()),
        "keys_older_than": request.keys_older_than.map(|d| humantime::format_duration(d).to_string()),
    });
    let action_id = {
        let mut conn = pool.acquire().await?;
        record_action(
            &mut conn,
            &request.actor,
            "prune",
            &recorded,
            request.reason.as_deref(),
        )
        .await?
    };
    report.action_id = Some(action_id);

    for target in targets {
        // Whole partitions first: what they held, the row pass need not read.
        for partition in target.droppable_partitions(pool, statuses).await? {
            if drop_partition(pool, &partition.name, action_id, partition.rows).await? {
                *target.counter(&mut report) += partition.rows;
                report.partitions.push(partition.name);
                progress(partition.rows as u64);
            }
        }
        for pass in target.row_passes(statuses) {
            let mut cursor = Cursor::START;
            loop {
                let mut transaction = pool.begin().await?;
                let n = pass
                    .prune_batch(&mut transaction, statuses, request.batch_size, &mut cursor)
                    .await?;
                add_affected(&mut transaction, action_id, n).await?;
                transaction.commit().await?;
                *target.counter(&mut report) += n;
                progress(n as u64);
                if n == 0 {
                    break;
                }
            }
        }
    }
    if !report.partitions.is_empty() {
        // The action says which partitions went, for the audit trail.
        sqlx::query!(
            "UPDATE inbox_actions SET filter = filter || jsonb_build_object('dropped_partitions', $2::text[]) WHERE id = $1",
            action_id,
            &report.partitions,
        )
        .execute(pool)
        .await?;
    }
    Ok(report)
}

/// A partition prune may drop, and how many rows go with it.
struct Droppable {
    name: String,
    rows: i64,
}

/// `name` as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops a partition, waiting for its lock a moment at a time; returns
/// whether it went (if not, the row pass prunes what it must of it).
async fn drop_partition(
    pool: &PgPool,
    name: &str,
    action_id: i64,
    rows: i64,
) -> Result<bool, sqlx::Error> {
    for attempt in 1..=DROP_TRIES {
        let mut transaction = pool.begin().await?;
        sqlx::query!(
            "SELECT set_config('lock_timeout', $1, true)",
            DROP_LOCK_TIMEOUT
        )
        .fetch_one(&mut *transaction)
        .await?;
        match sqlx::query(&format!("DROP TABLE {}", quoted(name)))
            .execute(&mut *transaction)
            .await
        {
            Ok(_) => {
                add_affected(&mut transaction, action_id, rows).await?;
                transaction.commit().await?;
                tracing::info!(partition = name, rows, "partition dropped");
                return Ok(true);
            }
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                transaction.rollback().await?;
                tracing::warn!(
                    partition = name,
                    attempt,
                    "prune: the partition is in use; trying again"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error),
        }
    }
    tracing::warn!(
        partition = name,
        "prune: could not drop the partition; its rows are pruned one by one"
    );
    Ok(false)
}

/// Where a row pass resumes: after the last `(at, id)` (or event id) it
/// pruned. Each batch starts there instead of reading past every row already
/// pruned. (A row locked by someone else when its batch ran is skipped, not
/// waited for; the next prune takes it.)
struct Cursor {
    at: DateTime<Utc>,
    id: uuid::Uuid,
}

impl Cursor {
    const START: Self = Self {
        at: DateTime::<Utc>::UNIX_EPOCH,
        id: uuid::Uuid::nil(),
    };

    /// Moves past a batch pruned by event id; returns how many it pruned.
    fn past_ids(&mut self, pruned: &[uuid::Uuid]) -> i64 {
        if let Some(last) = pruned.iter().max() {
            self.id = *last;
        }
        pruned.len() as i64
    }
}

/// What one prune removes, older than its cutoff.
#[derive(Clone, Copy)]
enum Target {
    Payloads(DateTime<Utc>),
    Deliveries(DateTime<Utc>),
    Attempts(DateTime<Utc>),
    Keys(DateTime<Utc>),
}

/// One row-by-row pass.
#[derive(Clone, Copy)]
enum Pass {
    /// Rows of `inbox_payloads` (events received since version 10) in the
    /// partitions of ids before the cutoff.
    Payloads(DateTime<Utc>),
    /// Rows of `inbox_payloads`' DEFAULT partition.
    DefaultPayloads(DateTime<Utc>),
    /// The payload columns of events received before version 10.
    LegacyPayloads(DateTime<Utc>),
    Deliveries(DateTime<Utc>),
    Attempts(DateTime<Utc>),
    /// Whole finished events of one status, in id order.
    Keys(EventStatus, DateTime<Utc>),
}

impl Target {
    fn counter(self, report: &mut PruneReport) -> &mut i64 {
        match self {
            Self::Payloads(_) => &mut report.payloads,
            Self::Deliveries(_) => &mut report.deliveries,
            Self::Attempts(_) => &mut report.attempts,
            Self::Keys(_) => &mut report.events,
        }
    }

    /// The partitioned table this target's rows live in, if any.
    fn parent(self) -> Option<&'static str> {
        match self {
            Self::Payloads(_) => Some("inbox_payloads"),
            Self::Deliveries(_) => Some("inbox_deliveries"),
            Self::Attempts(_) => Some("inbox_attempts"),
            Self::Keys(_) => None,
        }
    }

    fn cutoff(self) -> DateTime<Utc> {
        match self {
            Self::Payloads(before)
            | Self::Deliveries(before)
            | Self::Attempts(before)
            | Self::Keys(before) => before,
        }
    }

    fn row_passes(self, statuses: &[EventStatus]) -> Vec<Pass> {
        match self {
            Self::Payloads(before) => vec![
                Pass::Payloads(before),
                Pass::DefaultPayloads(before),
                Pass::LegacyPayloads(before),
            ],
            Self::Deliveries(before) => vec![Pass::Deliveries(before)],
            Self::Attempts(before) => vec![Pass::Attempts(before)],
            Self::Keys(before) => statuses
                .iter()
                .map(|&status| Pass::Keys(status, before))
                .collect(),
        }
    }

    /// The partitions wholly before the cutoff that hold nothing prune must
    /// keep: no payload of an event that is unfinished, finished since the
    /// cutoff, or dead (unless asked); no attempt still running.
    async fn droppable_partitions(
        self,
        pool: &PgPool,
        statuses: &[EventStatus],
    ) -> Result<Vec<Droppable>, sqlx::Error> {
        let before = self.cutoff();
        let Some(parent) = self.parent() else {
            return Ok(Vec::new());
        };
        let candidates = sqlx::query_scalar!(
            r#"
            SELECT partition AS "partition!" FROM inbox_partitions
            WHERE parent = $1 AND NOT is_default AND to_time <= $2
            ORDER BY to_time
            "#,
            parent,
            before,
        )
        .fetch_all(pool)
        .await?;
        let mut droppable = Vec::new();
        for name in candidates {
            let table = quoted(&name);
            let keeps_something = match self {
                // Reads the partition once, each event by its primary key.
                Self::Payloads(_) => sqlx::query_scalar::<_, bool>(&format!(
                    "SELECT EXISTS (SELECT 1 FROM {table} p JOIN inbox_event_state e ON e.id = p.event_id
                                    WHERE NOT (e.status = ANY($1) AND e.processed_at < $2))"
                ))
                .bind(statuses)
                .bind(before)
                .fetch_one(pool)
                .await?,
                // An attempt in flight that started in the partition's range
                // (on its event's row, schema V17: its own row is written when
                // it ends). Reads the lease index: the processing events only.
                Self::Attempts(_) => sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM inbox_event_state
                                    WHERE status = 'processing'
                                      AND attempt_started_at < (SELECT to_time FROM inbox_partitions
                                                                WHERE partition = $1))",
                )
                .bind(&name)
                .fetch_one(pool)
                .await?,
                Self::Deliveries(_) | Self::Keys(_) => false,
            };
            if keeps_something {
                continue;
            }
            let rows = sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(pool)
                .await?;
            droppable.push(Droppable { name, rows });
        }
        Ok(droppable)
    }

    /// What a prune would remove now (a dry run).
    async fn count(self, pool: &PgPool, statuses: &[EventStatus]) -> Result<i64, sqlx::Error> {
        match self {
            Self::Payloads(before) => sqlx::query_scalar!(
                r#"
                SELECT (SELECT count(*) FROM inbox_event_state
                        WHERE legacy_payload IS NOT NULL AND status IN ('succeeded', 'skipped', 'dead')
                          AND status = ANY($1) AND processed_at < $2)
                     + (SELECT count(*) FROM inbox_payloads p JOIN inbox_event_state e ON e.id = p.event_id
                        WHERE (p.event_id < inbox_uuid_at($2::timestamptz + $3::text::interval)
                               OR p.tableoid = 'inbox_payloads_default'::regclass)
                          AND e.status = ANY($1) AND e.processed_at < $2) AS "n!"
                "#,
                statuses as &[EventStatus],
                before,
                CLOCK_SKEW,
            )
            .fetch_one(pool)
            .await,
            Self::Deliveries(before) => sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_deliveries WHERE received_at < $1"#,
                before
            )
            .fetch_one(pool)
            .await,
            Self::Attempts(before) => sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_attempts WHERE started_at < $1 AND finished_at IS NOT NULL"#,
                before
            )
            .fetch_one(pool)
            .await,
            Self::Keys(before) => sqlx::query_scalar!(
                r#"
                SELECT count(*) AS "n!" FROM inbox_event_state
                WHERE status = ANY($1) AND id < inbox_uuid_at($2::timestamptz + $3::text::interval)
                  AND processed_at < $2
                  AND NOT (status = 'dead' AND ordering_key IS NOT NULL AND coalesce(dead_blocks, false))
                "#,
                statuses as &[EventStatus],
                before,
                CLOCK_SKEW,
            )
            .fetch_one(pool)
            .await,
        }
    }
}

impl Pass {
    /// One bounded batch; returns how many rows it changed.
    async fn prune_batch(
        self,
        conn: &mut PgConnection,
        statuses: &[EventStatus],
        batch: i64,
        cursor: &mut Cursor,
    ) -> Result<i64, sqlx::Error> {
        let result = match self {
            Self::Payloads(before) => {
                // In event id order from the cursor, each payload's event by
                // its primary key; the event rows are locked as they were
                // when payloads lived in them, so that a replay and a prune
                // of one event take turns. Ids are receipt times: only the
                // partitions of ids before the cutoff are read (and the
                // DEFAULT partition, which may hold any id).
                let pruned = sqlx::query_scalar!(
                    r#"
                    WITH batch AS (
                        SELECT e.id FROM inbox_payloads p JOIN inbox_event_state e ON e.id = p.event_id
                        WHERE p.event_id > $4 AND p.event_id < inbox_uuid_at($2::timestamptz + $5::text::interval)
                          AND e.id > $4 AND e.status = ANY($1) AND e.processed_at < $2
                        ORDER BY p.event_id
                        LIMIT $3
                        FOR NO KEY UPDATE OF e SKIP LOCKED
                    )
                    DELETE FROM inbox_payloads p
                    WHERE p.event_id = ANY(ARRAY(SELECT id FROM batch))
                    RETURNING p.event_id
                    "#,
                    statuses as &[EventStatus],
                    before,
                    batch,
                    cursor.id,
                    CLOCK_SKEW,
                )
                .fetch_all(conn)
                .await?;
                return Ok(cursor.past_ids(&pruned));
            }
            Self::DefaultPayloads(before) => {
                // The DEFAULT partition holds ids no partition was made for
                // (and ids that are not UUIDv7, written by other means than
                // the receiver): all of it is read.
                let pruned = sqlx::query_scalar!(
                    r#"
                    WITH batch AS (
                        SELECT e.id FROM inbox_payloads_default p JOIN inbox_event_state e ON e.id = p.event_id
                        -- (e.id > $4 too: a merge join then starts both scans at the cursor.)
                        WHERE p.event_id > $4 AND e.id > $4 AND e.status = ANY($1) AND e.processed_at < $2
                        ORDER BY p.event_id
                        LIMIT $3
                        FOR NO KEY UPDATE OF e SKIP LOCKED
                    )
                    DELETE FROM inbox_payloads_default p
                    WHERE p.event_id = ANY(ARRAY(SELECT id FROM batch))
                    RETURNING p.event_id
                    "#,
                    statuses as &[EventStatus],
                    before,
                    batch,
                    cursor.id,
                )
                .fetch_all(conn)
                .await?;
                return Ok(cursor.past_ids(&pruned));
            }
            Self::LegacyPayloads(before) => {
                // The literal conditions match inbox_events_prunable_idx, so
                // the planner can use it; pruned rows leave that index. The
                // update finds its rows by primary key (`= ANY`), never by
                // joining against a scan of the whole table.
                let pruned = sqlx::query!(
                    r#"
                    WITH batch AS (
                        SELECT id FROM inbox_event_state
                        WHERE legacy_payload IS NOT NULL AND status IN ('succeeded', 'skipped', 'dead')
                          AND status = ANY($1) AND processed_at < $2
                          AND (processed_at, id) > ($4, $5)
                        ORDER BY processed_at, id
                        LIMIT $3
                        FOR NO KEY UPDATE SKIP LOCKED
                    )
                    UPDATE inbox_event_state e
                    SET legacy_payload = NULL, legacy_payload_json = NULL, legacy_headers = NULL
                    WHERE e.id = ANY(ARRAY(SELECT id FROM batch))
                    RETURNING e.processed_at AS "processed_at!", e.id
                    "#,
                    statuses as &[EventStatus],
                    before,
                    batch,
                    cursor.at,
                    cursor.id,
                )
                .fetch_all(conn)
                .await?;
                if let Some(last) = pruned.iter().max_by_key(|row| (row.processed_at, row.id)) {
                    *cursor = Cursor {
                        at: last.processed_at,
                        id: last.id,
                    };
                }
                return Ok(pruned.len() as i64);
            }
            Self::Keys(status, before) => {
                // A dead event that holds back its ordering key stays: only
                // `hookbox skip` releases the key, with an audit row.
                // In id order (receipt time) along inbox_events_status_id_idx,
                // from the cursor and only up to the cutoff: the rows this
                // reads are the ones it may delete, and the few received
                // before the cutoff but finished since. (Written as row
                // comparisons in that index's order: with `status = $1 AND
                // id > $4 ORDER BY id`, plans walk the primary key through
                // every event of other statuses.) The row lock is the
                // one a replay takes: a replay that got there first has
                // changed the status, which the lock's recheck then sees.
                // Payloads go with the event (ON DELETE CASCADE), and its
                // attempts in the same statement (their rows have no foreign
                // key since schema V17: checking it cost each attempt a
                // query); deliveries still kept lose their event id.
                let pruned = sqlx::query_scalar!(
                    r#"
                    WITH batch AS (
                        SELECT id FROM inbox_event_state
                        WHERE (status, id) > ($1, $4)
                          AND (status, id) < ($1, inbox_uuid_at($2::timestamptz + $5::text::interval))
                          AND processed_at < $2
                          AND NOT (status = 'dead' AND ordering_key IS NOT NULL AND coalesce(dead_blocks, false))
                        ORDER BY status, id
                        LIMIT $3
                        FOR UPDATE SKIP LOCKED
                    ), pruned AS (
                        DELETE FROM inbox_event_state e
                        WHERE e.id = ANY(ARRAY(SELECT id FROM batch))
                        RETURNING e.id
                    ), attempts AS (
                        DELETE FROM inbox_attempts a
                        WHERE a.event_id = ANY(ARRAY(SELECT id FROM pruned))
                    )
                    SELECT id AS "id!" FROM pruned
                    "#,
                    status as EventStatus,
                    before,
                    batch,
                    cursor.id,
                    CLOCK_SKEW,
                )
                .fetch_all(conn)
                .await?;
                return Ok(cursor.past_ids(&pruned));
            }
            // Oldest first, each row by its partition key and id: only the
            // partitions before the cutoff are read.
            Self::Deliveries(before) => {
                sqlx::query!(
                    "DELETE FROM inbox_deliveries d
                     USING (SELECT received_at, id FROM inbox_deliveries
                            WHERE received_at < $1 ORDER BY received_at LIMIT $2) old
                     WHERE d.received_at = old.received_at AND d.id = old.id",
                    before,
                    batch
                )
                .execute(conn)
                .await?
            }
            Self::Attempts(before) => {
                sqlx::query!(
                    "DELETE FROM inbox_attempts a
                     USING (SELECT started_at, id FROM inbox_attempts
                            WHERE started_at < $1 AND finished_at IS NOT NULL
                            ORDER BY started_at LIMIT $2) old
                     WHERE a.started_at = old.started_at AND a.id = old.id",
                    before,
                    batch
                )
                .execute(conn)
                .await?
            }
        };
        Ok(result.rows_affected() as i64)
    }
}
