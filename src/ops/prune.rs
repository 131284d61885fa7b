//! `hookbox prune`: drop old payloads but keep every key (late duplicates are
//! still recognised), and delete old audit rows, in bounded batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::{add_affected, record_action};
use crate::status::EventStatus;

#[derive(Clone, Debug)]
pub struct PruneRequest {
    /// Drop `payload`, `payload_json` and `headers` of events finished before this.
    pub payloads_older_than: Option<Duration>,
    /// Dead events keep their payload unless asked: a replay needs it.
    pub include_dead: bool,
    pub deliveries_older_than: Option<Duration>,
    pub attempts_older_than: Option<Duration>,
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
    let payload_cutoff = request.payloads_older_than.map(cutoff);
    let delivery_cutoff = request.deliveries_older_than.map(cutoff);
    let attempt_cutoff = request.attempts_older_than.map(cutoff);
    let mut report = PruneReport::default();

    if request.dry_run {
        if let Some(before) = payload_cutoff {
            report.payloads = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_events WHERE status = ANY($1) AND processed_at < $2 AND payload IS NOT NULL"#,
                &statuses as &[EventStatus],
                before
            )
            .fetch_one(pool)
            .await?;
        }
        if let Some(before) = delivery_cutoff {
            report.deliveries = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_deliveries WHERE received_at < $1"#,
                before
            )
            .fetch_one(pool)
            .await?;
        }
        if let Some(before) = attempt_cutoff {
            report.attempts = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_attempts WHERE started_at < $1 AND finished_at IS NOT NULL"#,
                before
            )
            .fetch_one(pool)
            .await?;
        }
        return Ok(report);
    }

    let recorded = serde_json::json!({
        "payloads_older_than": request.payloads_older_than.map(|d| humantime::format_duration(d).to_string()),
        "include_dead": request.include_dead,
        "deliveries_older_than": request.deliveries_older_than.map(|d| humantime::format_duration(d).to_string()),
        "attempts_older_than": request.attempts_older_than.map(|d| humantime::format_duration(d).to_string()),
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

    let targets = [
        payload_cutoff.map(Target::Payloads),
        delivery_cutoff.map(Target::Deliveries),
        attempt_cutoff.map(Target::Attempts),
    ];
    for target in targets.into_iter().flatten() {
        let mut cursor = Cursor::START;
        loop {
            let mut transaction = pool.begin().await?;
            let n = target
                .prune_batch(&mut transaction, &statuses, request.batch_size, &mut cursor)
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
    Ok(report)
}

/// Where payload pruning resumes: after the last `(processed_at, id)` pruned.
/// Each batch starts there instead of reading past every row already pruned.
/// (A row locked by someone else when its batch ran is skipped, not waited
/// for; the next prune takes it.)
struct Cursor {
    processed_at: DateTime<Utc>,
    id: uuid::Uuid,
}

impl Cursor {
    const START: Self = Self {
        processed_at: DateTime::<Utc>::UNIX_EPOCH,
        id: uuid::Uuid::nil(),
    };
}

/// What one prune pass removes, older than its cutoff.
#[derive(Clone, Copy)]
enum Target {
    Payloads(DateTime<Utc>),
    Deliveries(DateTime<Utc>),
    Attempts(DateTime<Utc>),
}

impl Target {
    fn counter(self, report: &mut PruneReport) -> &mut i64 {
        match self {
            Self::Payloads(_) => &mut report.payloads,
            Self::Deliveries(_) => &mut report.deliveries,
            Self::Attempts(_) => &mut report.attempts,
        }
    }

    /// One bounded batch; returns how many rows it changed.
    async fn prune_batch(
        self,
        conn: &mut sqlx::PgConnection,
        statuses: &[EventStatus],
        batch: i64,
        cursor: &mut Cursor,
    ) -> Result<i64, sqlx::Error> {
        let result = match self {
            Self::Payloads(before) => {
                // The literal conditions match inbox_events_prunable_idx, so
                // the planner can use it; pruned rows leave that index. The
                // update finds its rows by primary key (`= ANY`), never by
                // joining against a scan of the whole table.
                let pruned = sqlx::query!(
                    r#"
                    WITH batch AS (
                        SELECT id FROM inbox_events
                        WHERE payload IS NOT NULL AND status IN ('succeeded', 'skipped', 'dead')
                          AND status = ANY($1) AND processed_at < $2
                          AND (processed_at, id) > ($4, $5)
                        ORDER BY processed_at, id
                        LIMIT $3
                        FOR NO KEY UPDATE SKIP LOCKED
                    )
                    UPDATE inbox_events e SET payload = NULL, payload_json = NULL, headers = NULL
                    WHERE e.id = ANY(ARRAY(SELECT id FROM batch))
                    RETURNING e.processed_at AS "processed_at!", e.id
                    "#,
                    statuses as &[EventStatus],
                    before,
                    batch,
                    cursor.processed_at,
                    cursor.id,
                )
                .fetch_all(conn)
                .await?;
                if let Some(last) = pruned.iter().max_by_key(|row| (row.processed_at, row.id)) {
                    *cursor = Cursor {
                        processed_at: last.processed_at,
                        id: last.id,
                    };
                }
                return Ok(pruned.len() as i64);
            }
            Self::Deliveries(before) => {
                sqlx::query!(
                    "DELETE FROM inbox_deliveries WHERE id IN (
                         SELECT id FROM inbox_deliveries WHERE received_at < $1 ORDER BY id LIMIT $2)",
                    before,
                    batch
                )
                .execute(conn)
                .await?
            }
            Self::Attempts(before) => {
                sqlx::query!(
                    "DELETE FROM inbox_attempts WHERE id IN (
                         SELECT id FROM inbox_attempts WHERE started_at < $1 AND finished_at IS NOT NULL ORDER BY id LIMIT $2)",
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
