//! `GET /readyz` is unauthenticated: its answer is cached for about a second,
//! so a flood of probes costs at most one query per second.

use std::time::{Duration, Instant};

use sqlx::PgPool;

/// How long an answer is reused.
const CACHED_FOR: Duration = Duration::from_secs(1);
/// A database slower than this to answer `SELECT 1` is not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Readiness {
    pool: PgPool,
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Readiness {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the database answers. Concurrent probes wait for one query.
    pub async fn is_ready(&self) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = *last {
            if at.elapsed() < CACHED_FOR {
                return ready;
            }
        }
        let ready = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&self.pool)).await,
            Ok(Ok(_))
        );
        *last = Some((Instant::now(), ready));
        ready
    }
}
