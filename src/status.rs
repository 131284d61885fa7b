//! The states the SQL contract names, as types: an event's status, an
//! attempt's outcome and a delivery's outcome. Each is stored as the text the
//! contract documents (the columns stay `text`, so operators' SQL is unchanged).
//!
//! ```
//! use hookbox::EventStatus;
//!
//! assert_eq!(EventStatus::Retrying.as_str(), "retrying");
//! assert_eq!("dead".parse::<EventStatus>(), Ok(EventStatus::Dead));
//! assert!(EventStatus::Skipped.is_finished());
//! ```
#![warn(missing_docs)]

use std::{fmt, str::FromStr};

/// Declares a text-backed state enum: `as_str`, `Display`, `FromStr`, `ALL`.
macro_rules! text_states {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$variant_meta:meta])* $variant:ident = $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type, serde::Serialize, serde::Deserialize)]
        #[sqlx(type_name = "text", rename_all = "snake_case")]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$variant_meta])* $variant ),+
        }

        impl $name {
            /// Every state, in the order the contract lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database and shown to operators.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownState {
                        kind: stringify!($name),
                        text: text.to_owned(),
                    }),
                }
            }
        }
    };
}

/// A text that names no state of its kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not one of the {kind} values")]
pub struct UnknownState {
    kind: &'static str,
    text: String,
}

text_states! {
    /// `inbox_events.status`.
    pub enum EventStatus {
        /// Stored, never tried.
        Pending = "pending",
        /// Claimed by a worker under a lease.
        Processing = "processing",
        /// Failed; due again at `next_attempt_at`.
        Retrying = "retrying",
        /// The handler succeeded.
        Succeeded = "succeeded",
        /// Gave up: only a replay runs it again.
        Dead = "dead",
        /// Ended without running a handler (no route, stale, or skipped by an operator).
        Skipped = "skipped",
    }
}

impl EventStatus {
    /// Whether the event has ended (`processed_at` is set): `succeeded`, `dead` or `skipped`.
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Skipped)
    }
}

text_states! {
    /// `inbox_attempts.outcome`.
    pub enum AttemptOutcome {
        /// The handler succeeded; the event is `succeeded`.
        Succeeded = "succeeded",
        /// Failed; the event is `retrying`.
        Retry = "retry",
        /// Failed for good; the event is `dead`.
        Dead = "dead",
        /// The worker did not finish within its lease; rescue ended the attempt.
        LeaseExpired = "lease_expired",
        /// No handler ran; the event is `skipped`.
        Skipped = "skipped",
    }
}

text_states! {
    /// `inbox_deliveries.outcome`.
    pub enum DeliveryOutcome {
        /// A new event was stored.
        Accepted = "accepted",
        /// The key was stored already, with the same payload.
        Duplicate = "duplicate",
        /// The key was stored already, with a different payload: not processed again.
        Conflict = "conflict",
        /// Signature missing, malformed or wrong, or timestamp out of tolerance (403).
        RejectedSignature = "rejected_signature",
        /// The address is not in `allow_ips` (403).
        RejectedIp = "rejected_ip",
        /// The payload lacks what the key or type needs (400).
        RejectedPayload = "rejected_payload",
        /// The body is over `max_body_bytes` (413).
        TooLarge = "too_large",
        /// Entered by an operator's import; `reason` says what became of it.
        Imported = "imported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_from_its_text() {
        for status in EventStatus::ALL {
            assert_eq!(status.as_str().parse::<EventStatus>(), Ok(*status));
        }
        for outcome in AttemptOutcome::ALL {
            assert_eq!(outcome.as_str().parse::<AttemptOutcome>(), Ok(*outcome));
        }
        for outcome in DeliveryOutcome::ALL {
            assert_eq!(outcome.as_str().parse::<DeliveryOutcome>(), Ok(*outcome));
        }
    }

    #[test]
    fn serde_uses_the_stored_text() {
        assert_eq!(
            serde_json::to_string(&AttemptOutcome::LeaseExpired).unwrap(),
            "\"lease_expired\""
        );
    }

    #[test]
    fn an_unknown_text_is_refused_by_name() {
        let error = "done".parse::<EventStatus>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "`done` is not one of the EventStatus values"
        );
    }
}
