//! What an attempt came to, and the retry decision: data in, outcome out.

use std::time::Duration;

use super::{handler::HandlerError, queue, retry::RetryPolicy, Event};
use crate::status::{AttemptOutcome, EventStatus};

/// `last_error` and attempt errors are kept short.
const ERROR_LIMIT: usize = 1000;

pub(super) const PAYLOAD_PRUNED: &str = "payload was pruned; nothing to process";
/// The reason a stale event is skipped; it starts with `stale` for operators' SQL.
pub(super) const STALE: &str = "stale: an event of its key ordered after it has already finished";

/// What became of one claimed event in this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The outcome was recorded (and committed) as this attempt outcome.
    Recorded(AttemptOutcome),
    /// The lease was lost before the outcome could be recorded: nothing committed.
    LeaseLost,
}

/// What became of an event's handler in one attempt.
pub(super) enum Attempted {
    NoRoute,
    /// The payload was pruned before a replay asked for the event again.
    PayloadPruned,
    /// Not started: the worker is stopping or the lease is nearly over.
    NotStarted,
    /// Ordered after an event of its key that already finished (`stale = "skip"`).
    Stale,
    Ran(Result<(), HandlerError>),
}

/// The retry decision for one attempt. `jitter_unit`, in [-1, 1], places the
/// retry delay within the policy's jitter (callers pass a random number).
pub(super) fn decide<'a>(
    policy: &RetryPolicy,
    event: &Event,
    attempt_row: queue::AttemptRow,
    handler: Option<&'a str>,
    attempted: Attempted,
    jitter_unit: f64,
) -> queue::Finish<'a> {
    let finish = |event_status, attempt_outcome, error: Option<String>, retry_in| queue::Finish {
        event_id: event.id,
        attempt: event.attempt,
        attempt_row,
        event_status,
        attempt_outcome,
        handler,
        error: error.map(|e| truncate(e, ERROR_LIMIT)),
        retry_in,
        not_started: false,
    };
    match attempted {
        Attempted::NotStarted => queue::Finish {
            not_started: true,
            ..finish(
                EventStatus::Retrying,
                AttemptOutcome::Retry,
                Some("released: the handler had not started when the worker stopped or the lease ran short".into()),
                Some(Duration::ZERO),
            )
        },
        Attempted::NoRoute => {
            let why = format!(
                "no route matches source {} and type {}",
                event.source,
                event.event_type.as_deref().unwrap_or("(none)")
            );
            finish(EventStatus::Skipped, AttemptOutcome::Skipped, Some(why), None)
        }
        Attempted::Stale => finish(
            EventStatus::Skipped,
            AttemptOutcome::Skipped,
            Some(STALE.into()),
            None,
        ),
        Attempted::PayloadPruned => finish(
            EventStatus::Dead,
            AttemptOutcome::Dead,
            Some(PAYLOAD_PRUNED.into()),
            None,
        ),
        Attempted::Ran(Ok(())) => finish(EventStatus::Succeeded, AttemptOutcome::Succeeded, None, None),
        Attempted::Ran(Err(HandlerError::Permanent { message })) => {
            finish(EventStatus::Dead, AttemptOutcome::Dead, Some(message), None)
        }
        Attempted::Ran(Err(HandlerError::Retryable {
            message,
            retry_after,
        })) => {
            let attempt = u32::try_from(event.attempt).unwrap_or(u32::MAX);
            if policy.is_exhausted(attempt) {
                let message = format!("{message} (gave up after {attempt} attempts)");
                finish(EventStatus::Dead, AttemptOutcome::Dead, Some(message), None)
            } else {
                // The downstream's Retry-After is honoured up to the policy's
                // `max`: a value of years (or 1e13 s) would park the event for good.
                let wait = policy
                    .delay(attempt, jitter_unit)
                    .max(retry_after.unwrap_or_default())
                    .min(policy.max);
                finish(
                    EventStatus::Retrying,
                    AttemptOutcome::Retry,
                    Some(message),
                    Some(wait),
                )
            }
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Logs a recorded outcome and counts it. The error text is not logged: SQL
/// errors and a program's stderr may quote the payload. It is kept in the
/// attempt row, which the database guards.
pub(super) fn log_outcome(event: &Event, finish: &queue::Finish<'_>) {
    match finish.attempt_outcome {
        AttemptOutcome::Dead => {
            tracing::warn!(event_id = %event.id, source = %event.source, handler = finish.handler, "event is dead; the attempt row holds the error")
        }
        AttemptOutcome::Retry => {
            tracing::info!(event_id = %event.id, source = %event.source, handler = finish.handler, "attempt failed; will retry; the attempt row holds the error")
        }
        outcome => {
            tracing::info!(event_id = %event.id, source = %event.source, outcome = outcome.as_str(), "attempt finished")
        }
    }
    metrics::counter!("hookbox_attempts_total", "handler" => finish.handler.unwrap_or("").to_owned(), "outcome" => finish.attempt_outcome.as_str())
        .increment(1);
}

pub(super) fn log_lease_lost(event: &Event) {
    tracing::warn!(event_id = %event.id, source = %event.source, "lease lost before the outcome was recorded; nothing committed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(5),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    fn attempt() -> queue::AttemptRow {
        queue::AttemptRow {
            id: 1,
            started_at: chrono::Utc::now(),
        }
    }

    fn event(attempt: i32) -> Event {
        Event {
            id: uuid::Uuid::now_v7(),
            source: "begini".into(),
            event_key: "k".into(),
            event_type: Some("application.complete".into()),
            attempt,
            payload: b"{}".to_vec(),
            payload_json: None,
        }
    }

    #[test]
    fn a_retryable_failure_waits_the_longer_of_the_backoff_and_retry_after() {
        let failed = |retry_after| {
            Attempted::Ran(Err(HandlerError::Retryable {
                message: "503".into(),
                retry_after,
            }))
        };
        let finish = decide(
            &policy(),
            &event(1),
            attempt(),
            Some("h"),
            failed(None),
            0.0,
        );
        assert_eq!(finish.event_status, EventStatus::Retrying);
        assert_eq!(finish.retry_in, Some(Duration::from_secs(5)));
        let later = failed(Some(Duration::from_secs(30)));
        let finish = decide(&policy(), &event(1), attempt(), Some("h"), later, 0.0);
        assert_eq!(finish.retry_in, Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_downstreams_retry_after_is_capped_at_the_policys_max() {
        for seconds in [3600 * 24 * 365 * 10, 10_000_000_000_000] {
            let failed = Attempted::Ran(Err(HandlerError::Retryable {
                message: "429".into(),
                retry_after: Some(Duration::from_secs(seconds)),
            }));
            let finish = decide(&policy(), &event(1), attempt(), Some("h"), failed, 0.0);
            assert_eq!(finish.retry_in, Some(Duration::from_secs(60)));
        }
    }

    #[test]
    fn the_last_allowed_attempt_ends_dead_and_says_so() {
        let failed = Attempted::Ran(Err(HandlerError::retryable("timeout")));
        let finish = decide(&policy(), &event(3), attempt(), Some("h"), failed, 0.0);
        assert_eq!(finish.event_status, EventStatus::Dead);
        assert_eq!(finish.attempt_outcome, AttemptOutcome::Dead);
        assert_eq!(
            finish.error.as_deref(),
            Some("timeout (gave up after 3 attempts)")
        );
    }

    #[test]
    fn an_event_without_a_route_is_skipped() {
        let finish = decide(
            &policy(),
            &event(1),
            attempt(),
            None,
            Attempted::NoRoute,
            0.0,
        );
        assert_eq!(finish.event_status, EventStatus::Skipped);
        assert_eq!(
            finish.error.as_deref(),
            Some("no route matches source begini and type application.complete")
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let cut = truncate("é".repeat(600), 1000);
        assert!(cut.len() <= 1000 + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }
}
