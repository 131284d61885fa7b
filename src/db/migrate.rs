//! `hookbox migrate`: refinery's migrations (the files in `migrations/`), run
//! over a sqlx connection, so migrating connects exactly as the pools do
//! (same URL options, same TLS: `sslmode=require`, `verify-full`, `sslrootcert`).

use std::str::FromStr;

use anyhow::Context;
use futures_util::future::BoxFuture;
use refinery_core::{
    traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction},
    Migration, Target,
};
use sqlx::{
    postgres::{PgConnectOptions, PgRow},
    Connection, Executor, PgConnection, Row,
};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Any number of processes may migrate at once: they queue on this lock.
const MIGRATION_LOCK_KEY: i64 = 0x0068_6f6f_6b62_6f78; // "hookbox" in ASCII

/// What `migrate` did.
#[derive(Debug)]
pub struct MigrationReport {
    /// The migrations this run applied (`V4__ordering`, ...); empty when the
    /// schema was up to date.
    pub applied: Vec<String>,
}

/// Applies the embedded migrations under an advisory lock; safe to run twice or
/// from several processes at once.
pub async fn migrate(url: &str) -> anyhow::Result<MigrationReport> {
    migrate_with(url, Target::Latest).await
}

/// Applies the embedded migrations up to `version` only (`V7__...` is 7):
/// to build a database as an older release left it, and test an upgrade.
pub async fn migrate_to(url: &str, version: i32) -> anyhow::Result<MigrationReport> {
    migrate_with(url, Target::Version(version)).await
}

async fn migrate_with(url: &str, target: Target) -> anyhow::Result<MigrationReport> {
    let options = PgConnectOptions::from_str(url)
        .context("the database URL is not a valid postgres:// URL")?
        .application_name("hookbox-migrate");
    let mut connection = RefineryConnection(
        PgConnection::connect_with(&options)
            .await
            .context("cannot connect to the database to migrate it")?,
    );
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut connection.0)
        .await
        .context("cannot take the migration lock")?;
    let outcome = embedded::migrations::runner()
        .set_target(target)
        .run_async(&mut connection)
        .await;
    // The lock also goes with the session; unlocking is a courtesy.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut connection.0)
        .await;
    let _ = connection.0.close().await;
    let report = outcome.context("a migration failed")?;
    Ok(MigrationReport {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    })
}

/// A sqlx connection speaking refinery's driver interface: each migration in
/// a transaction of its own, as refinery's tokio-postgres driver does.
struct RefineryConnection(PgConnection);

impl AsyncTransaction for RefineryConnection {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let queries: Vec<String> = queries.map(str::to_owned).collect();
        execute_in_one_transaction(&mut self.0, queries).await
    }
}

impl AsyncQuery<Vec<Migration>> for RefineryConnection {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        let rows = fetch_all(&mut self.0, query.to_owned()).await?;
        rows.iter()
            .map(|row| {
                let decode = |message: &str| sqlx::Error::Decode(message.to_owned().into());
                let applied_on: String = row.try_get(2)?;
                let checksum: String = row.try_get(3)?;
                Ok(Migration::applied(
                    row.try_get(0)?,
                    row.try_get(1)?,
                    OffsetDateTime::parse(&applied_on, &Rfc3339)
                        .map_err(|_| decode("applied_on is not RFC 3339"))?,
                    checksum
                        .parse()
                        .map_err(|_| decode("checksum is not a number"))?,
                ))
            })
            .collect()
    }
}

// Boxed with concrete lifetimes: refinery's traits want `Send` futures, which
// the compiler cannot prove for sqlx's executor calls inside them directly.
fn execute_in_one_transaction(
    connection: &mut PgConnection,
    queries: Vec<String>,
) -> BoxFuture<'_, Result<usize, sqlx::Error>> {
    Box::pin(async move {
        let mut transaction = connection.begin().await?;
        for query in &queries {
            // Migration files hold several statements: without arguments,
            // sqlx sends the text as one simple query.
            transaction.execute(query.as_str()).await?;
        }
        transaction.commit().await?;
        Ok(queries.len())
    })
}

fn fetch_all(
    connection: &mut PgConnection,
    query: String,
) -> BoxFuture<'_, Result<Vec<PgRow>, sqlx::Error>> {
    Box::pin(async move { connection.fetch_all(query.as_str()).await })
}

impl AsyncMigrate for RefineryConnection {}
