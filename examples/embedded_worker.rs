//! A worker binary with a handler of its own.
//!
//! The handler runs inside the transaction that also marks the event
//! `succeeded` and writes its attempt row, so its database effects happen
//! exactly once. In `hookbox.toml`:
//!
//! ```toml
//! [[route]]
//! source = "begini"
//! event_types = ["*_score.complete"]
//! handler = "record_score"
//!
//! [handler.record_score]
//! kind = "library"
//! ```
//!
//! Run with `cargo run --example embedded_worker -- path/to/hookbox.toml`.

use hookbox::{async_trait, db, Config, Event, Handler, HandlerError, LibraryHandlers, Worker};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

struct RecordScore;

#[async_trait]
impl Handler for RecordScore {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        // A payload without a score will never have one: retrying is pointless.
        let score = event
            .payload_json
            .as_ref()
            .and_then(|payload| payload.pointer("/event/details/score"))
            .and_then(|score| score.as_f64())
            .ok_or_else(|| HandlerError::permanent("the event carries no score"))?;
        sqlx::query("INSERT INTO scores (event_id, score) VALUES ($1, $2)")
            .bind(event.id)
            .bind(score)
            .execute(transaction)
            .await
            .map_err(|e| HandlerError::retryable(format!("cannot record the score: {e}")))?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hookbox::telemetry::init_logging(hookbox::telemetry::LogFormat::Auto);
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "hookbox.toml".into());
    let config = Config::load(path.as_ref())?;
    let pool = db::pool(&config.database_url()?, &db::PoolSettings::worker(&config))?;
    let handlers = LibraryHandlers::default().with("record_score", RecordScore);
    let worker = Worker::from_config(&config, pool, handlers)?;

    let shutdown = CancellationToken::new();
    tokio::spawn(hookbox::shutdown_on_signal(shutdown.clone()));
    worker.run(shutdown).await?;
    Ok(())
}
