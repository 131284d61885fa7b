//! `kind = "amqp"`: a persistent, mandatory publish on a channel in confirm
//! mode. It counts once the broker has confirmed it; a nack, or the return of
//! a message no queue took, is a failure. `message_id` is the event id.

use std::time::Duration;

use async_trait::async_trait;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, ConnectionProperties,
};

use super::broker::{self, Connection, Failed};
use crate::{
    config::BrokerConfig,
    secret::Secret,
    worker::handler::{Event, ExternalHandler, HandlerError},
};

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// A connection and the one channel, in confirm mode, that publishes on it.
pub struct Session {
    connection: lapin::Connection,
    channel: Channel,
}

impl Session {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

pub struct AmqpHandler {
    url: Secret,
    exchange: String,
    routing_key: String,
    timeout: Duration,
    session: Connection<Session>,
}

impl AmqpHandler {
    pub fn new(config: &BrokerConfig, exchange: &str, routing_key: &str) -> Self {
        Self {
            url: config.url.clone(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            timeout: config.timeout,
            session: Connection::default(),
        }
    }

    async fn connect(&self) -> Result<Session, HandlerError> {
        let url = std::str::from_utf8(self.url.expose()).expect("checked at load");
        let properties =
            ConnectionProperties::default().with_connection_name("hookbox-worker".into());
        let connection = lapin::Connection::connect(url, properties)
            .await
            .map_err(|e| {
                HandlerError::retryable(format!("cannot connect to AMQP: {}", describe(&e)))
            })?;
        let channel = connection.create_channel().await.map_err(|e| {
            HandlerError::retryable(format!("cannot open an AMQP channel: {}", describe(&e)))
        })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| {
                HandlerError::retryable(format!(
                    "cannot turn on publisher confirms: {}",
                    describe(&e)
                ))
            })?;
        Ok(Session {
            connection,
            channel,
        })
    }

    fn properties(event: &Event) -> BasicProperties {
        let id = event.id.to_string();
        let event_type = event.event_type.as_deref().unwrap_or("");
        let mut headers = FieldTable::default();
        for (name, value) in [
            (broker::EVENT_ID, id.as_str()),
            (broker::EVENT_TYPE, event_type),
            (broker::SOURCE, event.source.as_str()),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        headers.insert(broker::ATTEMPT.into(), AMQPValue::LongInt(event.attempt));
        let properties = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_delivery_mode(PERSISTENT)
            .with_content_type(broker::content_type(event).into())
            .with_app_id("hookbox".into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        match &event.event_type {
            Some(event_type) => properties.with_type(event_type.as_str().into()),
            None => properties,
        }
    }
}

#[async_trait]
impl ExternalHandler for AmqpHandler {
    /// Publishes are cheap to make at once: a batch publishes together and
    /// awaits its confirmations together.
    fn completes_as_a_batch(&self) -> bool {
        true
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let properties = Self::properties(event);
        self.session
            .publish(
                self.timeout,
                Session::usable,
                || self.connect(),
                |session| async move {
                    let options = BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    };
                    let confirmation = session
                        .channel
                        .basic_publish(
                            self.exchange.as_str().into(),
                            self.routing_key.as_str().into(),
                            options,
                            &event.payload,
                            properties,
                        )
                        .await
                        .map_err(|e| Failed::broken(format!("cannot publish: {}", describe(&e))))?
                        .await
                        .map_err(|e| {
                            Failed::broken(format!(
                                "no confirmation from the broker: {}",
                                describe(&e)
                            ))
                        })?;
                    self.confirmed(confirmation)
                },
            )
            .await
    }
}

impl AmqpHandler {
    /// Only a plain ack is a success. A nack, or a message returned because
    /// no queue is bound for it, is retried: an operator may fix the binding.
    fn confirmed(&self, confirmation: Confirmation) -> Result<(), Failed> {
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(Failed::refused(format!(
                    "the broker returned the message ({} {}): no queue is bound to exchange {} for routing key \"{}\"",
                    returned.reply_code, returned.reply_text, self.exchange, self.routing_key
                )))
            }
            Confirmation::Nack(None) => Err(Failed::refused(
                "the broker refused the message (nack)",
            )),
            Confirmation::NotRequested => Err(Failed::broken(
                "the channel is not in confirm mode; reconnecting",
            )),
        }
    }
}

/// What went wrong, from the error's kind: never the URL or credentials.
fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::IOError(e) => format!("{}", e.kind()),
        lapin::ErrorKind::ProtocolError(e) => e.to_string(),
        lapin::ErrorKind::MissingHeartbeatError => "the broker stopped sending heartbeats".into(),
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidConnectionState(_) => {
            "the connection is closed".into()
        }
        _ => error.to_string(),
    }
}
