//! Reconciliation: asks the provider which events it sent and imports those
//! the inbox lacks, through the same path as `hookbox import` (deduplicated
//! by key, audited as `imported`, one `inbox_actions` row with the counts).
//! A worker runs it on a schedule ([`run_scheduled`]); the cursor and the
//! schedule live in `inbox_reconcile_cursors`.

pub mod listing;
mod schedule;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

pub use schedule::run_scheduled;

use crate::{
    config::{Reconcile, Source},
    ops::{
        import::{self, ImportError, ImportReport, ImportTarget},
        record_action,
    },
};
use listing::{ListError, Lister};

/// A provider that keeps answering "more" is stopped here; the next run
/// continues from the cursor.
const MAX_PAGES: u64 = 10_000;

#[derive(Clone, Debug)]
pub struct ReconcileRequest {
    /// List from here instead of `lookback` before the cursor.
    pub since: Option<DateTime<Utc>>,
    /// Count what would be imported; change nothing (the cursor included).
    pub dry_run: bool,
    pub actor: String,
    pub reason: Option<String>,
}

/// What a run found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconcileReport {
    pub action_id: Option<i64>,
    /// Events created at or after this were asked for.
    pub from: DateTime<Utc>,
    pub pages: u64,
    /// Events the provider listed.
    pub listed: u64,
    /// Listed events the inbox already had (delivered, or imported before).
    pub already_stored: u64,
    /// Listed events the inbox lacked, now imported (dry run: to import).
    pub imported: u64,
    /// `(position in the listing, why)` of listed events that cannot be
    /// imported (their key field is missing, say).
    pub invalid: Vec<(u64, String)>,
    /// The cursor after the run: every event created before it was listed.
    pub listed_through: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("source {0} has no [source.reconcile] table")]
    NotConfigured(String),
    #[error("cannot list the provider's events: {0}")]
    List(#[from] ListError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ReconcileError {
    /// Whether the same run may succeed later (the provider or the database
    /// was unavailable) rather than needing a change of configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotConfigured(_) => false,
            Self::List(error) => error.is_retryable(),
            Self::Import(ImportError::HeaderKey { .. }) => false,
            Self::Import(_) | Self::Database(_) => true,
        }
    }
}

/// `hookbox reconcile`: lists the provider's events from `--since`, else from
/// `lookback` before the cursor, and imports the missing ones.
pub async fn reconcile(
    pool: &PgPool,
    source: &Source,
    request: &ReconcileRequest,
) -> Result<ReconcileReport, ReconcileError> {
    let settings = settings(source)?;
    let started = Utc::now();
    let cursor = schedule::listed_through(pool, &source.name).await?;
    let from = request
        .since
        .unwrap_or_else(|| start_from(settings, cursor, started));
    let mut target = if request.dry_run {
        ImportTarget::dry_run()
    } else {
        let recorded = serde_json::json!({ "source": source.name, "from": from });
        let mut conn = pool.acquire().await?;
        ImportTarget::Action(
            record_action(
                &mut conn,
                &request.actor,
                "reconcile",
                &recorded,
                request.reason.as_deref(),
            )
            .await?,
        )
    };
    let outcome = list_and_import(pool, source, settings, from, &mut target).await;
    let mut report = finish(pool, source, &target, outcome).await?;
    // A run from `--since` later than the cursor leaves a gap behind it:
    // then the cursor stays where it was.
    if !request.dry_run && cursor.is_none_or(|cursor| from <= cursor) {
        schedule::advance(pool, &source.name, started).await?;
        report.listed_through = Some(cursor.map_or(started, |c| c.max(started)));
    } else {
        report.listed_through = cursor;
    }
    Ok(report)
}

fn settings(source: &Source) -> Result<&Reconcile, ReconcileError> {
    source
        .reconcile
        .as_ref()
        .ok_or_else(|| ReconcileError::NotConfigured(source.name.clone()))
}

