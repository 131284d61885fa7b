//! The built-in handlers.

pub mod amqp;
pub mod broker;
pub mod exec;
pub mod http;
pub mod nats;
pub mod redis;
pub mod sql;
