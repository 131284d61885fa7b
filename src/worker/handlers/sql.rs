//! `kind = "sql"`: one statement, run inside the event's completion transaction.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    encode::IsNull,
    error::BoxDynError,
    postgres::{PgArgumentBuffer, PgTypeInfo},
    PgConnection, Postgres,
};

use crate::worker::handler::{Event, Handler, HandlerError};

/// The statement may use `$1` payload (jsonb), `$2` event type, `$3` event id,
/// `$4` source, `$5` event key, `$6` attempt.
pub struct SqlHandler {
    statement: String,
    /// Which of `$1`..`$6` the statement names: only those values are sent.
    used: [bool; 6],
    /// The statement has run once as a prepared statement. Until then it
    /// runs one event at a time: PostgreSQL refuses some statements there
    /// (several commands in one) that the loop of a call would run, and a
    /// statement must fail the same way however many events it is handed.
    runs_prepared: AtomicBool,
}

impl SqlHandler {
    /// A handler that runs `statement` with the parameters it uses.
    pub fn new(statement: &str) -> Self {
        Self {
            statement: statement.to_owned(),
            used: parameters_used(statement),
            runs_prepared: AtomicBool::new(false),
        }
    }

    /// As many parameters as the highest one the statement names.
    fn bound(&self) -> usize {
        self.used
            .iter()
            .rposition(|&used| used)
            .map_or(0, |i| i + 1)
    }
}

/// Which of `$1`..`$6` appear in the statement. A parameter below the highest
/// one that the statement does not name is still bound (positions are
/// fixed), as NULL: a payload nobody reads is not sent.
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

/// A JSON payload's exact bytes, sent as `jsonb` (whose binary form is a
/// version byte and the JSON text). Parsed and written again by serde_json,
/// a number beyond 64 bits would lose digits on the way.
struct JsonbText<'a>(&'a [u8]);

impl sqlx::Type<Postgres> for JsonbText<'_> {
    fn type_info() -> PgTypeInfo {
        <sqlx::types::Json<()> as sqlx::Type<Postgres>>::type_info()
    }
}

impl sqlx::Encode<'_, Postgres> for JsonbText<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.push(1);
        buf.extend_from_slice(self.0);
        Ok(IsNull::No)
    }
}

/// The payload as the statement's `$1` gets it: NULL when it is not JSON.
fn json_payload(event: &Event) -> Option<&[u8]> {
    event
        .payload_json
        .as_ref()
        .map(|_| event.payload.as_slice())
}

#[async_trait]
impl Handler for SqlHandler {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let mut query = sqlx::query(&self.statement);
        let [payload, event_type, id, source, key, attempt] = self.used;
        let n = self.bound();
        if n >= 1 {
            query = query.bind(json_payload(event).filter(|_| payload).map(JsonbText));
        }
        if n >= 2 {
            query = query.bind(event.event_type.as_deref().filter(|_| event_type));
        }
        if n >= 3 {
            query = query.bind(Some(event.id).filter(|_| id));
        }
        if n >= 4 {
            query = query.bind(Some(event.source.as_str()).filter(|_| source));
        }
        if n >= 5 {
            query = query.bind(Some(event.event_key.as_str()).filter(|_| key));
        }
        if n >= 6 {
            query = query.bind(Some(event.attempt).filter(|_| attempt));
        }
        query.execute(transaction).await.map_err(classify)?;
        self.runs_prepared.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// One call for many events (`inbox_run_statement`, schema V16): the
    /// statement runs once per event inside the server, with each event's
    /// parameters, until `within` has passed, instead of one round trip per
    /// event. Handed no more payload bytes than [`MOST_PAYLOAD_BYTES`] (but at
    /// least one event).
    async fn handle_batch(
        &self,
        events: &[&Event],
        within: Duration,
        transaction: &mut PgConnection,
    ) -> Option<Result<usize, HandlerError>> {
        if !self.runs_prepared.load(Ordering::Relaxed) {
            return None;
        }
        let [payload, event_type, _, source, key, attempt] = self.used;
        let events = match payload {
            false => events,
            true => &events[..handed_within(events, MOST_PAYLOAD_BYTES)],
        };
        // Valid UTF-8 wherever it parsed as JSON.
        let payloads: Option<Vec<Option<&str>>> = payload.then(|| {
            events
                .iter()
                .map(|e| json_payload(e).and_then(|bytes| std::str::from_utf8(bytes).ok()))
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
        let result = sqlx::query_scalar!(
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
        .await;
        Some(
            result
                .map(|ran| usize::try_from(ran).unwrap_or(0))
                .map_err(classify),
        )
    }
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
    fn only_the_parameters_named_are_sent_up_to_the_highest() {
        let bound = |statement: &str| {
            let handler = SqlHandler::new(statement);
            (handler.bound(), handler.used)
        };
        assert_eq!(bound("SELECT 1"), (0, [false; 6]));
        assert_eq!(
            bound("SELECT f($1, $3)"),
            (3, [true, false, true, false, false, false])
        );
        assert_eq!(
            bound("INSERT INTO t VALUES ($6, $2)"),
            (6, [false, true, false, false, false, true])
        );
        assert_eq!(bound("SELECT $$a$$, $7"), (0, [false; 6]));
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
