//! What a handler is, and how it says whether a failure is worth retrying.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;
use uuid::Uuid;

/// An event handed to a handler.
#[derive(Clone, Debug)]
pub struct Event {
    /// `inbox_events.id`: time-ordered, and the stable key downstreams dedupe on.
    pub id: Uuid,
    /// The `[[source]]` it came from.
    pub source: String,
    /// The key it is stored under, unique within its source.
    pub event_key: String,
    /// The type the source's `event_type` names, if any.
    pub event_type: Option<String>,
    /// 1 on the first try.
    pub attempt: i32,
    /// The exact bytes received.
    pub payload: Vec<u8>,
    /// The payload parsed, when it is JSON.
    pub payload_json: Option<serde_json::Value>,
}

/// A failure, classified where it happens: the worker branches on the class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later; `retry_after` is the downstream's own request.
    #[error("{message}")]
    Retryable {
        /// What went wrong, for the attempt row (never a payload or a secret).
        message: String,
        /// How long the downstream asked to be left alone (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// Will fail the same way every time: the event goes `dead` now.
    #[error("{message}")]
    Permanent {
        /// What went wrong, for the attempt row (never a payload or a secret).
        message: String,
    },
}

impl HandlerError {
    /// A failure worth retrying later, on the retry policy's schedule.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that will repeat: the event goes `dead` now.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }
}

/// A handler whose effects commit in the same transaction as the event's
/// `succeeded` status and its attempt row: exactly-once effects.
///
/// Events of a batch share one transaction. An error rolls back only this
/// handler's work; to get there, the batch may be run a second time with a
/// savepoint per event, so a handler may run more than once before its one
/// commit (its database effects still commit once; keep effects outside the
/// transaction out of it).
#[async_trait]
pub trait Handler: Send + Sync {
    /// Does the event's work in `transaction`; the worker commits it.
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError>;

    /// Does the work of several events at once, in the order given, when the
    /// handler can do it for less than one call each (the `sql` handler: one
    /// round trip for many events). Runs events until `within` has passed
    /// (the first whatever it takes) and returns how many it ran, from the
    /// first: the worker checks between calls whether the rest may still
    /// start, and hands them to the next call. `None`, the default: the
    /// worker calls [`Handler::handle`] for each event.
    ///
    /// All or nothing: on `Err` the worker rolls the whole batch back and
    /// runs it again one event at a time with `handle`, which decides which
    /// event failed and how. So the error's class and message here are not
    /// recorded anywhere.
    async fn handle_batch(
        &self,
        _events: &[&Event],
        _within: Duration,
        _transaction: &mut PgConnection,
    ) -> Option<Result<usize, HandlerError>> {
        None
    }
}

/// A handler with effects outside the database (HTTP, a program): it runs
/// before the outcome is recorded, so it is at-least-once with a stable key
/// (the event id).
#[async_trait]
pub trait ExternalHandler: Send + Sync {
    /// Does the event's work; `Ok` means it is done and will not be repeated.
    async fn handle(&self, event: &Event) -> Result<(), HandlerError>;

    /// Whether a claimed batch's events may all run at once, holding one
    /// slot, with their outcomes recorded in one transaction: for calls that
    /// are cheap to make together (a broker publish), not one program each.
    fn completes_as_a_batch(&self) -> bool {
        false
    }
}
