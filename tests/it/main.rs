//! hookbox's integration tests: one binary, a real PostgreSQL.

mod cli;
mod faults;
mod group_commit;
mod hardening;
mod observability;
mod operations;
mod providers;
mod receiver;
mod resilience;
mod safeguards;
mod support;
mod worker;
