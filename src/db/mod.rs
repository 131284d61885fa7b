//! Connections and schema migrations.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    Connection, PgPool,
};

use crate::config::Config;

/// How a process talks to the database.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Server-side limit per statement, so a blocked insert gives up instead of
    /// holding a request open; `None` for the worker, whose handlers may run long.
    pub statement_timeout: Option<Duration>,
    pub application_name: &'static str,
}

impl PoolSettings {
    /// A receiver's pool: every statement ends before the sender gives up.
    pub fn receiver(config: &Config) -> Self {
        let request_timeout = config.receiver.request_timeout.0;
        Self {
            max_connections: config.database.max_connections,
            acquire_timeout: config.database.acquire_timeout.0.min(request_timeout),
            // The database gives up before the sender does: nothing is left waiting.
            statement_timeout: Some(request_timeout.mul_f64(0.8)),
            application_name: "hookbox-receiver",
        }
    }

    /// A worker's pool: claims, completions, the listener and rescue all need
    /// a connection besides the handlers running at once.
    pub fn worker(config: &Config) -> Self {
        Self {
            max_connections: config
                .database
                .max_connections
                .max(config.worker.concurrency as u32 + 2),
            acquire_timeout: config.database.acquire_timeout.0,
            statement_timeout: None,
            application_name: "hookbox-worker",
        }
    }

    /// An operator command's pool (`hookbox status`, `replay`, ...): two
    /// connections, no statement limit (a replay may touch many rows).
    pub fn operator(config: &Config) -> Self {
        Self {
            max_connections: 2,
            acquire_timeout: config.database.acquire_timeout.0,
            statement_timeout: None,
            application_name: "hookbox",
        }
    }
}

/// The database refused the data itself (SQLSTATE class 22, a data exception,
/// 23, an integrity constraint, or 54, a program limit such as an index row too
/// large), rather than being unreachable, slow or interrupted: the same rows
/// fail the same way every time.
pub fn refuses_the_data(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| {
        code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
    })
}

/// The transaction lost a race with another one (deadlock `40P01`,
/// serialization failure `40001`) and was rolled back: the same work, tried
/// again, normally succeeds.
pub fn lost_a_race(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == "40P01" || code == "40001")
}

/// A row refers to one that does not exist (`23503`): in a statement whose
/// only references are to rows it has just read, one deleted meanwhile.
pub fn is_foreign_key_violation(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == "23503")
}

/// No answer came (the connection was refused, reset or closed, or no pooled
/// connection was free in time), as opposed to an answer that was an error:
/// asked again a moment later, the database may well answer.
pub fn did_not_answer(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
    )
}

fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    match error {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

/// A pooled connection idle this long is tested before it is handed out.
pub const TEST_CONNECTIONS_IDLE_FOR: Duration = Duration::from_secs(1);

/// A pool that connects lazily: processes start while the database is down and
/// work as soon as it answers.
pub fn pool(url: &str, settings: &PoolSettings) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url)
        .context("the database URL is not a valid postgres:// URL")?
        .application_name(settings.application_name);
    if let Some(timeout) = settings.statement_timeout {
        options = options.options([("statement_timeout", format!("{}ms", timeout.as_millis()))]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        // A connection broken by a database restart is found and replaced
        // before use. Only one that sat idle is tested: under load every
        // statement would otherwise pay a second round trip, and a restart
        // takes longer than this anyway.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= TEST_CONNECTIONS_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

mod migrate;
pub mod partitions;

pub use migrate::{migrate, migrate_to, MigrationReport};
pub use partitions::{make_partitions, PartitionSettings};
