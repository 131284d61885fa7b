//! `hookbox-receiver`: serves until SIGTERM or Ctrl-C, then drains in-flight requests.

use std::process::ExitCode;

use crate::{db::PoolSettings, receiver};

pub fn main() -> ExitCode {
    super::process::serve(
        "hookbox-receiver",
        "Receive, verify and store webhooks",
        crate::config::ProcessRole::Receiver,
        PoolSettings::receiver,
        |config, pool, shutdown| async move { receiver::run(&config, pool, shutdown).await },
    )
}
