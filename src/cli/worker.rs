//! `hookbox-worker`: processes stored events until SIGTERM or Ctrl-C, then
//! stops gracefully.

use std::process::ExitCode;

use crate::{
    db::PoolSettings,
    worker::{self, LibraryHandlers},
};

pub fn main() -> ExitCode {
    super::process::serve(
        "hookbox-worker",
        "Process stored webhook events",
        PoolSettings::worker,
        |config, pool, shutdown| async move {
            worker::run(&config, pool, LibraryHandlers::default(), shutdown).await
        },
    )
}
