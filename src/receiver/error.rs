//! Every way a delivery can fail, and the one place that turns each into the
//! contract's status and body. Internal detail goes to the log, never the client.

use actix_web::{http::StatusCode, HttpResponse, ResponseError};

use crate::{event_key::ExtractError, signature::Rejection};

/// Seconds a sender should wait after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("unknown source")]
    UnknownSource,
    #[error("address not allowed")]
    AddressNotAllowed,
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("too many refused requests from this address")]
    RefusalsOverLimit { retry_after_secs: u64 },
    #[error("body over the size limit")]
    TooLarge,
    #[error("signature refused: {}", .0.reason())]
    Signature(Rejection),
    #[error("signature made with the key of another environment")]
    WrongEnvironment,
    #[error("payload refused: {0}")]
    Payload(#[from] ExtractError),
    #[error("body not received in time")]
    BodyTimeout,
    #[error("body could not be read")]
    BodyUnreadable,
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
}

impl DeliveryError {
    /// `(outcome, reason)` for the audit row and the metrics.
    pub fn outcome_and_reason(&self) -> (&'static str, &'static str) {
        match self {
            Self::UnknownSource => ("unknown_source", "unknown_source"),
            Self::AddressNotAllowed => ("rejected_ip", "address_not_allowed"),
            Self::RateLimited { .. } => ("rate_limited", "rate_limited"),
            Self::RefusalsOverLimit { .. } => ("rate_limited", "refusals_over_limit"),
            Self::TooLarge => ("too_large", "body_too_large"),
            Self::Signature(rejection) => ("rejected_signature", rejection.reason()),
            Self::WrongEnvironment => ("rejected_signature", "wrong_environment"),
            Self::Payload(error) => ("rejected_payload", error.reason()),
            Self::BodyTimeout => ("timed_out", "body_timeout"),
            Self::BodyUnreadable => ("rejected_payload", "body_unreadable"),
            Self::Unavailable(_) => ("unavailable", "database_unavailable"),
        }
    }

    /// The detailed audit row a refused delivery may leave (the first few per
    /// minute; every refusal is counted). Rate-limited, timed-out and
    /// unknown-source requests leave none, nor does an unavailable database
    /// (it cannot take one).
    pub fn audit(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::AddressNotAllowed
            | Self::TooLarge
            | Self::Signature(_)
            | Self::WrongEnvironment
            | Self::Payload(_) => Some(self.outcome_and_reason()),
            _ => None,
        }
    }

    /// Whether the refusal spends the client address's refusal allowance:
    /// everything the client caused (not a 404, a 429 or a 503).
    pub fn spends_refusal_allowance(&self) -> bool {
        !matches!(
            self,
            Self::UnknownSource
                | Self::RateLimited { .. }
                | Self::RefusalsOverLimit { .. }
                | Self::Unavailable(_)
        )
    }

    fn detail(&self) -> String {
        match self {
            Self::UnknownSource => "Not Found".into(),
            Self::AddressNotAllowed => "Forbidden".into(),
            Self::RateLimited { .. } | Self::RefusalsOverLimit { .. } => "Too Many Requests".into(),
            Self::TooLarge => "Payload Too Large".into(),
            Self::Signature(_) | Self::WrongEnvironment => "Validation Failure".into(),
            // Names the field, never echoes the payload.
            Self::Payload(error) => error.to_string(),
            Self::BodyTimeout => "Request Timeout".into(),
            Self::BodyUnreadable => "Bad Request".into(),
            Self::Unavailable(_) => "Service Unavailable".into(),
        }
    }
}

impl ResponseError for DeliveryError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::UnknownSource => StatusCode::NOT_FOUND,
            Self::AddressNotAllowed | Self::Signature(_) | Self::WrongEnvironment => {
                StatusCode::FORBIDDEN
            }
            Self::RateLimited { .. } | Self::RefusalsOverLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Payload(_) | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            Self::RateLimited { retry_after_secs }
            | Self::RefusalsOverLimit { retry_after_secs } => {
                response.insert_header(("Retry-After", retry_after_secs.to_string()));
            }
            Self::Unavailable(_) => {
                response.insert_header(("Retry-After", UNAVAILABLE_RETRY_AFTER_SECS.to_string()));
            }
            _ => {}
        }
        response.json(serde_json::json!({ "detail": self.detail() }))
    }
}

/// The body of a status the router itself produces (unknown path, wrong method).
pub fn detail_response(status: StatusCode, detail: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "detail": detail }))
}
