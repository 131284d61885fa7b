//! The built-in handlers.

pub mod exec;
pub mod http;
pub mod sql;
