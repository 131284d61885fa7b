//! `hookbox import`: events obtained out of band after an outage (a provider's
//! export or API listing) enter the inbox as if delivered, deduplicated by key
//! and audited as `imported`.

use std::{collections::HashSet, io::BufRead};

use serde::Serialize;
use sqlx::PgPool;

use super::{add_affected, record_action};
use crate::{
    config::Source,
    event_key::{sha256_hex, EventFields, EventKeySpec, ExtractError},
    store::{self, IngestOutcome, NewDelivery, Origin},
};

#[derive(Clone, Debug)]
pub struct ImportRequest {
    pub file_name: String,
    pub dry_run: bool,
    pub actor: String,
    pub reason: Option<String>,
    pub batch_size: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub action_id: Option<i64>,
    pub lines: u64,
    /// New events (for a dry run: that would be new).
    pub stored: u64,
    /// Already stored with the same payload.
    pub duplicates: u64,
    /// Already stored with a different payload.
    pub conflicts: u64,
    /// `(line number, why)` of lines that could not be imported.
    pub invalid: Vec<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("source {name} takes its event key from the {header} header; imported lines carry no headers")]
    HeaderKey { name: String, header: String },
    #[error("cannot read the input: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Rare: the import met `prune --keys-older-than` on one of its keys.
    /// The batch rolled back; an import run again stores each key once.
    #[error("an event was pruned while its duplicate was imported; run the import again")]
    PrunedMeanwhile,
}

/// Where imported payloads go: into the inbox under an operator action, or
/// (a dry run) nowhere, only counted.
#[derive(Debug)]
pub enum ImportTarget {
    Action(i64),
    /// The keys a dry run has counted as new so far.
    DryRun(HashSet<String>),
}

impl ImportTarget {
    pub fn dry_run() -> Self {
        Self::DryRun(HashSet::new())
    }

    pub fn action_id(&self) -> Option<i64> {
        match self {
            Self::Action(id) => Some(*id),
            Self::DryRun(_) => None,
        }
    }
}

/// Whether payloads of `source` can enter the inbox without a delivery's
/// headers.
pub fn check_importable(source: &Source) -> Result<(), ImportError> {
    match &source.event_key {
        EventKeySpec::Header(header) => Err(ImportError::HeaderKey {
            name: source.name.clone(),
            header: header.clone(),
        }),
        _ => Ok(()),
    }
}

/// A payload's hash, key, type and JSON text, derived as a delivery's would be.
pub fn event_fields<'a>(
    source: &Source,
    payload: &'a [u8],
) -> Result<(String, EventFields<'a>), ExtractError> {
    let no_headers: &[(&str, &str)] = &[];
    let sha = sha256_hex(payload);
    let fields = EventFields::extract(
        &source.event_key,
        source.event_type.as_ref(),
        source.ordering.as_ref(),
        payload,
        &sha,
        no_headers,
    )?;
    Ok((sha, fields))
}

/// The one way events obtained out of band enter the inbox (`hookbox import`
/// and reconciliation both come through here): each payload is stored if its
/// key is new, every one gets an `imported` audit row saying what became of
/// it, and the new events are linked to the action. `(number, payload)`: the
/// number names an invalid payload in the report.
pub async fn import_payloads(
    pool: &PgPool,
    source: &Source,
    target: &mut ImportTarget,
    batch: &[(u64, Vec<u8>)],
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    check_importable(source)?;
    match target {
        ImportTarget::Action(action_id) => {
            import_batch(pool, source, *action_id, batch, report).await
        }
        ImportTarget::DryRun(seen) => check_batch(pool, source, batch, seen, report).await,
    }
}

