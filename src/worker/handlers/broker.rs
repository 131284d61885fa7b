//! What the broker handlers (`nats`, `amqp`, `redis`) share: one connection
//! per handler, made on first use and made again after a failure, and the
//! deadline that bounds connecting, publishing and the broker's confirmation.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    config::{BrokerConfig, BrokerTarget},
    worker::handler::{Event, ExternalHandler, HandlerError},
};

use super::{amqp::AmqpHandler, nats::NatsHandler, redis::RedisHandler};

/// Header (NATS, AMQP) and field names every forwarded message carries, besides
/// the broker's own dedup id. Never the event key: it may hold a user id.
pub const EVENT_ID: &str = "hookbox-event-id";
pub const EVENT_TYPE: &str = "hookbox-event-type";
pub const SOURCE: &str = "hookbox-source";
pub const ATTEMPT: &str = "hookbox-attempt";

/// The handler for a checked broker table.
pub fn build(config: &BrokerConfig) -> Arc<dyn ExternalHandler> {
    match &config.target {
        BrokerTarget::Nats { subject } => Arc::new(NatsHandler::new(config, subject)),
        BrokerTarget::Amqp {
            exchange,
            routing_key,
        } => Arc::new(AmqpHandler::new(config, exchange, routing_key)),
        BrokerTarget::Redis { stream, max_len } => {
            Arc::new(RedisHandler::new(config, stream, *max_len))
        }
    }
}

/// The content type a forwarded payload is labelled with.
pub fn content_type(event: &Event) -> &'static str {
    if event.payload_json.is_some() {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

/// A failed publish, and whether the connection it used should be dropped
/// (so the next publish connects anew) rather than reused.
pub struct Failed {
    pub error: HandlerError,
    pub broken: bool,
}

impl Failed {
    /// A failure that says nothing bad about the connection (a refusal by the broker).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            error: HandlerError::retryable(message),
            broken: false,
        }
    }

    /// A failure of the connection itself.
    pub fn broken(message: impl Into<String>) -> Self {
        Self {
            error: HandlerError::retryable(message),
            broken: true,
        }
    }
}

/// One connection per handler, shared by its concurrent publishes. Made on
/// first use, not at start, so a worker starts while a broker is away; made
/// again on the first publish after one failed in a way that broke it.
pub struct Connection<C> {
    current: Mutex<Option<Arc<C>>>,
    /// Held while connecting, so a failure makes one new connection, not one
    /// per waiting publish.
    connecting: tokio::sync::Mutex<()>,
}

impl<C> Default for Connection<C> {
    fn default() -> Self {
        Self {
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }
}

impl<C> Connection<C> {
    fn usable(&self, usable: &impl Fn(&C) -> bool) -> Option<Arc<C>> {
        let current = self.current.lock().expect("not poisoned");
        current.as_ref().filter(|c| usable(c)).cloned()
    }

    /// The current connection while `usable` says it still is; otherwise a new one.
    pub async fn get<F, Fut>(
        &self,
        usable: impl Fn(&C) -> bool,
        connect: F,
    ) -> Result<Arc<C>, HandlerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, HandlerError>>,
    {
        if let Some(connection) = self.usable(&usable) {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        // Another publish may have connected while this one waited.
        if let Some(connection) = self.usable(&usable) {
            return Ok(connection);
        }
        let old = self.current.lock().expect("not poisoned").take();
        drop(old);
        let connection = Arc::new(connect().await?);
        *self.current.lock().expect("not poisoned") = Some(connection.clone());
        Ok(connection)
    }

    /// Drops `broken` if it is still the current connection.
    pub fn discard(&self, broken: &Arc<C>) {
        let mut current = self.current.lock().expect("not poisoned");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            *current = None;
        }
    }

    /// Gets a connection and runs `publish` on it, all within `timeout`. A
    /// timeout, or a failure that broke the connection, drops it.
    pub async fn publish<Conn, ConnFut, Pub, PubFut>(
        &self,
        timeout: Duration,
        usable: impl Fn(&C) -> bool,
        connect: Conn,
        publish: Pub,
    ) -> Result<(), HandlerError>
    where
        Conn: FnOnce() -> ConnFut,
        ConnFut: Future<Output = Result<C, HandlerError>>,
        Pub: FnOnce(Arc<C>) -> PubFut,
        PubFut: Future<Output = Result<(), Failed>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = |what: &str| {
            HandlerError::retryable(format!("{what} took longer than the timeout ({timeout:?})"))
        };
        let connection = tokio::time::timeout_at(deadline, self.get(usable, connect))
            .await
            .map_err(|_| timed_out("connecting to the broker"))??;
        match tokio::time::timeout_at(deadline, publish(connection.clone())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failed)) => {
                if failed.broken {
                    self.discard(&connection);
                }
                Err(failed.error)
            }
            Err(_) => {
                self.discard(&connection);
                Err(timed_out(
                    "publishing and waiting for the broker's confirmation",
                ))
            }
        }
    }
}
