//! `POST /webhooks/{source}`: the contract's checks in the contract's order,
//! then one write, then the answer.

use std::net::IpAddr;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use super::{
    error::DeliveryError, group_commit::GroupCommit, headers, network, refusals::Refused,
    ReceiverState, SourceRuntime,
};
use crate::{
    event_key::{sha256_hex, EventFields},
    signature::Rejection,
    store::{self, NewDelivery},
};

/// A refused delivery and what is known of its body.
struct Refusal {
    error: DeliveryError,
    payload_sha256: Option<String>,
}

impl From<DeliveryError> for Refusal {
    fn from(error: DeliveryError) -> Self {
        Self {
            error,
            payload_sha256: None,
        }
    }
}

pub async fn receive(
    request: HttpRequest,
    source_name: web::Path<String>,
    body: web::Payload,
    state: web::Data<ReceiverState>,
    group_commit: web::Data<GroupCommit>,
) -> Result<HttpResponse, DeliveryError> {
    let source = state
        .sources
        .get(source_name.as_str())
        .cloned()
        .ok_or(DeliveryError::UnknownSource)?;
    let forwarded_for: Vec<&str> = request
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|value| value.to_str().ok())
        .collect();
    let client = network::client_address(
        request.peer_addr().map(|a| a.ip()),
        &forwarded_for,
        &state.trusted_proxies,
    );

    match accept(&request, body, &state, &group_commit, &source, client).await {
        Ok(response) => Ok(response),
        Err(refusal) => {
            let (outcome, reason) = refusal.error.outcome_and_reason();
            metrics::counter!("hookbox_deliveries_total", "source" => source.source.name.clone(), "outcome" => outcome).increment(1);
            metrics::counter!("hookbox_rejections_total", "source" => source.source.name.clone(), "reason" => reason).increment(1);
            if let DeliveryError::Unavailable(error) = &refusal.error {
                tracing::error!(source = %source.source.name, error = format!("{error:#}"), "delivery not stored: database unavailable");
            } else {
                if refusal.error.spends_refusal_allowance() {
                    source.limits.refused(client);
                }
                tracing::debug!(source = %source.source.name, outcome, reason, "delivery refused");
                let refused = Refused {
                    source: &source.source.name,
                    remote_addr: client,
                    outcome,
                    reason,
                    payload_sha256: refusal.payload_sha256.as_deref(),
                    status_code: actix_web::ResponseError::status_code(&refusal.error).as_u16(),
                    may_detail: refusal.error.audit().is_some(),
                };
                // A detailed refusal is answered once its row is written, as
                // before; if that takes too long the refusal stands anyway: a
                // 503 would only invite the sender to retry a bad request.
                if let Some(written) = state.refusals.record(&refused) {
                    let _ = tokio::time::timeout(state.request_timeout, written).await;
                }
            }
            Err(refusal.error)
        }
    }
}

async fn accept(
    request: &HttpRequest,
    body: web::Payload,
    state: &ReceiverState,
    group_commit: &GroupCommit,
    runtime: &SourceRuntime,
    client: Option<IpAddr>,
) -> Result<HttpResponse, Refusal> {
    let source = &runtime.source;
    // First of all, before the body is read: an address that keeps sending
    // what is refused is throttled.
    if let Err(retry_after_secs) = runtime.limits.check_throttled(client) {
        metrics::counter!("hookbox_rate_limited_total", "source" => source.name.clone())
            .increment(1);
        return Err(DeliveryError::RefusalsOverLimit { retry_after_secs }.into());
    }
    if !network::is_allowed(client, &source.allow_ips) {
        return Err(DeliveryError::AddressNotAllowed.into());
    }
    let deadline = tokio::time::Instant::now() + state.request_timeout;
    let body = read_body(request, body, state.max_body_bytes, deadline).await?;
    let payload_sha256 = sha256_hex(&body);
    let refuse = |error: DeliveryError| Refusal {
        error,
        payload_sha256: Some(payload_sha256.clone()),
    };

    let headers = request.headers();
    let now = chrono::Utc::now().timestamp();
    if let Err(rejection) =
        source
            .scheme
            .verify(&source.keys, headers, &body, now, source.tolerance)
    {
        let other_environment = rejection == Rejection::SignatureMismatch
            && !runtime.foreign_keys.is_empty()
            && source
                .scheme
                .verify(&runtime.foreign_keys, headers, &body, now, source.tolerance)
                .is_ok();
        if other_environment {
            tracing::warn!(
                source = %source.name,
                environment = %source.environment,
                "signature made with the key of a source in another environment: check which key the sender uses"
            );
            return Err(refuse(DeliveryError::WrongEnvironment));
        }
        return Err(refuse(DeliveryError::Signature(rejection)));
    }
    // Only deliveries that verify spend the source's allowance: forged
    // traffic cannot use up the real sender's.
    if let Err(retry_after_secs) = runtime.limits.check_verified(client) {
        metrics::counter!("hookbox_rate_limited_total", "source" => source.name.clone())
            .increment(1);
        return Err(refuse(DeliveryError::RateLimited { retry_after_secs }));
    }

    let fields = EventFields::extract(
        &source.event_key,
        source.event_type.as_ref(),
        source.ordering.as_ref(),
        &body,
        &payload_sha256,
        headers,
    )
    .map_err(|e| refuse(e.into()))?;

    let delivery = NewDelivery {
        source: source.name.clone(),
        environment: source.environment.clone(),
        event_key: fields.event_key,
        event_type: fields.event_type,
        ordering: fields.ordering,
        payload_is_json: fields.json_text.is_some(),
        payload: body.to_vec(),
        headers: headers::stored_headers(
            request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
            &runtime.private_headers,
        ),
        payload_sha256: payload_sha256.clone(),
        remote_addr: client,
    };
    let started = std::time::Instant::now();
    let (outcome, event_id) = group_commit
        .store(delivery, deadline)
        .await
        .map_err(|e| refuse(DeliveryError::Unavailable(e.into())))?;
    metrics::histogram!("hookbox_ingest_seconds", "source" => source.name.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("hookbox_deliveries_total", "source" => source.name.clone(), "outcome" => outcome.as_str()).increment(1);
    match outcome {
        store::IngestOutcome::Conflict => tracing::warn!(
            source = %source.name, %event_id,
            "event key already stored with a different payload: not processed again"
        ),
        _ => {
            tracing::info!(source = %source.name, %event_id, outcome = outcome.as_str(), "delivery stored")
        }
    }
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "status": outcome.as_str(), "event_id": event_id })))
}

/// Reads the body, refusing it as soon as it is known to be over the limit.
async fn read_body(
    request: &HttpRequest,
    mut body: web::Payload,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<web::Bytes, DeliveryError> {
    let declared = request
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(DeliveryError::TooLarge);
    }
    let read = async {
        let mut bytes = web::BytesMut::with_capacity(declared.map_or(8192, |l| l as usize));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|_| DeliveryError::BodyUnreadable)?;
            if bytes.len() + chunk.len() > limit {
                return Err(DeliveryError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| DeliveryError::BodyTimeout)?
}

/// Shared by the source's runtime: built once at start.
pub(super) fn private_headers(runtime_source: &crate::config::Source) -> Vec<String> {
    runtime_source
        .scheme
        .signature_headers()
        .into_iter()
        .map(str::to_ascii_lowercase)
        .collect()
}
