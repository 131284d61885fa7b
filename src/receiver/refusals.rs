//! Refused deliveries are audited without letting a flood write a row each.
//!
//! Every refusal is counted in `inbox_refusal_counts` (per minute, source,
//! outcome and reason); only the first `detailed_per_minute` of each such
//! group also get their `inbox_deliveries` row. The quota is enforced by the
//! database, so it holds across receiver processes.
//!
//! Requests only add to an in-memory tally; one task writes it on a connection
//! of its own, never one the group commit needs. A request whose refusal gets
//! a detailed row may wait for that row (its answer then means "audited", as
//! before); the rest are answered at once and written within a second.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, DurationRound, Utc};
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify};

/// How often counted-only refusals are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One refused delivery, as the receiver knows it.
pub struct Refused<'a> {
    pub source: &'a str,
    pub remote_addr: Option<IpAddr>,
    pub outcome: &'static str,
    pub reason: &'static str,
    pub payload_sha256: Option<&'a str>,
    pub status_code: u16,
    /// Whether the refusal may get an `inbox_deliveries` row (else it is only
    /// counted: rate-limited and timed-out requests never get one).
    pub may_detail: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Group {
    minute: DateTime<Utc>,
    source: String,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Default)]
struct Tally {
    refused: i64,
    details: Vec<Detail>,
}

struct Detail {
    received_at: DateTime<Utc>,
    remote_addr: Option<IpAddr>,
    payload_sha256: Option<String>,
    status_code: u16,
    written: Option<oneshot::Sender<()>>,
}

struct Shared {
    pending: Mutex<HashMap<Group, Tally>>,
    wake: Notify,
    detailed_per_minute: usize,
}

/// The receiver's side: counts refusals and hands them to the writer task.
#[derive(Clone)]
pub struct RefusalLog {
    shared: Arc<Shared>,
}

impl RefusalLog {
    /// Starts the writer on the current runtime, with `pool` to itself.
    pub fn start(pool: PgPool, detailed_per_minute: usize) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            detailed_per_minute,
        });
        tokio::spawn(write_forever(pool, Arc::downgrade(&shared)));
        Self { shared }
    }

    /// Counts the refusal. Returns a receiver that resolves once its detailed
    /// row is written, or `None` when it is only counted.
    pub fn record(&self, refused: &Refused<'_>) -> Option<oneshot::Receiver<()>> {
        let now = Utc::now();
        let group = Group {
            minute: now
                .duration_trunc(chrono::Duration::minutes(1))
                .unwrap_or(now),
            source: refused.source.to_owned(),
            outcome: refused.outcome,
            reason: refused.reason,
        };
        let mut pending = self.shared.pending.lock().expect("refusal tally lock");
        let tally = pending.entry(group).or_default();
        tally.refused += 1;
        let detailed = refused.may_detail && tally.details.len() < self.shared.detailed_per_minute;
        let written = detailed.then(|| {
            let (written, done) = oneshot::channel();
            tally.details.push(Detail {
                received_at: now,
                remote_addr: refused.remote_addr,
                payload_sha256: refused.payload_sha256.map(str::to_owned),
                status_code: refused.status_code,
                written: Some(written),
            });
            done
        });
        drop(pending);
        if written.is_some() {
            self.shared.wake.notify_one();
        }
        written
    }
}

async fn write_forever(pool: PgPool, shared: std::sync::Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let _ = tokio::time::timeout(FLUSH_EVERY, strong.wake.notified()).await;
        let taken = std::mem::take(&mut *strong.pending.lock().expect("refusal tally lock"));
        if taken.is_empty() {
            continue;
        }
        let quota = strong.detailed_per_minute as i64;
        drop(strong);
        let mut unwritten = HashMap::new();
        for (group, mut tally) in taken {
            match write_group(&pool, &group, &mut tally, quota).await {
                Ok(()) => {
                    for detail in &mut tally.details {
                        if let Some(written) = detail.written.take() {
                            let _ = written.send(());
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        source = %group.source,
                        outcome = group.outcome,
                        sqlstate = error.as_database_error().and_then(|e| e.code()).as_deref(),
                        "refusals not written yet; kept as counts"
                    );
                    unwritten.insert(group, tally.refused);
                }
            }
        }
        // Counts survive a database outage; the detailed rows (and whoever
        // waits for them) do not, so memory stays bounded.
        if let Some(strong) = shared.upgrade() {
            let mut pending = strong.pending.lock().expect("refusal tally lock");
            for (group, refused) in unwritten {
                pending.entry(group).or_default().refused += refused;
            }
        }
    }
}

/// Adds the group's count and writes as many detailed rows as the minute's
/// quota, shared by every receiver, still allows.
async fn write_group(
    pool: &PgPool,
    group: &Group,
    tally: &mut Tally,
    quota: i64,
) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO inbox_refusal_counts (minute, source, outcome, reason)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        group.minute,
        group.source,
        group.outcome,
        group.reason,
    )
    .execute(&mut *transaction)
    .await?;
    let detailed_so_far = sqlx::query_scalar!(
        "SELECT detailed FROM inbox_refusal_counts
         WHERE minute = $1 AND source = $2 AND outcome = $3 AND reason = $4
         FOR UPDATE",
        group.minute,
        group.source,
        group.outcome,
        group.reason,
    )
    .fetch_one(&mut *transaction)
    .await?;
    let allowed = (quota - detailed_so_far).clamp(0, tally.details.len() as i64) as usize;
    let details = &tally.details[..allowed];
    sqlx::query!(
        "UPDATE inbox_refusal_counts SET refused = refused + $5, detailed = detailed + $6
         WHERE minute = $1 AND source = $2 AND outcome = $3 AND reason = $4",
        group.minute,
        group.source,
        group.outcome,
        group.reason,
        tally.refused,
        allowed as i64,
    )
    .execute(&mut *transaction)
    .await?;
    if !details.is_empty() {
        let received_at: Vec<DateTime<Utc>> = details.iter().map(|d| d.received_at).collect();
        let addresses: Vec<Option<String>> = details
            .iter()
            .map(|d| d.remote_addr.map(|ip| ip.to_string()))
            .collect();
        let hashes: Vec<Option<String>> =
            details.iter().map(|d| d.payload_sha256.clone()).collect();
        let statuses: Vec<i32> = details.iter().map(|d| i32::from(d.status_code)).collect();
        sqlx::query!(
            r#"
            INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, reason, payload_sha256, status_code)
            SELECT received_at, $5, remote_addr::inet, $6, $7, payload_sha256, status_code
            FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::int[])
                 AS d(received_at, remote_addr, payload_sha256, status_code)
            "#,
            &received_at,
            &addresses as &[Option<String>],
            &hashes as &[Option<String>],
            &statuses,
            group.source,
            group.outcome,
            group.reason,
        )
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await
}
