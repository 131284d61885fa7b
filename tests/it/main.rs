//! hookbox's integration tests: one binary, a real PostgreSQL.

mod brokers;
mod cli;
mod faults;
mod group_commit;
mod observability;
mod operations;
mod providers;
mod receiver;
mod resilience;
mod safeguards;
mod support;
mod worker;
