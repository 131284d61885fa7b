//! `kind = "sql"`: one statement, run inside the event's completion transaction.

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::worker::handler::{Event, Handler, HandlerError};

/// The statement may use `$1` payload (jsonb), `$2` event type, `$3` event id,
/// `$4` source, `$5` event key, `$6` attempt.
pub struct SqlHandler {
    statement: String,
    parameters: usize,
}

impl SqlHandler {
    /// A handler that runs `statement` with the parameters it uses.
    pub fn new(statement: &str) -> Self {
        Self {
            statement: statement.to_owned(),
            parameters: highest_parameter(statement).min(6),
        }
    }
}

/// The highest `$N` used, so exactly that many values are bound.
fn highest_parameter(statement: &str) -> usize {
    let bytes = statement.as_bytes();
    let mut highest = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'$' {
            let digits: String = bytes[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .map(|&c| c as char)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                highest = highest.max(n);
            }
        }
    }
    highest
}

#[async_trait]
impl Handler for SqlHandler {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let mut query = sqlx::query(&self.statement);
        let n = self.parameters;
        if n >= 1 {
            query = query.bind(event.payload_json.clone().map(sqlx::types::Json));
        }
        if n >= 2 {
            query = query.bind(event.event_type.clone());
        }
        if n >= 3 {
            query = query.bind(event.id);
        }
        if n >= 4 {
            query = query.bind(event.source.clone());
        }
        if n >= 5 {
            query = query.bind(event.event_key.clone());
        }
        if n >= 6 {
            query = query.bind(event.attempt);
        }
        query
            .execute(transaction)
            .await
            .map(|_| ())
            .map_err(classify)
    }
}

/// Data and integrity errors fail the same way every time; everything else
/// (connections, deadlocks, timeouts, a missing function during a deploy) may pass later.
pub(crate) fn classify(error: sqlx::Error) -> HandlerError {
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().to_string();
            let message = format!("SQL error {code}: {}", db.message());
            if crate::db::refuses_the_data(&error) {
                HandlerError::permanent(message)
            } else {
                HandlerError::retryable(message)
            }
        }
        other => HandlerError::retryable(format!("database error: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_parameters_used_are_bound() {
        assert_eq!(highest_parameter("SELECT 1"), 0);
        assert_eq!(highest_parameter("SELECT f($1, $3)"), 3);
        assert_eq!(highest_parameter("INSERT INTO t VALUES ($6, $2)"), 6);
    }
}
