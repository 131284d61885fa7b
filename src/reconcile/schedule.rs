//! Scheduled reconciliation: every worker polls, and the database elects the
//! one that runs each period (`inbox_reconcile_cursors`), so there is one run
//! per source per `every` however many workers there are.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{finish, list_and_import, start_from, ReconcileError};
use crate::{
    config::{Config, Reconcile, Source},
    ops::{import::ImportTarget, record_action},
};

/// A run is abandoned after this long (or `every`, if longer), and its
/// claim then expires, so a hung run never stops reconciliation for good.
const SHORTEST_RUN_LIMIT: Duration = Duration::from_secs(600);
/// Releasing a claim on shutdown waits at most this long.
const RELEASE_LIMIT: Duration = Duration::from_secs(2);

/// Runs each reconciling source's reconcile once per `every`, across all the
/// workers sharing the database, until `shutdown` is cancelled. Returns at
/// once when no source reconciles. `worker_id` is recorded as the actor.
pub async fn run_scheduled(
    config: Config,
    pool: PgPool,
    worker_id: String,
    shutdown: CancellationToken,
) {
    let sources: Vec<(Source, Reconcile)> = config
        .sources
        .into_iter()
        .filter_map(|source| {
            let settings = source.reconcile.clone()?;
            Some((source, settings))
        })
        .collect();
    let Some(shortest) = sources.iter().map(|(_, s)| s.every).min() else {
        return;
    };
    let poll = (shortest / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    tracing::info!(sources = sources.len(), "scheduled reconciliation enabled");
    while !shutdown.is_cancelled() {
        for (source, settings) in &sources {
            let run = run_if_due(&pool, source, settings, &worker_id);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    release(&pool, &source.name, &worker_id, Some("stopped: the worker shut down")).await;
                    return;
                }
                result = run => if let Err(error) = result {
                    if error.is_retryable() {
                        tracing::warn!(source = %source.name, error = %error, "scheduled reconcile failed; the next period tries again");
                    } else {
                        tracing::error!(source = %source.name, error = %error, "scheduled reconcile failed; check [source.reconcile]");
                    }
                },
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Claims this period's run if it is due and nobody holds it, then runs it.
async fn run_if_due(
    pool: &PgPool,
    source: &Source,
    settings: &Reconcile,
    worker_id: &str,
) -> Result<(), ReconcileError> {
    let run_limit = settings.every.max(SHORTEST_RUN_LIMIT);
    let started = Utc::now();
    let mut transaction = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO inbox_reconcile_cursors (source) VALUES ($1) ON CONFLICT (source) DO NOTHING",
        source.name
    )
    .execute(&mut *transaction)
    .await?;
    // One statement decides: the period's run goes to whoever moves
    // next_run_at first; the others find it in the future.
    let claimed = sqlx::query_scalar!(
        r#"
        UPDATE inbox_reconcile_cursors
           SET next_run_at = now() + make_interval(secs => $2),
               running_by = $3,
               running_until = now() + make_interval(secs => $4),
               last_run_at = now()
         WHERE source = $1 AND next_run_at <= now()
           AND (running_until IS NULL OR running_until <= now())
        RETURNING listed_through
        "#,
        source.name,
        settings.every.as_secs_f64(),
        worker_id,
        run_limit.as_secs_f64(),
    )
    .fetch_optional(&mut *transaction)
    .await?;
    let Some(cursor) = claimed else {
        transaction.rollback().await?;
        return Ok(());
    };
    let from = start_from(settings, cursor, started);
    let recorded = serde_json::json!({ "source": source.name, "from": from, "scheduled": true });
    // In the claim's transaction: the action's `at` is the claim's time.
    let action_id = record_action(
        &mut transaction,
        worker_id,
        "reconcile",
        &recorded,
        Some(&format!(
            "scheduled every {}",
            humantime::format_duration(settings.every)
        )),
    )
    .await?;
    transaction.commit().await?;

    let target = &mut ImportTarget::Action(action_id);
    let outcome = match tokio::time::timeout(
        run_limit,
        list_and_import(pool, source, settings, from, target),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(super::listing::ListError::Retryable(format!(
            "the run did not finish within {}",
            humantime::format_duration(run_limit)
        ))
        .into()),
    };
    let result = finish(pool, source, target, outcome).await;
    match &result {
        Ok(_) => {
            advance(pool, &source.name, started).await?;
            release(pool, &source.name, worker_id, None).await;
        }
        Err(error) => release(pool, &source.name, worker_id, Some(&error.to_string())).await,
    }
    result.map(|_| ())
}

/// Frees the source for the next period's run and records how this one ended.
async fn release(pool: &PgPool, source: &str, worker_id: &str, error: Option<&str>) {
    let statement = sqlx::query!(
        r#"
        UPDATE inbox_reconcile_cursors
           SET running_by = NULL, running_until = NULL, last_error = $3
         WHERE source = $1 AND running_by = $2
        "#,
        source,
        worker_id,
        error,
    )
    .execute(pool);
    match tokio::time::timeout(RELEASE_LIMIT, statement).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(source, error = %error, "cannot release the reconcile claim; it expires by itself")
        }
        Err(_) => tracing::warn!(
            source,
            "releasing the reconcile claim timed out; it expires by itself"
        ),
    }
}

/// How far the provider's listing has been checked for `source`.
pub(super) async fn listed_through(
    pool: &PgPool,
    source: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(sqlx::query_scalar!(
        "SELECT listed_through FROM inbox_reconcile_cursors WHERE source = $1",
        source
    )
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// Every event created before `through` has been listed; the cursor never
/// moves back.
pub(super) async fn advance(
    pool: &PgPool,
    source: &str,
    through: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        INSERT INTO inbox_reconcile_cursors (source, listed_through) VALUES ($1, $2)
        ON CONFLICT (source) DO UPDATE
           SET listed_through = GREATEST(inbox_reconcile_cursors.listed_through, EXCLUDED.listed_through)
        "#,
        source,
        through,
    )
    .execute(pool)
    .await?;
    Ok(())
}
