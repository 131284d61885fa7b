//! `kind = "nats"`: a JetStream publish that counts only once the stream has
//! acknowledged it. `Nats-Msg-Id` is the event id, so a retried publish inside
//! the stream's duplicate window is stored once.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{PublishError, PublishErrorKind},
};
use async_trait::async_trait;

use super::broker::{self, Connection, Failed};
use crate::{
    config::BrokerConfig,
    secret::Secret,
    worker::handler::{Event, ExternalHandler, HandlerError},
};

pub struct NatsHandler {
    url: Secret,
    subject: String,
    timeout: Duration,
    /// The client reconnects by itself after a connection drops (publishes
    /// meanwhile time out and are retried); this makes the first connection
    /// lazily, so a worker starts while NATS is away.
    jetstream: Connection<jetstream::Context>,
}

impl NatsHandler {
    pub fn new(config: &BrokerConfig, subject: &str) -> Self {
        Self {
            url: config.url.clone(),
            subject: subject.to_owned(),
            timeout: config.timeout,
            jetstream: Connection::default(),
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, HandlerError> {
        let url = std::str::from_utf8(self.url.expose()).expect("checked at load");
        let client = async_nats::ConnectOptions::new()
            .name("hookbox-worker")
            .connection_timeout(self.timeout)
            .connect(url)
            .await
            // The kind only: the error's details could repeat the address.
            .map_err(|e| {
                HandlerError::retryable(format!("cannot connect to NATS: {}", e.kind()))
            })?;
        let mut context = jetstream::new(client);
        context.set_timeout(self.timeout);
        Ok(context)
    }
}

#[async_trait]
impl ExternalHandler for NatsHandler {
    /// Publishes are cheap to make at once: a batch publishes together and
    /// awaits its confirmations together.
    fn completes_as_a_batch(&self) -> bool {
        true
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let id = event.id.to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert(broker::EVENT_ID, id.as_str());
        headers.insert(
            broker::EVENT_TYPE,
            event.event_type.as_deref().unwrap_or(""),
        );
        headers.insert(broker::SOURCE, event.source.as_str());
        headers.insert(broker::ATTEMPT, event.attempt.to_string().as_str());
        headers.insert("Content-Type", broker::content_type(event));
        let payload = event.payload.clone();
        self.jetstream
            .publish(
                self.timeout,
                |_| true,
                || self.connect(),
                |jetstream| async move {
                    let ack = jetstream
                        .publish_with_headers(self.subject.clone(), headers, payload.into())
                        .await
                        .map_err(|e| classify(&self.subject, e))?;
                    ack.await.map_err(|e| classify(&self.subject, e))?;
                    Ok(())
                },
            )
            .await
    }
}

/// Every failure but an event too large for the server is worth retrying:
/// a stream missing for the subject may be created by an operator, so it is
/// retried (and ends `dead` after `max_attempts` if nobody does).
fn classify(subject: &str, error: PublishError) -> Failed {
    let message = match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            return Failed {
                error: HandlerError::permanent(
                    "the event is larger than the NATS server's max_payload",
                ),
                broken: false,
            }
        }
        PublishErrorKind::StreamNotFound => {
            format!("no JetStream stream takes subject {subject} (create one, or fix the subject)")
        }
        PublishErrorKind::TimedOut => "NATS did not acknowledge the publish in time".into(),
        PublishErrorKind::BrokenPipe => "the connection to NATS broke".into(),
        _ => format!("JetStream refused the publish: {error}"),
    };
    // The client reconnects by itself; the connection is never dropped here.
    Failed::refused(message)
}
