//! `kind = "sql"`: one statement, run inside the event's completion transaction.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::worker::handler::{Event, Handler, HandlerError};

/// The statement may use `$1` payload (jsonb), `$2` event type, `$3` event id,
/// `$4` source, `$5` event key, `$6` attempt.
///
/// Every run goes through `inbox_run_statement` (schema V16), for one event
/// or many: the statement is executed inside the server with each event's
/// parameters, planned for their values every time. One way for every
/// batch size, so a statement succeeds or fails the same however many
/// events a call takes: a prepared statement would switch to a generic plan
/// from its sixth run, and a generic plan can fail where a plan for the
/// values does not (`CASE WHEN $2 = 'x' THEN 1/0 END` is folded, and fails,
/// while planning).
pub struct SqlHandler {
    statement: String,
    /// Which of `$1`..`$6` the statement names: only those values are sent.
    used: [bool; 6],
}

impl SqlHandler {
    /// A handler that runs `statement` with the parameters it uses.
    pub fn new(statement: &str) -> Self {
        Self {
            statement: statement.to_owned(),
            used: parameters_used(statement),
        }
    }

    /// Runs the statement for `events`, from the first, until `within` has
    /// passed (the first whatever it takes); how many ran.
    async fn run(
        &self,
        events: &[&Event],
        within: Duration,
        transaction: &mut PgConnection,
    ) -> Result<usize, HandlerError> {
        let [payload, event_type, _, source, key, attempt] = self.used;
        let events = match payload {
            false => events,
            true => &events[..handed_within(events, MOST_PAYLOAD_BYTES)],
        };
        // The exact bytes received (valid UTF-8 wherever they parsed as
        // JSON), cast to jsonb by the server: serde_json would have written
        // a number beyond 64 bits again as a float.
        let payloads: Option<Vec<Option<&str>>> = payload.then(|| {
            events
                .iter()
                .map(|e| {
                    e.payload_json
                        .as_ref()
                        .and_then(|_| std::str::from_utf8(&e.payload).ok())
                })
                .collect()
        });
        let types: Option<Vec<Option<&str>>> =
            event_type.then(|| events.iter().map(|e| e.event_type.as_deref()).collect());
        // Every event's id goes, used or not: its length is the call's.
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
        let sources: Option<Vec<&str>> =
            source.then(|| events.iter().map(|e| e.source.as_str()).collect());
        let keys: Option<Vec<&str>> =
            key.then(|| events.iter().map(|e| e.event_key.as_str()).collect());
        let attempts: Option<Vec<i32>> =
            attempt.then(|| events.iter().map(|e| e.attempt).collect());
        let ran = sqlx::query_scalar!(
            r#"SELECT inbox_run_statement($1, $2, $3, $4, $5, $6, $7, $8) AS "ran!""#,
            &self.statement,
            within.as_secs_f64(),
            payloads as Option<Vec<Option<&str>>>,
            types as Option<Vec<Option<&str>>>,
            &ids,
            sources as Option<Vec<&str>>,
            keys as Option<Vec<&str>>,
            attempts as Option<Vec<i32>>,
        )
        .fetch_one(transaction)
        .await
        .map_err(classify)?;
        Ok(usize::try_from(ran).unwrap_or(0))
    }
}

/// Which of `$1`..`$6` appear in the statement. Only those values are sent:
/// a payload nobody reads is not.
fn parameters_used(statement: &str) -> [bool; 6] {
    let bytes = statement.as_bytes();
    let mut used = [false; 6];
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'$' {
            let digits: String = bytes[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .map(|&c| c as char)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                if (1..=6).contains(&n) {
                    used[n - 1] = true;
                }
            }
        }
    }
    used
}

/// The most payload bytes one call is sent: far below PostgreSQL's limit on
/// a message (1 GB), which a batch of large payloads could reach.
const MOST_PAYLOAD_BYTES: usize = 16 << 20;

/// How many of `events`, from the first, fit in `budget` payload bytes (at
/// least one).
fn handed_within(events: &[&Event], budget: usize) -> usize {
    let mut total = 0;
    events
        .iter()
        .take_while(|event| {
            total += event.payload.len();
            total <= budget
        })
        .count()
        .max(1)
        .min(events.len())
}

#[async_trait]
impl Handler for SqlHandler {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        self.run(&[event], Duration::ZERO, transaction)
            .await
            .map(|_| ())
    }

    /// One call for many events instead of one round trip per event; handed
    /// no more payload bytes than [`MOST_PAYLOAD_BYTES`] (but at least one
    /// event).
    async fn handle_batch(
        &self,
        events: &[&Event],
        within: Duration,
        transaction: &mut PgConnection,
    ) -> Option<Result<usize, HandlerError>> {
        Some(self.run(events, within, transaction).await)
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
    fn only_the_parameters_named_are_sent() {
        assert_eq!(parameters_used("SELECT 1"), [false; 6]);
        assert_eq!(
            parameters_used("SELECT f($1, $3)"),
            [true, false, true, false, false, false]
        );
        assert_eq!(
            parameters_used("INSERT INTO t VALUES ($6, $2)"),
            [false, true, false, false, false, true]
        );
        assert_eq!(parameters_used("SELECT $$a$$, $7"), [false; 6]);
    }

    #[test]
    fn a_call_is_handed_payloads_up_to_its_byte_budget_and_always_one_event() {
        let event = |size: usize| Event {
            id: uuid::Uuid::nil(),
            source: "s".into(),
            event_key: "k".into(),
            event_type: None,
            attempt: 1,
            payload: vec![b'1'; size],
            payload_json: None,
        };
        let (small, large) = (event(10), event(100));
        assert_eq!(handed_within(&[&small, &small, &small], 25), 2);
        assert_eq!(handed_within(&[&large, &small], 25), 1);
        assert_eq!(handed_within(&[&small, &small], 1000), 2);
    }
}