/// `lookback` before the cursor (the first run: before now), so events the
/// provider lists a little late are still seen.
fn start_from(
    settings: &Reconcile,
    cursor: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let lookback = chrono::Duration::from_std(settings.lookback).unwrap_or(chrono::Duration::MAX);
    cursor
        .unwrap_or(now)
        .min(now)
        .checked_sub_signed(lookback)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Pages through the listing; each page's events that the inbox lacks go
/// through [`import::import_payloads`].
async fn list_and_import(
    pool: &PgPool,
    source: &Source,
    settings: &Reconcile,
    from: DateTime<Utc>,
    target: &mut ImportTarget,
) -> Result<ReconcileReport, ReconcileError> {
    import::check_importable(source)?;
    let lister = Lister::new(&settings.listing, from)?;
    let mut report = ReconcileReport {
        from,
        ..ReconcileReport::default()
    };
    let mut imported = ImportReport::default();
    let mut cursor: Option<String> = None;
    let mut seen_cursors = HashSet::new();
    loop {
        let page = lister.page(cursor.as_deref()).await?;
        report.pages += 1;
        let mut keyed = Vec::with_capacity(page.events.len());
        for event in page.events {
            report.listed += 1;
            match import::event_fields(source, &event.bytes) {
                Ok((_, fields)) => keyed.push((report.listed, fields.event_key, event.bytes)),
                Err(error) => {
                    tracing::warn!(source = %source.name, provider_event_id = %event.id, error = %error, "listed event cannot be imported");
                    report.invalid.push((report.listed, error.to_string()));
                }
            }
        }
        let keys: Vec<&str> = keyed.iter().map(|(_, key, _)| key.as_str()).collect();
        let stored: HashSet<String> = sqlx::query_scalar!(
            "SELECT event_key FROM inbox_event_state WHERE source = $1 AND event_key = ANY($2::text[])",
            source.name,
            &keys as &[&str],
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let missing: Vec<(u64, Vec<u8>)> = keyed
            .into_iter()
            .filter(|(_, key, _)| !stored.contains(key))
            .map(|(position, _, bytes)| (position, bytes))
            .collect();
        if !missing.is_empty() {
            import::import_payloads(pool, source, target, &missing, &mut imported).await?;
        }
        cursor = match page.next {
            Some(next) if report.pages < MAX_PAGES && seen_cursors.insert(next.clone()) => {
                Some(next)
            }
            Some(_) => {
                return Err(ListError::Permanent(format!(
                    "the listing did not end after {} pages (or repeated a cursor)",
                    report.pages
                ))
                .into())
            }
            None => break,
        };
    }
    // Stored by a delivery between the check and the import: already stored too.
    report.imported = imported.stored;
    report.already_stored = report.listed - report.invalid.len() as u64 - imported.stored;
    Ok(report)
}

/// Records the counts (or the error) on the run's action.
async fn finish(
    pool: &PgPool,
    source: &Source,
    target: &ImportTarget,
    outcome: Result<ReconcileReport, ReconcileError>,
) -> Result<ReconcileReport, ReconcileError> {
    let Some(action_id) = target.action_id() else {
        return outcome;
    };
    let recorded = match &outcome {
        Ok(report) => serde_json::json!({
            "source": source.name, "from": report.from, "pages": report.pages,
            "listed": report.listed, "already_stored": report.already_stored,
            "imported": report.imported, "invalid": report.invalid.len(),
        }),
        Err(error) => serde_json::json!({ "source": source.name, "error": error.to_string() }),
    };
    sqlx::query!(
        "UPDATE inbox_actions SET filter = filter || $2 WHERE id = $1",
        action_id,
        recorded
    )
    .execute(pool)
    .await?;
    let mut report = outcome?;
    report.action_id = Some(action_id);
    metrics::counter!("hookbox_reconcile_missing_total", "source" => source.name.clone())
        .increment(report.imported);
    metrics::gauge!("hookbox_reconcile_last_success_timestamp_seconds", "source" => source.name.clone())
        .set(Utc::now().timestamp() as f64);
    if report.imported > 0 {
        tracing::warn!(source = %source.name, imported = report.imported, listed = report.listed, "reconcile found events the inbox had missed and imported them");
    } else {
        tracing::info!(source = %source.name, listed = report.listed, "reconcile found nothing missing");
    }
    Ok(report)
}
