//! `kind = "redis"`: `XADD` to a stream; the reply (the entry's id) is the
//! confirmation. Each entry carries the event id as a field, so a consumer
//! recognises an entry repeated by a retry.

use std::time::Duration;

use ::redis::{aio::MultiplexedConnection, AsyncConnectionConfig, RedisError};
use async_trait::async_trait;

use super::broker::{Connection, Failed};
use crate::{
    config::BrokerConfig,
    secret::Secret,
    worker::handler::{Event, ExternalHandler, HandlerError},
};

pub struct RedisHandler {
    url: Secret,
    stream: String,
    max_len: Option<u64>,
    timeout: Duration,
    connection: Connection<MultiplexedConnection>,
}

impl RedisHandler {
    pub fn new(config: &BrokerConfig, stream: &str, max_len: Option<u64>) -> Self {
        Self {
            url: config.url.clone(),
            stream: stream.to_owned(),
            max_len,
            timeout: config.timeout,
            connection: Connection::default(),
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, HandlerError> {
        let url = std::str::from_utf8(self.url.expose()).expect("checked at load");
        let client = ::redis::Client::open(url)
            .map_err(|_| HandlerError::retryable("the Redis URL is not valid"))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| {
                HandlerError::retryable(format!("cannot connect to Redis: {}", describe(&e)))
            })
    }

    /// `XADD stream [MAXLEN ~ n] * event_id … type … source … attempt … payload …`
    fn command(&self, event: &Event) -> ::redis::Cmd {
        let mut command = ::redis::cmd("XADD");
        command.arg(&self.stream);
        if let Some(max_len) = self.max_len {
            command.arg("MAXLEN").arg("~").arg(max_len);
        }
        command
            .arg("*")
            .arg("event_id")
            .arg(event.id.to_string())
            .arg("type")
            .arg(event.event_type.as_deref().unwrap_or(""))
            .arg("source")
            .arg(&event.source)
            .arg("attempt")
            .arg(event.attempt)
            .arg("payload")
            .arg(&event.payload[..]);
        command
    }
}

#[async_trait]
impl ExternalHandler for RedisHandler {
    /// Publishes are cheap to make at once: a batch publishes together and
    /// awaits its confirmations together.
    fn completes_as_a_batch(&self) -> bool {
        true
    }

    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let command = self.command(event);
        self.connection
            .publish(
                self.timeout,
                |_| true,
                || self.connect(),
                |connection| async move {
                    let mut connection = MultiplexedConnection::clone(&connection);
                    command
                        .query_async::<String>(&mut connection)
                        .await
                        .map(drop)
                        .map_err(|e| {
                            let broken = e.is_io_error()
                                || e.is_connection_dropped()
                                || e.is_connection_refusal()
                                || e.is_timeout()
                                || e.is_unrecoverable_error();
                            let message = format!("XADD failed: {}", describe(&e));
                            if broken {
                                Failed::broken(message)
                            } else {
                                Failed::refused(message)
                            }
                        })
                },
            )
            .await
    }
}

/// The error without anything that could come from the URL: connection
/// failures by their kind, the server's own refusals by their text.
fn describe(error: &RedisError) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connection_refusal() {
        "connection refused".into()
    } else if error.is_io_error() || error.is_connection_dropped() {
        "the connection broke".into()
    } else {
        error.to_string()
    }
}
