//! The partitions of the history (`inbox_deliveries`, `inbox_attempts`,
//! `inbox_payloads`; migrations/V10): made ahead of time by one worker at a
//! time, dropped by `hookbox prune`.

use std::time::Duration;

use sqlx::PgPool;

use crate::config::Config;

/// The partitioned tables, in the order their partitions are made.
pub const PARTITIONED: [&str; 3] = ["inbox_deliveries", "inbox_attempts", "inbox_payloads"];

/// How long making a table's partitions waits for a lock before it gives up
/// until the next run. Attaching a partition locks the table's DEFAULT
/// partition, and while it waits for that lock every statement that reads
/// the whole table (a claim, the finishing update) waits behind it: the wait
/// must stay far below a lease and a receiver's statement timeout.
const MAKE_LOCK_TIMEOUT: &str = "250ms";

/// What `[worker] partition_interval` and `partitions_ahead` ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionSettings {
    /// The time each partition covers.
    pub interval: Duration,
    /// Partitions reach this many intervals past now.
    pub ahead: u32,
}

impl PartitionSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            interval: config.worker.partition_interval.0,
            ahead: config.worker.partitions_ahead,
        }
    }

    /// How often the elected worker looks: four times an interval, at least
    /// every ten minutes, at most every ten seconds.
    pub fn check_every(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_secs(10), Duration::from_secs(600))
    }
}

/// Makes every partition the three tables lack now, one transaction per
/// table (each takes the locks it needs once, for a moment: the partitions
/// are empty); returns their names. Never moves a row: a range the DEFAULT
/// partition already holds rows of is left to it (see `inbox_make_partition`).
pub async fn make_partitions(
    pool: &PgPool,
    settings: PartitionSettings,
) -> Result<Vec<String>, sqlx::Error> {
    let mut made = Vec::new();
    for parent in PARTITIONED {
        let mut transaction = pool.begin().await?;
        sqlx::query!(
            "SELECT set_config('lock_timeout', $1, true)",
            MAKE_LOCK_TIMEOUT
        )
        .fetch_one(&mut *transaction)
        .await?;
        let mut names = Vec::new();
        while let Some(name) = sqlx::query_scalar!(
            "SELECT inbox_make_partition($1, $2, $3)",
            parent,
            settings.interval.as_secs_f64(),
            i32::try_from(settings.ahead).unwrap_or(i32::MAX),
        )
        .fetch_one(&mut *transaction)
        .await?
        {
            names.push(name);
        }
        transaction.commit().await?;
        made.extend(names);
    }
    Ok(made)
}

/// Whether `worker_id` runs `task` this period: one atomic UPDATE moves the
/// task's `next_run_at` forward by `every`, and only its author runs the
/// task, however many workers ask (`inbox_housekeeping`).
pub async fn elect(
    pool: &PgPool,
    task: &str,
    worker_id: &str,
    every: Duration,
) -> Result<bool, sqlx::Error> {
    let elected = sqlx::query_scalar!(
        r#"
        UPDATE inbox_housekeeping
           SET next_run_at = now() + make_interval(secs => $3), run_by = $2, run_at = now(),
               runs = runs + 1
         WHERE task = $1 AND next_run_at <= now()
        RETURNING task
        "#,
        task,
        worker_id,
        every.as_secs_f64(),
    )
    .fetch_optional(pool)
    .await?;
    Ok(elected.is_some())
}

/// Records how the elected run of `task` ended (`None`: it succeeded).
pub async fn record_run(pool: &PgPool, task: &str, error: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE inbox_housekeeping SET last_error = $2 WHERE task = $1",
        task,
        error
    )
    .execute(pool)
    .await?;
    Ok(())
}
