//! hookbox's integration tests: one binary, a real PostgreSQL.

mod alerts;
mod brokers;
mod cli;
mod console;
mod faults;
mod flow;
mod group_commit;
mod hardening;
mod observability;
mod operations;
mod partitions;
mod providers;
mod receiver;
mod reconcile;
mod resilience;
mod safeguards;
mod support;
mod worker;
