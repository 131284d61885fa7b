//! `kind = "http"`: POST the raw payload downstream.

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    secret::Secret,
    signature::Scheme,
    worker::handler::{Event, ExternalHandler, HandlerError},
};

/// POSTs the raw payload downstream with `Idempotency-Key: <event id>`.
pub struct HttpHandler {
    client: reqwest::Client,
    url: String,
    permanent_statuses: Vec<u16>,
    signing_key: Option<Secret>,
}

impl HttpHandler {
    /// A handler for `url`; `signing_key` re-signs with Standard Webhooks.
    pub fn new(
        url: &str,
        timeout: Duration,
        permanent_statuses: &[u16],
        signing_key: Option<Secret>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            url: url.to_owned(),
            permanent_statuses: permanent_statuses.to_vec(),
            signing_key,
        })
    }
}

#[async_trait]
impl ExternalHandler for HttpHandler {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let content_type = if event.payload_json.is_some() {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let id = event.id.to_string();
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", content_type)
            .header("idempotency-key", &id)
            .header("hookbox-event-id", &id)
            .header(
                "hookbox-event-type",
                event.event_type.as_deref().unwrap_or(""),
            )
            .header("hookbox-attempt", event.attempt.to_string())
            .body(event.payload.clone());
        if let Some(key) = &self.signing_key {
            let now = chrono::Utc::now().timestamp();
            for (name, value) in Scheme::StandardWebhooks.sign(key, &event.payload, now, &id) {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else {
                "could not connect"
            };
            HandlerError::retryable(format!("downstream {what}"))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let message = format!("downstream answered HTTP {}", status.as_u16());
        if self.permanent_statuses.contains(&status.as_u16()) {
            return Err(HandlerError::permanent(message));
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        Err(HandlerError::Retryable {
            message,
            retry_after,
        })
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
