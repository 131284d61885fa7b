//! Alerts: conditions over the inbox's tables, evaluated by exactly one worker
//! at a time, with every notification sent or failed recorded.
//!
//! Election is a row per alert in `hookbox_alert_state`: the worker whose
//! `UPDATE … WHERE next_evaluation_at <= now() RETURNING` moves the row forward
//! evaluates that alert this round. No lock outlives a statement, so a worker
//! that dies mid-round holds nothing up; the next round simply goes to whoever
//! claims it.

mod notify;

use std::time::Duration;

use serde_json::json;
use sqlx::{postgres::PgConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{AlertConfig, Condition, Config};

pub use notify::Notification;

/// Starts `run_evaluator` on its own task: the worker's one line for alerts.
pub fn spawn_evaluator(config: &Config, shutdown: &CancellationToken) {
    tokio::spawn(run_evaluator(config.clone(), shutdown.clone()));
}

/// Runs until `shutdown`: every `[alerting] evaluate_every`, claims each alert
/// that is due and notifies if its condition holds and `every` has passed
/// since the last notification that reached its endpoint.
pub async fn run_evaluator(config: Config, shutdown: CancellationToken) {
    if config.alerts.is_empty() {
        return;
    }
    let pool = match evaluator_pool(&config) {
        Ok(pool) => pool,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "alerts are not evaluated");
            return;
        }
    };
    let evaluator = Evaluator::new(
        pool,
        config.alerts.clone(),
        config.alert_evaluation_interval,
    );
    tracing::info!(alerts = config.alerts.len(), "alert evaluator started");
    // Rows are claimed for a whole interval; looking twice as often bounds the
    // delay between rounds to 1.5 intervals whichever worker claims.
    let tick = config.alert_evaluation_interval / 2;
    loop {
        if let Err(error) = evaluator.round().await {
            tracing::warn!(error = %error, "alert round failed; retrying next round");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

fn evaluator_pool(config: &Config) -> anyhow::Result<PgPool> {
    use std::str::FromStr;
    let options = PgConnectOptions::from_str(&config.database_url()?)?
        .application_name("hookbox-alerts")
        .options([("statement_timeout", "30s")]);
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// One evaluator: the same code runs in every worker; the database decides
/// which one acts on each alert.
pub struct Evaluator {
    pool: PgPool,
    alerts: Vec<AlertConfig>,
    interval: Duration,
    id: String,
    client: reqwest::Client,
}

/// Whether a condition holds, with the counts that say why.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub firing: bool,
    pub counts: serde_json::Value,
}

impl Evaluator {
    pub fn new(pool: PgPool, alerts: Vec<AlertConfig>, interval: Duration) -> Self {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        Self {
            pool,
            alerts,
            interval,
            id: format!("{}:{}", std::process::id(), &unique[unique.len() - 6..]),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Evaluates every alert this evaluator wins; returns how many it evaluated.
    pub async fn round(&self) -> Result<usize, sqlx::Error> {
        let names: Vec<String> = self.alerts.iter().map(|a| a.name.clone()).collect();
        sqlx::query!(
            "INSERT INTO hookbox_alert_state (alert) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &names
        )
        .execute(&self.pool)
        .await?;
        let mut evaluated = 0;
        for alert in &self.alerts {
            let claimed = sqlx::query!(
                r#"
                UPDATE hookbox_alert_state
                SET next_evaluation_at = now() + make_interval(secs => $2),
                    evaluated_by = $3, evaluated_at = now()
                WHERE alert = $1 AND next_evaluation_at <= now()
                RETURNING last_sent_at, now() AS "now!"
                "#,
                alert.name,
                self.interval.as_secs_f64(),
                self.id,
            )
            .fetch_optional(&self.pool)
            .await?;
            let Some(claimed) = claimed else { continue };
            evaluated += 1;
            let evaluation = evaluate(&self.pool, alert).await?;
            if !evaluation.firing {
                continue;
            }
            let quiet = claimed.last_sent_at.is_some_and(|sent| {
                (claimed.now - sent).to_std().unwrap_or_default() < alert.every
            });
            if quiet {
                continue;
            }
            self.notify(alert, evaluation.counts).await?;
        }
        Ok(evaluated)
    }

    async fn notify(
        &self,
        alert: &AlertConfig,
        counts: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let notification = Notification {
            alert: &alert.name,
            condition: &alert.when,
            source: alert.source.as_deref(),
            counts: &counts,
        };
        let result = notification
            .send(&self.client, &alert.url, alert.format)
            .await;
        let (outcome, status_code, error) = match &result {
            Ok(status) => ("sent", Some(i32::from(*status)), None),
            Err(failure) => (
                "failed",
                failure.status.map(i32::from),
                Some(failure.reason.clone()),
            ),
        };
        let mut transaction = self.pool.begin().await?;
        sqlx::query!(
            r#"
            INSERT INTO hookbox_alert_notifications (alert, condition, source, counts, outcome, status_code, error, sent_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            "#,
            alert.name,
            alert.when,
            alert.source,
            counts,
            outcome,
            status_code,
            error,
            self.id,
        )
        .execute(&mut *transaction)
        .await?;
        if result.is_ok() {
            // Only a notification that arrived starts the quiet period: a
            // failed one is tried again next round.
            sqlx::query!(
                "UPDATE hookbox_alert_state SET last_sent_at = now() WHERE alert = $1",
                alert.name
            )
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        metrics::counter!("hookbox_alert_notifications_total", "alert" => alert.name.clone(), "outcome" => outcome)
            .increment(1);
        match error {
            None => tracing::info!(alert = %alert.name, "alert notification sent"),
            Some(reason) => {
                tracing::warn!(alert = %alert.name, reason, "alert notification failed; retried next round")
            }
        }
        Ok(())
    }
}

/// Whether `alert`'s condition holds now.
pub async fn evaluate(pool: &PgPool, alert: &AlertConfig) -> Result<Evaluation, sqlx::Error> {
    let source = alert.source.as_deref();
    Ok(match alert.condition {
        Condition::Dead => {
            let dead = sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM inbox_event_state WHERE status = 'dead' AND ($1::text IS NULL OR source = $1)"#,
                source
            )
            .fetch_one(pool)
            .await?;
            Evaluation {
                firing: dead > 0,
                counts: json!({ "dead": dead }),
            }
        }
        Condition::OldestDueAge(limit) => {
            let row = sqlx::query!(
                r#"
                SELECT count(*) AS "due!", extract(epoch FROM now() - min(next_attempt_at))::float8 AS oldest_due_seconds
                FROM inbox_event_state
                WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
                  AND ($1::text IS NULL OR source = $1)
                "#,
                source
            )
            .fetch_one(pool)
            .await?;
            let oldest = row.oldest_due_seconds.unwrap_or(0.0);
            Evaluation {
                firing: oldest > limit.as_secs_f64(),
                counts: json!({ "due": row.due, "oldest_due_seconds": oldest.round() }),
            }
        }
        Condition::FailureRate { above, over } => {
            let row = sqlx::query!(
                r#"
                SELECT count(*) FILTER (WHERE a.outcome IN ('retry', 'dead', 'lease_expired')) AS "failed!",
                       count(*) FILTER (WHERE a.outcome IS NOT NULL) AS "finished!"
                FROM inbox_attempts a JOIN inbox_event_state e ON e.id = a.event_id
                WHERE a.started_at > now() - make_interval(secs => $1)
                  AND ($2::text IS NULL OR e.source = $2)
                "#,
                over.as_secs_f64(),
                source
            )
            .fetch_one(pool)
            .await?;
            let rate = if row.finished > 0 {
                row.failed as f64 / row.finished as f64
            } else {
                0.0
            };
            Evaluation {
                firing: rate > above,
                counts: json!({ "failed": row.failed, "finished": row.finished, "failure_rate": rate }),
            }
        }
        Condition::SignatureFailures { above, over } => {
            let failures = count_deliveries(pool, source, None, over).await?;
            Evaluation {
                firing: failures as u64 > above,
                counts: json!({ "signature_failures": failures, "window_seconds": over.as_secs() }),
            }
        }
        Condition::ReconciledMissing { above } => {
            // Events reconciliation imported, over the alert's own `every`.
            let missing = sqlx::query_scalar!(
                r#"
                SELECT coalesce(sum(affected), 0)::int8 AS "n!" FROM inbox_actions
                WHERE action = 'reconcile' AND at > now() - make_interval(secs => $1)
                  AND ($2::text IS NULL OR filter ->> 'source' = $2)
                "#,
                alert.every.as_secs_f64(),
                source
            )
            .fetch_one(pool)
            .await?;
            Evaluation {
                firing: missing as u64 > above,
                counts: json!({ "reconciled_missing": missing, "window_seconds": alert.every.as_secs() }),
            }
        }
        Condition::WrongEnvironment => {
            // Over the alert's own `every`: each quiet period reports the
            // deliveries it covered.
            let wrong =
                count_deliveries(pool, source, Some("wrong_environment"), alert.every).await?;
            Evaluation {
                firing: wrong > 0,
                counts: json!({ "wrong_environment": wrong, "window_seconds": alert.every.as_secs() }),
            }
        }
    })
}

/// Deliveries refused for their signature (with this reason, if given).
async fn count_deliveries(
    pool: &PgPool,
    source: Option<&str>,
    reason: Option<&str>,
    over: Duration,
) -> Result<i64, sqlx::Error> {
    // The per-minute counts hold every refusal (only the first few of a
    // minute have a row of their own in inbox_deliveries).
    sqlx::query_scalar!(
        r#"
        SELECT coalesce(sum(refused), 0)::int8 AS "n!" FROM inbox_refusal_counts
        WHERE outcome = 'rejected_signature'
          AND minute >= date_trunc('minute', now() - make_interval(secs => $1))
          AND ($2::text IS NULL OR source = $2)
          AND ($3::text IS NULL OR reason = $3)
        "#,
        over.as_secs_f64(),
        source,
        reason
    )
    .fetch_one(pool)
    .await
}
