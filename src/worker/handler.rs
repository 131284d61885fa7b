//! What a handler is, and how it says whether a failure is worth retrying.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;
use uuid::Uuid;

/// An event handed to a handler.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: Uuid,
    pub source: String,
    pub event_key: String,
    pub event_type: Option<String>,
    /// 1 on the first try.
    pub attempt: i32,
    /// The exact bytes received.
    pub payload: Vec<u8>,
    pub payload_json: Option<serde_json::Value>,
}

/// A failure, classified where it happens: the worker branches on the class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later; `retry_after` is the downstream's own request.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Will fail the same way every time: the event goes `dead` now.
    #[error("{message}")]
    Permanent { message: String },
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }
}

/// A handler whose effects commit in the same transaction as the event's
/// `succeeded` status and its attempt row: exactly-once effects. The
/// connection is inside a savepoint; an error rolls back only the handler's work.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError>;
}

/// A handler with effects outside the database (HTTP, a program): it runs
/// before the outcome is recorded, so it is at-least-once with a stable key
/// (the event id).
#[async_trait]
pub trait ExternalHandler: Send + Sync {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError>;

    /// Whether a claimed batch's events may all run at once, holding one
    /// slot, with their outcomes recorded in one transaction: for calls that
    /// are cheap to make together (a broker publish), not one program each.
    fn completes_as_a_batch(&self) -> bool {
        false
    }
}