/// One payload per line (JSON Lines); blank lines are ignored.
pub async fn import(
    pool: &PgPool,
    source: &Source,
    input: impl BufRead,
    request: &ImportRequest,
    progress: impl Fn(u64),
) -> Result<ImportReport, ImportError> {
    check_importable(source)?;
    let mut report = ImportReport::default();
    let action_id = if request.dry_run {
        None
    } else {
        let recorded = serde_json::json!({ "source": source.name, "file": request.file_name });
        let mut conn = pool.acquire().await?;
        Some(
            record_action(
                &mut conn,
                &request.actor,
                "import",
                &recorded,
                request.reason.as_deref(),
            )
            .await?,
        )
    };
    report.action_id = action_id;
    let mut target = match action_id {
        Some(action_id) => ImportTarget::Action(action_id),
        None => ImportTarget::dry_run(),
    };
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(request.batch_size);
    let mut lines = input.split(b'\n');
    let mut number = 0u64;
    loop {
        let line = lines.next().transpose()?;
        let ended = line.is_none();
        if let Some(mut line) = line {
            number += 1;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            report.lines += 1;
            batch.push((number, line));
            if batch.len() < request.batch_size {
                continue;
            }
        }
        if batch.is_empty() {
            break;
        }
        let done = batch.len() as u64;
        import_payloads(pool, source, &mut target, &batch, &mut report).await?;
        batch.clear();
        progress(done);
        if ended {
            break;
        }
    }
    if let Some(action_id) = action_id {
        let counts = serde_json::json!({
            "source": source.name, "file": request.file_name, "lines": report.lines, "stored": report.stored,
            "duplicates": report.duplicates, "conflicts": report.conflicts, "invalid": report.invalid.len(),
        });
        sqlx::query!(
            "UPDATE inbox_actions SET filter = $2 WHERE id = $1",
            action_id,
            counts
        )
        .execute(pool)
        .await?;
    }
    Ok(report)
}

/// A payload's hash and fields, as a delivery's would be; an invalid one is
/// noted in the report with its number.
fn parse<'a>(
    source: &Source,
    number: u64,
    payload: &'a [u8],
    report: &mut ImportReport,
) -> Option<(String, EventFields<'a>)> {
    match event_fields(source, payload) {
        Ok(fields) => Some(fields),
        Err(error) => {
            report.invalid.push((number, error.to_string()));
            None
        }
    }
}

async fn import_batch(
    pool: &PgPool,
    source: &Source,
    action_id: i64,
    batch: &[(u64, Vec<u8>)],
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let mut deliveries = Vec::with_capacity(batch.len());
    for (number, payload) in batch {
        let Some((sha, fields)) = parse(source, *number, payload, report) else {
            continue;
        };
        deliveries.push(NewDelivery {
            ordering: fields.ordering,
            source: source.name.clone(),
            environment: source.environment.clone(),
            event_key: fields.event_key,
            event_type: fields.event_type,
            payload_is_json: fields.json_text.is_some(),
            payload: payload.clone(),
            headers: serde_json::json!({}),
            payload_sha256: sha,
            remote_addr: None,
        });
    }
    let mut transaction = pool.begin().await?;
    let outcomes = store::ingest_batch(&mut transaction, &deliveries, Origin::Import)
        .await
        .map_err(|e| match e {
            store::StoreError::Database(e) => ImportError::Database(e),
            store::StoreError::Vanished => ImportError::Database(sqlx::Error::RowNotFound),
            store::StoreError::PrunedMeanwhile => ImportError::PrunedMeanwhile,
        })?;
    let mut stored = Vec::new();
    for (outcome, event_id) in outcomes {
        match outcome {
            IngestOutcome::Accepted => stored.push(event_id),
            IngestOutcome::Duplicate => report.duplicates += 1,
            IngestOutcome::Conflict => report.conflicts += 1,
        }
    }
    report.stored += stored.len() as u64;
    sqlx::query!(
        "INSERT INTO inbox_action_events (action_id, event_id) SELECT $1, unnest($2::uuid[])",
        action_id,
        &stored,
    )
    .execute(&mut *transaction)
    .await?;
    add_affected(&mut transaction, action_id, stored.len() as i64).await?;
    transaction.commit().await?;
    Ok(())
}

async fn check_batch(
    pool: &PgPool,
    source: &Source,
    batch: &[(u64, Vec<u8>)],
    seen: &mut HashSet<String>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    for (number, payload) in batch {
        let Some((sha, fields)) = parse(source, *number, payload, report) else {
            continue;
        };
        let stored = sqlx::query_scalar!(
            "SELECT payload_sha256 FROM inbox_event_state WHERE source = $1 AND event_key = $2",
            source.name,
            fields.event_key
        )
        .fetch_optional(pool)
        .await?;
        match stored {
            Some(stored_sha) if stored_sha == sha => report.duplicates += 1,
            Some(_) => report.conflicts += 1,
            None if !seen.insert(fields.event_key) => report.duplicates += 1,
            None => report.stored += 1,
        }
    }
    Ok(())
}
