//! Connections and schema migrations.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    Connection, PgPool,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Any number of processes may migrate at once: they queue on this lock.
const MIGRATION_LOCK_KEY: i64 = 0x0068_6f6f_6b62_6f78; // "hookbox" in ASCII

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

fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    match error {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

/// A pooled connection idle this long is tested before it is handed out.
const TEST_CONNECTIONS_IDLE_FOR: Duration = Duration::from_secs(1);

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

/// What `migrate` did.
#[derive(Debug)]
pub struct MigrationReport {
    pub applied: Vec<String>,
}

/// Applies the embedded migrations under an advisory lock; safe to run twice or
/// from several processes at once.
pub async fn migrate(url: &str) -> anyhow::Result<MigrationReport> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the database to migrate it")?;
    let connection = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("cannot take the migration lock")?;
    let outcome = embedded::migrations::runner().run_async(&mut client).await;
    // The lock also goes with the session; unlocking is a courtesy.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    let _ = connection.await;
    let report = outcome.context("a migration failed")?;
    Ok(MigrationReport {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    })
}
